"""The end-to-end demo on scikit-learn's digits: train (cached), featurize, index, attribute."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from projidx.analysis.bias import unique_ratio
from projidx.data.datasets import load_dataset
from projidx.features.featurization import FeaturizeConfig, featurize, featurize_queries
from projidx.models.training import TrainConfig, cached_model
from projidx.reports.viz import attribution_grid
from projidx.search.attribution import attribute, training_images
from projidx.search.index import build_index

DEMO_TRAIN = TrainConfig(epochs=30, checkpoints=4, seed=0, loss="mse", lr=1e-3, batch_size=64)
DEMO_FEATURIZE = FeaturizeConfig()  # featurize's defaults (sjlt k=2048, 10 midpoints, shared noise, dtrak)
DEMO_METHODS = ("matched", "retrac", "tracin")  # the default look-up method, then the paper's two
TITLES = {"matched": "Timestep-matched cosine", "retrac": "Diffusion-ReTrac", "tracin": "Diffusion-TracIn"}
DEMO_QUERIES = 8
DEMO_TOP_K = 8


def run_demo(out: Path, cache: str | Path | None = None) -> dict:
    """Run the demo into ``out``: report.json, tracin.png, retrac.png and the store + indices."""
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data = load_dataset("digits:train")
    queries = load_dataset("digits:test").subset(slice(0, DEMO_QUERIES))

    start = time.perf_counter()
    ckpts = cached_model(data, DEMO_TRAIN, cache)
    timings["train_or_cache_s"] = time.perf_counter() - start

    store_path = out / "store.zarr"
    shutil.rmtree(store_path, ignore_errors=True)
    shutil.rmtree(store_path.with_name(store_path.name + ".index"), ignore_errors=True)
    start = time.perf_counter()
    store = featurize(ckpts, data, store_path, DEMO_FEATURIZE)
    timings["featurize_s"] = time.perf_counter() - start
    n_grads = len(data) * len(ckpts.checkpoints) * store.meta.gradients_per_sample

    start = time.perf_counter()
    qfeat = featurize_queries(store, ckpts, queries)
    timings["query_featurize_s"] = time.perf_counter() - start

    results = {}
    for method in DEMO_METHODS:
        start = time.perf_counter()
        build_index(store, method, "Flat")
        timings[f"index_{method}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        res = attribute(store, qfeat, method, DEMO_TOP_K)
        timings[f"search_{method}_s"] = time.perf_counter() - start
        exact = attribute(store, qfeat, method, DEMO_TOP_K, exact=True)
        results[method] = {
            **res.to_json(),
            "unique_ratio": unique_ratio(res.ids),
            "index_matches_exact": bool(np.array_equal(res.ids, exact.ids)),
            "query_labels": [int(i) for i in _digit_labels(queries.ids.numpy())],
            "top_labels": _digit_labels(res.ids).tolist(),
        }
        attribution_grid(out / f"{method}.png", queries.images.numpy(), training_images(store, res.ids, data),
                         res.scores, title=f"{TITLES[method]}: held-out digit (left), top training images by influence",
                         labels=data.display_names(res.ids), query_labels=[str(int(i)) for i in queries.ids])
    summary = {
        "train_samples": len(data),
        "checkpoints": len(ckpts.checkpoints),
        "projector": store.meta.projector.describe(),
        "train_timesteps": f"{store.meta.train_timesteps} {store.meta.timesteps}",
        "featurize_gradients_per_s": n_grads / timings["featurize_s"],
        "store_bytes": store.nbytes_on_disk(),
        **{f"{m}_unique_ratio": results[m]["unique_ratio"] for m in results},
        **{f"{m}_top1_label_match": _label_match(results[m]) for m in results},
        "timings_s": timings,
    }
    report = {"summary": summary, "checkpoint_dir": str(ckpts.directory), "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _digit_labels(ids: np.ndarray) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target[ids]


def _label_match(result: dict) -> float:
    """Share of queries whose top-1 training image shows the same digit (a sanity figure, not a metric)."""
    tops = np.asarray(result["top_labels"])[:, 0]
    return float(np.mean(tops == np.asarray(result["query_labels"])))
