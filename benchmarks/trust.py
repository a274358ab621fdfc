"""The first checks a user tries, per (dataset x training-side setting x method): is a training image found for
itself, for a near-copy, for a copy shifted by one pixel? (``projidx validate``, exact scan.)

Training-side settings (``--settings``, MODE:GRID:NOISE[:OBJECTIVE], the objective defaulting to featurize's): the
defaults (grid of 10 bin midpoints, shared noise),
the same with per-sample noise, the paper's grid (linspace(1, 999, 10)) with shared noise, and the paper's replay
mode under both noise policies. Query side: ``projidx query``'s defaults for each store.

Datasets (each model trained with projidx's own ``train``, cached under $PROJIDX_CACHE):
- ``digits``: the demo's model on scikit-learn's 1,500 8x8 training digits;
- ``photos``: 1,000 16x16 RGB patches of scikit-learn's two photographs (paper_repro's photos model);
- ``digits28``: 400 of those digits upscaled to 28x28 (bilinear), trained 8 epochs with 2 checkpoints and
  featurized at k = 1024: the setting of the first user report (real 28x28 digits, which this repo does not ship).

For each store, M training rows (seeded) are queried as themselves, with N(0, sigma^2) pixel noise (sigma in [0, 1]
pixel units) and shifted one pixel right; the table gives the share of queries whose source is top-1 / top-10.
As a yardstick, the same shares for plain pixel-space nearest neighbours (L2) are printed for each dataset.

    python benchmarks/trust.py --out bench-out/trust          # ~30 min on 2 cores (models cached after)
    python benchmarks/trust.py --quick --out /tmp/trust       # smoke run

Prints a table, writes OUT/trust.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from projidx.cli.demo import DEMO_TRAIN, cached_model
from projidx.data.datasets import ImageSet, load_dataset
from projidx.features.featurization import FeaturizeConfig, featurize
from projidx.models.unet import UNetConfig
from projidx.reports.validate import CHECKS, DEFAULT_SIGMA, check_queries, sample_rows, summarize, validate_store

DATASETS = {
    "digits": (lambda: load_dataset("digits:train"), DEMO_TRAIN, 2048),
    "photos": (lambda: load_dataset("photos:train"), replace(DEMO_TRAIN, unet=UNetConfig(channels=3, base=32)), 2048),
    "digits28": (lambda: upscaled_digits(400, 28), replace(DEMO_TRAIN, epochs=8, checkpoints=2), 1024),
}


def upscaled_digits(n: int, size: int) -> ImageSet:
    """The first ``n`` training digits, bilinearly upscaled to size x size (a stand-in for real 28x28 digits)."""
    d = load_dataset("digits:train").subset(slice(0, n))
    images = F.interpolate(d.images, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return ImageSet(f"digits:train[:{n}]@{size}", images, d.ids)


def pixel_baseline(train: ImageSet, samples: int, seed: int, sigma: float) -> dict:
    """The checks answered by L2 nearest neighbours in pixel space (no model)."""
    rows = sample_rows(len(train), samples, seed)
    flat = train.images.flatten(1)
    out = {}
    for check, queries in check_queries(train, rows, sigma, seed).items():
        dist = torch.cdist(queries.images.flatten(1), flat)
        own = dist[torch.arange(len(rows)), torch.from_numpy(rows)]
        higher = dist < own[:, None]
        higher[torch.arange(len(rows)), torch.from_numpy(rows)] = False
        out[check] = summarize(higher.sum(dim=1).numpy())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/trust")
    p.add_argument("--cache", default=None)
    p.add_argument("--datasets", default="digits,photos,digits28")
    p.add_argument("--settings", default="grid:midpoints:shared,grid:midpoints:per-sample,grid:paper:shared,"
                                         "replay:-:shared,replay:-:per-sample")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="digits28 only, the defaults, 8 samples")
    args = p.parse_args()
    if args.quick:
        args.datasets, args.settings, args.samples = "digits28", "grid:midpoints:shared", 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "settings": vars(args), "pixel_l2": {}, "runs": []}
    for name in args.datasets.split(","):
        make, train_config, proj_dim = DATASETS[name]
        data = make()
        path = out / f"{name}.npz"  # a store reloads its data by name: give it a file
        np.savez(path, images=data.images.numpy(), ids=data.ids.numpy())
        data = load_dataset(str(path))
        ckpts = cached_model(data, train_config, args.cache)
        results["pixel_l2"][name] = pixel_baseline(data, args.samples, args.seed, args.sigma)
        for setting in args.settings.split(","):
            mode, grid, noise, *objective = setting.split(":")
            config = FeaturizeConfig(proj_dim=proj_dim, train_timesteps=mode, noise=noise,
                                     grid=grid if grid != "-" else "midpoints",
                                     objective=objective[0] if objective else FeaturizeConfig.objective)
            t0 = time.perf_counter()
            store = featurize(ckpts, data, out / f"{name}-{setting.replace(':', '-')}.zarr", config, progress=False)
            featurize_s = time.perf_counter() - t0
            report = validate_store(store, ckpts, data, args.samples, args.seed, args.sigma)
            results["runs"].append({"dataset": name, "setting": setting, "featurize_s": featurize_s, **report})
            print_run(results["runs"][-1])
            (out / "trust.json").write_text(json.dumps(results, indent=1))
    results["wall_s"] = time.perf_counter() - start
    (out / "trust.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def cells(checks: dict) -> str:
    return "  ".join(f"{checks[c]['top1']:.2f}/{checks[c]['top10']:.2f}" for c in CHECKS)


def print_run(run: dict) -> None:
    for method, checks in run["methods"].items():
        print(f"{run['dataset']:<9} {run['setting']:<26} {method:<8} {cells(checks)}", flush=True)


def print_table(results: dict) -> None:
    print(f"top-1/top-10 of the source; columns: {', '.join(CHECKS)}")
    print(f"{'dataset':<9} {'mode:grid:noise':<26} {'method':<8} {'  '.join(f'{c:<9}' for c in CHECKS)}")
    for name, checks in results["pixel_l2"].items():
        print(f"{name:<9} {'-':<26} {'pixel-L2':<8} {cells(checks)}")
    for run in results["runs"]:
        print_run(run)
    print(f"wall time {results['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
