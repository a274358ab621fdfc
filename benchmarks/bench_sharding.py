"""Does Zarr sharding pay for a projidx store? Chunked (the store's layout) vs sharded, written as featurize writes.

One checkpoint's arrays of a store (features (N, G, k) float16, norms, mean_norms, timesteps, and the done records
of one element per row-chunk) are written the way ``featurize`` writes them: one row-chunk of every array, then
its done record, chunk after chunk. The sharded layout puts S row-chunks in one shard object (the done records:
S per shard), so writing a row-chunk rewrites its shard (Zarr reads the shard, replaces the chunk, writes it
whole). Then the store is read the way scans read it: every done record at once, then row-chunk after row-chunk.

Two file systems: ``file://`` (a local disk through Zarr's FsspecStore) and ``slowmemory://``, the in-memory file
system with a fixed delay per request (``--latency-ms``): a stand-in for an object store, where each request costs
a round trip. Reports the write and read seconds, the objects written and the requests made.

    python benchmarks/bench_sharding.py --out benchmarks/results/bench_sharding.json     # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import FsspecStore


class SlowMemory(MemoryFileSystem):
    """The memory file system with ``latency`` seconds per read or write request, counting them."""

    protocol = "slowmemory"
    latency = 0.0
    requests = {"get": 0, "put": 0}

    def cat_file(self, path, start=None, end=None, **kwargs):
        SlowMemory.requests["get"] += 1
        time.sleep(self.latency)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        SlowMemory.requests["put"] += 1
        time.sleep(self.latency)
        return super().pipe_file(path, value, mode=mode, **kwargs)


def arrays(root: zarr.Group, n: int, g: int, k: int, rows: int, shard: int | None) -> dict[str, zarr.Array]:
    spec = {"features": ((n, g, k), "float16", np.nan), "norms": ((n, g), "float32", np.nan),
            "mean_norms": ((n,), "float32", np.nan), "timesteps": ((n, g), "int32", -1)}
    out = {}
    for name, (shape, dtype, fill) in spec.items():
        chunks = (rows, *shape[1:])
        shards = None if shard is None else (rows * shard, *shape[1:])
        out[name] = root.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=fill,
                                      serializer=BytesCodec(), compressors=[Crc32cCodec()])
    n_chunks = -(-n // rows)
    out["done"] = root.create_array("done", shape=(n_chunks,), chunks=(1,), shards=None if shard is None else (shard,),
                                    dtype="uint64", fill_value=0, serializer=BytesCodec(), compressors=[Crc32cCodec()])
    return out


def run_case(url: str, n: int, g: int, k: int, rows: int, shard: int | None) -> dict:
    rng = np.random.default_rng(0)
    store = FsspecStore.from_url(url, storage_options={"auto_mkdir": True} if url.startswith("file") else None)
    group = zarr.open_group(store, mode="w", zarr_format=3)
    a = arrays(group, n, g, k, rows, shard)
    n_chunks = -(-n // rows)
    data = [(rng.standard_normal((min(rows, n - i * rows), g, k)).astype(np.float16),
             rng.random((min(rows, n - i * rows), g), dtype=np.float32)) for i in range(n_chunks)]
    SlowMemory.requests.update(get=0, put=0)
    start = time.perf_counter()
    for i, (features, norms) in enumerate(data):
        r = slice(i * rows, i * rows + len(features))
        a["features"][r] = features
        a["norms"][r] = norms
        a["mean_norms"][r] = norms[:, 0]
        a["timesteps"][r] = np.ones(norms.shape, np.int32)
        a["done"][i] = i + 1
    write_s = time.perf_counter() - start
    writes = dict(SlowMemory.requests)
    SlowMemory.requests.update(get=0, put=0)
    start = time.perf_counter()
    assert (np.asarray(a["done"][:]) == np.arange(1, n_chunks + 1)).all()
    for i, (features, _) in enumerate(data):
        r = slice(i * rows, i * rows + len(features))
        got = [np.asarray(a[name][r]) for name in ("features", "norms", "mean_norms", "timesteps")]
        assert got[0].tobytes() == features.tobytes()
    read_s = time.perf_counter() - start
    fs, path = fsspec.url_to_fs(url)
    objects = [p for p in fs.find(path) if not p.endswith("zarr.json")]
    return {"layout": "chunked" if shard is None else f"sharded (S={shard})", "write_s": write_s, "read_s": read_s,
            "objects": len(objects), "write_requests": writes, "read_requests": dict(SlowMemory.requests)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/bench_sharding.json")
    p.add_argument("--n", type=int, default=8192, help="rows")
    p.add_argument("--g", type=int, default=10, help="gradients per row (the grid)")
    p.add_argument("--k", type=int, default=256, help="projected dimension")
    p.add_argument("--chunk-rows", type=int, default=256)
    p.add_argument("--shards", default="8,32", help="row-chunks per shard to try")
    p.add_argument("--latency-ms", type=float, default=5.0, help="slowmemory:// delay per request")
    args = p.parse_args()
    fsspec.register_implementation("slowmemory", SlowMemory, clobber=True)
    SlowMemory.latency = args.latency_ms / 1000
    work = Path(tempfile.mkdtemp(prefix="shard-"))
    rows = []
    layouts = [None, *(int(s) for s in args.shards.split(","))]
    for fs_name in ("file", "slowmemory"):
        for shard in layouts:
            tag = "chunked" if shard is None else f"s{shard}"
            url = f"file://{work}/{tag}.zarr" if fs_name == "file" else f"slowmemory://bench/{tag}.zarr"
            row = {"fs": fs_name, **run_case(url, args.n, args.g, args.k, args.chunk_rows, shard)}
            if fs_name == "file":
                row.pop("write_requests")
                row.pop("read_requests")
            rows.append(row)
            print(json.dumps(row), flush=True)
    shutil.rmtree(work)
    result = {"machine": platform.processor() or platform.machine(), "zarr": zarr.__version__, "fsspec":
              fsspec.__version__, "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'fs':<11}{'layout':<17}{'write s':>9}{'read s':>9}{'objects':>9}{'PUT':>7}{'GET w':>7}{'GET r':>7}")
    for r in rows:
        req = (r.get("write_requests", {}).get("put", ""), r.get("write_requests", {}).get("get", ""),
               r.get("read_requests", {}).get("get", ""))
        print(f"{r['fs']:<11}{r['layout']:<17}{r['write_s']:>9.2f}{r['read_s']:>9.2f}{r['objects']:>9}"
              f"{req[0]!s:>7}{req[1]!s:>7}{req[2]!s:>7}")


if __name__ == "__main__":
    main()
