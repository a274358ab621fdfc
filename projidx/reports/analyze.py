"""The ``projidx analyze`` reports: analysis (numbers) + viz (pictures), written as JSON + PNG into a directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from projidx.analysis import bias as analysis
from projidx.data.datasets import Dataset, ImageSet
from projidx.features.featurization import featurize_queries
from projidx.models.checkpoints import CheckpointSet
from projidx.reports import viz
from projidx.search.attribution import attribute, store_checkpoints, store_dataset
from projidx.store.feature_store import FeatureStore


def _label(data: Dataset, row: int) -> str:
    return data.names[row] if data.names is not None else str(int(data.ids[row]))


def _write(out: Path, name: str, payload: dict) -> Path:
    path = out / name
    path.write_text(json.dumps(payload, indent=1))
    return path


def timestep_bias_report(store: FeatureStore, out: Path) -> dict:
    """timestep_bias.json, norm_vs_timestep.png and, in replay mode, norm_scatter.png."""
    out.mkdir(parents=True, exist_ok=True)
    bias = analysis.timestep_bias(store)
    _write(out, "timestep_bias.json", bias)
    viz.norm_vs_timestep(out / "norm_vs_timestep.png", bias)
    if store.meta.train_timesteps == "replay":
        pairs = {cid: store.norms(cid) for cid in store.meta.checkpoint_ids}
        viz.norm_scatter(out / "norm_scatter.png", {c: p[0] for c, p in pairs.items()},
                         {c: p[1] for c, p in pairs.items()})
    return bias


def influence_report(
    store: FeatureStore,
    queries: ImageSet,
    top_k: int,
    out: Path,
    query_timesteps: int = 10,
    noise_draws: int = 4,
    methods: tuple[str, ...] = ("tracin", "retrac"),
    progress: bool = True,
    ckpts: CheckpointSet | None = None,
) -> dict:
    """influence.json (per method: unique ratio, generally influential samples, mechanism correlations) and
    influence_curve.png / appearances_vs_norm.png. Exact top-k (no index needed). ``ckpts``: the store's
    checkpoints [default: read from the directory the store records]."""
    qf = featurize_queries(store, ckpts or store_checkpoints(store), queries, query_timesteps, noise_draws,
                           progress=progress)
    per_method = {}
    for method in methods:
        result = attribute(store, qf, method, top_k, exact=True)
        per_method[method] = {**analysis.influence_stats(result.ids, store), "top_ids": result.ids.tolist()}
    last = store.meta.checkpoint_ids[-1]
    norms = store.norms(last)[0].mean(axis=1)
    out.mkdir(parents=True, exist_ok=True)
    viz.influence_curves(out / "influence_curve.png", per_method)
    viz.appearances_vs_norm(out / "appearances_vs_norm.png",
                            {m: np.asarray(s["counts"]) for m, s in per_method.items()}, norms)
    summary = {m: {"unique_ratio": s["unique_ratio"], "generally_influential": s["generally_influential"]["count"]}
               for m, s in per_method.items()}
    report = {"queries": queries.name, "top_k": top_k, "query_timesteps": query_timesteps,
              "noise_draws": noise_draws, "summary": summary, "methods": per_method}
    _write(out, "influence.json", report)
    return report


def self_influence_report(
    store: FeatureStore,
    out: Path,
    query_timesteps: int = 5,
    noise_draws: int = 2,
    methods: tuple[str, ...] = ("tracin", "retrac", "cosine"),
    progress: bool = True,
    ckpts: CheckpointSet | None = None,
    train: ImageSet | None = None,
) -> dict:
    """self_influence.json: every training sample's score against itself per method, highest first lists,
    self_influence.png (histograms) and self_influence_top.png (the 12 highest training images per method, with
    their ids or file names). High self-influence flags outliers and mislabeled images. ``ckpts`` and ``train``:
    the store's checkpoints and training data [default: read from where the store records them]."""
    train = train if train is not None else store_dataset(store)
    own = featurize_queries(store, ckpts or store_checkpoints(store), train, query_timesteps, noise_draws,
                            progress=progress)
    ids = store.ids()
    scores = {m: analysis.self_influence(store, own, m) for m in methods}
    out.mkdir(parents=True, exist_ok=True)
    viz.score_histogram(out / "self_influence.png", scores, "self-influence per training sample")
    top = {m: np.argsort(-s)[:12] for m, s in scores.items()}
    pictures = {m: train.subset(np.asarray(rows)).images.numpy() for m, rows in top.items()}
    viz.image_rows(out / "self_influence_top.png", pictures,
                   {m: [f"{_label(train, r)}\n{scores[m][r]:.3g}" for r in rows] for m, rows in top.items()},
                   "highest self-influence (outlier candidates), per method")
    report = {
        "query_timesteps": query_timesteps,
        "noise_draws": noise_draws,
        "ids": ids.tolist(),
        "scores": {m: s.tolist() for m, s in scores.items()},
        "highest": {m: [int(ids[r]) for r in np.argsort(-s)[:20]] for m, s in scores.items()},
    }
    _write(out, "self_influence.json", report)
    return report
