"""Warm look-ups: ``projidx serve`` against the library call and a cold ``projidx query``, one run.

On a demo store (``projidx demo --out DIR`` makes one: digits, 4 checkpoints, grid of 10, shared noise, Flat
indices), one held-out digit is attributed with ``matched``, top-10, S = 10 (the store's grid), R = 4:
- library: ``projidx.attribute`` in a warm Python process (p50 over --reps calls);
- serve: ``POST /query`` with a JSON DATA spec to ``projidx serve`` on loopback (p50 over --reps requests, after
  one warm-up request);
- cold: ``projidx query`` as a new process each time (median over 3 runs), start-up included.

    python benchmarks/bench_serve.py --store demo-out/store.zarr --out bench-out/serve.json

Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--out", default="bench-out/serve.json")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    from projidx.attribution import attribute
    from projidx.data import load_dataset
    from projidx.store import FeatureStore

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    query = load_dataset("digits:test").subset(slice(0, 1))
    npz = work / "one.npz"
    np.savez(npz, images=((query.images.numpy() + 1) * 127.5).round().astype(np.uint8))
    one = load_dataset(str(npz))
    store = FeatureStore.open(args.store)
    library = []
    for _ in range(args.reps + 1):
        start = time.perf_counter()
        attribute(store, one, "matched", 10, noise_draws=4)
        library.append(time.perf_counter() - start)
    library = library[1:]

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "projidx", "serve", "--store", args.store, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        server.stdout.readline()  # "serving ..." once it listens
        body = json.dumps({"data": str(npz), "method": "matched", "top_k": 10, "noise_draws": 4}).encode()
        served = []
        for _ in range(args.reps + 1):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/query", data=body,
                                         headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
            served.append(time.perf_counter() - start)
        served = served[1:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    cold = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "projidx", "query", "--store", args.store, "--data", str(npz),
                        "--method", "matched", "--noise-draws", "4", "--out", str(work / "r.json")],
                       check=True, capture_output=True)
        cold.append(time.perf_counter() - start)
    result = {"library_p50_s": statistics.median(library), "serve_p50_s": statistics.median(served),
              "cold_cli_median_s": statistics.median(cold), "library_s": library, "serve_s": served, "cold_s": cold}
    result["serve_over_library"] = result["serve_p50_s"] / result["library_p50_s"]
    result["cold_over_serve"] = result["cold_cli_median_s"] / result["serve_p50_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"one query, matched, S = 10, R = 4: library p50 {result['library_p50_s'] * 1000:.0f} ms, serve p50"
          f" {result['serve_p50_s'] * 1000:.0f} ms ({result['serve_over_library']:.2f}x the library), cold"
          f" 'projidx query' {result['cold_cli_median_s']:.2f} s ({result['cold_over_serve']:.1f}x serve)")


if __name__ == "__main__":
    main()
