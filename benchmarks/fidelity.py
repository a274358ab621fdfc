"""Fidelity of projected scores against exact ones, per projector kind and proj_dim k, on the demo model.

The exact reference is the ``identity`` projector through the same featurize -> store -> scoring path. For each
projector kind and k in {128, 256, ..., 8192}, the same training samples and queries are featurized again and
the (queries x training samples) score matrices of each method (TracIn, ReTrac, and the timestep-matched cosine on
grid stores) are compared with the exact ones: Spearman and Kendall correlation per query (averaged) and top-10 /
top-100 overlap. Training side: featurize's defaults (grid, shared noise) with a grid of --timesteps (4 by default:
the identity store holds N x K x p float32 per checkpoint); --train-timesteps replay --noise per-sample is the
paper's setting. Query side: the store's defaults unless --query-timesteps / --noise-draws are given.

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
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from projidx.analysis.bias import rank_agreement  # noqa: E402
from projidx.cli.demo import DEMO_TRAIN, cached_model  # noqa: E402
from projidx.data.datasets import load_dataset  # noqa: E402
from projidx.errors import ProjidxError  # noqa: E402
from projidx.features.featurization import FeaturizeConfig, featurize, featurize_queries  # noqa: E402
from projidx.features.projection import KINDS  # noqa: E402
from projidx.search.scoring import exact_scores, query_vectors  # noqa: E402

METHODS = ("tracin", "retrac", "matched")
DEFAULTS = FeaturizeConfig()


def scores_for(ckpts, data, queries, config: FeaturizeConfig, path: Path, s: int | None,
               r: int | None) -> dict[str, np.ndarray]:
    """(Q, N) score matrices per method for one projector configuration (the store is deleted after)."""
    shutil.rmtree(path, ignore_errors=True)
    store = featurize(ckpts, data, path, config, progress=False)
    qf = featurize_queries(store, ckpts, queries, s, r, progress=False)
    methods = [m for m in METHODS if m != "matched" or store.meta.train_timesteps == "grid"]
    out = {m: exact_scores(store, query_vectors(store, qf, m), m) for m in methods}
    shutil.rmtree(path, ignore_errors=True)
    return out


def run(kinds: list[str], dims: list[int], n_train: int, n_queries: int, s: int | None, r: int | None,
        cache: str | None, workdir: Path, seed: int = 0, base: FeaturizeConfig = DEFAULTS) -> list[dict]:
    """One row per (kind, k, method): rank agreement of projected with exact scores on the demo model.

    ``seed`` is the projection seed; the noise (``base``'s noise seed and policy) is the same for the exact
    reference, so only the projection differs between seeds' comparisons."""
    train = load_dataset("digits:train")
    ckpts = cached_model(train, DEMO_TRAIN, cache)  # the demo model
    data = train.subset(slice(0, n_train))
    queries = load_dataset("digits:test").subset(slice(0, n_queries))
    exact = scores_for(ckpts, data, queries, replace(base, projector="identity", dtype="float32"),
                       workdir / "exact.zarr", s, r)
    rows = []
    for kind in kinds:
        for k in dims:
            t0 = time.perf_counter()
            try:
                approx = scores_for(ckpts, data, queries, replace(base, projector=kind, proj_dim=k,
                                                                  projection_seed=seed),
                                    workdir / f"{kind}-{k}.zarr", s, r)
            except ProjidxError as e:
                rows.append({"kind": kind, "k": k, "seed": seed, "error": str(e)})
                continue
            for method in approx:
                rows.append({"kind": kind, "k": k, "seed": seed, "method": method, "seconds": time.perf_counter() - t0,
                             **rank_agreement(approx[method], exact[method])})
            print(f"{kind:<11} k={k:<5} seed={seed} " + "  ".join(
                f"{row['method']}: rho={row['spearman']:.3f} top10={row['top10_overlap']:.2f}"
                for row in rows[-len(approx):]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/fidelity")
    p.add_argument("--cache", default=None)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--query-timesteps", type=int, default=None, help="default: the store's grid, else 10")
    p.add_argument("--noise-draws", type=int, default=None, help="default: D with shared noise, else 4")
    p.add_argument("--train-timesteps", default="grid", choices=["grid", "replay"])
    p.add_argument("--timesteps", type=int, default=4, help="training grid size in grid mode")
    p.add_argument("--noise", default="shared", choices=["shared", "per-sample"])
    p.add_argument("--kinds", default=",".join(k for k in KINDS if k != "identity"))
    p.add_argument("--dims", default="128,256,512,1024,2048,4096,8192")
    p.add_argument("--seeds", default="0", help="comma-separated projection seeds (the spread over seeds)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.n_train, args.queries, args.dims = 100, 4, "256,2048"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = FeaturizeConfig(train_timesteps=args.train_timesteps, timesteps=args.timesteps, noise=args.noise)
    rows = [row for seed in args.seeds.split(",")
            for row in run(args.kinds.split(","), [int(v) for v in args.dims.split(",")], args.n_train,
                           args.queries, args.query_timesteps, args.noise_draws, args.cache, out, int(seed), base)]
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "model": "demo (digits:train, " + str(DEMO_TRAIN) + ")", "settings": vars(args),
              "wall_s": time.perf_counter() - start, "rows": rows}
    (out / "fidelity.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "fidelity.png")
    print(f"wall time {result['wall_s']:.0f}s")


def plot(rows: list[dict], path: Path) -> None:
    methods = [m for m in METHODS if any(r.get("method") == m for r in rows)]
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for kind in sorted({r["kind"] for r in rows if "error" not in r}):
            pts = [(r["k"], r["spearman"]) for r in rows
                   if r.get("method") == method and r["kind"] == kind and r["seed"] == rows[0]["seed"]]
            ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("proj_dim k")
        ax.set_title(f"{method}: Spearman, projected vs exact")
        ax.axhline(0.95, color="gray", linestyle=":")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("Spearman (mean over queries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
