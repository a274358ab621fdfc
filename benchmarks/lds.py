"""Linear datamodeling score (LDS) for diffusion attribution, D-TRAK's protocol scaled to 2 CPU cores, through
``projidx evaluate lds`` (the library call).

A small DDPM (``projidx train``'s recipe: 40 epochs, 4 checkpoints, width 16) is trained on the first N rows of a
dataset; its checkpoints are featurized into one store per objective (``--objectives``; featurize's defaults
otherwise); M seeded subsets of N/2 rows are retrained with the same recipe (resumable, under OUT/retrains); each
retrained model's loss on Q held-out queries (10 midpoint timesteps x 4 fixed noises) is correlated with every
method's summed scores. Datasets: ``digits`` (digits:train / digits:test, 8x8) and ``photos`` (photos:train /
photos:test, 16x16 RGB).

    python benchmarks/lds.py --out bench-out/lds                      # digits, N=500, M=32, Q=32
    python benchmarks/lds.py --dataset photos --out bench-out/lds-photos

Prints a table, writes OUT/lds.json (and lds.png).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from projidx.cli.demo import cached_model
from projidx.data.datasets import ImageSet, load_dataset
from projidx.features.featurization import FeaturizeConfig, featurize
from projidx.models.training import TrainConfig
from projidx.models.unet import UNetConfig
from projidx.reports.evaluation import evaluate_lds
from projidx.settings import LDSConfig

RECIPE = TrainConfig(epochs=40, checkpoints=4, seed=0, loss="mse", lr=1e-3, batch_size=32,
                     unet=UNetConfig(channels=1, base=16))
DATASETS = {"digits": ("digits:train", "digits:test", 1), "photos": ("photos:train", "photos:test", 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/lds")
    p.add_argument("--cache", default=None)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="digits")
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--subsets", type=int, default=32)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--objectives", default="dtrak,loss")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--leave-out", type=int, default=0, help="K: leave-K-out retrains too (evaluate lds --leave-out)")
    p.add_argument("--leave-out-queries", type=int, default=LDSConfig.leave_out_queries)
    args = p.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_spec, test_spec, channels = DATASETS[args.dataset]
    full = load_dataset(train_spec).subset(slice(0, args.n_train))
    npz = out / "train.npz"  # a store reloads its training data by name: give it a file
    np.savez(npz, images=full.images.numpy(), ids=full.ids.numpy())
    train = load_dataset(str(npz))
    queries = load_dataset(test_spec).subset(slice(0, args.queries))
    queries = ImageSet(queries.name, queries.images, queries.ids)
    ckpts = cached_model(train, replace(RECIPE, unet=replace(RECIPE.unet, channels=channels)), args.cache)
    stores = [featurize(ckpts, train, out / f"{args.dataset}-{objective}.zarr",
                        replace(FeaturizeConfig(), objective=objective), progress=False)
              for objective in args.objectives.split(",")]
    config = LDSConfig(subsets=args.subsets, workers=args.workers, leave_out=args.leave_out,
                       leave_out_queries=args.leave_out_queries)
    report = evaluate_lds(stores, queries, out, config, progress=False)
    report["benchmark"] = {**vars(args), "wall_s": time.perf_counter() - start}
    (out / "lds.json").write_text(json.dumps(report, indent=1))
    print(f"{args.dataset}: N={args.n_train}, M={args.subsets}, Q={args.queries}")
    print(f"{'store':<22} {'method':<12} {'LDS':>7}  95% interval")
    for r in report["results"]:
        value = "-" if r["lds"] is None else f"{r['lds']:.3f}"
        print(f"{r['store']:<22} {r['method']:<12} {value:>7}  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    if report["leave_out"] is not None:
        lo = report["leave_out"]
        print(f"leave-{lo['k']}-out, {lo['queries']} queries, {lo['retrains']} retrains ({lo['retrain_s']:.0f}s):"
              " loss rise, top-K removed vs K random removed")
        for name, r in lo["methods"].items():
            print(f"{name:<28} {r['rise_top']:.4f} vs {r['rise_random']:.4f}: difference {r['difference']:.4f}"
                  f" [{r['difference_ci95'][0]:.4f}, {r['difference_ci95'][1]:.4f}], top-K larger for"
                  f" {r['share_top_larger']:.2f}")
    print(f"wall time {report['benchmark']['wall_s']:.0f}s (retraining {report['retrain_s']:.0f}s)")


if __name__ == "__main__":
    main()
