"""Index build and search at N = 1e5 and 1e6 (k = 512, 2 checkpoints) on gradient-like vectors, one run.

Store: written through the store API (replay layout, G = 1), its unit features drawn from the spectrum of a real
store: the demo model featurized on digits:train at k = 512 (replay, first two checkpoints); per checkpoint the
real features' mean and principal directions / singular values; a synthetic row is mean + U S z / sqrt(n) with
one z ~ N(0, I) shared by both checkpoints (the checkpoints of one sample are correlated), normalized, and a norm
resampled from the real norms. Queries: 256 fresh draws of the same distribution.

Per index (each built and searched in a child process, so its peak RSS is its own): build time, peak RSS of the
build (the recall report included; the search phase is reported apart), the index's size on disk, ms per query in
batches of 32, recall@10 against the exact scan of the store, for IVF indices at several nprobe. Index types: Flat,
IVF-Flat, HNSW32 (retrac vectors are unit norm per checkpoint), IVF-SQfp16, IVF-SQfp16 on disk, IVF-PQ64, and IVF-
PQ64 with an exact re-rank of 100 candidates from the store; the exact streaming scan (``query --exact``)
alongside. At 1e6, HNSW32 (its build alone exceeds the time budget on 2 cores) and the re-rank (100 candidates x 32
queries touch every row-chunk, so it costs a full scan per batch) are not run. IVF indices are trained on min(39 x
nlist, 100,000) sampled rows.

    python benchmarks/bench_index.py --out bench-out/bench_index.json                # ~30 min on 2 cores
    python benchmarks/bench_index.py --sizes 10000 --out /tmp/bi.json              # smoke run

Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHOD = "retrac"
QUERIES, BATCH = 256, 32


def spectrum(work: Path, cache: str | None, k: int) -> list[dict]:
    """Per checkpoint (the first two): mean, principal directions, singular values and norms of a real store."""
    from projidx.cli.demo import DEMO_TRAIN, cached_model
    from projidx.data.datasets import load_dataset
    from projidx.features.featurization import FeaturizeConfig, featurize

    data = load_dataset("digits:train")
    ckpts = cached_model(data, DEMO_TRAIN, cache)
    store = featurize(ckpts, data, work / "real.zarr", FeaturizeConfig(proj_dim=k, train_timesteps="replay"),
                      progress=False)
    out = []
    for cid in store.meta.checkpoint_ids[:2]:
        chunks = [c for _, c in store.chunks(cid)]
        f = np.concatenate([c.features[:, 0] for c in chunks]).astype(np.float64)
        mean = f.mean(axis=0)
        _, s, vt = np.linalg.svd(f - mean, full_matrices=False)
        out.append({"mean": mean, "s": s / np.sqrt(len(f)), "vt": vt,
                    "norms": np.concatenate([c.norms[:, 0] for c in chunks])})
    return out


def draw(spec: list[dict], n: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """n synthetic rows: per checkpoint (unit features (n, k) float32, norms (n,))."""
    z = rng.standard_normal((n, len(spec[0]["s"])))
    out = []
    for c in spec:
        f = c["mean"] + (z * c["s"]) @ c["vt"]
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        out.append((f.astype(np.float32), rng.choice(c["norms"], n).astype(np.float32)))
    return out


def make_store(path: Path, n: int, spec: list[dict], k: int, chunk_rows: int, seed: int) -> None:
    from projidx.features.projection import ProjectorSpec
    from projidx.models.diffusion import NoiseSchedule
    from projidx.store.feature_store import Chunk, FeatureStore, StoreMeta

    meta = StoreMeta(projector=ProjectorSpec("sjlt", k, {"synthetic": (10_000,)}), model_fingerprint="synthetic",
                     dataset_fingerprint=f"synthetic-{n}-{seed}", dataset_name="synthetic", n=n,
                     image_shape=(1, 8, 8), checkpoints=[{"id": f"c{c}", "sha256": "-", "weight": 1.0}
                                                         for c in range(2)],
                     loss="mse", schedule=NoiseSchedule(), train_timesteps="replay", timesteps=[], noise_seed=0,
                     chunk_rows=chunk_rows, noise="shared")
    store = FeatureStore.create(path, meta, np.arange(n, dtype=np.int64))
    rng = np.random.default_rng(seed)
    for i in range(store.n_chunks):
        rows = store.rows(i)
        for c, (f, norms) in enumerate(draw(spec, rows.stop - rows.start, rng)):
            store.write_chunk(f"c{c}", i, Chunk(f[:, None], norms[:, None], norms,
                                                np.full((len(f), 1), 500, np.int32)))


CHILD = """
import json, os, resource, sys, time
import numpy as np
from projidx.search.index import IndexConfig, build_index, index_dir, load_index
from projidx.store.feature_store import FeatureStore
args = json.loads(sys.argv[1])
store = FeatureStore.open(args["store"])
qv, exact = np.load(args["queries"]), np.load(args["exact"])
start = time.perf_counter()
if args["factory"] != "exact":
    build_index(store, args["method"], IndexConfig(**args["config"]))
build_s = time.perf_counter() - start
build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
size = sum(f.stat().st_size for f in index_dir(store).local.glob(args["method"] + "*") if f.is_file()) \\
    if args["factory"] != "exact" else 0
rows = []
for nprobe in args["nprobes"]:
    if args["factory"] == "exact":
        from projidx.search.scoring import exact_topk
        search = lambda q: exact_topk(store, q, args["method"], 10)[1]
    else:
        index = None  # release the previous nprobe's copy before loading the next
        index = load_index(store, args["method"], nprobe=nprobe)
        search = lambda q: index.search(q, 10, rerank=args.get("rerank"))[1]
    search(qv[:32])  # warm
    t0 = time.perf_counter()
    found = np.concatenate([search(qv[i:i + 32]) for i in range(0, len(qv), 32)])
    ms = (time.perf_counter() - t0) * 1000 / len(qv)
    recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), exact.tolist())]))
    rows.append({"nprobe": nprobe, "ms_per_query": ms, "recall_at_10": recall})
print(json.dumps({"build_s": build_s, "index_bytes": size, "build_peak_rss_mb": build_peak, "peak_rss_mb":
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "search": rows}))
"""


def child(payload: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def baseline_rss_mb() -> float:
    code = "import resource, numpy, torch, faiss, projidx.search.index; " \
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/bench_index.json")
    p.add_argument("--cache", default=None)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--work", default=None, help="where the stores go (default: a temporary directory)")
    p.add_argument("--only", default=None, help="';'-separated index labels to run (e.g. 'IVF4096,SQfp16 on-disk')",
                   type=lambda v: [x.strip() for x in v.split(";")])  # ";"-separated
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    spec = spectrum(work, args.cache, args.k)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "settings": vars(args), "baseline_rss_mb": baseline_rss_mb(), "sizes": {}}
    for n in [int(v) for v in args.sizes.split(",")]:
        from projidx.search.scoring import exact_topk
        from projidx.store.feature_store import FeatureStore

        store_path = work / f"synthetic-{n}.zarr"
        shutil.rmtree(store_path, ignore_errors=True)
        shutil.rmtree(store_path.with_name(store_path.name + ".index"), ignore_errors=True)
        t0 = time.perf_counter()
        make_store(store_path, n, spec, args.k, args.chunk_rows, seed=n)
        make_s = time.perf_counter() - t0
        # retrac query vectors: the concatenation of unit features (checkpoint weights are 1)
        qv = np.concatenate([f for f, _ in draw(spec, QUERIES, np.random.default_rng(1))], axis=1)
        store = FeatureStore.open(store_path)
        t0 = time.perf_counter()
        exact = exact_topk(store, qv, METHOD, 10)[1]
        np.save(work / "queries.npy", qv)
        np.save(work / "exact.npy", exact)
        nlist = 1024 if n <= 200_000 else 4096
        chunk_mb = args.chunk_rows * 2 * args.k * (4 + 2) / 2**20
        probes = [16, 32, 64, 128] if n <= 200_000 else [32, 64, 128, 256]
        cases = [("exact", {}, [None], None), ("Flat", {}, [None], None),
                 (f"IVF{nlist},Flat", {}, probes, None),
                 (f"IVF{nlist},SQfp16", {}, probes, None),
                 (f"IVF{nlist},SQfp16", {"on_disk": True}, probes[1:3], None),
                 (f"IVF{nlist},PQ64", {}, probes[1:], None)]
        if n <= 200_000:  # HNSW's build, and a re-rank that reads the chunks of 3,200 candidates, are for smaller N
            cases.insert(2, ("HNSW32", {}, [None], None))
            cases.append((f"IVF{nlist},PQ64", {}, probes[1:], 100))
        rows = []
        for factory, extra, nprobes, rerank in cases:
            config = {"factory": factory, "train_rows": min(39 * nlist, 100_000), **extra} if factory != "exact" else {}
            res = child({"store": str(store_path), "queries": str(work / "queries.npy"),
                         "exact": str(work / "exact.npy"), "method": METHOD, "factory": factory, "config": config,
                         "nprobes": nprobes, "rerank": rerank})
            label = factory + (" on-disk" if extra.get("on_disk") else "") + (f" +rerank{rerank}" if rerank else "")
            if args.only and label not in args.only:
                continue
            rows.append({"index": label, **res})
            print_row(n, rows[-1], chunk_mb, results["baseline_rss_mb"])
        results["sizes"][str(n)] = {"make_store_s": make_s, "chunk_mb": chunk_mb, "rows": rows,
                                    "store_bytes": store.nbytes_on_disk()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        shutil.rmtree(store_path.with_name(store_path.name + ".index"), ignore_errors=True)
        shutil.rmtree(store_path)
    results["wall_s"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(results, indent=1))
    if not args.work:
        shutil.rmtree(work)
    print(f"wall time {results['wall_s']:.0f}s; baseline RSS of a process with torch + faiss:"
          f" {results['baseline_rss_mb']:.0f} MB")


def print_row(n: int, row: dict, chunk_mb: float, base: float) -> None:
    if "error" in row:
        print(f"N={n:<8} {row['index']:<28} error: {row['error']}", flush=True)
        return
    size = row["index_bytes"] / 2**20
    bound = 1.5 * size + chunk_mb
    build_peak = row.get("build_peak_rss_mb", row["peak_rss_mb"])
    for s in row["search"]:
        probe = f"nprobe={s['nprobe']}" if s["nprobe"] else ""
        print(f"N={n:<8} {row['index']:<28} {probe:<10} build {row['build_s']:7.1f}s  size {size:8.1f} MB  "
              f"build peak RSS {build_peak:7.0f} MB (over baseline {build_peak - base:7.0f};"
              f" bound 1.5 x size + chunk {bound:7.0f})  {s['ms_per_query']:7.2f} ms/query  "
              f"recall@10 {s['recall_at_10']:.3f}", flush=True)


if __name__ == "__main__":
    main()
