"""What bounds the exact scan (``query --exact``): reading the store, or the matmul? One run at N = 2e5.

A synthetic store as in bench_index.py (k = 512, 2 checkpoints, gradient-like unit features). Timed, for one batch
of 32 queries (retrac): (a) reading, decoding and validating every row-chunk and forming the method's vectors, no
matmul; (b) the matmul + running top-10 against the same vectors held in memory; (c) ``exact_topk`` as shipped
(the next chunk read in a background thread while the current one is scored); (d) the same with reading and
scoring in sequence. If (c) is close to (a), the scan is bound by reading the store.

    python benchmarks/bench_scan.py --out bench-out/bench_scan.json     # ~3 min on 2 cores

Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import bench_index
import numpy as np
import torch

from projidx.search import scoring
from projidx.store.feature_store import FeatureStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/bench_scan.json")
    p.add_argument("--cache", default=None)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--chunk-rows", type=int, default=4096)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    spec = bench_index.spectrum(work, args.cache, 512)
    bench_index.make_store(work / "s.zarr", args.n, spec, 512, args.chunk_rows, seed=1)
    store = FeatureStore.open(work / "s.zarr")
    qv = np.concatenate([f for f, _ in bench_index.draw(spec, 32, np.random.default_rng(1))], axis=1)
    t0 = time.perf_counter()
    vectors = [v for _, v in scoring.chunk_vectors(store, "retrac")]
    read_s = time.perf_counter() - t0
    q = torch.from_numpy(qv)
    t0 = time.perf_counter()
    best = torch.full((32, 0), -torch.inf)
    for v in vectors:
        best = torch.topk(torch.cat([best, q @ torch.from_numpy(v).T], dim=1), 10, dim=1).values
    matmul_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scoring.exact_topk(store, qv, "retrac", 10)
    overlapped_s = time.perf_counter() - t0

    def sequential(store, method, chunks=None, transform=None):
        for i in range(store.n_chunks) if chunks is None else chunks:
            yield i, scoring.train_vectors(store, method, i)

    real = scoring.chunk_vectors
    scoring.chunk_vectors = sequential
    t0 = time.perf_counter()
    scoring.exact_topk(store, qv, "retrac", 10)
    sequential_s = time.perf_counter() - t0
    scoring.chunk_vectors = real
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "n": args.n, "store_bytes": store.nbytes_on_disk(), "read_s": read_s, "matmul_s": matmul_s,
              "exact_topk_overlapped_s": overlapped_s, "exact_topk_sequential_s": sequential_s}
    shutil.rmtree(work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"N = {args.n}, store {result['store_bytes'] / 2**20:.0f} MB, 32 queries:")
    print(f"  (a) read + decode + validate + vectors, no matmul  {read_s:6.2f} s")
    print(f"  (b) matmul + top-10 on vectors in memory           {matmul_s:6.2f} s")
    print(f"  (c) exact_topk, next chunk read in the background  {overlapped_s:6.2f} s")
    print(f"  (d) exact_topk, read then score in sequence         {sequential_s:6.2f} s")


if __name__ == "__main__":
    main()
