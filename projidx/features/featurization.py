"""Featurization: per-sample gradients -> projection -> store (training side) or memory (query side).

Training side, per checkpoint c and sample x (METHOD.md):
- ``replay``: one gradient g_c(x, t_x^(c), eps) at the timestep x was drawn at in the epoch that ended
  at checkpoint c (recorded by ``projidx train``);
- ``grid``: one gradient per timestep of a K-point grid.
With ``train_draws`` D > 1 each of those gradients is averaged over D noise draws (the paper: D = 1).
Query side, per checkpoint c, query x' and timestep t of the query grid S: gbar_c(x', t), the gradient
of the loss averaged over R noise draws.
Every noise comes from :func:`projidx.models.diffusion.noise_for` under the store's noise policy: ``shared`` (the
default: (noise seed, checkpoint index, timestep, draw), the same for every sample and for both sides, so a
query's draw r meets the training side's draw r) or ``per-sample`` (also the sample id and the side: the two
sides never share a noise). Results do not depend on batch size, chunking, order or machine.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from projidx.data.datasets import Dataset, ImageSet
from projidx.errors import ProjidxError, one_line
from projidx.features.dist import World, process_group
from projidx.features.encoding import EncodedRows, LatentCache, encoders_record, model_rows, shape_hint
from projidx.features.factorized import FactorizedGradients, factorizable_modules
from projidx.features.grads import (
    GradientComputer,
    GradientSource,
    Projected,
    model_fingerprint,
    parameter_shapes,
    select_parameters,
)
from projidx.features.projection import Projector, ProjectorSpec, make_projector
from projidx.features.query import QueryFeatures
from projidx.models.checkpoints import CheckpointSet, check_blob
from projidx.models.diffusion import (
    QUERY_NOISE,
    TRAIN_NOISE,
    NoiseDraws,
    NoiseSchedule,
    model_conditioning,
    timestep_grid,
)
from projidx.settings import GRIDS, FeaturizeConfig, check_grid_size
from projidx.store.feature_store import Chunk, FeatureStore, StoreMeta, WriterLock, store_exists
from projidx.store.locations import Location

PROJECT_BUFFER_BYTES = 1 << 30  # most gradient bytes held to batch a projection call (dense projector)


def resolve_projector(kind: str, model: torch.nn.Module, objective: str = "loss") -> str:
    """``auto`` -> ``factorized`` (the fastest kind; less faithful than sjlt at equal k, docs/results.md) when
    every trainable layer of ``model`` is one it supports and the objective is the loss, else ``sjlt``; any
    other kind is returned as is."""
    if kind != "auto":
        return kind
    if objective != "loss":
        return "sjlt"
    try:
        factorizable_modules(model)
    except ValueError:
        return "sjlt"
    return "factorized"


def projector_spec(ckpts: CheckpointSet, config: FeaturizeConfig) -> ProjectorSpec:
    """The :class:`ProjectorSpec` for ``ckpts``' model under ``config`` (identity: k = #params)."""
    shapes = parameter_shapes(ckpts.model)
    kind = resolve_projector(config.projector, ckpts.model, config.objective)
    k = sum(int(np.prod(s)) for s in shapes.values()) if kind == "identity" else config.proj_dim
    try:
        return ProjectorSpec(kind, k, shapes, seed=config.projection_seed, dtype=config.dtype, sparsity=config.sparsity)
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


def _unit(
    projected: torch.Tensor, sq_norms: torch.Tensor, ids: torch.Tensor, timesteps: torch.Tensor, cid: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) P g / ||g|| and (B,) ||g|| on the CPU from P g and ||g||^2; ProjidxError if not finite."""
    norms = sq_norms.sqrt()
    bad = ~torch.isfinite(norms)
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        raise ProjidxError(
            f"checkpoint {cid}: non-finite gradient for sample id {int(ids[b])} at timestep {int(timesteps[b])}"
            " (not stored)"
        )
    scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    return (projected * scale[:, None]).cpu(), norms.cpu()


def gradient_computer(
    model: torch.nn.Module, schedule: NoiseSchedule, loss: str, spec: ProjectorSpec, device: str,
    objective: str = "loss", prediction: str = "epsilon",
) -> GradientSource:
    """The per-sample gradient source for ``spec``: layer inputs and output gradients from one batched forward and
    backward pass (:class:`FactorizedGradients`) where every trainable layer is one it supports, the same gradients
    as torch.func's up to float rounding but faster (docs/performance.md); else torch.func (:class:`GradientComputer`,
    any model; also where the hooks cannot take a model's forward pass apart). The factorized projector needs the
    former."""
    if spec.kind == "factorized" and objective != "loss":
        raise ProjidxError(f"the factorized projector supports the loss objective only, not {objective!r} (pass"
                           " --objective loss)")
    try:
        return FactorizedGradients(model, schedule, loss, device, objective, prediction,
                                   fallback=spec.kind != "factorized")
    except ValueError as e:
        if spec.kind == "factorized":
            raise ProjidxError(str(e)) from e
        return GradientComputer(model, schedule, loss, device, objective, prediction)


def _store_meta(ckpts: CheckpointSet, data: Dataset, spec: ProjectorSpec, config: FeaturizeConfig,
                params: dict) -> StoreMeta:
    """What a store of ``data`` at ``ckpts`` under ``config`` records (``data``: the images as given, in pixels);
    ``params``: the selection's record (:func:`select_parameters`)."""
    grid = timestep_grid(config.timesteps, ckpts.schedule.T, config.grid) if config.train_timesteps == "grid" else []
    conditioning = model_conditioning(ckpts.model)
    return StoreMeta(
        projector=spec,
        model_fingerprint=model_fingerprint(ckpts.model),
        dataset_fingerprint=data.fingerprint(tuple(sorted(conditioning))),
        dataset_name=data.name,
        n=len(data),
        image_shape=data.image_shape,
        checkpoints=ckpts.describe(),
        loss=ckpts.loss,
        schedule=ckpts.schedule,
        train_timesteps=config.train_timesteps,
        timesteps=grid,
        noise_seed=config.noise_seed,
        chunk_rows=config.chunk_rows,
        objective=config.objective,
        train_draws=config.train_draws,
        noise=config.noise,
        prediction=ckpts.prediction,
        conditioning=conditioning,
        encoders=encoders_record(ckpts, config.latents),
        params=params,
        checkpoint_dir=str(ckpts.directory.resolve()) if ckpts.directory else None,
        checkpoint_folders=[str(f) for f in ckpts.folders],
        checkpoint_base=str(ckpts.base) if ckpts.base else None,
        dataset_options=data.options.to_dict(),
        losses=True,
    )


def open_or_create(path: str | Path | Location, meta: StoreMeta, ids: np.ndarray) -> FeatureStore:
    """Create the store, or open an existing one after checking that it was made from the same inputs and
    repairing what a re-run can repair (damaged array metadata, ids; see :meth:`FeatureStore.repair`)."""
    if not store_exists(path):
        return FeatureStore.create(path, meta, ids)
    store = FeatureStore.open(path, mode="r+")
    diff = store.meta.difference(meta)
    if diff is not None:
        raise ProjidxError(
            f"store {path} was written with a different {diff}; refusing to mix them (use a new --store path)"
        )
    store.repair(ids)
    return store


def featurize(
    ckpts: CheckpointSet,
    data: Dataset,
    store_path: str | Path | Location,
    config: FeaturizeConfig = FeaturizeConfig(),
    progress: bool = True,
    on_chunk: Callable[[str, int], None] | None = None,
    allow_other_data: bool = False,
) -> FeatureStore:
    """Featurize ``data`` at every checkpoint into the store at ``store_path`` (a local path or an fsspec URL;
    created or resumed).

    Chunks already done (and matching their done records) are skipped; damaged ones are recomputed, damaged
    array metadata and ids are repaired. One writer at a time (:class:`WriterLock`). ``on_chunk(cid, i)`` is
    called after each chunk is written. In replay mode ``data`` must be the data the checkpoints were trained on
    (the manifest's dataset fingerprint), unless ``allow_other_data`` (then a warning is printed).

    Under ``torchrun`` with W > 1 ranks (:mod:`projidx.features.dist`) every rank calls this with the same arguments:
    rank 0 takes the lock and creates or repairs the store, then each rank checks its share of the done chunks
    and computes its share of the pending ones (whole row-chunks: one writer per chunk object). The store is
    the one-process run's bit for bit, given the same torch thread count per process (torch's CPU kernels sum
    in a thread-dependent order); every rank returns it once all have finished.
    """
    with process_group(config.device) as world:
        config = replace(config, device=world.device(config.device))
        return _featurize(world, ckpts, data, store_path, config, progress, on_chunk, allow_other_data)


def _featurize(
    world: World,
    ckpts: CheckpointSet,
    data: Dataset,
    store_path: str | Path,
    config: FeaturizeConfig,
    progress: bool,
    on_chunk: Callable[[str, int], None] | None,
    allow_other_data: bool,
) -> FeatureStore:
    """:func:`featurize` on this rank of ``world``."""
    if data.image_shape != tuple(ckpts.image_shape):
        raise ProjidxError(f"data images are {data.image_shape}, the model was trained on {tuple(ckpts.image_shape)}"
                           + shape_hint(ckpts))
    # the model's inputs besides the image are in the data (every caption, for a text encoder)
    rows = model_rows(ckpts, data, model_conditioning(ckpts.model), config.latents, config.noise_seed, config.device,
                      config.batch_size)
    # every checkpoint is loaded and validated before anything is written
    blobs = [check_blob(c.load(), c.id, ckpts.schedule.T) for c in ckpts.checkpoints]
    if config.train_timesteps == "auto":
        config = replace(config, train_timesteps="replay" if "replay_ids" in blobs[0] else "grid")
    if config.train_timesteps == "grid":
        check_grid_size("timesteps", config.timesteps, ckpts.schedule.T)
    trained_on = ckpts.dataset.get("fingerprint")
    if config.train_timesteps == "replay" and trained_on and trained_on != data.fingerprint():
        message = (f"data {data.name} is not the data the checkpoints were trained on (its fingerprint differs from"
                   " the manifest's): replayed timesteps would be attributed to the wrong images")
        if not allow_other_data:
            raise ProjidxError(message + "; pass the training data, use --train-timesteps grid, or --other-data")
        warnings.warn(message, stacklevel=2)
    params = select_parameters(ckpts.model, config.params)  # the model's other parameters frozen from here on
    spec = projector_spec(ckpts, config)
    meta = _store_meta(ckpts, data, spec, config, params)
    replays = [replay_timesteps(b, data.ids, c.id) for b, c in zip(blobs, ckpts.checkpoints, strict=True)] \
        if config.train_timesteps == "replay" else None
    computer = gradient_computer(ckpts.model, ckpts.schedule, ckpts.loss, spec, config.device, config.objective,
                                 ckpts.prediction)
    try:
        computer.load_state_dict(blobs[0]["state_dict"])
    except RuntimeError as e:
        raise ProjidxError(f"checkpoint {ckpts.checkpoints[0].id} does not fit the model: {one_line(e)}") from e
    check_memory(spec, config, meta.gradients_per_sample, world.local_size)
    location = Location.parse(store_path)
    if isinstance(rows, EncodedRows) and "vae" in meta.encoders:
        rows.cache = LatentCache.beside(location, meta.encoders["vae"], meta.dataset_fingerprint, config.latents,
                                        config.noise_seed)
    with ExitStack() as held:  # rank 0 holds the writer lock until every rank has finished

        def create() -> FeatureStore:
            held.enter_context(WriterLock(location))
            return open_or_create(location, meta, data.ids.numpy())

        store = world.on_main(create)
        if store is None:
            store = _open_as_peer(location, meta, world)
        _featurize_share(world, store, ckpts, rows, config, meta, spec, blobs, replays, computer,
                         progress and world.rank == 0, on_chunk)
        world.barrier()
    return store


def _open_as_peer(location: Location, meta: StoreMeta, world: World) -> FeatureStore:
    """The store rank 0 created or repaired, opened by another rank, which checks it against its own inputs."""
    store = FeatureStore.open(location, mode="r+")
    diff = store.meta.difference(meta)
    if diff is not None:
        raise ProjidxError(f"rank {world.rank}: store {location} was written with a different {diff} than this"
                           " rank's inputs; give every rank the same --checkpoints, --data and flags")
    return store


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def recorded_settings(meta: StoreMeta) -> dict:
    """The :class:`FeaturizeConfig` fields a store was written with (to resume it without repeating every flag)."""
    out = {"projector": meta.projector.kind, "proj_dim": meta.projector.proj_dim, "projection_seed":
           meta.projector.seed, "dtype": meta.projector.dtype, "sparsity": meta.projector.sparsity,
           "noise": meta.noise, "noise_seed": meta.noise_seed, "train_timesteps": meta.train_timesteps,
           "chunk_rows": meta.chunk_rows, "objective": meta.objective, "train_draws": meta.train_draws,
           "params": meta.params.get("patterns", "all")}
    if "latents" in meta.encoders:
        out["latents"] = meta.encoders["latents"]
    if meta.train_timesteps == "grid":
        out["timesteps"] = len(meta.timesteps)
        kinds = [g for g in GRIDS if timestep_grid(len(meta.timesteps), meta.schedule.T, g) == meta.timesteps]
        if kinds:
            out["grid"] = kinds[0]
    return out


def check_memory(spec: ProjectorSpec, config: FeaturizeConfig, gradients_per_sample: int, processes: int = 1) -> None:
    """ProjidxError (before anything is written) when one row-chunk's features and one batch of per-sample
    gradients, in each of ``processes`` featurizing processes on this machine, would not fit in the memory
    available, naming the flags to lower."""
    k, p = spec.proj_dim, spec.input_dim
    chunk = config.chunk_rows * gradients_per_sample * k * (8 + np.dtype(config.dtype).itemsize)
    batch = config.batch_size * (2 * p + 2 * k) * 4
    need = (chunk + batch) * processes
    available = available_memory()
    if available is not None and need > available:
        ranks = f" in each of {processes} ranks on this machine" if processes > 1 else ""
        raise ProjidxError(
            f"--chunk-rows {config.chunk_rows} x --proj-dim {k} x {gradients_per_sample} gradients per sample and"
            f" --batch-size {config.batch_size} x {p} parameters{ranks} need about {need / 2**30:.1f} GiB,"
            f" {available / 2**30:.1f} GiB is available: lower --chunk-rows, --proj-dim or --batch-size")


def _featurize_share(
    world: World,
    store: FeatureStore,
    ckpts: CheckpointSet,
    data: Dataset | EncodedRows,
    config: FeaturizeConfig,
    meta: StoreMeta,
    spec: ProjectorSpec,
    blobs: list[dict],
    replays: list[torch.Tensor] | None,
    computer: GradientSource,
    progress: bool,
    on_chunk: Callable[[str, int], None] | None,
) -> None:
    """The writing part of :func:`featurize`, run while rank 0 holds the store's writer lock: this rank's
    share of the done chunks checked, then its share of the pending chunks of every rank computed.

    Units are (checkpoint index, chunk index) in that order; unit j of a list goes to rank j mod W, first of
    all units (to check them), then of the pending ones (to compute them), so the work stays balanced on resume.
    """
    projector = make_projector(spec, config.device)
    noise = NoiseDraws(config.noise, config.noise_seed, TRAIN_NOISE, config.train_draws)
    units = [(c, i) for c in range(len(meta.checkpoint_ids)) for i in range(store.n_chunks)]
    pending = sorted(u for part in world.gather(_pending(store, meta.checkpoint_ids, world.share(units)))
                     for u in part)
    todo = world.share(pending)
    desc = "featurize" if world.size == 1 else f"featurize (rank 0 of {world.size}: its share)"
    bar = tqdm(total=len(todo), desc=desc, unit="chunk", disable=not progress)
    loaded = 0
    for c, i in todo:
        ckpt = ckpts.checkpoints[c]
        if c != loaded:
            computer.load_state_dict(blobs[c]["state_dict"])
            loaded = c
        rows = store.rows(i)
        times = replays[c][rows][:, None] if replays is not None else torch.tensor(meta.timesteps).expand(
            rows.stop - rows.start, -1)
        chunk = _featurize_rows(computer, projector, data.subset(rows), times, c, ckpt.id, config.batch_size, noise,
                                meta.conditioning, losses=store.meta.losses)
        store.write_chunk(ckpt.id, i, chunk)
        bar.update(1)
        if on_chunk is not None:
            on_chunk(ckpt.id, i)
    bar.close()


def _pending(store: FeatureStore, cids: list[str], units: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ``units`` (checkpoint index, chunk index) to compute: not done (an unreadable done record counts as
    not done), or done but failing validation against the record (then un-marked)."""
    records = {c: store.records(cids[c], unreadable_as_undone=True) for c in sorted({c for c, _ in units})}
    pending = []
    for c, i in units:
        if records[c][i]:
            try:
                store.read_chunk(cids[c], i, int(records[c][i]))
                continue
            except ProjidxError:
                store.mark_undone(cids[c], i)
        pending.append((c, i))
    return pending


def _featurize_rows(
    computer: GradientSource,
    projector: Projector,
    rows: ImageSet,
    times: torch.Tensor,
    c: int,
    cid: str,
    batch_size: int,
    noise: NoiseDraws,
    conditioning: dict[str, dict],
    losses: bool = False,
) -> Chunk:
    """Features of ``rows`` at checkpoint index ``c``: times (n, G) timesteps per sample; at each, the gradient
    of the loss averaged over the ``noise`` draws (training or query side), the model given the ``conditioning``
    inputs it takes (:func:`projidx.models.diffusion.model_conditioning`) from ``rows``.

    Gradients are computed ``batch_size`` evaluations at a time (samples x timesteps x draws) and projected in
    calls of ``projection_rows`` samples; features accumulate in float32 (the store casts on write).
    Returns features (n, G, k), norms (n, G) and the norm of each sample's mean gradient over G (n,); with
    ``losses`` also the training loss at each of the n x G (x0, t, draws) (n, G), from the gradients' own forward
    passes.
    """
    n, g = times.shape
    per_batch = max(1, batch_size // (g * noise.count))
    per_call = projection_rows(projector, per_batch, g)
    feats, norms, mean_norms, row_losses = [], [], [], []
    for start in range(0, n, per_call):
        stop = min(start + per_call, n)
        ids = rows.ids[start:stop].repeat_interleave(g)
        t = times[start:stop].reshape(-1)
        projected = _project_samples(computer, projector, rows, times, start, stop, per_batch, c, noise,
                                     conditioning, losses)
        f, nrm = _unit(projected.features, projected.sq_norms, ids, t, cid)
        feats.append(f.reshape(stop - start, g, -1))
        norms.append(nrm.reshape(stop - start, g))
        mean_norms.append(projected.mean_sq_norms.sqrt().cpu())
        row_losses.append(projected.losses.cpu().reshape(stop - start, g))
    return Chunk(
        features=torch.cat(feats).numpy(),
        norms=torch.cat(norms).numpy(),
        mean_norms=torch.cat(mean_norms).numpy(),
        timesteps=times.numpy().astype(np.int32),
        losses=torch.cat(row_losses).numpy().astype(np.float32) if losses else None,
    )


def projection_rows(projector: Projector, per_batch: int, groups: int) -> int:
    """Samples per projection call: one gradient batch, or more for projectors that want many rows
    (``preferred_rows``), as long as their gradients fit in PROJECT_BUFFER_BYTES."""
    wanted = -(-projector.preferred_rows // groups)
    if wanted <= per_batch:
        return per_batch
    fits = PROJECT_BUFFER_BYTES // max(1, 4 * projector.spec.input_dim * groups)
    return max(per_batch, min(wanted, fits))


def _inputs(rows: ImageSet, times: torch.Tensor, a: int, b: int, c: int, noise: NoiseDraws,
            conditioning: dict[str, dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The inputs of samples [a, b) of ``rows`` at each of their G ``times`` (n, G), one row per (sample, timestep):
    x0 ((b-a)*G, C, H, W), t ((b-a)*G,), their ``noise`` draws at checkpoint index ``c`` ((b-a)*G, R, C, H, W) and
    the model's ``conditioning`` inputs."""
    g = times.shape[1]
    part = rows.subset(slice(a, b))
    t = times[a:b].reshape(-1)
    eps = noise.sample(part.ids.repeat_interleave(g).tolist(), c, t.tolist(), part.image_shape)
    cond = {name: v.repeat_interleave(g, dim=0) for name, v in part.conditioning(conditioning).items()}
    return part.images.repeat_interleave(g, dim=0), t, eps, cond


def _project_samples(
    computer: GradientSource,
    projector: Projector,
    rows: ImageSet,
    times: torch.Tensor,
    start: int,
    stop: int,
    per_batch: int,
    c: int,
    noise: NoiseDraws,
    conditioning: dict[str, dict],
    losses: bool,
) -> Projected:
    """P g, ||g||^2 and the losses (rows (stop-start)*G) and ||mean_G g||^2 (stop-start) for samples [start, stop)
    (the losses NaN where not wanted and not free)."""
    g = times.shape[1]
    if stop - start <= per_batch:
        x0, t, eps, cond = _inputs(rows, times, start, stop, c, noise, conditioning)
        return computer.project(projector, x0, t, eps, groups=g, conditioning=cond)
    # a projector that wants more rows per call than one gradient batch (dense) takes full per-sample gradients
    # (the factorized projector never asks for more rows), and the losses from forward passes of their own
    batches = [_inputs(rows, times, a, min(a + per_batch, stop), c, noise, conditioning)
               for a in range(start, stop, per_batch)]
    parts = [computer.per_sample(*inputs) for inputs in batches]
    grads = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    del parts
    row_losses = (torch.cat([computer.losses(*inputs).cpu() for inputs in batches]) if losses
                  else torch.full(((stop - start) * g,), float("nan")))
    return Projected(*projector.project_with_norms(grads, g), row_losses)


def query_defaults(meta: StoreMeta, query_timesteps: int | None, noise_draws: int | None) -> tuple[list[int], int]:
    """The query grid S and the draws R for a store when the caller leaves them out (None).

    S: the store's own training grid in grid mode (so that every method, ``matched`` included, can be scored),
    else the paper's grid of 10; ``query_timesteps`` n asks for the paper's grid of n. R: under shared noise the
    store's ``train_draws`` (the query's draws are then exactly the training side's), else 4.
    """
    if query_timesteps is None:
        grid = list(meta.timesteps) if meta.train_timesteps == "grid" else timestep_grid(10, meta.schedule.T)
    elif query_timesteps < 1:
        raise ProjidxError(f"query_timesteps must be >= 1, got {query_timesteps}")
    else:
        check_grid_size("query_timesteps", query_timesteps, meta.schedule.T)
        grid = timestep_grid(query_timesteps, meta.schedule.T)
    draws = noise_draws if noise_draws is not None else (meta.train_draws if meta.noise == "shared" else 4)
    if draws < 1:
        raise ProjidxError(f"noise_draws must be >= 1, got {draws}")
    return grid, draws


def select_as_store(meta: StoreMeta, model: torch.nn.Module, given: str = "the checkpoints given") -> None:
    """Select (:func:`select_parameters`) the parameters of ``model`` that the store attributes; ProjidxError unless
    they are the same names and shapes. Stores written before the selection was recorded leave ``model`` as it
    is."""
    if meta.params and select_parameters(model, meta.params["patterns"]) != meta.params:
        raise ProjidxError(f"the parameters --params {meta.params['patterns']!r} selects in {given} are not the ones"
                           " the store attributes (another model)")


def check_checkpoints(store: FeatureStore, ckpts: CheckpointSet, given: str = "the checkpoints given") -> None:
    """ProjidxError unless ``ckpts`` are the ones ``store`` was built from: the same model fingerprint over the
    store's parameter selection (:func:`select_as_store`, which ``ckpts.model`` keeps), the same checkpoint ids,
    file hashes and weights (wherever the files now are), and the same VAE and text encoder."""
    select_as_store(store.meta, ckpts.model, given)
    if model_fingerprint(ckpts.model) != store.meta.model_fingerprint or ckpts.describe() != store.meta.checkpoints:
        raise ProjidxError(f"{given} are not the ones store {store.path} was built from (another model or other"
                           " checkpoint files)")
    frozen = ckpts.frozen.describe() if ckpts.frozen is not None else {}
    if frozen != {k: v for k, v in store.meta.encoders.items() if k != "latents"}:
        raise ProjidxError(f"{given} are not the ones store {store.path} was built from (another VAE, tokenizer or"
                           " text encoder)")


def load_state_dicts(ckpts: CheckpointSet) -> list[dict]:
    """Every checkpoint's state dict, hash-checked and validated (:func:`check_blob`)."""
    return [check_blob(c.load(), c.id, ckpts.schedule.T)["state_dict"] for c in ckpts.checkpoints]


def featurize_queries(
    store: FeatureStore,
    ckpts: CheckpointSet,
    queries: ImageSet,
    query_timesteps: int | None = None,
    noise_draws: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    state_dicts: list[dict] | None = None,
) -> QueryFeatures:
    """Featurize query images with the projector, loss, schedule, objective, noise policy and seeds recorded in
    ``store``, at the checkpoints ``ckpts`` (refused unless they are the store's). ``query_timesteps`` (|S|) and
    ``noise_draws`` (R) default as :func:`query_defaults` says. ``state_dicts``: the checkpoints' weights already
    loaded and checked (:func:`load_state_dicts`; a warm service keeps them), else each file is read."""
    meta = store.meta
    if queries.image_shape != tuple(meta.image_shape):
        raise ProjidxError(
            f"query images are {queries.image_shape}, the store was built from images of {tuple(meta.image_shape)}"
            + shape_hint(ckpts)
        )
    check_checkpoints(store, ckpts)
    grid, draws = query_defaults(meta, query_timesteps, noise_draws)
    # loss and schedule come from the store, never from the CheckpointSet handed in
    computer = gradient_computer(ckpts.model, meta.schedule, meta.loss, meta.projector, device, meta.objective,
                                 meta.prediction)
    # the model's inputs besides the image are in the queries; latents as the store's training side made them
    encoded = model_rows(ckpts, queries, meta.conditioning, meta.encoders.get("latents", "mean"), meta.noise_seed,
                         device, batch_size)
    projector = make_projector(meta.projector, device)
    noise = NoiseDraws(meta.noise, meta.noise_seed, QUERY_NOISE, draws)
    times = torch.tensor(grid).expand(len(queries), -1)
    # batch_size counts gradient evaluations: each (query, timestep) gradient averages `draws` of them
    per_block = max(1, batch_size // (len(grid) * draws))
    out = QueryFeatures(queries.ids.numpy(), grid, [], [], [], store.uuid)
    bar = tqdm(total=len(ckpts.checkpoints) * len(queries), desc="query features", unit="gradient set",
               disable=not progress)
    weights = state_dicts if state_dicts is not None else load_state_dicts(ckpts)
    blocks = [slice(a, min(a + per_block, len(queries))) for a in range(0, len(queries), per_block)]
    # a pipeline's encoders run once, not per checkpoint (its encoded queries are held); other rows are read per
    # block (a streamed training set as queries stays on disk)
    held = [encoded.subset(rows) for rows in blocks] if isinstance(encoded, EncodedRows) else None
    for c, ckpt in enumerate(ckpts.checkpoints):
        computer.load_state_dict(weights[c])
        parts = []
        for i, rows in enumerate(blocks):
            block = held[i] if held is not None else encoded.subset(rows)
            parts.append(_featurize_rows(computer, projector, block, times[rows], c, ckpt.id, batch_size, noise,
                                         meta.conditioning))
            bar.update(rows.stop - rows.start)
        out.features.append(np.concatenate([p.features for p in parts]))
        out.norms.append(np.concatenate([p.norms for p in parts]))
        out.mean_norms.append(np.concatenate([p.mean_norms for p in parts]))
    bar.close()
    return out
