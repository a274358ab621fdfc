"""Featurize peak memory with streamed data, N = 1e4 vs 1e5 (issue 'Scale-out': peak RSS flat within 10%).

The training data is an .npy of N uint8 RGB 32x32 images (3 KB each on disk, 12 KB each as float32 in memory).
Each run is a fresh process that featurizes it (`load_dataset(..., stream=True)`, i.e. what `projidx featurize`
does, or the whole array read into memory first, for comparison) and reports its own peak RSS (VmHWM) and
time. ``stream-fixed-mmap`` is the streamed run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_): it tells
the growth of the data path from freed per-chunk buffers that glibc keeps in the heap. The model is a per-pixel MLP
epsilon model with random weights, 2 checkpoints, so that the gradients are cheap and the data path dominates: grid
mode with 1 timestep, sjlt k = 64, chunks of 1024 rows.

    python benchmarks/bench_stream.py --out bench-out/stream.json          # ~6 min on 2 cores

Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

MODES = ("stream", "stream-fixed-mmap", "memory")
# glibc raises its mmap threshold as large buffers are freed, after which freed transient buffers stay in the heap
# and count in RSS: with the threshold fixed, every large buffer goes back to the system when freed
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class PixelEps(nn.Module):
    """eps = the same small MLP at every pixel, of (x_t's channels, t / T): a hundred parameters, cheap gradients
    (the data path, not the model, is what this benchmark measures)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 3))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = x_t.permute(0, 2, 3, 1)
        h = torch.cat([h, (t.float() / 1000)[:, None, None, None].expand(*h.shape[:3], 1)], dim=-1)
        return self.net(h).permute(0, 3, 1, 2)


def worker(npy: Path, mode: str, work: Path) -> dict:
    """One featurize run in this process; returns its time and the process's peak RSS."""
    from projidx.data.datasets import load_dataset
    from projidx.features.featurization import FeaturizeConfig, featurize
    from projidx.models.checkpoints import Checkpoint, CheckpointSet, save_checkpoint
    from projidx.models.diffusion import NoiseSchedule

    torch.manual_seed(0)
    model, ckpts = PixelEps(), []
    for c in range(2):
        path = work / f"c{c}.pt"
        ckpts.append(Checkpoint(f"c{c}", path, 1.0, save_checkpoint(path, model)))
    cset = CheckpointSet(PixelEps(), ckpts, "mse", NoiseSchedule(), (3, 32, 32))
    start = time.perf_counter()
    data = load_dataset(str(npy), stream=mode.startswith("stream"))
    store = featurize(cset, data, work / "s.zarr", FeaturizeConfig(proj_dim=64, timesteps=1, chunk_rows=1024,
                                                                   batch_size=256), progress=False)
    seconds = time.perf_counter() - start
    return {"mode": mode, "n": store.meta.n, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM, which starts afresh at exec (ru_maxrss does not: a child started after
    the parent wrote the data would report the parent's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def make_data(path: Path, n: int) -> None:
    """n uint8 (32, 32, 3) images (smooth random colour fields), written in blocks."""
    rng = np.random.default_rng(n)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    for start in range(0, n, 10_000):
        block = rng.integers(0, 256, (min(10_000, n - start), 8, 8, 3), dtype=np.uint8)
        out[start : start + len(block)] = block.repeat(4, axis=1).repeat(4, axis=2)
    out.flush()
    del out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/stream.json")
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--worker", nargs=3, metavar=("NPY", "MODE", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), args.worker[1], Path(args.worker[2]))))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.sizes.split(",")):
            npy = Path(tmp) / f"data-{n}.npy"
            make_data(npy, n)
            for mode in args.modes.split(","):
                work = Path(tmp) / f"{mode}-{n}"
                work.mkdir()
                load = os.getloadavg()[0]
                env = {**os.environ, **(FIXED_MMAP if mode == "stream-fixed-mmap" else {})}
                done = subprocess.run([sys.executable, __file__, "--worker", str(npy), mode, str(work)], check=True,
                                      capture_output=True, text=True, env=env)
                run = {**json.loads(done.stdout.strip().splitlines()[-1]), "loadavg_1min_before": load,
                       "loadavg_1min_after": os.getloadavg()[0], "data_mb_on_disk": npy.stat().st_size / 2**20}
                runs.append(run)
                print(f"{mode:<17} N={n:>7}: peak RSS {run['peak_rss_mb']:7.0f} MB, {run['seconds']:6.1f} s"
                      f" ({n / run['seconds']:.0f} images/s), load {load:.1f}", flush=True)
    peak = {(r["mode"], r["n"]): r["peak_rss_mb"] for r in runs}
    sizes = sorted({r["n"] for r in runs})
    ratios = {mode: peak[(mode, sizes[-1])] / peak[(mode, sizes[0])] for mode in args.modes.split(",")
              if (mode, sizes[0]) in peak and (mode, sizes[-1]) in peak and len(sizes) > 1}
    for mode, ratio in ratios.items():
        print(f"{mode}: peak RSS at N={sizes[-1]} / N={sizes[0]} = {ratio:.3f}"
              + (" (target <= 1.10)" if mode.startswith("stream") else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "rss_ratio_largest_over_smallest": ratios,
                               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "torch": torch.__version__}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
