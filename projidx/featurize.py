"""Featurization: per-sample gradients -> projection -> store (training side) or memory (query side).

Training side, per checkpoint c and sample x (METHOD.md):
- ``replay``: one gradient g_c(x, t_x^(c), eps) at the timestep x was drawn at in the epoch that ended
  at checkpoint c (recorded by ``projidx train``), with noise draw 0;
- ``grid``: one gradient per timestep of a K-point grid, noise draw 0 at each.
Query side, per checkpoint c, query x' and timestep t of the query grid S: gbar_c(x', t), the gradient
of the loss averaged over R noise draws (draws 1..R, so never the training-side draw).
Every noise comes from (noise seed, sample id, checkpoint index, timestep, draw): results do not depend
on batch size, chunking, order or machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from projidx.checkpoints import CheckpointSet
from projidx.data import ImageSet
from projidx.diffusion import noise_for, timestep_grid
from projidx.errors import ProjidxError, one_line
from projidx.grads import GradientComputer, Grads, model_fingerprint, parameter_shapes, squared_norms
from projidx.projection import ProjectorSpec, make_projector
from projidx.store import MODES, Chunk, FeatureStore, StoreMeta


@dataclass(frozen=True)
class FeaturizeConfig:
    """Training-side featurization settings. ``batch_size`` counts gradients per vmap call."""

    projector: str = "sjlt"
    proj_dim: int = 2048
    seed: int = 0
    dtype: str = "float16"
    sparsity: int = 1
    train_timesteps: str = "replay"
    timesteps: int = 10
    batch_size: int = 32
    chunk_rows: int = 256
    device: str = "cpu"


def projector_spec(ckpts: CheckpointSet, config: FeaturizeConfig) -> ProjectorSpec:
    """The :class:`ProjectorSpec` for ``ckpts``' model under ``config`` (identity: k = #params)."""
    shapes = parameter_shapes(ckpts.model)
    k = sum(int(np.prod(s)) for s in shapes.values()) if config.projector == "identity" else config.proj_dim
    try:
        return ProjectorSpec(config.projector, k, shapes, seed=config.seed, dtype=config.dtype,
                             sparsity=config.sparsity)
    except ValueError as e:
        raise ProjidxError(str(e)) from e


def replay_timesteps(blob: dict, ids: torch.Tensor, cid: str) -> torch.Tensor:
    """(N,) the recorded training timestep of each id at checkpoint ``cid``; error if any is missing."""
    if "replay_ids" not in blob:
        raise ProjidxError(f"checkpoint {cid} has no record of training timesteps; use --train-timesteps grid")
    table = dict(zip(blob["replay_ids"].tolist(), blob["replay_timesteps"].tolist(), strict=True))
    missing = [int(i) for i in ids.tolist() if int(i) not in table]
    if missing:
        raise ProjidxError(
            f"checkpoint {cid} has no training timestep for sample id {missing[0]} ({len(missing)} missing):"
            " is this the dataset the model was trained on? Use --train-timesteps grid otherwise"
        )
    return torch.tensor([table[int(i)] for i in ids.tolist()], dtype=torch.int64)


def unit_projection(
    grads: Grads, projector, ids: torch.Tensor, timesteps: torch.Tensor, cid: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project B gradients: returns P g / ||g|| (B, k) and exact ||g|| (B,), on the CPU.

    Non-finite gradients raise ProjidxError naming the sample id and timestep.
    """
    norms = squared_norms(grads).sqrt()
    bad = ~torch.isfinite(norms)
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        raise ProjidxError(
            f"checkpoint {cid}: non-finite gradient for sample id {int(ids[b])} at timestep {int(timesteps[b])}"
            " (not stored)"
        )
    projected = projector.project(grads)
    scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    return (projected * scale[:, None]).cpu(), norms.cpu()


def _store_meta(ckpts: CheckpointSet, data: ImageSet, spec: ProjectorSpec, config: FeaturizeConfig) -> StoreMeta:
    grid = timestep_grid(config.timesteps, ckpts.schedule.T) if config.train_timesteps == "grid" else []
    return StoreMeta(
        projector=spec,
        model_fingerprint=model_fingerprint(ckpts.model),
        dataset_fingerprint=data.fingerprint(),
        dataset_name=data.name,
        n=len(data),
        image_shape=data.image_shape,
        checkpoints=ckpts.describe(),
        loss=ckpts.loss,
        schedule=ckpts.schedule,
        train_timesteps=config.train_timesteps,
        timesteps=grid,
        noise_seed=config.seed,
        chunk_rows=config.chunk_rows,
        checkpoint_dir=str(ckpts.directory.resolve()) if ckpts.directory else None,
    )


def open_or_create(path: Path, meta: StoreMeta, ids: np.ndarray) -> FeatureStore:
    """Create the store, or open an existing one after checking that it was made from the same inputs."""
    if not path.exists():
        return FeatureStore.create(path, meta, ids)
    store = FeatureStore.open(path, mode="r+")
    diff = store.meta.difference(meta)
    if diff is not None:
        raise ProjidxError(
            f"store {path} was written with a different {diff}; refusing to mix them (use a new --store path)"
        )
    return store


def featurize(
    ckpts: CheckpointSet,
    data: ImageSet,
    store_path: str | Path,
    config: FeaturizeConfig = FeaturizeConfig(),
    progress: bool = True,
    on_chunk: Callable[[str, int], None] | None = None,
) -> FeatureStore:
    """Featurize ``data`` at every checkpoint into the store at ``store_path`` (created or resumed).

    Chunks already done (and readable) are skipped; corrupted ones are recomputed. ``on_chunk(cid, i)``
    is called after each chunk is written.
    """
    if config.train_timesteps not in MODES:
        raise ProjidxError(f"--train-timesteps must be one of {MODES}, got {config.train_timesteps!r}")
    if data.image_shape != tuple(ckpts.image_shape):
        raise ProjidxError(f"data images are {data.image_shape}, the model was trained on {tuple(ckpts.image_shape)}")
    if config.batch_size < 1 or config.chunk_rows < 1:
        raise ProjidxError("batch size and chunk rows must be >= 1")
    spec = projector_spec(ckpts, config)
    meta = _store_meta(ckpts, data, spec, config)
    blobs = [c.load() for c in ckpts.checkpoints]  # validates every checkpoint before anything is written
    replays = [replay_timesteps(b, data.ids, c.id) for b, c in zip(blobs, ckpts.checkpoints, strict=True)] \
        if config.train_timesteps == "replay" else None
    computer = GradientComputer(ckpts.model, ckpts.schedule, ckpts.loss, config.device)
    try:
        computer.load_state_dict(blobs[0]["state_dict"])
    except RuntimeError as e:
        raise ProjidxError(f"checkpoint {ckpts.checkpoints[0].id} does not fit the model: {one_line(e)}") from e
    store = open_or_create(Path(store_path), meta, data.ids.numpy())
    projector = make_projector(spec, config.device)
    todo = [(c, i) for c, cid in enumerate(meta.checkpoint_ids) for i in _pending(store, cid)]
    bar = tqdm(total=len(todo), desc="featurize", unit="chunk", disable=not progress)
    for c, ckpt in enumerate(ckpts.checkpoints):
        chunks = [i for cc, i in todo if cc == c]
        if not chunks:
            continue
        computer.load_state_dict(blobs[c]["state_dict"])
        for i in chunks:
            rows = store.rows(i)
            times = replays[c][rows][:, None] if replays is not None else torch.tensor(meta.timesteps).expand(
                rows.stop - rows.start, -1)
            chunk = _featurize_rows(computer, projector, data.subset(rows), times, c, ckpt.id, config)
            store.write_chunk(ckpt.id, i, chunk)
            bar.update(1)
            if on_chunk is not None:
                on_chunk(ckpt.id, i)
    bar.close()
    return store


def _pending(store: FeatureStore, cid: str) -> list[int]:
    """Chunks of ``cid`` to compute: not done, or done but failing validation (then un-marked)."""
    pending = []
    for i, done in enumerate(store.done(cid)):
        if done:
            try:
                store.read_chunk(cid, i)
                continue
            except ProjidxError:
                store.mark_undone(cid, i)
        pending.append(i)
    return pending


def _featurize_rows(
    computer: GradientComputer,
    projector,
    rows: ImageSet,
    times: torch.Tensor,
    c: int,
    cid: str,
    config: FeaturizeConfig,
) -> Chunk:
    """One row-chunk at one checkpoint. times: (n, G) timesteps per sample."""
    n, g = times.shape
    per_batch = max(1, config.batch_size // g)
    feats, norms, mean_norms = [], [], []
    for start in range(0, n, per_batch):
        x0, ids = rows.images[start : start + per_batch], rows.ids[start : start + per_batch]
        b = len(ids)
        ids_rep = ids.repeat_interleave(g)
        t = times[start : start + b].reshape(-1)
        eps = noise_for(config.seed, ids_rep.tolist(), c, t.tolist(), 0, x0.shape[1:])[:, None]
        grads = computer.per_sample(x0.repeat_interleave(g, dim=0), t, eps)
        f, nrm = unit_projection(grads, projector, ids_rep, t, cid)
        feats.append(f.reshape(b, g, -1))
        norms.append(nrm.reshape(b, g))
        if g == 1:
            mean_norms.append(nrm)
        else:
            mean = {name: v.reshape(b, g, *v.shape[1:]).mean(dim=1) for name, v in grads.items()}
            mean_norms.append(squared_norms(mean).sqrt().cpu())
    return Chunk(
        features=torch.cat(feats).numpy(),
        norms=torch.cat(norms).numpy(),
        mean_norms=torch.cat(mean_norms).numpy(),
        timesteps=times.numpy().astype(np.int32),
    )


@dataclass
class QueryFeatures:
    """Query-side features for M queries at C checkpoints and |S| timesteps.

    features[c]: (M, S, k) float32 P gbar / ||gbar||; norms[c]: (M, S) ||gbar_c(x', t)||;
    mean_norms[c]: (M,) ||(1/|S|) sum_t gbar_c(x', t)||, all exact except the projection.
    """

    ids: np.ndarray
    timesteps: list[int]
    features: list[np.ndarray]
    norms: list[np.ndarray]
    mean_norms: list[np.ndarray]


def featurize_queries(
    store: FeatureStore,
    ckpts: CheckpointSet,
    queries: ImageSet,
    query_timesteps: int = 10,
    noise_draws: int = 4,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
) -> QueryFeatures:
    """Featurize query images with the projector, checkpoints, loss and seed recorded in ``store``."""
    meta = store.meta
    if queries.image_shape != tuple(meta.image_shape):
        raise ProjidxError(
            f"query images are {queries.image_shape}, the store was built from images of {tuple(meta.image_shape)}"
        )
    if noise_draws < 1:
        raise ProjidxError(f"--noise-draws must be >= 1, got {noise_draws}")
    if model_fingerprint(ckpts.model) != meta.model_fingerprint or ckpts.describe() != meta.checkpoints:
        raise ProjidxError(f"the checkpoints given are not the ones store {store.path} was built from")
    grid = timestep_grid(query_timesteps, meta.schedule.T)
    computer = GradientComputer(ckpts.model, meta.schedule, meta.loss, device)
    projector = make_projector(meta.projector, device)
    pairs = [(q, t) for q in range(len(queries)) for t in range(len(grid))]
    per_batch = max(1, batch_size // noise_draws)
    out = QueryFeatures(queries.ids.numpy(), grid, [], [], [])
    bar = tqdm(total=len(ckpts.checkpoints) * len(pairs), desc="query features", disable=not progress)
    for c, ckpt in enumerate(ckpts.checkpoints):
        computer.load_state_dict(ckpt.load()["state_dict"])
        feats = torch.zeros(len(queries), len(grid), meta.projector.proj_dim)
        norms = torch.zeros(len(queries), len(grid))
        sums: dict[str, torch.Tensor] = {}
        for start in range(0, len(pairs), per_batch):
            q = torch.tensor([p[0] for p in pairs[start : start + per_batch]])
            s = torch.tensor([p[1] for p in pairs[start : start + per_batch]])
            t = torch.tensor(grid)[s]
            ids = queries.ids[q]
            eps = torch.stack([
                noise_for(meta.noise_seed, ids.tolist(), c, t.tolist(), r + 1, queries.image_shape)
                for r in range(noise_draws)
            ], dim=1)
            grads = computer.per_sample(queries.images[q], t, eps)
            f, nrm = unit_projection(grads, projector, ids, t, ckpt.id)
            feats[q, s], norms[q, s] = f, nrm
            for name, v in grads.items():
                acc = sums.setdefault(name, torch.zeros(len(queries), *v.shape[1:], device=v.device))
                acc.index_add_(0, q.to(v.device), v)
            bar.update(len(q))
        out.features.append(feats.numpy())
        out.norms.append(norms.numpy())
        out.mean_norms.append((squared_norms(sums).sqrt() / len(grid)).cpu().numpy())
    bar.close()
    return out
