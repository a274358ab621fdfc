"""``projidx serve``: warm look-ups over HTTP (Flask). The store, its checkpoints' weights and the indices stay
loaded, so a query pays only for its own gradients and the search.

Endpoints:

- ``GET /health`` -> ``{"status": "ok", "store": ..., "n": ..., "methods": [...]}``;
- ``POST /query`` with a JSON body ``{"data": DATA spec, "method": ..., "top_k": ..., "query_timesteps": ...,
  "noise_draws": ..., "exact": false, "rerank": null}`` or a multipart form with an ``image`` file (and the same
  fields as form values, plus ``label`` for a class-conditional model) -> the JSON ``projidx query --out`` writes.
  Bad input -> 400 ``{"error": "..."}``.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import torch

from projidx.attribution import Attribution, has_file_names, store_checkpoints, store_dataset
from projidx.data import ImageSet, from_arrays, load_dataset
from projidx.errors import ProjidxError
from projidx.featurization import featurize_queries, load_state_dicts
from projidx.index import SearchIndex, load_index
from projidx.scoring import check_method, default_method, exact_topk, query_vectors
from projidx.store import FeatureStore


class QueryService:
    """A store kept warm: checkpoints' weights, indices (loaded on first use, checked once) and training names."""

    def __init__(self, store_path: str, device: str = "cpu", checkpoints: list[str] | None = None,
                 train_data: str | None = None) -> None:
        """``checkpoints`` and ``train_data``: where the store's checkpoints and training data are now [default:
        where the store records them]."""
        self.store = FeatureStore.open(store_path)
        self.ckpts = store_checkpoints(self.store, checkpoints)
        self.state_dicts = load_state_dicts(self.ckpts)
        self.device = device
        self.names = store_dataset(self.store, train_data) if has_file_names(self.store, train_data) else None
        self.indices: dict[str, SearchIndex] = {}
        self.lock = threading.Lock()  # one gradient computation at a time: the model is shared

    def index(self, method: str) -> SearchIndex:
        if method not in self.indices:
            self.indices[method] = load_index(self.store, method)
        return self.indices[method]

    def query(self, images: ImageSet, method: str | None = None, top_k: int = 10, query_timesteps: int | None = None,
              noise_draws: int | None = None, exact: bool = False, rerank: int | None = None) -> dict:
        """The RESULTS.json of ``images`` (as ``projidx query --out`` writes it)."""
        method = method or default_method(self.store)
        check_method(self.store, method)
        index = None if exact else self.index(method)
        with self.lock:
            start = time.perf_counter()
            qf = featurize_queries(self.store, self.ckpts, images, query_timesteps, noise_draws, device=self.device,
                                   progress=False, state_dicts=self.state_dicts)
            featurized = time.perf_counter() - start
        start = time.perf_counter()
        qv = query_vectors(self.store, qf, method)
        scores, ids = exact_topk(self.store, qv, method, top_k) if exact else index.search(qv, top_k, rerank=rerank)
        result = Attribution(method, top_k, qf.ids, ids, scores,
                             {"featurize_queries": featurized, "search": time.perf_counter() - start},
                             names=self.names.display_names(ids) if self.names is not None else None,
                             query_names=list(images.names) if images.names is not None else None)
        return result.to_json()


def image_from_bytes(payload: bytes, name: str, label: int | None = None) -> ImageSet:
    """One uploaded image file (PNG, JPEG, ...) as an ImageSet named by its file name, with its class ``label``
    (for a class-conditional model) when given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as img:
            gray = img.mode in ("1", "L", "I;16", "I", "F")
            array = np.asarray(img.convert("L" if gray else "RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ProjidxError(f"upload {name!r}: not a readable image") from e
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    data = from_arrays(array[None], None, name=name)
    labels = torch.tensor([label], dtype=torch.int64) if label is not None else None
    return ImageSet(name, data.images, data.ids, names=(name,), labels=labels)


def create_app(service: QueryService):
    """The Flask application serving ``service``."""
    from flask import Flask, jsonify, request

    app = Flask("projidx")

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "store": str(service.store.path), "n": service.store.meta.n,
                        "methods": sorted(service.indices)})

    @app.post("/query")
    def query():
        try:
            if "image" in request.files:
                upload = request.files["image"]
                fields = request.form
                images = image_from_bytes(upload.read(), upload.filename or "upload", _int(fields.get("label")))
            else:
                fields = request.get_json(silent=True)
                if not isinstance(fields, dict) or "data" not in fields:
                    raise ProjidxError('send JSON {"data": DATA spec, ...} or a multipart form with an "image" file')
                images = load_dataset(str(fields["data"]))
            result = service.query(images, fields.get("method") or None, int(fields.get("top_k", 10)),
                                   _int(fields.get("query_timesteps")), _int(fields.get("noise_draws")),
                                   str(fields.get("exact", "false")).lower() in ("1", "true"),
                                   _int(fields.get("rerank")))
        except (ProjidxError, ValueError, TypeError) as e:
            return jsonify({"error": " ".join(str(e).split())}), 400
        return jsonify(result)

    return app


def _int(value) -> int | None:
    return None if value in (None, "", "null") else int(value)
