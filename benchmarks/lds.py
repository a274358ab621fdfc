"""Linear datamodeling score (LDS) for diffusion attribution, D-TRAK's protocol scaled to 2 CPU cores.

1. A small DDPM is trained on N digits (the first N of digits:train); its checkpoints are featurized.
2. M random 50% subsets of those N are drawn (fixed seed); a DDPM is retrained on each with the same recipe
   (cached under $PROJIDX_CACHE).
3. The model output for a held-out query is its diffusion loss averaged over fixed timesteps and fixed noises,
   evaluated on each retrained model's final checkpoint.
4. For each attribution method, the predicted output of subset m for query q is the sum of the scores of the
   subset's samples. Influence means *lowering* the query's loss, so LDS(q) = Spearman over m of
   (sum of scores, -loss); LDS = mean over queries, with a bootstrap 95% interval over queries.

Methods: TracIn, ReTrac and cosine on the paper's replay features, on grid features (K timesteps), and on
grid features of D-TRAK's objective (gradient of the mean squared model output, ``featurize --objective dtrak``),
plus the timestep-matched cosine (``matched``) on grid features; each under both noise policies (``--noise``).
Query settings are the store's defaults (``projidx query``'s) unless --query-timesteps / --noise-draws are given.
Nothing is tuned on the evaluation: the recipe is fixed before the retrained models are looked at.

    python benchmarks/lds.py --out bench-out/lds            # < 60 min on 2 cores (retrained models cached)
    python benchmarks/lds.py --quick --out /tmp/lds         # smoke run (M=8, N=200)

Prints a table, writes OUT/lds.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from projidx.checkpoints import CheckpointSet
from projidx.data import ImageSet, load_dataset
from projidx.demo import cached_model
from projidx.diffusion import diffusion_loss, noise_for, timestep_grid
from projidx.featurization import FeaturizeConfig, featurize, featurize_queries
from projidx.scoring import METHODS, exact_scores, query_vectors
from projidx.training import TrainConfig
from projidx.unet import UNetConfig

LDS_TRAIN = TrainConfig(epochs=40, checkpoints=4, seed=0, loss="mse", lr=1e-3, batch_size=32,
                        unet=UNetConfig(channels=1, base=16))
OUTPUT_SEED = 424242  # the fixed noises of the model-output function (never used by featurization)


@torch.no_grad()
def model_output(ckpts: CheckpointSet, queries: ImageSet, timesteps: list[int], draws: int) -> np.ndarray:
    """(Q,) each query's diffusion loss at the final checkpoint, averaged over fixed timesteps and noises."""
    model = ckpts.model
    model.load_state_dict(ckpts.checkpoints[-1].load()["state_dict"])
    model.eval()
    abar = ckpts.schedule.alphas_cumprod().float()
    total = torch.zeros(len(queries))
    for t in timesteps:
        for r in range(draws):
            eps = noise_for(OUTPUT_SEED, queries.ids.tolist(), 0, [t] * len(queries), r, queries.image_shape)
            tt = torch.full((len(queries),), t, dtype=torch.int64)
            total += diffusion_loss(model, queries.images, tt, eps, abar, ckpts.loss)
    return (total / (len(timesteps) * draws)).numpy()


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """(Q,) per-query LDS. scores (Q, N); masks (M, N) bool subsets; outputs (M, Q) retrained losses."""
    predicted = scores @ masks.T.astype(np.float64)  # (Q, M)
    return np.array([stats.spearmanr(predicted[q], -outputs[:, q]).statistic for q in range(scores.shape[0])])


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [np.nanmean(rng.choice(values, len(values))) for _ in range(n)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/lds")
    p.add_argument("--cache", default=None)
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--subsets", type=int, default=32)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--grid", type=int, default=10, help="timesteps per training image in grid mode")
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--query-timesteps", type=int, default=None, help="default: the store's grid, else 10")
    p.add_argument("--noise-draws", type=int, default=None, help="default: D with shared noise, else 4")
    p.add_argument("--noise", default="shared,per-sample", help="comma-separated noise policies")
    p.add_argument("--output-timesteps", type=int, default=10)
    p.add_argument("--output-draws", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.n_train, args.subsets, args.queries, args.grid = 200, 8, 8, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    config = replace(LDS_TRAIN, epochs=LDS_TRAIN.epochs if not args.quick else 10)
    full = load_dataset("digits:train").subset(slice(0, args.n_train))
    full = ImageSet(f"digits:train[:{args.n_train}]", full.images, full.ids)
    queries = load_dataset("digits:test").subset(slice(0, args.queries))
    rng = np.random.default_rng(0)
    masks = np.stack([rng.permutation(args.n_train) < args.n_train // 2 for _ in range(args.subsets)])

    # 1-3: retrained models and their outputs
    out_t = timestep_grid(args.output_timesteps, config.schedule.T)
    outputs = []
    for m, mask in enumerate(masks):
        rows = np.nonzero(mask)[0]
        sub = ImageSet(f"{full.name} subset {m}", full.images[rows], full.ids[rows])
        outputs.append(model_output(cached_model(sub, config, args.cache), queries, out_t, args.output_draws))
        print(f"retrained {m + 1}/{len(masks)}", flush=True)
    outputs = np.stack(outputs)  # (M, Q)
    retrain_s = time.perf_counter() - start

    # 4: attribution on the model trained on everything; the store needs a reloadable dataset (an .npz)
    npz = out / "lds_train.npz"
    np.savez(npz, images=full.images.numpy(), ids=full.ids.numpy())
    train_set = load_dataset(str(npz))
    ckpts = cached_model(train_set, config, args.cache)
    features = {"replay": ("replay", "loss"), f"grid{args.grid}": ("grid", "loss"),
                f"grid{args.grid}-dtrak": ("grid", "dtrak")}
    variants = {f"{label}/{noise}": (mode, objective, noise) for noise in args.noise.split(",")
                for label, (mode, objective) in features.items()}
    rows, per_query = [], {}
    for label, (mode, objective, noise) in variants.items():
        fcfg = FeaturizeConfig(proj_dim=args.proj_dim, train_timesteps=mode, timesteps=args.grid, objective=objective,
                               noise=noise)
        store = featurize(ckpts, train_set, out / f"lds-{label.replace('/', '-')}.zarr", fcfg)
        qf = featurize_queries(store, ckpts, queries, args.query_timesteps, args.noise_draws)
        for method in [m for m in METHODS if m != "matched" or mode == "grid"]:
            scores = exact_scores(store, query_vectors(store, qf, method), method)
            values = lds(scores, masks, outputs)
            lo, hi = bootstrap_ci(values)
            rows.append({"features": label, "method": method, "lds": float(np.nanmean(values)), "ci95": [lo, hi]})
            per_query[f"{label}/{method}"] = values.tolist()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "settings": vars(args), "train_recipe": str(config), "n_train": args.n_train, "subsets": args.subsets,
        "queries": args.queries, "retrain_s": retrain_s, "wall_s": time.perf_counter() - start,
        "results": rows, "per_query": per_query,
    }
    (out / "lds.json").write_text(json.dumps(result, indent=1))
    print(f"{'features/noise':<28} {'method':<8} {'LDS':>7}  95% CI")
    for r in rows:
        print(f"{r['features']:<28} {r['method']:<8} {r['lds']:7.3f}  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    print(f"wall time {result['wall_s']:.0f}s (retraining {retrain_s:.0f}s)")


if __name__ == "__main__":
    main()
