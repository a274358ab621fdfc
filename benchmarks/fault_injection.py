"""Kill ``projidx featurize`` at every write of a small run, resume it with the same command, and compare.

A tiny model (2 checkpoints) featurizes 24 digits into a store of 3 row-chunks per checkpoint. A counting run
learns how many objects the run writes (W: creation included: array metadata, ids, chunk objects, done records).
Then for every n in 1..W, in a fresh directory, a child process runs the same ``projidx featurize`` command with
write n replaced by a fault, and the command is re-run as is (no cleanup). The resumed store must equal an
uninterrupted run's: every array's contents and the metadata (less the store's random uuid and its digest).

Faults (``--modes``): ``kill`` (SIGKILL just before write n), ``torn`` (the first half of object n's bytes written
in place, then SIGKILL: what a store without atomic renames could leave).

    python benchmarks/fault_injection.py --out bench-out/fault_injection.json     # ~10-15 min on 2 cores

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

INJECT = """
import os, signal, sys
from pathlib import Path
import zarr.storage._local as local
count, at, mode = [0], int(os.environ.get("FAULT_AT", "0")), os.environ.get("FAULT_MODE", "kill")
real = local._put
def put(path, value, exclusive=False):
    count[0] += 1
    if count[0] == at:
        if mode == "torn":
            data = value.to_bytes()
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(path, value, exclusive=exclusive)
    if at == 0:
        Path(os.environ["FAULT_COUNT"]).write_text(str(count[0]))
    return result
local._put = put
sys.argv = ["projidx", *sys.argv[1:]]
from projidx.__main__ import run
run()
"""


def contents(store: Path) -> dict:
    """Every array's decoded bytes and the metadata less uuid and digest."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    meta = {k: v for k, v in dict(group.attrs)["projidx"].items() if k not in ("uuid", "digest", "checkpoint_dir")}
    arrays = {}
    for name, array in group.arrays():
        arrays[name] = np.asarray(array[:]).tobytes()
    for name, sub in group.groups():
        for child, array in sub.arrays():
            arrays[f"{name}/{child}"] = np.asarray(array[:]).tobytes()
    return {"meta": json.dumps(meta, sort_keys=True), "arrays": arrays}


def featurize_args(ck: Path, data: Path, store: Path) -> list[str]:
    return ["featurize", "--checkpoints", str(ck), "--data", str(data), "--store", str(store), "--proj-dim", "32",
            "--timesteps", "2", "--chunk-rows", "8"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/fault_injection.json")
    p.add_argument("--modes", default="kill,torn")
    p.add_argument("--limit", type=int, default=None, help="only the first N write positions (smoke run)")
    args = p.parse_args()
    from projidx.data.datasets import load_dataset

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fault-"))
    d = load_dataset("digits").subset(slice(0, 24))
    data = work / "train.npz"
    np.savez(data, images=((d.images.numpy()[:, 0] + 1) * 127.5).round().astype(np.uint8), ids=np.arange(24) + 500)
    cli = [sys.executable, "-m", "projidx"]
    subprocess.run([*cli, "train", "--data", str(data), "--out", str(work / "ck"), "--epochs", "2", "--checkpoints",
                    "2", "--width", "8"], check=True, capture_output=True)
    env = {**os.environ, "FAULT_AT": "0", "FAULT_COUNT": str(work / "count")}
    subprocess.run([sys.executable, "-c", INJECT, *featurize_args(work / "ck", data, work / "ref.zarr")], env=env,
                   check=True, capture_output=True)
    writes = int((work / "count").read_text())
    reference = contents(work / "ref.zarr")
    print(f"an uninterrupted run writes {writes} objects", flush=True)
    rows = []
    for mode in args.modes.split(","):
        for n in range(1, (args.limit or writes) + 1):
            case = work / f"{mode}-{n}"
            case.mkdir()
            store = case / "s.zarr"
            killed = subprocess.run([sys.executable, "-c", INJECT, *featurize_args(work / "ck", data, store)],
                                    env={**env, "FAULT_AT": str(n), "FAULT_MODE": mode}, capture_output=True)
            resumed = subprocess.run([*cli, *featurize_args(work / "ck", data, store)], capture_output=True, text=True)
            if resumed.returncode != 0:
                outcome = "resume failed: " + (resumed.stderr.strip().splitlines() or ["?"])[-1][:200]
            elif contents(store) != reference:
                outcome = "differs"
            elif list(case.glob(".s.zarr.creating-*")):
                outcome = "identical, leftover temporary directory"
            else:
                outcome = "identical"
            rows.append({"mode": mode, "write": n, "killed": killed.returncode == -9, "outcome": outcome})
            print(f"{mode:<5} write {n:3d}/{writes}: killed={killed.returncode == -9} {outcome}", flush=True)
            shutil.rmtree(case)
    shutil.rmtree(work)
    summary = {mode: {"runs": sum(r["mode"] == mode for r in rows),
                      "identical": sum(r["mode"] == mode and r["outcome"] == "identical" for r in rows),
                      "killed": sum(r["mode"] == mode and r["killed"] for r in rows)} for mode in args.modes.split(",")}
    result = {"machine": platform.processor() or platform.machine(), "writes": writes, "summary": summary,
              "rows": rows, "wall_s": time.perf_counter() - start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for mode, s in summary.items():
        print(f"{mode}: {s['identical']}/{s['runs']} resumed identical ({s['killed']} killed at their write)")
    print(f"wall time {result['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
