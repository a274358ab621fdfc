"""Featurize throughput under the two noise policies, measured in one run (issue 'Trust': shared >= per-sample).

The demo's model (cached) featurizes the first N training digits in grid mode (10 timesteps, sjlt k = 2048),
alternating ``--noise shared`` and ``--noise per-sample`` ``--reps`` times each into fresh stores, after one
discarded warm-up run; the table gives gradients per second per run, the median per policy and their ratio. The
only code that differs is the noise generation: per-sample noise seeds one generator per (sample, timestep, draw),
shared noise one per (timestep, draw) and broadcasts it; its cost per gradient is also timed alone.

    python benchmarks/bench_noise.py --out bench-out/noise.json     # ~5 min on 2 cores (model cached)

Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from projidx.cli.demo import DEMO_TRAIN, cached_model
from projidx.data.datasets import load_dataset
from projidx.features.featurization import FeaturizeConfig, featurize
from projidx.models.diffusion import TRAIN_NOISE, NoiseDraws

POLICIES = ("shared", "per-sample")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/noise.json")
    p.add_argument("--cache", default=None)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    full = load_dataset("digits:train")
    ckpts = cached_model(full, DEMO_TRAIN, args.cache)
    data = full.subset(slice(0, args.n))
    runs = []
    noise_us = {}
    for policy in POLICIES:
        draws = NoiseDraws(policy, 0, TRAIN_NOISE, 1)
        ids, times = data.ids.repeat_interleave(10).tolist(), [t for _ in range(len(data)) for t in range(10)]
        start = time.perf_counter()
        for c in range(4):
            draws.sample(ids, c, times, data.image_shape)
        noise_us[policy] = (time.perf_counter() - start) * 1e6 / (4 * len(ids))
        print(f"noise alone, {policy:<10}: {noise_us[policy]:.1f} us per gradient", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        featurize(ckpts, data.subset(slice(0, 32)), Path(tmp) / "warm.zarr", FeaturizeConfig(), progress=False)
        for rep in range(args.reps):
            for policy in POLICIES:
                path = Path(tmp) / f"{policy}.zarr"
                shutil.rmtree(path, ignore_errors=True)
                start = time.perf_counter()
                store = featurize(ckpts, data, path, FeaturizeConfig(noise=policy), progress=False)
                seconds = time.perf_counter() - start
                grads = len(data) * len(ckpts.checkpoints) * store.meta.gradients_per_sample
                runs.append({"rep": rep, "noise": policy, "seconds": seconds, "gradients_per_s": grads / seconds})
                print(f"rep {rep} {policy:<10} {grads / seconds:8.1f} gradients/s ({seconds:.1f} s)", flush=True)
    median = {pol: statistics.median(r["gradients_per_s"] for r in runs if r["noise"] == pol) for pol in POLICIES}
    ratio = median["shared"] / median["per-sample"]
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "settings": vars(args), "noise_us_per_gradient": noise_us, "runs": runs,
              "median_gradients_per_s": median, "shared_over_per_sample": ratio}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"median gradients/s: shared {median['shared']:.1f}, per-sample {median['per-sample']:.1f};"
          f" shared / per-sample = {ratio:.3f}")


if __name__ == "__main__":
    main()
