"""Fidelity of projected scores against exact ones, per projector kind and proj_dim k, on the demo model.

The exact reference is the ``identity`` projector through the same featurize -> store -> scoring path. For each
projector kind and k in {128, 256, ..., 8192}, the same training samples and queries are featurized again and
the (queries x training samples) TracIn and ReTrac score matrices are compared with the exact ones: Spearman and
Kendall correlation per query (averaged) and top-10 / top-100 overlap.

    python benchmarks/fidelity.py --out bench-out/fidelity             # ~20-40 min on 2 cores
    python benchmarks/fidelity.py --quick --out /tmp/fid               # smoke run
    python benchmarks/fidelity.py --kinds sjlt,factorized --dims 4096 --seeds 0,1,2,3,4 --out /tmp/fid-seeds

Prints a table, writes OUT/fidelity.json and OUT/fidelity.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from projidx.analysis import rank_agreement  # noqa: E402
from projidx.data import load_dataset  # noqa: E402
from projidx.demo import DEMO_TRAIN, cached_model  # noqa: E402
from projidx.errors import ProjidxError  # noqa: E402
from projidx.featurize import FeaturizeConfig, featurize, featurize_queries  # noqa: E402
from projidx.projection import KINDS  # noqa: E402
from projidx.scoring import exact_scores, query_vectors  # noqa: E402

METHODS = ("tracin", "retrac")


def scores_for(ckpts, data, queries, config: FeaturizeConfig, path: Path, s: int, r: int) -> dict[str, np.ndarray]:
    """(Q, N) score matrices per method for one projector configuration (the store is deleted after)."""
    shutil.rmtree(path, ignore_errors=True)
    store = featurize(ckpts, data, path, config, progress=False)
    qf = featurize_queries(store, ckpts, queries, s, r, progress=False)
    out = {m: exact_scores(store, query_vectors(store, qf, m), m) for m in METHODS}
    shutil.rmtree(path, ignore_errors=True)
    return out


def run(kinds: list[str], dims: list[int], n_train: int, n_queries: int, s: int, r: int, cache: str | None,
        workdir: Path, seed: int = 0) -> list[dict]:
    """One row per (kind, k, method): rank agreement of projected with exact scores on the demo model.

    ``seed`` seeds the projection and the noise draws (FeaturizeConfig.seed): the exact reference is recomputed
    with the same noise, so only the projection differs between seeds' comparisons."""
    train = load_dataset("digits:train")
    ckpts = cached_model(train, DEMO_TRAIN, cache)  # the demo model
    data = train.subset(slice(0, n_train))
    queries = load_dataset("digits:test").subset(slice(0, n_queries))
    exact = scores_for(ckpts, data, queries, FeaturizeConfig(projector="identity", dtype="float32", seed=seed),
                       workdir / "exact.zarr", s, r)
    rows = []
    for kind in kinds:
        for k in dims:
            t0 = time.perf_counter()
            try:
                approx = scores_for(ckpts, data, queries, FeaturizeConfig(projector=kind, proj_dim=k, seed=seed),
                                    workdir / f"{kind}-{k}.zarr", s, r)
            except ProjidxError as e:
                rows.append({"kind": kind, "k": k, "seed": seed, "error": str(e)})
                continue
            for method in METHODS:
                rows.append({"kind": kind, "k": k, "seed": seed, "method": method, "seconds": time.perf_counter() - t0,
                             **rank_agreement(approx[method], exact[method])})
            print(f"{kind:<11} k={k:<5} seed={seed} " + "  ".join(
                f"{row['method']}: rho={row['spearman']:.3f} top10={row['top10_overlap']:.2f}"
                for row in rows[-2:]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/fidelity")
    p.add_argument("--cache", default=None)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--query-timesteps", type=int, default=5)
    p.add_argument("--noise-draws", type=int, default=2)
    p.add_argument("--kinds", default=",".join(k for k in KINDS if k != "identity"))
    p.add_argument("--dims", default="128,256,512,1024,2048,4096,8192")
    p.add_argument("--seeds", default="0", help="comma-separated projection/noise seeds (the spread over seeds)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.n_train, args.queries, args.dims = 100, 4, "256,2048"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [row for seed in args.seeds.split(",")
            for row in run(args.kinds.split(","), [int(v) for v in args.dims.split(",")], args.n_train,
                           args.queries, args.query_timesteps, args.noise_draws, args.cache, out, int(seed))]
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "model": "demo (digits:train, " + str(DEMO_TRAIN) + ")", "settings": vars(args),
              "wall_s": time.perf_counter() - start, "rows": rows}
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "fidelity.png")
    print(f"wall time {result['wall_s']:.0f}s")


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, method in zip(axes, METHODS, strict=True):
        for kind in sorted({r["kind"] for r in rows if "error" not in r}):
            pts = [(r["k"], r["spearman"]) for r in rows
                   if r.get("method") == method and r["kind"] == kind and r["seed"] == rows[0]["seed"]]
            ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("proj_dim k")
        ax.set_title(f"{method}: Spearman, projected vs exact")
        ax.axhline(0.95, color="gray", linestyle=":")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Spearman (mean over queries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
