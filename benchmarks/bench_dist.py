"""Distributed featurization: whole-process ``projidx featurize`` throughput of 1 worker vs 2 gloo workers.

One workload (the demo UNet, 2 checkpoints, N tiled digits, the default grid of 10 timesteps, sjlt at k = 2048),
featurized from scratch into a fresh store by, in one run and in this order (repeated ``--repeats`` times):
- ``1p1t``: ``python -m projidx featurize`` with one torch thread: one worker, as a torchrun rank has;
- ``2p1t``: ``torchrun --standalone --nproc-per-node 2 -m projidx featurize``: 2 gloo ranks of one thread each;
- ``1p2t``: ``python -m projidx featurize`` with two torch threads: the one-process run on 2 cores.
Wall seconds are the whole process (start-up, imports, rendezvous, writing), from launch to exit; CPU seconds
are what all its processes used (the part of the cost that other jobs on the machine change least). Every store
is compared array by array with the first ``1p1t`` store (bitwise: features, norms, mean_norms, timesteps, done
records, ids). The target (issue 9) is ``2p1t`` >= 1.7x ``1p1t``. Every run records ``os.getloadavg()`` before
and after: on a machine shared with other jobs the figures are not the machine's, and the JSON says so.
All runs use ``OMP_WAIT_POLICY=PASSIVE`` (spinning OpenMP threads slow torch ~100x on a shared machine).

    python benchmarks/bench_dist.py --out benchmarks/results/bench_dist.json   # minutes per repeat on 2 cores

Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from projidx.store import FeatureStore

RUNS = {  # name: (launcher arguments before "-m projidx", OMP_NUM_THREADS)
    "1p1t": ([], 1),
    "2p1t": (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], 1),
    "1p2t": ([], 2),
}
LOADED = 0.5  # a 1-minute load average above this before a run: other jobs share the cores


def tiled_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8) uint8 digits: scikit-learn's digits tiled and perturbed by +-1 grey level; ids 0..n-1."""
    from sklearn.datasets import load_digits

    base = (load_digits().images * (255 / 16)).astype(np.int16)
    rng = np.random.default_rng(seed)
    images = base[np.arange(n) % len(base)] + rng.integers(-1, 2, (n, 8, 8))
    return np.clip(images, 0, 255).astype(np.uint8), np.arange(n, dtype=np.int64)


def arrays(store: Path) -> dict[str, bytes]:
    """Every array's decoded contents, by name."""
    fs = FeatureStore.open(store)
    names = ["ids"] + [f"{a}/{c}" for c in fs.meta.checkpoint_ids
                       for a in ("features", "norms", "mean_norms", "timesteps", "done")]
    return {name: np.asarray(fs.group[name][:]).tobytes() for name in names}


def featurize(name: str, work: Path, store: Path) -> dict:
    """One whole-process featurize run from scratch; wall seconds and the load averages around it."""
    launcher, threads = RUNS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, *launcher, "-m", "projidx", "featurize", "--checkpoints", str(work / "ck"), "--data",
           str(work / "train.npz"), "--store", str(store)]
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # torchrun's ranks included: it waits for them
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {proc.stderr[-3000:]}")
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {"run": name, "threads_per_process": threads, "processes": 2 if launcher else 1, "seconds": wall,
            "cpu_seconds": cpu, "load_avg_before": load_before, "load_avg_after": os.getloadavg()}


def machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="training images")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three runs")
    parser.add_argument("--out", default="benchmarks/results/bench_dist.json", help="JSON results file")
    args = parser.parse_args()
    start = time.perf_counter()
    report: dict = {"machine": machine(), "n": args.n, "checkpoints": 2, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images, ids = tiled_digits(args.n)
        np.savez(work / "train.npz", images=images, ids=ids)
        subprocess.run([sys.executable, "-m", "projidx", "train", "--data", str(work / "train.npz"), "--out",
                        str(work / "ck"), "--epochs", "2", "--checkpoints", "2"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        reference = None
        for rep in range(args.repeats):
            for name in RUNS:
                store = work / f"{name}.zarr"
                row = featurize(name, work, store)
                got = arrays(store)
                reference = reference or got
                row["repeat"] = rep
                row["bitwise_equal_to_1p1t"] = got == reference
                row["differing_arrays"] = sorted(k for k in got if got[k] != reference[k])
                row["gradients_per_s"] = args.n * 2 * 10 / row["seconds"]
                row["loaded"] = row["load_avg_before"][0] > LOADED
                report["runs"].append(row)
                print(f"[{time.perf_counter() - start:5.0f}s] {name} rep {rep}: {row['seconds']:.1f} s, load"
                      f" {row['load_avg_before'][0]:.2f} -> {row['load_avg_after'][0]:.2f},"
                      f" bitwise equal to 1p1t: {row['bitwise_equal_to_1p1t']}", flush=True)
                shutil.rmtree(store)
    best = {name: min(r["seconds"] for r in report["runs"] if r["run"] == name) for name in RUNS}
    report["summary"] = {
        "best_seconds": best,
        "speedup_2p1t_vs_1p1t": best["1p1t"] / best["2p1t"],
        "speedup_2p1t_vs_1p2t": best["1p2t"] / best["2p1t"],
        "target_2p1t_vs_1p1t": 1.7,
        "cpu_seconds": {name: min(r["cpu_seconds"] for r in report["runs"] if r["run"] == name) for name in RUNS},
        "2p1t_bitwise_equal_to_1p1t": all(r["bitwise_equal_to_1p1t"] for r in report["runs"] if r["run"] == "2p1t"),
        "1p2t_bitwise_equal_to_1p1t": all(r["bitwise_equal_to_1p1t"] for r in report["runs"] if r["run"] == "1p2t"),
        "any_run_loaded": any(r["loaded"] for r in report["runs"]),
        "max_load_avg_1min": max(max(r["load_avg_before"][0], r["load_avg_after"][0]) for r in report["runs"]),
    }
    report["seconds"] = time.perf_counter() - start
    print(f"\n{'run':<6} {'rep':>3} {'seconds':>8} {'cpu s':>7} {'grads/s':>8} {'load before':>12}"
          f" {'load after':>11} {'bitwise':>8}")
    for r in report["runs"]:
        print(f"{r['run']:<6} {r['repeat']:>3} {r['seconds']:8.1f} {r['cpu_seconds']:7.1f} {r['gradients_per_s']:8.1f}"
              f" {r['load_avg_before'][0]:12.2f} {r['load_avg_after'][0]:11.2f} {str(r['bitwise_equal_to_1p1t']):>8}")
    print(json.dumps(report["summary"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
