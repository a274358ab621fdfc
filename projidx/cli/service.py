"""``projidx serve``: warm look-ups over HTTP, built to face a network. The store, its checkpoints' weights and the
indices stay loaded, so a query pays only for its own gradients and the search.

Endpoints (every answer JSON, every failure one line: ``{"error": "..."}`` with a 4xx/5xx status):

- ``GET /health`` -> ``{"status": "ok", "store_uuid", "n", "methods": [what the store scores], "indices_loaded"}``
  (no server paths);
  503 ``{"status": "stale", ...}`` once the store has changed under the service;
- ``POST /query`` -> the JSON ``projidx query --out`` writes, for images sent as
  - a multipart form with one or more ``image`` files (and ``label`` values, one per image, for a
    class-conditional model; ``prompt`` values, one for all images or one per image, for a text-to-image
    pipeline), the other fields as form values; or
  - a JSON body ``{"images": [{"name": ..., "base64": ..., "label": ..., "prompt": ...}], "prompt": ..., ...}``
    (a top-level ``prompt`` for every image without its own); or, where the operator allows it,
    ``{"data": DATA, "prompt": ..., ...}`` naming a regular file under ``ServeLimits.data_root`` (relative to it)
    or a built-in data set (``ServeLimits.builtin_data``). A prompt has at most ``ServeLimits.max_prompt_chars``
    characters.

  The other fields: ``method``, ``top_k`` (<= n), ``query_timesteps`` (<= T), ``noise_draws``, ``exact``,
  ``rerank``; defaults as for ``projidx query``.

What a client cannot do (ServeLimits holds the operator's bounds):

- make the server open a file it was not given: no path is read unless it resolves (links followed) to a regular
  file under the data root, and a missing, outside, linked-out or special file gets one and the same answer;
- exhaust it: the body is capped (``max_upload_bytes``), images per request, noise draws and the gradient
  evaluations a request holds the model for (``max_gradients``) are capped, an image's header is checked against
  the store's image size before any pixel is decoded, and a request waits at most ``timeout`` for the model;
- get a stale or mixed answer: the store is pinned by its uuid and metadata digest, read again before and after
  every request; a store deleted, re-featurized or edited under the service is refused (503), never served. It is
  refused rather than reloaded: the new store may still be being written, the ``--checkpoints`` / ``--train-data``
  the operator gave belong to the old one, and one process then answers from one store for its whole life (an
  orchestrator restarts it when ``/health`` turns 503). Each index is checked against the pin on every use.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from projidx.data.datasets import (
    BUILTIN,
    GRAY_MODES,
    IMAGE_SUFFIXES,
    ImageSet,
    concat,
    from_arrays,
    load_dataset,
    with_prompt,
)
from projidx.errors import ProjidxError, one_line
from projidx.features.featurization import featurize_queries, load_state_dicts, query_defaults
from projidx.search.attribution import Attribution, has_file_names, search_report, store_checkpoints, store_dataset
from projidx.search.index import SearchIndex, load_index, store_digest
from projidx.search.scoring import check_method, default_method, exact_topk, query_vectors, scorable_methods
from projidx.settings import ServeLimits
from projidx.store.feature_store import FeatureStore
from projidx.store.locations import ROOT, Location

DATA_SUFFIXES = (*IMAGE_SUFFIXES, ".npz", ".npy")  # what a request may name under the data root
QUERY_FIELDS = ("method", "top_k", "query_timesteps", "noise_draws", "exact", "rerank")
TOKEN_ENV = "PROJIDX_SERVE_TOKEN"
SERVE_MAX_PIXELS = 1 << 24  # an uploaded image's header declaring more pixels is refused before decoding


class Unavailable(ProjidxError):
    """A sound request that cannot be answered now (HTTP 503): the model stayed busy past the timeout, or the
    store changed under the service."""


@dataclass(frozen=True)
class StorePin:
    """What identifies the store a service answers from: its uuid (new at each creation) and its metadata digest
    (any edit of the metadata changes it)."""

    uuid: str | None
    digest: str | None


def read_pin(location: Location) -> StorePin | None:
    """The pin of the store at ``location`` as its root metadata says now (one small read), or None if there is no
    readable store there."""
    try:
        attrs = json.loads((location / ROOT).read_text())["attributes"]["projidx"]
        return StorePin(attrs.get("uuid"), attrs.get("digest"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class QueryService:
    """A store kept warm and pinned: checkpoints' weights, indices (loaded on first use, checked against the pin
    on every use) and training names; requests bounded by ``limits``."""

    def __init__(self, store_path: str, device: str = "cpu", checkpoints: list[str] | None = None,
                 train_data: str | None = None, limits: ServeLimits = ServeLimits(), base: str | None = None) -> None:
        """``checkpoints``, ``base`` and ``train_data``: where the store's checkpoints, a LoRA store's base model and
        the training data are now [default: where the store records them]."""
        self.store = FeatureStore.open(store_path)
        self.pin = StorePin(self.store.uuid, store_digest(self.store))
        self.ckpts = store_checkpoints(self.store, checkpoints, base)
        self.state_dicts = load_state_dicts(self.ckpts)
        self.device = device
        self.names = store_dataset(self.store, train_data) if has_file_names(self.store, train_data) else None
        self.limits = limits
        self.data_root = Path(limits.data_root).resolve(strict=True) if limits.data_root is not None else None
        if self.data_root is not None and not self.data_root.is_dir():
            raise ProjidxError(f"data_root {limits.data_root}: not a directory")
        self.indices: dict[str, SearchIndex] = {}
        self.methods = scorable_methods(self.store)  # what /health lists before any query
        self.index_lock = threading.Lock()  # each index is loaded once
        self.model_lock = threading.Lock()  # one gradient computation at a time: the model is shared
        self.check_pinned()  # the store did not change between opening it and reading its pin

    # ---- the pinned store ----------------------------------------------------------------------------
    def check_pinned(self) -> None:
        """Unavailable unless the store at the served path is still the one loaded (same uuid and digest)."""
        if read_pin(self.store.path) != self.pin:
            raise Unavailable("the store changed since this service started (deleted, re-featurized or edited); it"
                              " is not served: restart projidx serve to serve the new store")

    def index(self, method: str) -> SearchIndex:
        """The ``method`` index of the pinned store (its sidecar names the pin's uuid and digest)."""
        with self.index_lock:
            if method not in self.indices:
                self.indices[method] = load_index(self.store, method)
            index = self.indices[method]
        if (index.sidecar or {}).get("store_uuid") != self.pin.uuid \
                or (index.sidecar or {}).get("store_digest") != self.pin.digest:
            raise Unavailable(f"the {method} index was not built from the served store; restart projidx serve")
        return index

    def redact(self, message: str) -> str:
        """``message`` without the server's paths (store, index, data root, checkpoints), for a client."""
        paths = [str(self.store.path.sibling(".index")), str(self.store.path), str(self.data_root or ""),
                 str(self.ckpts.directory or "")]
        for path, alias in zip(paths, ("<index>", "<store>", "<data-root>", "<checkpoints>"), strict=True):
            message = message.replace(path, alias) if path else message
        return message

    # ---- requests --------------------------------------------------------------------------------------
    def query(self, images: ImageSet, method: str | None = None, top_k: int | None = None,
              query_timesteps: int | None = None, noise_draws: int | None = None, exact: bool = False,
              rerank: int | None = None) -> dict:
        """The RESULTS.json of ``images`` (as ``projidx query --out`` writes it), after checking every argument
        against the store and ``self.limits``: ProjidxError (bad request) or Unavailable (busy, stale store)."""
        n, limits = self.store.meta.n, self.limits
        method = method if method is not None else default_method(self.store)
        check_method(self.store, method)
        top_k = top_k if top_k is not None else min(10, n)
        _check_range("top_k", top_k, 1, n)
        if rerank is not None:
            _check_range("rerank", rerank, top_k, n)
        _check_range("images per request", len(images), 1, limits.max_images)
        if noise_draws is not None:
            _check_range("noise_draws", noise_draws, 1, limits.max_noise_draws)
        grid, draws = query_defaults(self.store.meta, query_timesteps, noise_draws)  # query_timesteps <= T
        gradients = len(images) * len(grid) * draws * len(self.ckpts.checkpoints)
        if gradients > limits.max_gradients:
            raise ProjidxError(f"this request needs {gradients} gradient evaluations (images x query_timesteps x"
                               f" noise_draws x {len(self.ckpts.checkpoints)} checkpoints), the server allows"
                               f" {limits.max_gradients}: send fewer images, timesteps or draws")
        self.check_pinned()
        index = None if exact else self.index(method)
        if not self.model_lock.acquire(timeout=limits.timeout):
            raise Unavailable(f"the model stayed busy for {limits.timeout:g} s; try again")
        try:
            start = time.perf_counter()
            qf = featurize_queries(self.store, self.ckpts, images, query_timesteps, noise_draws, device=self.device,
                                   progress=False, state_dicts=self.state_dicts)
            featurized = time.perf_counter() - start
        finally:
            self.model_lock.release()
        start = time.perf_counter()
        qv = query_vectors(self.store, qf, method)
        scores, ids = exact_topk(self.store, qv, method, top_k) if exact else index.search(qv, top_k, rerank=rerank)
        self.check_pinned()  # nothing read from a store that changed during the request reaches the client
        result = Attribution(method, top_k, qf.ids, ids, scores,
                             {"featurize_queries": featurized, "search": time.perf_counter() - start},
                             names=self.names.display_names(ids) if self.names is not None else None,
                             query_names=list(images.names) if images.names is not None else None,
                             search=search_report(index, rerank))
        return result.to_json()

    def data(self, spec: str) -> ImageSet:
        """The images a request's ``data`` field names: a built-in data set (if the operator allows them) or a
        regular file under the data root (images are checked as uploads are)."""
        if spec in BUILTIN:
            if not self.limits.builtin_data:
                raise ProjidxError(f"data {spec!r}: built-in data sets are not served here; upload images")
            return load_dataset(spec)
        if self.data_root is None:
            raise ProjidxError("data: this server reads no files; upload images (multipart 'image' files, or JSON"
                               ' "images": [{"name", "base64"}])')
        if not spec.lower().endswith(DATA_SUFFIXES):
            raise ProjidxError(f"data {spec!r}: name an image file, an .npz or an .npy under the data root")
        payload = read_under(self.data_root, spec, self.limits.max_upload_bytes)
        if spec.lower().endswith(IMAGE_SUFFIXES):
            return image_from_bytes(payload, Path(spec).name, self.store.meta.image_shape)
        try:
            if spec.lower().endswith(".npy"):
                return from_arrays(np.load(io.BytesIO(payload), allow_pickle=False), None, name=spec)
            with np.load(io.BytesIO(payload), allow_pickle=False) as f:
                return from_arrays(f["images"], None, name=spec)
        except ProjidxError:
            raise
        except Exception as e:  # numpy's zip and format errors name the file's members: not echoed
            raise ProjidxError(f"data {spec!r}: not a readable .npz (with 'images') or .npy") from e


def read_under(root: Path, spec: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``spec`` names relative to ``root`` (an absolute ``spec`` too must lie under
    it), resolved with every link followed and never outside ``root``. A missing file, one outside ``root``, a link
    leading out, a directory or a special file (FIFO, device, socket) all get the same ProjidxError, so a client
    learns nothing about what exists outside the data root. Opened without blocking (a FIFO swapped in after the
    check does not hang a thread); at most ``max_bytes``."""
    refused = ProjidxError(f"data {spec!r}: no such file under the data root")
    try:
        path = (root / spec).resolve(strict=True)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError, RuntimeError):
        raise refused from None
    try:
        info = os.fstat(fd)
        if not path.is_relative_to(root) or not stat.S_ISREG(info.st_mode):
            raise refused
        if info.st_size > max_bytes:
            raise ProjidxError(f"data {spec!r}: larger than the server's {max_bytes}-byte limit")
        with open(fd, "rb", closefd=False) as f:
            return f.read(max_bytes)
    finally:
        os.close(fd)


def image_from_bytes(payload: bytes, name: str, shape: tuple[int, int, int], label: int | None = None,
                     prompt: str | None = None) -> ImageSet:
    """One image file's bytes (PNG, JPEG, ...) as an ImageSet of one image named ``name``, with its class ``label``
    (for a class-conditional model) and its ``prompt`` (for a text-to-image pipeline) when given. ``shape`` (C, H,
    W): the store's images; the file's header is checked against H x W before any pixel is decoded (a small file
    can declare a huge image)."""
    from PIL import Image

    _, h, w = shape
    try:
        with Image.open(io.BytesIO(payload)) as img:  # reads the header only
            width, height = img.size
            if width * height > SERVE_MAX_PIXELS:  # the decompression-bomb guard, whatever PIL's global says
                raise ProjidxError(f"image {name!r}: {width}x{height} pixels, too many (the store's images are"
                                   f" {w}x{h})")
            if (width, height) != (w, h):
                raise ProjidxError(f"image {name!r}: {width}x{height} pixels, the store's images are {w}x{h}")
            img.load()
            array = np.asarray(img.convert("L" if img.mode in GRAY_MODES else "RGB"))
    except ProjidxError:
        raise
    except Image.DecompressionBombError as e:
        raise ProjidxError(f"image {name!r}: too many pixels") from e
    except Exception as e:  # decoders of untrusted bytes raise many types (OSError, SyntaxError, ValueError, ...)
        raise ProjidxError(f"image {name!r}: not a readable image") from e
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    data = from_arrays(array[None], None, name=name)
    labels = torch.tensor([label], dtype=torch.int64) if label is not None else None
    return ImageSet(name, data.images, data.ids, names=(name,), labels=labels,
                    captions=(prompt,) if prompt is not None else None)


def request_images(service: QueryService, request) -> tuple[ImageSet, dict]:
    """The images of a Flask ``request`` and its other fields (multipart form or JSON body, see the module
    docstring)."""
    shape, limits = service.store.meta.image_shape, service.limits
    if request.files:
        fields = request.form.to_dict()
        uploads = request.files.getlist("image")
        labels = request.form.getlist("label")
        prompts = [_prompt(service, p) for p in request.form.getlist("prompt")]
        fields.pop("prompt", None)
        _check_fields(set(fields) | set(request.files), {*QUERY_FIELDS, "image", "label"})
        _check_range("images per request", len(uploads), 1, limits.max_images)
        if labels and len(labels) != len(uploads):
            raise ProjidxError(f"label: give one per image ({len(uploads)}), got {len(labels)}")
        if len(prompts) not in (0, 1, len(uploads)):
            raise ProjidxError(f"prompt: give one for all images or one per image ({len(uploads)}), got"
                               f" {len(prompts)}")
        sets = [image_from_bytes(u.read(limits.max_upload_bytes), u.filename or f"upload-{i}", shape,
                                 _integer("label", labels[i]) if labels else None,
                                 prompts[i if len(prompts) > 1 else 0] if prompts else None)
                for i, u in enumerate(uploads)]
        return _numbered(sets), fields
    fields = request.get_json(silent=True)
    if not isinstance(fields, dict) or ("images" in fields) == ("data" in fields):
        raise ProjidxError('send a multipart form with "image" files, or JSON {"images": [{"name", "base64",'
                           ' "label"}], ...}')
    _check_fields(set(fields), {*QUERY_FIELDS, "images", "data", "prompt"})
    prompt = _prompt(service, fields.pop("prompt", None))
    if "data" in fields:
        if not isinstance(fields["data"], str):
            raise ProjidxError("data must be a string")
        images = service.data(fields["data"])
        _check_range("images per request", len(images), 1, limits.max_images)
        return with_prompt(images, prompt), fields
    entries = fields["images"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ProjidxError('images must be a list of {"name", "base64", "label", "prompt"} objects')
    _check_range("images per request", len(entries), 1, limits.max_images)
    sets = []
    for i, entry in enumerate(entries):
        _check_fields(set(entry), {"name", "base64", "label", "prompt"})
        name = str(entry.get("name") or f"upload-{i}")
        try:
            payload = base64.b64decode(entry.get("base64") or "", validate=True)
        except (binascii.Error, ValueError, TypeError) as e:
            raise ProjidxError(f"image {name!r}: base64 must be the image file's bytes in base64") from e
        own = _prompt(service, entry.get("prompt"))
        sets.append(image_from_bytes(payload, name, shape, _integer("label", entry.get("label")),
                                     own if own is not None else prompt))
    return _numbered(sets), fields


def _prompt(service: QueryService, value) -> str | None:
    """A request's prompt: text of at most ``max_prompt_chars`` characters, for a store whose model has a text
    encoder; None when absent."""
    if value is None:
        return None
    limit = service.limits.max_prompt_chars
    if not isinstance(value, str) or len(value) > limit:
        raise ProjidxError(f"prompt must be text of at most {limit} characters")
    if "text_encoder" not in service.store.meta.encoders:
        raise ProjidxError("prompt: this store's model has no text encoder")
    return value


def _numbered(sets: list[ImageSet]) -> ImageSet:
    """One ImageSet of single uploaded images, with query ids 0 .. M-1 in request order."""
    images = concat("uploads", sets)
    return replace(images, ids=torch.arange(len(images), dtype=torch.int64))


def _check_fields(given: set[str], allowed: set[str]) -> None:
    unknown = sorted(given - allowed)
    if unknown:
        raise ProjidxError(f"unknown field {unknown[0][:40]!r} (expected: {', '.join(sorted(allowed))})")


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        shown = value if abs(value) < 10**12 else "..."
        raise ProjidxError(f"{name} must lie in [{lo}, {hi}] on this server, got {shown}")


def _integer(name: str, value) -> int | None:
    """A request's integer field: a JSON integer or a form string of digits; None when absent. Floats (1e400 is
    inf in JSON), booleans and long strings are refused."""
    if value is None or value in ("", "null"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) <= 12 and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise ProjidxError(f"{name} must be an integer")


def _boolean(name: str, value) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0", ""):
        return value.lower() in ("true", "1")
    raise ProjidxError(f"{name} must be true or false")


def create_app(service: QueryService, token: str | None = None):
    """The Flask application serving ``service``; with a ``token``, every request must carry ``Authorization:
    Bearer TOKEN`` (compared in constant time)."""
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("projidx")
    app.config["MAX_CONTENT_LENGTH"] = service.limits.max_upload_bytes
    expected = f"Bearer {token}".encode() if token is not None else None

    def error(message: str, status: int):
        return jsonify({"error": one_line(ProjidxError(service.redact(" ".join(message.split()))))}), status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):  # 404, 405, 413 (body over MAX_CONTENT_LENGTH), 400 (bad multipart), ...
        return error(f"{e.name}: {e.description}" if e.description else e.name, e.code or 500)

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        if isinstance(e, Unavailable):
            return error(str(e), 503)
        if isinstance(e, ProjidxError):
            return error(str(e), 400)
        if isinstance(e, MemoryError):
            return error("out of memory: send a smaller request", 503)
        app.logger.exception("internal error")
        return error(f"internal error ({type(e).__name__}); see the server's log", 500)

    @app.before_request
    def authorize():
        if expected is not None and not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                                            expected):
            response, status = error("unauthorized: send Authorization: Bearer TOKEN", 401)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response, status
        return None

    @app.get("/health")
    def health():
        body = {"store_uuid": service.pin.uuid, "n": service.store.meta.n, "methods": service.methods,
                "indices_loaded": sorted(service.indices)}
        try:
            service.check_pinned()
        except Unavailable as e:
            return jsonify({"status": "stale", "error": str(e), **body}), 503
        return jsonify({"status": "ok", **body})

    @app.post("/query")
    def query():
        images, fields = request_images(service, request)
        method = fields.get("method")
        if method is not None and not isinstance(method, str):
            raise ProjidxError("method must be a string")
        return jsonify(service.query(images, method or None, _integer("top_k", fields.get("top_k")),
                                     _integer("query_timesteps", fields.get("query_timesteps")),
                                     _integer("noise_draws", fields.get("noise_draws")),
                                     _boolean("exact", fields.get("exact")), _integer("rerank", fields.get("rerank"))))

    return app


def create_server(app, host: str, port: int, limits: ServeLimits):
    """A waitress WSGI server for ``app`` on ``host:port`` (0: any free port; ``server.effective_port`` names it):
    ``limits.threads`` worker threads, bodies over ``limits.max_upload_bytes`` refused from their Content-Length
    before they are buffered, connections idle for ``limits.timeout`` seconds closed, and waitress's own
    refusals (413, malformed HTTP) one-line JSON like the app's. ``server.run()`` serves until ``server.close()``."""
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer
    from waitress.server import create_server as waitress_server
    from waitress.task import ErrorTask

    class JSONErrorTask(ErrorTask):
        def execute(self) -> None:
            e = self.request.error
            body = json.dumps({"error": " ".join(f"{e.reason}: {e.body}".split())}).encode()
            self.status = f"{e.code} {e.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JSONErrorChannel(HTTPChannel):
        error_task_class = JSONErrorTask

    sockets: dict = {}
    server = waitress_server(app, map=sockets, host=host, port=port, threads=limits.threads,
                             channel_timeout=max(1, round(limits.timeout)),
                             max_request_body_size=limits.max_upload_bytes, ident="projidx",
                             clear_untrusted_proxy_headers=True)
    for listener in list(sockets.values()):  # one per address the host resolves to
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = JSONErrorChannel
    return server


def read_token(token_file: str | None) -> str | None:
    """The bearer token: the first line of ``token_file``, else the ``PROJIDX_SERVE_TOKEN`` environment variable,
    else None (no authentication). Never taken from the command line, where other users of the machine see it."""
    if token_file is not None:
        token = Path(token_file).read_text().strip()
        where = f"token file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        where = TOKEN_ENV
        if not token:
            return None
    if len(token) < 16 or not token.isascii() or any(c.isspace() for c in token):
        raise ProjidxError(f"{where}: the token must be at least 16 printable ASCII characters without spaces")
    return token
