"""``projidx evaluate``: ground truth, end to end. ``memorization`` on generated images; ``lds`` by retraining on
random subsets (the linear datamodeling score, :mod:`projidx.analysis.lds`; the last section of this module).

``memorization``:

1. Plant: the first ``base`` rows of DATA, then ``copies`` identical copies of each of the next ``sources`` rows
   (written to OUT/planted.npz, with the data's labels where it has them).
2. Train a model on the planted set: ``projidx train``'s recipe (cached like the demo's), or the user's command
   template with ``{data_file}`` (the .npz) and ``{out}`` (a folder it fills with checkpoints ``--checkpoints``
   accepts: a projidx checkpoint directory, or one diffusers folder per checkpoint as sub-folders).
3. Generate ``generate`` images from the last checkpoint with deterministic DDIM, stored as 8-bit pixels (as
   ``projidx sample`` writes them).
4. Featurize the planted set with the given settings (featurize's defaults unless told) and rank every training row
   for every generation under each method the store scores (exact scan), and by pixel distance (the yardstick).
5. Report (:mod:`projidx.analysis.memorization`): for generations that reproduce a source, how often a copy is first and
   in the top k; for the others, where the data has labels, the share of the top k with the generation's label
   (a logistic-regression pixel classifier labels the generations; its held-out accuracy is reported).

The store is OUT/store-<objective>-<settings digest>.zarr, so runs with other featurize settings sit beside each other
over one trained model (projidx's recipe is cached; a command's finished run is reused). Writes OUT/memorization.json
and OUT/memorization.png (reproducing generations beside their top-ranked rows under
the default method) and returns the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from projidx.analysis.memorization import memorization_summary, planted_layout, reproductions
from projidx.cli.demo import cached_model
from projidx.data.datasets import ImageSet, load_dataset
from projidx.errors import ProjidxError, one_line
from projidx.features.featurization import featurize, featurize_queries
from projidx.files import atomic_path, file_sha256, write_text_atomic
from projidx.models.checkpoints import CheckpointSet, check_blob, load_checkpoints
from projidx.models.diffusion import ddim_sample, timestep_grid
from projidx.models.training import TrainConfig
from projidx.search.scoring import default_method, exact_scores, exact_topk, query_vectors, scorable_methods
from projidx.settings import FeaturizeConfig, LDSConfig, MemorizationConfig
from projidx.store.feature_store import FeatureStore


def planted_set(data: ImageSet, config: MemorizationConfig) -> tuple[ImageSet, np.ndarray]:
    """The planted training set and its (N,) source layout (:func:`projidx.analysis.memorization.planted_layout`)."""
    need = config.base + config.sources
    if len(data) < need:
        raise ProjidxError(f"data {data.name}: {len(data)} images, planting needs base + sources = {need}")
    source_of = planted_layout(config.base, config.sources, config.copies)
    rows = np.concatenate([np.arange(config.base), config.base + np.maximum(source_of[config.base:], 0)])
    chosen = data.subset(rows)
    ids = torch.arange(len(rows), dtype=torch.int64)
    return ImageSet(f"{data.name} planted", chosen.images, ids, labels=chosen.labels), source_of


def write_npz(data: ImageSet, path: Path) -> ImageSet:
    """Save ``data`` (images in [-1, 1], ids, labels) as an .npz and load it back as a DATA spec (so the store
    records where its training data is)."""
    extra = {"labels": data.labels.numpy()} if data.labels is not None else {}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=data.images.numpy(), ids=data.ids.numpy(), **extra)
    return load_dataset(str(path))


TRAINED = "projidx-trained.json"  # written beside a command's checkpoints once it succeeded


def check_template(template: str, data_field: str) -> None:
    """ProjidxError unless the training command ``template`` has both ``data_field`` and ``{out}``."""
    for field in (data_field, "{out}"):
        if field not in template:
            raise ProjidxError(f"train_command must contain {field}: {template!r}")


def run_train_command(template: str, data_file: Path, out: Path, data_field: str = "{data_file}") -> CheckpointSet:
    """Run the user's training command (``data_field`` and ``{out}`` filled in, shell-quoted) and load the
    checkpoints it wrote: ``out`` itself (a projidx directory or a diffusers folder) or its sub-folders in name order
    (one diffusers folder per checkpoint). A finished run (its record names the same command and data bytes) is
    reused; anything else in ``out`` is removed first."""
    check_template(template, data_field)
    record = json.dumps({"command": template, "data_sha256": file_sha256(data_file)})
    if not ((out / TRAINED).is_file() and (out / TRAINED).read_text() == record):
        shutil.rmtree(out, ignore_errors=True)
        command = template.replace(data_field, shlex.quote(str(data_file))).replace("{out}", shlex.quote(str(out)))
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ProjidxError(f"train_command exited with {done.returncode}: {last}")
    folders = [out] if (out / "manifest.json").is_file() or (out / "model_index.json").is_file() else sorted(
        p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    if not folders:
        raise ProjidxError(f"train_command wrote no checkpoints into {out}")
    ckpts = load_checkpoints(folders)
    write_text_atomic(out / TRAINED, record)
    return ckpts


@torch.no_grad()
def generate(ckpts: CheckpointSet, n: int, steps: int, seed: int) -> ImageSet:
    """``n`` DDIM images from the last checkpoint, rounded to 8-bit pixels as ``projidx sample`` writes them."""
    last = ckpts.checkpoints[-1]
    ckpts.model.load_state_dict(check_blob(last.load(), last.id, ckpts.schedule.T)["state_dict"])
    images = ddim_sample(ckpts.model.eval(), ckpts.schedule, n, ckpts.image_shape, steps=steps, seed=seed,
                         prediction=ckpts.prediction)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255)
    return ImageSet("generated", (pixels / 127.5 - 1).float(), torch.arange(n, dtype=torch.int64))


def pixel_labels(train: ImageSet, generated: ImageSet, seed: int) -> tuple[np.ndarray, float]:
    """Labels for generations from a logistic-regression classifier on the training pixels, and its accuracy on a
    seeded held-out fifth of the training rows."""
    from sklearn.linear_model import LogisticRegression

    x, y = train.images.flatten(1).numpy(), train.labels.numpy()
    held = np.random.default_rng(seed).permutation(len(x)) < len(x) // 5
    check = LogisticRegression(max_iter=2000).fit(x[~held], y[~held])
    accuracy = float((check.predict(x[held]) == y[held]).mean())
    full = LogisticRegression(max_iter=2000).fit(x, y)
    return full.predict(generated.images.flatten(1).numpy()), accuracy


def evaluate_memorization(data: ImageSet, out: str | Path, config: MemorizationConfig = MemorizationConfig(),
                          train_config: TrainConfig = TrainConfig(), featurize_config: FeaturizeConfig =
                          FeaturizeConfig(), train_command: str | None = None, cache: str | Path | None = None,
                          progress: bool = True) -> dict:
    """Run steps 1-5 of the module docstring into ``out``; returns the report written to memorization.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    planted, source_of = planted_set(data, config)
    train_set = write_npz(planted, out / "planted.npz")
    if train_command is not None:
        ckpts = run_train_command(train_command, out / "planted.npz", out / "model")
    else:
        ckpts = cached_model(train_set, train_config, cache)
    trained = time.perf_counter()
    generated = generate(ckpts, config.generate, config.steps, config.seed)
    settings = hashlib.sha256(repr(featurize_config).encode()).hexdigest()[:10]
    store = featurize(ckpts, train_set, out / f"store-{featurize_config.objective}-{settings}.zarr", featurize_config,
                      progress=progress, allow_other_data=train_command is not None)
    queries = featurize_queries(store, ckpts, generated, progress=progress)
    truth = reproductions(generated.images.flatten(1).numpy(), planted.images.flatten(1).numpy(), source_of,
                          config.quantile)
    labels, accuracy = (pixel_labels(planted, generated, config.seed) if planted.labels is not None else (None, None))
    train_labels = planted.labels.numpy() if planted.labels is not None else None
    rankings = {"pixel": _pixel_ranking(generated, planted, config.top_k)}
    for method in scorable_methods(store):
        _, rankings[method] = exact_topk(store, query_vectors(store, queries, method), method, config.top_k)
    report = {
        "settings": asdict(config), "train": str(train_config) if train_command is None else train_command,
        "featurize": asdict(featurize_config), "default_method": default_method(store),
        "threshold": truth.threshold, "memorized": int(truth.memorized.sum()), "generated": config.generate,
        "classifier_accuracy": accuracy,
        "methods": {name: memorization_summary(ranked, truth, source_of, train_labels, labels)
                    for name, ranked in rankings.items()},
        "sources_reproduced": sorted({int(s) for s in truth.source if s >= 0}),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "train_s": trained - start, "wall_s": time.perf_counter() - start,
    }
    report["store"] = store.path.name
    text = json.dumps(report, indent=1)
    write_text_atomic(out / f"memorization-{featurize_config.objective}-{settings}.json", text)  # this setting's
    write_text_atomic(out / "memorization.json", text)  # the latest run
    _picture(out / "memorization.png", generated, planted, truth.memorized, rankings[report["default_method"]],
             report["default_method"])
    return report


def _pixel_ranking(generated: ImageSet, train: ImageSet, k: int) -> np.ndarray:
    """(M, k) training rows nearest each generation in pixel space, nearest first."""
    d = torch.cdist(generated.images.flatten(1), train.images.flatten(1))
    return torch.topk(d, min(k, d.shape[1]), dim=1, largest=False).indices.numpy()


def _picture(path: Path, generated: ImageSet, train: ImageSet, memorized: np.ndarray, ranked: np.ndarray,
             method: str, rows: int = 8, k: int = 6) -> None:
    from projidx.reports.viz import attribution_grid

    pick = np.flatnonzero(memorized)[:rows]
    if len(pick) == 0:
        return
    top = ranked[pick, :k]
    try:
        attribution_grid(path, generated.images[pick].numpy(), train.images[np.maximum(top, 0)].numpy(),
                         np.zeros(top.shape, np.float32), f"generations reproducing a planted image: {method}",
                         labels=[[str(r) for r in row] for row in top.tolist()])
    except (OSError, ValueError) as e:
        raise ProjidxError(f"could not write {path}: {one_line(e)}") from e


# ---- projidx evaluate lds ------------------------------------------------------------------------------------------

OUTPUT_SEED = 424242  # the fixed noises of the measured output (never a store's noise seed)


def recipe_from_manifest(ckpts: CheckpointSet) -> TrainConfig:
    """The :class:`TrainConfig` a projidx checkpoint directory was trained with (its manifest records it)."""
    from projidx.models.checkpoints import MANIFEST
    from projidx.models.diffusion import NoiseSchedule
    from projidx.models.unet import UNetConfig

    if ckpts.directory is None:
        raise ProjidxError("these checkpoints were not trained by 'projidx train': retrain them with your own"
                           " command (train_command, a template with {subset_file} and {out})")
    m = json.loads((ckpts.directory / MANIFEST).read_text())
    if m.get("model", {}).get("kind") != "projidx.SmallUNet" or "training" not in m:
        raise ProjidxError(f"checkpoints {ckpts.directory}: no projidx training recipe recorded; give train_command")
    t = m["training"]
    return TrainConfig(epochs=int(t["epochs"]), checkpoints=len(m["checkpoints"]), seed=int(t["seed"]),
                       loss=str(m["loss"]), lr=float(t["lr"]), batch_size=int(t["batch_size"]),
                       schedule=NoiseSchedule.from_dict(m["schedule"]), unet=UNetConfig.from_dict(m["model"]["config"]))


@torch.no_grad()
def model_output(ckpts: CheckpointSet, queries: ImageSet, timesteps: list[int], draws: int) -> np.ndarray:
    """(Q,) each query's diffusion loss under the last checkpoint, averaged over ``timesteps`` and ``draws`` fixed
    noises (seeded by OUTPUT_SEED, the query id, the timestep and the draw)."""
    from projidx.models.diffusion import diffusion_loss, model_conditioning, noise_for

    last = ckpts.checkpoints[-1]
    model = ckpts.model
    model.load_state_dict(check_blob(last.load(), last.id, ckpts.schedule.T)["state_dict"])
    model.eval()
    abar = ckpts.schedule.alphas_cumprod().float()
    conditioning = queries.conditioning(model_conditioning(model))
    total = torch.zeros(len(queries), dtype=torch.float64)
    for t in timesteps:
        tt = torch.full((len(queries),), t, dtype=torch.int64)
        for r in range(draws):
            eps = noise_for(OUTPUT_SEED, queries.ids.tolist(), 0, [t] * len(queries), r, queries.image_shape)
            total += diffusion_loss(model, queries.images, tt, eps, abar, ckpts.loss, ckpts.prediction,
                                    conditioning).double()
    return (total / (len(timesteps) * draws)).numpy()


def _retrain(job: dict) -> np.ndarray:
    """One retrain of ``evaluate lds`` (a process of its own when there are several workers): train on the subset
    (projidx's recipe, or the command), measure the queries' outputs, save them; returns them (Q,)."""
    from projidx.models.training import train

    torch.set_num_threads(job["threads"])
    folder = Path(job["folder"])
    subset = load_dataset(str(folder / "subset.npz"))
    if job["command"] is not None:
        ckpts = run_train_command(job["command"], folder / "subset.npz", folder / "model", "{subset_file}")
    else:
        model = folder / "model"
        if not (model / "manifest.json").is_file():
            partial = folder / "model.partial"
            shutil.rmtree(partial, ignore_errors=True)
            train(subset, partial, job["recipe"], progress=False)
            partial.rename(model)
        from projidx.models.checkpoints import load_checkpoint_dir

        ckpts = load_checkpoint_dir(model)
    outputs = model_output(ckpts, job["queries"], job["timesteps"], job["draws"])
    with atomic_path(folder / job["outputs"]) as tmp, open(tmp, "wb") as f:
        np.save(f, outputs)
    return outputs


def retrained_outputs(train: ImageSet, masks: np.ndarray, queries: ImageSet, out: Path, config: LDSConfig,
                      recipe: TrainConfig | None, command: str | None, T: int,
                      progress: bool = True, plan: str = "retrains") -> tuple[np.ndarray, float]:
    """(M, Q) each subset's retrained model's outputs on the queries, and the seconds spent retraining. Resumable:
    OUT/``plan``/NNN/ keeps each subset, its model and its outputs (named by the query set and output settings);
    a folder whose subset differs is cleared, finished models and outputs are reused. ``T``: the model's diffusion
    timesteps (the output grid's range)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    timesteps = timestep_grid(config.output_timesteps, T, "midpoints")
    key = hashlib.sha256(json.dumps([queries.fingerprint(), timesteps, config.output_draws]).encode()).hexdigest()[:12]
    jobs, outputs = [], {}
    for m, mask in enumerate(masks):
        folder = out / plan / f"{m:03d}"
        rows = np.flatnonzero(mask)
        subset = train.subset(rows)
        digest = hashlib.sha256(subset.fingerprint().encode() + repr((recipe, command)).encode()).hexdigest()
        record = folder / "subset.json"
        if _read_json(record).get("digest") != digest:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            write_npz(ImageSet(f"{train.name} subset {m}", subset.images, subset.ids, labels=subset.labels),
                      folder / "subset.npz")
            write_text_atomic(record, json.dumps({"digest": digest, "rows": rows.tolist()}))
        try:
            outputs[m] = np.load(folder / f"outputs-{key}.npy")
            continue
        except (OSError, ValueError):
            pass  # not measured yet, or torn: measure (the model is reused if finished)
        jobs.append((m, {"folder": str(folder), "command": command, "recipe": recipe, "queries": queries,
                         "timesteps": timesteps, "draws": config.output_draws, "outputs": f"outputs-{key}.npy",
                         "threads": max(1, (os.cpu_count() or 1) // config.workers)}))
    start = time.perf_counter()
    bar = tqdm(total=len(masks), initial=len(outputs), desc=plan, unit="model", disable=not progress)
    if config.workers == 1 or len(jobs) <= 1:
        for m, job in jobs:
            outputs[m] = _retrain(job)
            bar.update()
    else:
        with ProcessPoolExecutor(config.workers, mp_context=get_context("spawn")) as pool:
            futures = {m: pool.submit(_retrain, job) for m, job in jobs}
            for m, future in futures.items():
                outputs[m] = future.result()
                bar.update()
    bar.close()
    return np.stack([outputs[m] for m in range(len(masks))]), time.perf_counter() - start


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or {} if it is missing, torn or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def leave_out(train: ImageSet, queries: ImageSet, scores: dict[tuple[str, str], np.ndarray], out: Path,
              config: LDSConfig, recipe: TrainConfig | None, command: str | None, T: int,
              progress: bool = True) -> dict:
    """The leave-K-out part of ``evaluate lds`` (:mod:`projidx.analysis.lds`): for the first
    ``config.leave_out_queries`` queries, retrain without each one's top-K rows under every (store, method) of
    ``config.leave_out_methods`` in ``scores`` ({(store, method): (Q, N)}), without K random rows, and on all rows;
    equal removal sets share one retrain (OUT/leave_out/NNN, resumable like the LDS retrains). Returns the plan's
    size, each method's :func:`leave_out_summary` and the removed rows."""
    from projidx.analysis.lds import leave_out_summary, random_rows, top_rows

    q = min(config.leave_out_queries, len(queries))
    picked = queries.subset(slice(0, q))
    removals: dict[str, np.ndarray] = {"random": random_rows(len(train), q, config.leave_out, config.seed)}
    for (store, method), s in scores.items():
        if method in config.leave_out_methods:
            removals[f"{store}/{method}"] = top_rows(s[:q], config.leave_out)
    sets = [()] + sorted({tuple(r.tolist()) for rows in removals.values() for r in rows})  # () = all rows
    position = {s: i for i, s in enumerate(sets)}
    masks = np.ones((len(sets), len(train)), dtype=bool)
    for i, s in enumerate(sets):
        masks[i, list(s)] = False
    outputs, retrain_s = retrained_outputs(train, masks, picked, out, config, recipe, command, T, progress,
                                           plan="leave_out")

    def rise(rows: np.ndarray) -> np.ndarray:  # (q,) each query's loss without its rows minus with all rows
        return np.array([outputs[position[tuple(r.tolist())], j] - outputs[0, j] for j, r in enumerate(rows)])

    baseline = rise(removals["random"])
    return {"k": config.leave_out, "queries": q, "retrains": len(sets), "retrain_s": retrain_s,
            "full_loss": outputs[0].tolist(), "rise_random": baseline.tolist(),
            "methods": {name: {**leave_out_summary(rise(rows), baseline, config.seed), "rise": rise(rows).tolist(),
                               "removed": rows.tolist()}
                        for name, rows in removals.items() if name != "random"}}


def evaluate_lds(stores: list[FeatureStore], queries: ImageSet, out: str | Path, config: LDSConfig = LDSConfig(),
                 train_command: str | None = None, progress: bool = True) -> dict:
    """LDS of every method each store scores, on the same M retrains (:mod:`projidx.analysis.lds`). All stores
    must hold the same training rows; the model retrained is the first store's (its recipe, or ``train_command``).
    Writes OUT/lds.json and OUT/lds.png (and, with ``config.leave_out``, OUT/leave_out.png); returns the report."""
    from projidx.analysis.lds import bootstrap_interval, lds_per_query, subset_masks
    from projidx.search.attribution import store_checkpoints, store_dataset

    first = stores[0]
    if config.leave_out >= first.meta.n:
        raise ProjidxError(f"leave_out must be below the store's {first.meta.n} training rows, got {config.leave_out}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for other in stores[1:]:
        if other.meta.dataset_fingerprint != first.meta.dataset_fingerprint:
            raise ProjidxError(f"store {other.path} holds other training rows than {first.path}: LDS compares methods"
                               " on the same retrains")
    ckpts = store_checkpoints(first)
    train = store_dataset(first)
    train = train if isinstance(train, ImageSet) else train.subset(slice(0, len(train)))
    if train_command is not None:
        check_template(train_command, "{subset_file}")
    recipe = None if train_command is not None else recipe_from_manifest(ckpts)
    masks = subset_masks(len(train), config.subsets, config.alpha, config.seed)
    outputs, retrain_s = retrained_outputs(train, masks, queries, out, config, recipe, train_command,
                                           ckpts.schedule.T, progress)
    rows, per_query, scores = [], {}, {}
    for store in stores:
        store_ckpts = store_checkpoints(store)
        qf = featurize_queries(store, store_ckpts, queries, progress=progress)
        label = store.path.name
        for method in scorable_methods(store):
            scores[label, method] = exact_scores(store, query_vectors(store, qf, method), method)
            values = lds_per_query(scores[label, method], masks, outputs)
            lo, hi = bootstrap_interval(values, seed=config.seed)
            rows.append({"store": label, "objective": store.meta.objective, "method": method,
                         "lds": float(np.nanmean(values)) if np.isfinite(values).any() else None, "ci95": [lo, hi]})
            per_query[f"{label}/{method}"] = [None if not np.isfinite(v) else float(v) for v in values]
    report = {"settings": asdict(config), "train": train_command or str(recipe), "n_train": len(train),
              "queries": len(queries), "output": {"timesteps": config.output_timesteps, "draws": config.output_draws,
                                                  "seed": OUTPUT_SEED, "what": "diffusion loss, last checkpoint"},
              "results": rows, "per_query": per_query, "retrain_s": retrain_s,
              "leave_out": leave_out(train, queries, scores, out, config, recipe, train_command, ckpts.schedule.T,
                                     progress) if config.leave_out else None,
              "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    write_text_atomic(out / "lds.json", json.dumps(report, indent=1))
    from projidx.reports.viz import lds_plot, leave_out_plot

    lds_plot(out / "lds.png", rows)
    if report["leave_out"] is not None:
        leave_out_plot(out / "leave_out.png", report["leave_out"])
    return report
