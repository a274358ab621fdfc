"""``projidx validate``: the checks a user tries first, on the user's own store.

A seeded sample of M training rows is queried three ways: the training image itself (self-tracing), the image
plus light Gaussian pixel noise (a near-copy), and the image shifted by one pixel (edge pixels repeated). For
each method, the rank of the source row among all N rows is found with the exact scan
(:func:`projidx.search.scoring.source_ranks`); the report gives top-1 / top-10 shares and the median rank per check.
A method that cannot find a training image for itself cannot be trusted on anything else.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from projidx.data.datasets import ImageSet, concat
from projidx.errors import ProjidxError
from projidx.features.featurization import featurize_queries
from projidx.models.checkpoints import CheckpointSet
from projidx.search.scoring import query_vectors, scorable_methods, source_ranks
from projidx.store.feature_store import FeatureStore

CHECKS = ("self", "near-copy", "shift")
DEFAULT_SIGMA = 6 / 255  # near-copy noise, in units of the [0, 1] pixel range (the first check a user tried)


def near_copy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """(M, C, H, W) images in [-1, 1] plus N(0, sigma^2) noise in [0, 1] pixel units, clipped to [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return (images + 2 * sigma * torch.randn(images.shape, generator=gen)).clamp(-1, 1)


def shift_one_pixel(images: torch.Tensor) -> torch.Tensor:
    """(M, C, H, W) images moved one pixel to the right; the first column is repeated."""
    return torch.cat([images[..., :1], images[..., :-1]], dim=-1)


def sample_rows(n: int, samples: int, seed: int) -> np.ndarray:
    """``min(samples, n)`` distinct store rows, seeded, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(samples, n), replace=False))


def check_queries(train: ImageSet, rows: np.ndarray, sigma: float, seed: int) -> dict[str, ImageSet]:
    """The three query sets of the checks, each query carrying its source's sample id."""
    sources = train.subset(rows)
    images = sources.images
    made = {"self": images, "near-copy": near_copy(images, sigma, seed), "shift": shift_one_pixel(images)}
    return {check: replace(sources, name=f"{train.name}:{check}", images=x) for check, x in made.items()}


def summarize(ranks: np.ndarray) -> dict:
    """top-1 / top-10 shares and the median rank of one check's (M,) source ranks."""
    return {"top1": float(np.mean(ranks == 0)), "top10": float(np.mean(ranks < 10)),
            "median_rank": float(np.median(ranks)), "ranks": ranks.tolist()}


def validate_store(
    store: FeatureStore,
    ckpts: CheckpointSet,
    train: ImageSet,
    samples: int = 16,
    seed: int = 0,
    sigma: float = DEFAULT_SIGMA,
    methods: tuple[str, ...] | None = None,
    query_timesteps: int | None = None,
    noise_draws: int | None = None,
    progress: bool = False,
) -> dict:
    """The sanity report of ``store``: {"methods": {method: {check: summarize(...)}}, "sample_ids", settings}.

    ``train`` must be the data the store was built from (same fingerprint). ``methods`` defaults to every
    method the store supports (:func:`~projidx.search.scoring.scorable_methods`). Query settings default as for
    ``projidx query``.
    """
    if train.fingerprint(store.meta.conditioning_inputs) != store.meta.dataset_fingerprint:
        raise ProjidxError(f"data {train.name} is not the training data store {store.path} was built from")
    if samples < 1:
        raise ProjidxError(f"samples must be >= 1, got {samples}")
    if sigma < 0:
        raise ProjidxError(f"sigma must be >= 0, got {sigma}")
    if methods is None:
        methods = tuple(scorable_methods(store))
    rows = sample_rows(store.meta.n, samples, seed)
    if not np.array_equal(store.ids()[rows], train.ids[rows].numpy()):
        raise ProjidxError(f"data {train.name}: the sample ids are not in the store's order")
    sets = check_queries(train, rows, sigma, seed)
    everything = concat("validate", list(sets.values()))
    qf = featurize_queries(store, ckpts, everything, query_timesteps, noise_draws, progress=progress)
    sources = np.tile(rows, len(sets))
    report: dict = {"samples": len(rows), "seed": seed, "sigma": sigma, "sample_ids": train.ids[rows].tolist(),
                    "query_timesteps": qf.timesteps, "methods": {}}
    for method in methods:
        ranks = source_ranks(store, query_vectors(store, qf, method), method, sources)
        report["methods"][method] = {check: summarize(r) for check, r in zip(sets, np.split(ranks, len(sets)),
                                                                             strict=True)}
    return report


def failures(report: dict, method: str, thresholds: dict[tuple[str, str], float]) -> list[str]:
    """The thresholds ``{(check, "top1" | "top10"): minimum}`` that ``method`` misses in ``report``, in words."""
    got = report["methods"][method]
    return [f"{method} {check} {stat} {got[check][stat]:.2f} < {minimum:.2f}"
            for (check, stat), minimum in thresholds.items() if got[check][stat] < minimum]
