"""Warm look-ups: ``projidx serve`` (waitress) against the library call and a cold ``projidx query``, then under load.

One held-out digit, saved as a PNG, is attributed with ``matched``, top-10, the store's grid, R = --noise-draws:
- library: ``projidx.attribute`` in a warm Python process (p50 over --reps calls);
- serve: ``POST /query`` with the PNG uploaded (base64 JSON) to ``projidx serve`` on loopback (p50 over --reps
  requests, after one warm-up request);
- cold: ``projidx query`` as a new process each time (median over 3 runs), start-up included;
- load: ``projidx serve --threads 16``, --requests requests at each of 1, 4 and 16 concurrent clients (loopback
  only): p50 / p99 latency and throughput per level; every answer compared with ``projidx query`` on the same PNG
  (ids equal, scores to rtol 1e-6); the server's resident memory (VmRSS) after every 100 requests and its peak
  (VmHWM) at the end.

A small store (a few minutes on 2 cores):

    projidx train --data digits --out ck --epochs 4 --checkpoints 2 --width 16
    projidx featurize --checkpoints ck --data digits --store s.zarr --timesteps 4 --proj-dim 256
    projidx index --store s.zarr
    python benchmarks/bench_serve.py --store s.zarr --out bench-out/serve.json

Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LEVELS = (1, 4, 16)  # concurrent clients
RSS_EVERY = 100  # requests between memory samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of process ``pid``, in KiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def same_answer(result: dict, expected: dict) -> bool:
    got, want = result["queries"][0], expected["queries"][0]
    return got["ids"] == want["ids"] and bool(np.allclose(got["scores"], want["scores"], rtol=1e-6, atol=0))


def serve(store: str, port: int, threads: int) -> subprocess.Popen:
    """``projidx serve`` on loopback, returned once it listens."""
    server = subprocess.Popen([sys.executable, "-m", "projidx", "serve", "--store", store, "--port", str(port),
                               "--threads", str(threads), "--timeout", "300"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server.stdout.readline()  # "serving ..." once it listens
    return server


def load_run(url: str, body: bytes, expected: dict, clients: int, requests: int, pid: int, served: list[int],
             rss: list[dict]) -> dict:
    """``requests`` requests from ``clients`` threads: latency percentiles (s), throughput (1/s), wrong answers.
    ``served`` counts requests over all runs; ``rss`` gets a memory sample every RSS_EVERY of them."""
    lock = threading.Lock()

    def one(_: int) -> tuple[float, bool]:
        start = time.perf_counter()
        result = post(url, body)
        latency = time.perf_counter() - start
        with lock:
            served[0] += 1
            if served[0] % RSS_EVERY == 0:
                rss.append({"requests": served[0], **memory_kib(pid)})
        return latency, same_answer(result, expected)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = np.array([latency for latency, _ in replies])
    return {"clients": clients, "requests": requests, "p50_s": float(np.percentile(latencies, 50)),
            "p99_s": float(np.percentile(latencies, 99)), "mean_s": float(latencies.mean()),
            "throughput_per_s": requests / wall, "wall_s": wall, "wrong_answers": sum(not ok for _, ok in replies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--out", default="bench-out/serve.json")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--requests", type=int, default=400, help="Requests per concurrency level of the load run.")
    p.add_argument("--noise-draws", type=int, default=4)
    args = p.parse_args()
    from PIL import Image

    from projidx.data.datasets import load_dataset
    from projidx.search.attribution import attribute
    from projidx.store.feature_store import FeatureStore

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    query = load_dataset("digits:test").subset(slice(0, 1))
    png = work / "one.png"
    Image.fromarray(((query.images.numpy()[0, 0] + 1) * 127.5).round().astype(np.uint8)).save(png)
    one = load_dataset(str(png))
    store = FeatureStore.open(args.store)
    draws = args.noise_draws
    library = []
    for _ in range(args.reps + 1):
        start = time.perf_counter()
        attribute(store, one, "matched", 10, noise_draws=draws)
        library.append(time.perf_counter() - start)
    library = library[1:]
    cold = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "projidx", "query", "--store", args.store, "--data", str(png),
                        "--method", "matched", "--noise-draws", str(draws), "--out", str(work / "cli.json")],
                       check=True, capture_output=True)
        cold.append(time.perf_counter() - start)
    expected = json.loads((work / "cli.json").read_text())

    body = json.dumps({"images": [{"name": "one.png", "base64": base64.b64encode(png.read_bytes()).decode()}],
                       "method": "matched", "top_k": 10, "noise_draws": draws}).encode()
    port = free_port()
    url = f"http://127.0.0.1:{port}/query"
    server = serve(args.store, port, max(LEVELS))
    try:
        served_s = []
        for _ in range(args.reps + 1):
            start = time.perf_counter()
            assert same_answer(post(url, body), expected), "served answer differs from projidx query"
            served_s.append(time.perf_counter() - start)
        served_s = served_s[1:]
        count, rss = [0], [{"requests": 0, **memory_kib(server.pid)}]
        levels = [load_run(url, body, expected, clients, args.requests, server.pid, count, rss) for clients in LEVELS]
        peak = memory_kib(server.pid)["VmHWM"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"noise_draws": draws, "library_p50_s": statistics.median(library),
              "serve_p50_s": statistics.median(served_s), "cold_cli_median_s": statistics.median(cold),
              "library_s": library, "serve_s": served_s, "cold_s": cold, "load": levels, "rss_kib": rss,
              "peak_rss_kib": peak, "requests_total": count[0]}
    result["serve_over_library"] = result["serve_p50_s"] / result["library_p50_s"]
    result["cold_over_serve"] = result["cold_cli_median_s"] / result["serve_p50_s"]
    after_warmup = [r["VmRSS"] for r in rss if r["requests"] >= RSS_EVERY]
    result["rss_growth_after_first_100"] = after_warmup[-1] / after_warmup[0] if after_warmup else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"one query, matched, R = {draws}: library p50 {result['library_p50_s'] * 1000:.0f} ms, serve p50"
          f" {result['serve_p50_s'] * 1000:.0f} ms ({result['serve_over_library']:.2f}x the library), cold"
          f" 'projidx query' {result['cold_cli_median_s']:.2f} s ({result['cold_over_serve']:.1f}x serve)")
    print(f"{'clients':>8}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'wrong':>7}")
    for level in levels:
        print(f"{level['clients']:>8}{level['requests']:>10}{level['p50_s'] * 1000:>9.0f}{level['p99_s'] * 1000:>9.0f}"
              f"{level['throughput_per_s']:>8.1f}{level['wrong_answers']:>7}")
    print(f"server RSS {rss[0]['VmRSS'] / 1024:.0f} MiB at start, {after_warmup[0] / 1024:.0f} MiB after"
          f" {RSS_EVERY} requests, {rss[-1]['VmRSS'] / 1024:.0f} MiB after {rss[-1]['requests']}; peak"
          f" {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
