"""``projidx evaluate memorization``: ground truth on generated images, end to end.

1. Plant: the first ``base`` rows of DATA, then ``copies`` identical copies of each of the next ``sources`` rows
   (written to OUT/planted.npz, with the data's labels where it has them).
2. Train a model on the planted set: ``projidx train``'s recipe (cached like the demo's), or the user's command
   template with ``{data_file}`` (the .npz) and ``{out}`` (a folder it fills with checkpoints ``--checkpoints``
   accepts: a projidx checkpoint directory, or one diffusers folder per checkpoint as sub-folders).
3. Generate ``generate`` images from the last checkpoint with deterministic DDIM, stored as 8-bit pixels (as
   ``projidx sample`` writes them).
4. Featurize the planted set with the given settings (featurize's defaults unless told) and rank every training row
   for every generation under each method the store scores (exact scan), and by pixel distance (the yardstick).
5. Report (:mod:`projidx.memorization`): for generations that reproduce a source, how often a copy is first and
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
import platform
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from projidx.checkpoints import CheckpointSet, check_blob, load_checkpoints
from projidx.data import ImageSet, load_dataset
from projidx.demo import cached_model
from projidx.diffusion import ddim_sample
from projidx.errors import ProjidxError, one_line
from projidx.featurization import featurize, featurize_queries
from projidx.files import atomic_path, file_sha256, write_text_atomic
from projidx.memorization import memorization_summary, planted_layout, reproductions
from projidx.scoring import default_method, exact_topk, query_vectors, scorable_methods
from projidx.settings import FeaturizeConfig, MemorizationConfig
from projidx.training import TrainConfig


def planted_set(data: ImageSet, config: MemorizationConfig) -> tuple[ImageSet, np.ndarray]:
    """The planted training set and its (N,) source layout (:func:`projidx.memorization.planted_layout`)."""
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


def run_train_command(template: str, data_file: Path, out: Path) -> CheckpointSet:
    """Run the user's training command (``{data_file}`` and ``{out}`` filled in, shell-quoted) and load the
    checkpoints it wrote: ``out`` itself (a projidx directory or a diffusers folder) or its sub-folders in name order
    (one diffusers folder per checkpoint). A finished run (its record names the same command and data bytes) is
    reused; anything else in ``out`` is removed first."""
    for field in ("{data_file}", "{out}"):
        if field not in template:
            raise ProjidxError(f"train_command must contain {field}: {template!r}")
    record = json.dumps({"command": template, "data_sha256": file_sha256(data_file)})
    if not ((out / TRAINED).is_file() and (out / TRAINED).read_text() == record):
        shutil.rmtree(out, ignore_errors=True)
        command = template.replace("{data_file}", shlex.quote(str(data_file))).replace("{out}", shlex.quote(str(out)))
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
        "settings": config.to_dict(), "train": str(train_config) if train_command is None else train_command,
        "featurize": vars(featurize_config) | {}, "default_method": default_method(store),
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
    from projidx.viz import attribution_grid

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
