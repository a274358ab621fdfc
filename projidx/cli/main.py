"""The ``projidx`` command line: thin wrappers over the library; errors are one line and exit 1."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from projidx.errors import ProjidxError, one_line
from projidx.features.dist import PeerError, world_from_env
from projidx.settings import (
    GRIDS,
    LATENTS,
    METHODS,
    NOISE_POLICIES,
    OBJECTIVES,
    PARAMS_CHOICES,
    PROJECTOR_CHOICES,
    SCHEDULES,
    VALUE_RANGES,
    DataOptions,
    FeaturizeConfig,
    LDSConfig,
    MemorizationConfig,
    SampleConfig,
    ServeLimits,
    check_grid_size,
)

FEATURIZE = FeaturizeConfig()  # the defaults the featurize options show
METHOD_HELP = ("matched (default on whole-model grid stores: mean over the grid of the cosine at the same timestep),"
               " matched-trak (default on an adapter's or other parameter subset's grid store: a TRAK kernel per"
               " timestep, each timestep one vote), retrac (the paper's bias-corrected method), tracin (the paper's"
               " baseline), cosine (of the timestep means), dtrak (D-TRAK's kernel; counterfactual questions), das"
               " (DAS's kernel and residual; stores that record training losses, best with --objective output).")


RESUME_HINT = "re-run the same command to resume (finished work is kept)"


def _fail_cleanly(fn):
    """Turn library errors, OS errors (disk full, file too large, read-only file system, ...), memory exhaustion
    and Ctrl-C into a one-line message and a non-zero exit status (1; 130 for Ctrl-C). Under torchrun, a rank
    stopped by another rank's error exits 1 silently: the failing rank prints the line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PeerError:
            _close_progress_bars()
            sys.exit(1)
        except ProjidxError as e:
            _close_progress_bars()
            raise click.ClickException(" ".join(str(e).split())) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            _close_progress_bars()
            raise click.ClickException(f"{e.strerror}: {e.filename}") from None
        except OSError as e:
            _close_progress_bars()
            where = f": {e.filename}" if e.filename else ""
            raise click.ClickException(f"{e.strerror or one_line(e)}{where}; fix that, then {RESUME_HINT}") from None
        except MemoryError:
            _close_progress_bars()
            raise click.ClickException("out of memory: lower --batch-size, --chunk-rows or --proj-dim, then"
                                       f" {RESUME_HINT}") from None
        except KeyboardInterrupt:
            _close_progress_bars()
            click.echo(f"Error: interrupted; {RESUME_HINT}", err=True)
            sys.exit(130)

    return wrapper


def _check_device(device: str) -> None:
    """A one-line error for a device torch cannot use here (e.g. cuda on a CPU-only build)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ProjidxError(f"--device {device!r} is not a torch device") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProjidxError(f"--device {device!r}: no CUDA device is available to this torch")


def _threads(threads: int | None) -> None:
    """Set torch's CPU thread count where given: torch's threads wait for each other at every operation, and beside
    another busy process a run with one thread per core can be many times slower (docs/performance.md)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _close_progress_bars() -> None:
    """End any progress bar an error interrupted, so the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


DATA = DataOptions()  # the defaults the data options show
DATA_FLAGS = ("value_range", "resize", "image_column", "label_column", "caption_column")


def data_options(fn):
    """--value-range, --resize, --image-column, --label-column, --caption-column: how --data is read
    (settings.DataOptions), handed to the command together as ``data_flags`` (read with :func:`_data`)."""

    @functools.wraps(fn)
    def collected(*args, **kwargs):
        return fn(*args, data_flags={name: kwargs.pop(name) for name in DATA_FLAGS}, **kwargs)

    collected = click.option("--caption-column", default=DATA.caption_column,
                             help="The caption of each image: a Hugging Face dataset's column, or the column of an"
                                  " image folder's metadata.jsonl / metadata.csv [default: 'text' if present].")(
        collected)
    collected = click.option("--label-column", default=DATA.label_column,
                             help="Hugging Face datasets: the label column [default: 'label' if present].")(collected)
    collected = click.option("--image-column", default=DATA.image_column, show_default=True,
                             help="Hugging Face datasets: the image column.")(collected)
    collected = click.option("--resize", default=None, metavar="HxW",
                             help="Resize every image to H x W (bilinear, antialiased) [default: keep; mixed sizes"
                                  " are refused].")(collected)
    return click.option("--value-range", type=click.Choice(VALUE_RANGES), default=DATA.value_range,
                        show_default=True,
                        help="Range of the stored values: auto = uint8 as [0, 255] and float as [-1, 1] (float data"
                             " that looks like [0, 1] or [0, 255] is refused); or declare -1,1, 0,1, 0,255.")(
        collected)


def _data(spec: str, data_flags: dict | None = None, stream: bool = False):
    """The dataset of a --data spec read as the data options say (``data_flags`` from :func:`data_options`;
    None: the defaults). ``stream``: images left on disk where the kind allows (data.StreamedImages)."""
    from projidx.data.datasets import load_dataset

    flags = dict(data_flags or {})
    resize = flags.pop("resize", None)
    if resize is not None:
        try:
            h, w = (int(v) for v in resize.lower().split("x"))
        except ValueError:
            raise ProjidxError(f"--resize must look like 32x32, got {resize!r}") from None
        flags["resize"] = (h, w)
    return load_dataset(spec, _flags(DataOptions, **flags), stream=stream)


STORE_HELP = "A featurized store: a path or an fsspec URL (file://, memory://, s3://, gs://)."


def checkpoints_option(fn):
    """--checkpoints and --base: where the store's checkpoints (and a LoRA store's base model) are now, overriding
    what the store records."""
    fn = click.option("--base", "ckpt_base", default=None, type=click.Path(file_okay=False),
                      help="LoRA stores: the base model's diffusers folder, if it is not where the store records it"
                           " (moved or copied; refused unless it is the store's base).")(fn)
    return click.option("--checkpoints", "ckpt_dir", type=click.Path(file_okay=False), multiple=True,
                        help="The store's checkpoint directory (or diffusers folders, repeated in order), if they are"
                             " not where the store records them (moved or copied; refused unless they are the"
                             " store's checkpoints).")(fn)


def train_data_option(fn):
    """--train-data: where the store's training data is now, overriding the DATA the store records."""
    return click.option("--train-data", default=None,
                        help="The store's training data (reloaded for pictures and file names), if it is not where"
                             " the store records it (refused unless it is the store's data).")(fn)


@click.group()
@click.version_option(package_name="projidx")
def main() -> None:
    """Training-data attribution for diffusion models (Diffusion-TracIn / Diffusion-ReTrac)."""


@main.command()
@click.option("--data", required=True, help="digits[:train|:test], photos[:train|:test|:gray8], or an .npz.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--epochs", default=40, show_default=True, type=click.IntRange(1), help="Passes over the data.")
@click.option("--checkpoints", default=4, show_default=True, type=click.IntRange(1), help="Checkpoints to keep.")
@click.option("--seed", default=0, show_default=True, help="Seed of initialization, order, timesteps and noise.")
@click.option("--loss", type=click.Choice(["mse", "l1"]), default="mse", show_default=True,
              help="Noise-prediction loss (recorded; attribution uses it).")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Minibatch size.")
@click.option("--width", default=32, show_default=True, type=click.IntRange(8), help="UNet base channels.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="linear", show_default=True,
              help="Beta schedule; cosine-clipped is the ReTrac authors' cosine (betas clipped to [1e-4, 0.02]).")
@click.option("--force", is_flag=True, help="Write into a non-empty --out (replacing its checkpoints).")
@data_options
@_fail_cleanly
def train(data, out, epochs, checkpoints, seed, loss, lr, batch_size, width, schedule, force, data_flags) -> None:
    """Train a small DDPM and save checkpoints with their TracIn weights and replay records."""
    from projidx.models.diffusion import NoiseSchedule
    from projidx.models.training import TrainConfig
    from projidx.models.training import train as run_train
    from projidx.models.unet import UNetConfig

    if Path(out).is_dir() and any(Path(out).iterdir()) and not force:
        raise ProjidxError(f"--out {out} is not empty: its checkpoints may be what stores were built from; choose"
                           " another directory, or pass --force to replace them")
    config = TrainConfig(epochs=epochs, checkpoints=checkpoints, seed=seed, loss=loss, lr=lr,
                         batch_size=batch_size, schedule=NoiseSchedule(schedule), unet=UNetConfig(base=width))
    ckpts = run_train(_data(data, data_flags), out, config)
    click.echo(f"wrote {len(ckpts.checkpoints)} checkpoints to {out}")


def checkpoint_options(fn):
    """--checkpoints (repeatable), --checkpoint-weights and --base: what a model's checkpoints are."""
    fn = click.option("--base", default=None, type=click.Path(file_okay=False),
                      help="LoRA fine-tunes: the base model's diffusers folder; each --checkpoints folder then holds"
                           " pytorch_lora_weights.safetensors (save_lora_weights), attributed through the adapter"
                           " (--params lora).")(fn)
    fn = click.option("--checkpoint-weights", "weights", default=None, metavar="W1,W2,...",
                      help="diffusers folders: the TracIn weight of each checkpoint, in order (the learning rate x"
                           " steps since the previous one) [default: 1 each].")(fn)
    return click.option("--checkpoints", "locations", required=True, multiple=True, type=click.Path(),
                        help="A projidx checkpoint directory (from 'projidx train'), or diffusers folders"
                             " (save_pretrained of a pipeline or a UNet with its scheduler config), one per"
                             " checkpoint in training order (repeat the option).")(fn)


def _checkpoints(locations: tuple[str, ...], weights: str | None, base: str | None):
    """The CheckpointSet of --checkpoints / --checkpoint-weights / --base."""
    from projidx.models.checkpoints import load_checkpoints

    values = None
    if weights is not None:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise ProjidxError(f"--checkpoint-weights must be numbers separated by commas, got {weights!r}") from None
    try:
        return load_checkpoints(list(locations), values, base)
    except ProjidxError as e:
        raise ProjidxError(str(e).replace("checkpoint_weights:", "--checkpoint-weights:")) from None


@main.command()
@checkpoint_options
@click.option("--data", required=True, help="The training data the checkpoints were trained on.")
@click.option("--store", required=True, type=click.Path(),
              help="Zarr store to create or resume: a path or an fsspec URL (file://, memory://, s3://, gs://).")
@click.option("--train-timesteps", type=click.Choice(["grid", "replay"]), default=FEATURIZE.train_timesteps,
              show_default=True,
              help="grid: --timesteps gradients per image (needed by the matched method); replay: the one timestep"
                   " each image was trained at (the paper's setting, needs recorded timesteps).")
@click.option("--timesteps", default=FEATURIZE.timesteps, show_default=True, type=int, help="Grid size K in grid mode.")
@click.option("--grid", type=click.Choice(GRIDS), default=FEATURIZE.grid, show_default=True,
              help="Grid placement: midpoints of K equal bins of [0, T), or the paper's linspace(1, T-1, K).")
@click.option("--noise", type=click.Choice(NOISE_POLICIES), default=FEATURIZE.noise, show_default=True,
              help="shared: the same noise for every image and both sides at each (checkpoint, timestep, draw);"
                   " per-sample: a noise per image and side (the paper's code).")
@click.option("--proj-dim", default=FEATURIZE.proj_dim, show_default=True, type=int, help="Projected dimension k.")
@click.option("--projector", type=click.Choice(PROJECTOR_CHOICES), default=FEATURIZE.projector, show_default=True,
              help="sjlt (faithful, fast), or auto: factorized where every layer allows it (faster, less faithful).")
@click.option("--projection-seed", default=FEATURIZE.projection_seed, show_default=True,
              help="Seed of the JL projection only.")
@click.option("--noise-seed", default=FEATURIZE.noise_seed, show_default=True, help="Seed of every noise draw only.")
@click.option("--batch-size", default=FEATURIZE.batch_size, show_default=True, type=int,
              help="Gradient evaluations per call (never changes results).")
@click.option("--chunk-rows", default=FEATURIZE.chunk_rows, show_default=True, type=int, help="Store rows per chunk.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=FEATURIZE.dtype, show_default=True,
              help="Storage type of the unit projected gradients (norms are always float32).")
@click.option("--device", default=FEATURIZE.device, show_default=True, help="Where gradients are computed.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=FEATURIZE.objective, show_default=True,
              help="Differentiate the training loss (the paper), D-TRAK's mean squared model output (dtrak) or"
                   " DAS's mean model output (output).")
@click.option("--train-draws", default=FEATURIZE.train_draws, show_default=True, type=click.IntRange(1),
              help="Noise draws averaged per training-side gradient (the paper: 1; costs D x the gradients).")
@click.option("--latents", type=click.Choice(LATENTS), default=FEATURIZE.latents, show_default=True,
              help="Pipelines with a VAE: each image's latent is its posterior mean, or a draw seeded by --noise-seed"
                   " (both sides).")
@click.option("--params", default=FEATURIZE.params, show_default=True, metavar="|".join(PARAMS_CHOICES) + "|GLOBS",
              help="The attributed parameters (the others are frozen; the projection is sized to them): all, lora (a"
                   " LoRA adapter's weights), or glob patterns over parameter names, e.g. '*attn2.to_k*,*attn2.to_v*';"
                   " auto: lora where the checkpoints carry an adapter (--base), else all.")
@click.option("--other-data", is_flag=True,
              help="Replay mode: accept data that is not the set the checkpoints were trained on (warns).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads torch uses (default: torch's, one per core). Beside other busy processes, fewer"
                   " threads than cores avoid a many-fold slow-down.")
@data_options
@_fail_cleanly
def featurize(locations, weights, base, data, store, train_timesteps, timesteps, grid, noise, proj_dim, projector,
              projection_seed, noise_seed, batch_size, chunk_rows, dtype, device, objective, train_draws, latents,
              params, other_data, threads, data_flags) -> None:
    """Per-sample gradients of every training image at every checkpoint, projected into a store."""
    import time

    from projidx.features.featurization import featurize as run_featurize
    from projidx.features.grads import select_parameters

    _check_device(device)
    _threads(threads)
    values = dict(projector=projector, proj_dim=proj_dim, projection_seed=projection_seed, noise_seed=noise_seed,
                  noise=noise, dtype=dtype, train_timesteps=train_timesteps, timesteps=timesteps, grid=grid,
                  batch_size=batch_size, chunk_rows=chunk_rows, device=device, objective=objective,
                  train_draws=train_draws, latents=latents, params=params)
    values.update(_recorded_unless_given(store, values))
    config = _flags(FeaturizeConfig, **values)
    ckpts = _checkpoints(locations, weights, base)
    _flags(select_parameters, model=ckpts.model, params=config.params)  # a selection of nothing, named as the flag
    if config.train_timesteps == "grid":
        check_grid_size("--timesteps", config.timesteps, ckpts.schedule.T)
    images = _data(data, data_flags, stream=True)
    start = time.perf_counter()
    fs = run_featurize(ckpts, images, store, config, allow_other_data=other_data)
    world = world_from_env()
    if world.rank == 0:
        ranks = f" by {world.size} ranks" if world.size > 1 else ""
        click.echo(f"featurized {len(images)} samples x {len(ckpts.checkpoints)} checkpoints"
                   f" ({fs.meta.train_timesteps}, {fs.meta.noise} noise) into {store}{ranks} in"
                   f" {time.perf_counter() - start:.1f}s")


def _recorded_unless_given(store: str, values: dict) -> dict:
    """For an existing store: its recorded settings for every option left at its default, so that resuming needs
    no flags but --checkpoints, --data and --store (an option given explicitly is compared, not replaced)."""
    from projidx.features.featurization import recorded_settings
    from projidx.store.feature_store import FeatureStore, store_exists

    try:
        if not store_exists(store):
            return {}
        recorded = recorded_settings(FeatureStore.open(store, mode="r+").meta)
    except ProjidxError:
        return {}  # featurize itself reports what is wrong with the store
    ctx = click.get_current_context()
    return {name: value for name, value in recorded.items() if name in values
            and ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT}


def _flags(cls, **values):
    """``cls(**values)``, with a library error's argument name shown as the CLI flag (proj_dim -> --proj-dim)."""
    try:
        return cls(**values)
    except ProjidxError as e:
        message = str(e)
        for name in values:
            message = message.replace(f"{name} must", f"--{name.replace('_', '-')} must")
        raise ProjidxError(message) from None


@main.command()
@click.option("--store", required=True, type=click.Path(), help=STORE_HELP)
@click.option("--method", type=click.Choice(METHODS), default=None, help=METHOD_HELP)
@click.option("--factory", default="Flat", show_default=True,
              help="FAISS index-factory string: Flat, IVF1024,Flat, IVF1024,SQfp16, HNSW32, IVF1024,PQ64, ...")
@click.option("--index-dim", type=click.IntRange(1), default=None,
              help="Second seeded JL over the checkpoint concatenation to this dimension [default: off, C x k].")
@click.option("--on-disk", is_flag=True, help="IVF only: inverted lists in a file next to the index, memory-mapped.")
@click.option("--nprobe", type=click.IntRange(1), default=None,
              help="IVF lists a query visits by default (recorded; query --nprobe overrides) [default: 1].")
@click.option("--train-rows", default=100_000, show_default=True, type=click.IntRange(1),
              help="Rows sampled (seeded) to train an index that needs training.")
@click.option("--recall-queries", default=100, show_default=True, type=click.IntRange(1),
              help="Store rows used as queries for the recall@10 report.")
@_fail_cleanly
def index(store, method, factory, index_dim, on_disk, nprobe, train_rows, recall_queries) -> None:
    """Build a top-k index whose inner product is the method's score (streamed, with a recall report)."""
    from projidx.search.index import IndexConfig, build_index, read_sidecar
    from projidx.search.scoring import default_method
    from projidx.store.feature_store import FeatureStore

    fs = FeatureStore.open(store)
    method = method or default_method(fs)
    config = _flags(IndexConfig, factory=factory, index_dim=index_dim, on_disk=on_disk, nprobe=nprobe,
                    train_rows=train_rows, recall_queries=recall_queries)
    path = build_index(fs, method, config)
    recall = read_sidecar(fs, method, digest=False)[0]["recall"]  # build_index checked the files it wrote
    click.echo(f"wrote {path} (recall@{recall['k']} vs the exact scan: {recall['recall_at_10']:.3f} over"
               f" {recall['queries']} store rows as queries)")


@main.command()
@click.option("--store", required=True, type=click.Path(), help=STORE_HELP)
@click.option("--data", required=True, help="Query images: digits:test, an .npz, ...")
@click.option("--method", type=click.Choice(METHODS), default=None, help=METHOD_HELP)
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1), help="Results per query.")
@click.option("--query-timesteps", default=None, type=click.IntRange(1),
              help="Size of the query timestep grid S (the paper: 100) [default: the store's grid, else 10].")
@click.option("--noise-draws", default=None, type=click.IntRange(1),
              help="Noise draws R averaged per timestep (the paper: 16) [default: the store's training draws with"
                   " shared noise, else 4].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="RESULTS.json to write.")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Also write a PNG grid.")
@click.option("--exact", is_flag=True, help="Exact streaming scan of the store instead of the index.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N query images.")
@click.option("--nprobe", type=click.IntRange(1), default=None,
              help="IVF lists to visit [default: the index's recorded nprobe].")
@click.option("--rerank", type=click.IntRange(1), default=None,
              help="Take this many candidates from the index and order them by their exact scores from the store.")
@click.option("--device", default="cpu", show_default=True, help="Where query gradients are computed.")
@click.option("--prompt", default=None,
              help="Text-to-image stores: the prompt of every query image [default: the data's own captions,"
                   " e.g. the metadata.jsonl 'projidx sample' writes].")
@checkpoints_option
@train_data_option
@data_options
@_fail_cleanly
def query(store, data, method, top_k, query_timesteps, noise_draws, out, png, exact, limit, nprobe, rerank,
          device, prompt, ckpt_dir, ckpt_base, train_data, data_flags) -> None:
    """Top-k influential training samples for each query image."""
    from projidx.data.datasets import with_prompt
    from projidx.files import write_text_atomic
    from projidx.search.attribution import attribute, has_file_names, store_checkpoints, store_dataset, training_images
    from projidx.search.scoring import default_method
    from projidx.store.feature_store import FeatureStore

    _check_device(device)
    fs = FeatureStore.open(store)
    if prompt is not None and "text_encoder" not in fs.meta.encoders:
        raise ProjidxError(f"--prompt: store {store} was built from a model without a text encoder")
    method = method or default_method(fs)
    queries = with_prompt(_data(data, data_flags), prompt)
    if limit is not None:
        queries = queries.subset(slice(0, limit))
    ckpts = store_checkpoints(fs, ckpt_dir, ckpt_base)
    train = store_dataset(fs, train_data) if png or has_file_names(fs, train_data) else None  # before featurizing
    result = attribute(fs, queries, method, top_k, exact=exact, ckpts=ckpts, query_timesteps=query_timesteps,
                       noise_draws=noise_draws, progress=True, nprobe=nprobe, device=device, rerank=rerank)
    if train is not None and train.names is not None:
        result.names = train.display_names(result.ids)
    write_text_atomic(out, json.dumps(result.to_json(), indent=1))
    if png:
        from projidx.reports.viz import attribution_grid

        attribution_grid(png, queries.images.numpy(), training_images(fs, result.ids, train), result.scores,
                         title=method, labels=train.display_names(result.ids),
                         query_labels=list(queries.names) if queries.names else [str(int(i)) for i in queries.ids])
    t = result.timings
    click.echo(f"{len(queries)} queries: featurized in {t['featurize_queries']:.2f}s"
               f" ({t['featurize_queries'] / len(queries):.3f}s per query), searched in {t['search']:.3f}s;"
               f" wrote {out}" + (f" and {png}" if png else ""))
    click.echo(_search_line(result.search))


RECALL_WARNING = 0.95  # below this recall@10, query says how to get exact answers


def _search_line(search: dict) -> str:
    """One line on how the answers were found: the exact scan, or an index and its measured recall@10."""
    if search.get("exact"):
        return "search: exact scan of the store"
    recall = search.get("recall_at_10")
    line = f"search: {search['factory']} index, recall@10 {'unmeasured' if recall is None else f'{recall:.2f}'}" \
           " against the exact scan" + (f", re-ranked from {search['rerank']}" if search.get("rerank") else "")
    if recall is not None and recall < RECALL_WARNING and not search.get("rerank"):
        line += f"; below {RECALL_WARNING}: pass --exact, or --rerank, or rebuild the index with more --nprobe"
    return line


@main.command()
@click.argument("store", type=click.Path())
@_fail_cleanly
def info(store) -> None:
    """Print a store's metadata and completeness."""
    from projidx.store.feature_store import FeatureStore

    fs = FeatureStore.open(store)
    meta = fs.meta.to_dict()
    meta.pop("projector")
    done = {cid: f"{int(fs.done(cid).sum())}/{fs.n_chunks}" for cid in fs.meta.checkpoint_ids}
    click.echo(json.dumps({"projector": fs.meta.projector.describe(), "chunks_done": done,
                           "bytes_on_disk": fs.nbytes_on_disk(), "indices": _indices(fs), **meta}, indent=2))


def _indices(fs) -> dict:
    """{method: factory, dimension, recall report} of each index built over the store (or why it is unusable)."""
    from projidx.search.index import index_dir, read_sidecar

    out = {}
    for sidecar in index_dir(fs).glob("*.json"):
        method = sidecar.name.removesuffix(".json")
        try:
            meta = read_sidecar(fs, method)[0]
        except ProjidxError as e:
            out[method] = {"error": str(e)}
            continue
        out[method] = {"factory": meta["factory"], "dim": meta["dim"], "recall": meta.get("recall"),
                       "on_disk": bool(meta.get("lists_file"))}
    return out


@main.command()
@click.option("--store", required=True, type=click.Path(), help=STORE_HELP)
@click.option("--data", default=None, help="Its training data, if not loadable by the name the store records.")
@click.option("--samples", default=16, show_default=True, type=click.IntRange(1), help="Training rows to check.")
@click.option("--seed", default=0, show_default=True, help="Seed of the row sample and of the near-copy noise.")
@click.option("--sigma", default=6 / 255, show_default=True, type=click.FloatRange(0),
              help="Near-copy noise standard deviation, in units of the [0, 1] pixel range.")
@click.option("--method", "methods", type=click.Choice(METHODS), multiple=True,
              help="Methods to check (repeatable) [default: every method the store supports].")
@click.option("--query-timesteps", default=None, type=click.IntRange(1), help="As for query.")
@click.option("--noise-draws", default=None, type=click.IntRange(1), help="As for query.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
@click.option("--min-self-top1", type=click.FloatRange(0, 1), default=None,
              help="Exit 1 if the default method's self-tracing top-1 share is below this.")
@click.option("--min-near-top10", type=click.FloatRange(0, 1), default=None,
              help="Exit 1 if the default method's near-copy top-10 share is below this.")
@click.option("--min-shift-top10", type=click.FloatRange(0, 1), default=None,
              help="Exit 1 if the default method's one-pixel-shift top-10 share is below this.")
@checkpoints_option
@data_options
@_fail_cleanly
def validate(store, data, samples, seed, sigma, methods, query_timesteps, noise_draws, out, min_self_top1,
             min_near_top10, min_shift_top10, ckpt_dir, ckpt_base, data_flags) -> None:
    """Sanity report: is each sampled training image found for itself, for a near-copy, for a one-pixel shift?"""
    from projidx.reports.validate import CHECKS, failures, validate_store
    from projidx.search.attribution import store_checkpoints, store_dataset
    from projidx.search.scoring import default_method
    from projidx.store.feature_store import FeatureStore

    fs = FeatureStore.open(store)
    train = _data(data, data_flags, stream=True) if data else store_dataset(fs)
    ckpts = store_checkpoints(fs, ckpt_dir, ckpt_base)
    report = validate_store(fs, ckpts, train, samples, seed, sigma, tuple(methods) or None, query_timesteps,
                            noise_draws, progress=True)
    click.echo(f"{report['samples']} training images, exact scan; share of queries whose source is top-1 / top-10"
               " (median rank)")
    click.echo(f"{'method':<13}" + "".join(f"{c:>24}" for c in CHECKS))
    for method, checks in report["methods"].items():
        cells = [f"{r['top1']:.2f} / {r['top10']:.2f} ({r['median_rank']:g})" for r in checks.values()]
        click.echo(f"{method:<13}" + "".join(f"{c:>24}" for c in cells))
    if out:
        from projidx.files import write_text_atomic

        write_text_atomic(out, json.dumps(report, indent=1))
    wanted = {("self", "top1"): min_self_top1, ("near-copy", "top10"): min_near_top10,
              ("shift", "top10"): min_shift_top10}
    thresholds = {key: v for key, v in wanted.items() if v is not None}
    method = default_method(fs)
    if thresholds and method not in report["methods"]:
        raise ProjidxError(f"thresholds apply to the default method {method}: include it with --method {method}")
    missed = failures(report, method, thresholds) if thresholds else []
    if missed:
        raise ProjidxError("validate: below threshold: " + "; ".join(missed))


SAMPLE = SampleConfig()  # the defaults the sample options show


@main.command()
@checkpoint_options
@click.option("--out", required=True, type=click.Path(),
              help="A folder (one PNG per image, and a metadata.jsonl of their prompts) or a file ending in .npz"
                   " (images, ids, labels, captions) to write.")
@click.option("--n", "count", default=SAMPLE.count, show_default=True, type=click.IntRange(1),
              help="Images to generate.")
@click.option("--steps", default=SAMPLE.steps, type=click.IntRange(1),
              help=f"DDIM steps (eta = 0) [default: {SampleConfig.PIXEL_STEPS}; text-to-image pipelines:"
                   f" {SampleConfig.PIPELINE_STEPS}].")
@click.option("--seed", default=SAMPLE.seed, show_default=True, help="Seed of the starting noise.")
@click.option("--checkpoint", "which", default=None, help="Checkpoint id to sample from [default: the last].")
@click.option("--label", "labels", default=None, metavar="L1,L2,...",
              help="Class-conditional models: the class label of every image (one), or one per image.")
@click.option("--prompt", "prompts", multiple=True,
              help="Text-to-image pipelines: the prompt of every image (once), or one per image (repeated --n"
                   " times); written beside the images for 'projidx query'.")
@click.option("--guidance-scale", default=SAMPLE.guidance_scale, show_default=True, type=float,
              help="Text-to-image pipelines: classifier-free guidance scale (1: none).")
@_fail_cleanly
def sample(locations, weights, base, out, count, steps, seed, which, labels, prompts, guidance_scale) -> None:
    """Generate images from a checkpoint, as queries for 'projidx query': deterministic DDIM, or for a
    text-to-image pipeline its own StableDiffusionPipeline with a DDIM scheduler and the prompts given."""
    from projidx.models.checkpoints import check_blob
    from projidx.models.diffusion import ddim_sample, model_conditioning

    config = _flags(SampleConfig, count=count, steps=steps, seed=seed, guidance_scale=guidance_scale)
    ckpts = _checkpoints(locations, weights, base)
    by_id = {c.id: c for c in ckpts.checkpoints}
    if which is not None and which not in by_id:
        raise ProjidxError(f"--checkpoint {which!r}: no such checkpoint (have {', '.join(by_id)})")
    ckpt = by_id[which] if which is not None else ckpts.checkpoints[-1]
    needs = model_conditioning(ckpts.model)
    text = ckpts.frozen is not None and ckpts.frozen.text_encoder is not None
    captions = _sample_prompts(prompts, count, text)
    label_array = _sample_labels(labels, count, needs)
    if not text and set(needs) - {"class_labels"}:
        raise ProjidxError(f"sample: the model is conditioned on {', '.join(sorted(needs))}; projidx samples"
                           " unconditional and class-conditional models and text-to-image pipelines (with a text"
                           " encoder); generate with your pipeline, then pass the images and their embeddings to"
                           " query as an .npz")
    if ckpts.frozen is not None and not text:
        raise ProjidxError("sample: a latent pipeline without a text encoder is not sampled by projidx; generate"
                           " with your pipeline")
    if label_array is not None and Path(out).suffix != ".npz":
        raise ProjidxError("--label: write an .npz --out, which keeps each image's label for 'projidx query'")
    ckpts.model.load_state_dict(check_blob(ckpt.load(), ckpt.id, ckpts.schedule.T)["state_dict"])
    steps = config.steps_for(text)
    if text:
        from projidx.models.pipeline import sample_pipeline

        images = sample_pipeline(ckpts.frozen, ckpts.model.unet.eval(), captions, ckpts.image_shape, steps,
                                 config.guidance_scale, config.seed)
    else:
        import torch

        conditioning = {"class_labels": torch.from_numpy(label_array)} if label_array is not None else None
        images = ddim_sample(ckpts.model.eval(), ckpts.schedule, count, ckpts.image_shape, steps=steps,
                             seed=config.seed, prediction=ckpts.prediction, conditioning=conditioning)
    _write_samples(Path(out), ((images.numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8"), label_array,
                   captions)
    click.echo(f"wrote {count} images sampled from checkpoint {ckpt.id} ({steps} DDIM steps, seed {seed}) to {out}")


def _write_samples(target: Path, pixels, labels, captions: list[str] | None) -> None:
    """Generated images (n, C, H, W) uint8 as an .npz (images, ids, labels, captions where given) or a folder of
    PNGs with a metadata.jsonl of their captions (the imagefolder convention, which 'projidx query' reads)."""
    import numpy as np

    from projidx.files import atomic_path, write_text_atomic

    if target.suffix == ".npz":
        extra = {"labels": labels} if labels is not None else {}
        if captions is not None:
            extra["captions"] = np.asarray(captions, dtype=str)
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=pixels, ids=np.arange(len(pixels)), **extra)
        return
    from PIL import Image

    target.mkdir(parents=True, exist_ok=True)
    names = [f"sample_{i:05d}.png" for i in range(len(pixels))]
    for name, img in zip(names, pixels, strict=True):
        with atomic_path(target / name) as tmp:
            Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(tmp, format="PNG")
    if captions is not None:
        write_text_atomic(target / "metadata.jsonl", "".join(json.dumps({"file_name": n, "text": c}) + "\n"
                                                             for n, c in zip(names, captions, strict=True)))


def _sample_prompts(prompts: tuple[str, ...], count: int, text: bool) -> list[str] | None:
    """``count`` prompts from --prompt (one for all, or one per image), or None; required by a text-to-image
    pipeline, refused by other models."""
    if not text:
        if prompts:
            raise ProjidxError("--prompt: the model has no text encoder (a text-to-image pipeline folder has"
                               " tokenizer/ and text_encoder/)")
        return None
    if not prompts:
        raise ProjidxError("the model is a text-to-image pipeline: pass --prompt")
    if len(prompts) not in (1, count):
        raise ProjidxError(f"--prompt: give one prompt or {count} (--n), got {len(prompts)}")
    return list(prompts) * count if len(prompts) == 1 else list(prompts)


def _sample_labels(labels: str | None, count: int, needs: dict[str, dict]):
    """(count,) int64 class labels from --label (one for all, or one per image), or None; refused where the
    model takes none, required where it takes them."""
    import numpy as np

    classes = needs.get("class_labels", {}).get("classes") if "class_labels" in needs else None
    if labels is None:
        if "class_labels" in needs:
            raise ProjidxError(f"the model is class-conditional ({classes} classes): pass --label")
        return None
    if "class_labels" not in needs:
        raise ProjidxError("--label: the model takes no class labels")
    try:
        values = [int(v) for v in labels.split(",")]
    except ValueError:
        raise ProjidxError(f"--label must be integers separated by commas, got {labels!r}") from None
    if len(values) not in (1, count):
        raise ProjidxError(f"--label: give one label or {count} (--n), got {len(values)}")
    if classes is not None and not all(0 <= v < classes for v in values):
        raise ProjidxError(f"--label: class labels lie in [0, {classes}) for this model, got {labels}")
    return np.asarray(values * count if len(values) == 1 else values, dtype=np.int64)


SERVE = ServeLimits()  # the defaults the serve options show


@main.command()
@click.option("--store", required=True, type=click.Path(),
              help="A featurized store (with its index for --method): a path or an fsspec URL.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback: see docs/cli.md on exposure, and use a token).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option("--device", default="cpu", show_default=True, help="Where query gradients are computed.")
@click.option("--threads", default=SERVE.threads, show_default=True, type=int,
              help="Requests handled at once (gradient computations still run one at a time).")
@click.option("--timeout", default=SERVE.timeout, show_default=True, type=float,
              help="Seconds a request waits for the model (then 503) and a connection may stay idle.")
@click.option("--max-images", default=SERVE.max_images, show_default=True, type=int, help="Images per request.")
@click.option("--max-noise-draws", default=SERVE.max_noise_draws, show_default=True, type=int,
              help="noise_draws a request may ask for.")
@click.option("--max-gradients", default=SERVE.max_gradients, show_default=True, type=int,
              help="Gradient evaluations per request (images x query timesteps x noise draws x checkpoints).")
@click.option("--max-upload-bytes", default=SERVE.max_upload_bytes, show_default=True, type=int,
              help="Largest request body (and file read under --data-root).")
@click.option("--data-root", default=None, type=click.Path(exists=True, file_okay=False),
              help="Let requests name regular files under DIR as data (image, .npz, .npy) [default: uploads only].")
@click.option("--builtin-data", is_flag=True, help="Let requests name the built-in data sets (digits, photos).")
@click.option("--max-prompt-chars", default=SERVE.max_prompt_chars, show_default=True, type=int,
              help="Characters of a request's prompt (text-to-image stores).")
@click.option("--token-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Require 'Authorization: Bearer TOKEN' with the token in this file (or in $PROJIDX_SERVE_TOKEN).")
@checkpoints_option
@train_data_option
@_fail_cleanly
def serve(store, host, port, device, threads, timeout, max_images, max_noise_draws, max_gradients, max_upload_bytes,
          data_root, builtin_data, max_prompt_chars, token_file, ckpt_dir, ckpt_base, train_data) -> None:
    """Warm look-ups over HTTP (waitress): GET /health, POST /query with uploaded images (docs/cli.md)."""
    try:
        import flask  # noqa: F401
        import waitress  # noqa: F401
    except ImportError:
        raise ProjidxError("projidx serve needs Flask and waitress: pip install 'projidx[serve]'") from None
    from projidx.cli.service import QueryService, create_app, create_server, read_token

    limits = _flags(ServeLimits, max_images=max_images, max_noise_draws=max_noise_draws, max_gradients=max_gradients,
                    max_upload_bytes=max_upload_bytes, timeout=timeout, threads=threads, data_root=data_root,
                    builtin_data=builtin_data, max_prompt_chars=max_prompt_chars)
    token = read_token(token_file)
    _check_device(device)
    service = QueryService(store, device, ckpt_dir, train_data, limits, ckpt_base)
    server = create_server(create_app(service, token), host, port, limits)
    if token is None and host not in ("127.0.0.1", "::1", "localhost"):
        click.echo(f"warning: {host} is not a loopback address and no token is set: anyone who can reach it can"
                   " query (--token-file)", err=True)
    click.echo(f"serving {store} on http://{host}:{server.effective_port} (GET /health, POST /query; {threads}"
               f" threads{', bearer token' if token else ''}); Ctrl-C stops")
    try:
        server.run()
    finally:
        server.close()


@main.group()
def analyze() -> None:
    """Timestep bias, generally influential samples, self-influence (JSON + PNG reports)."""


@analyze.command("timestep-bias")
@click.option("--store", required=True, type=click.Path(), help=STORE_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the JSON and PNGs.")
@_fail_cleanly
def analyze_timestep_bias(store, out) -> None:
    """Distribution of exact per-sample gradient norms per checkpoint and timestep."""
    from projidx.reports.analyze import timestep_bias_report
    from projidx.store.feature_store import FeatureStore

    bias = timestep_bias_report(FeatureStore.open(store), Path(out))
    ratios = {cid: round(c["median_max_min_ratio"], 2) for cid, c in bias["checkpoints"].items()}
    click.echo(f"median-norm max/min ratio over timesteps: {ratios}; wrote {out}")


@analyze.command("influence")
@click.option("--store", required=True, type=click.Path(), help=STORE_HELP)
@click.option("--data", required=True, help="Query images.")
@click.option("--top-k", default=50, show_default=True, type=click.IntRange(1), help="Proponents per query.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the JSON and PNGs.")
@click.option("--query-timesteps", default=10, show_default=True, type=click.IntRange(1),
              help="Size of the query timestep grid S (the paper's grid).")
@click.option("--noise-draws", default=4, show_default=True, type=click.IntRange(1),
              help="Noise draws R averaged per timestep.")
@click.option("--limit", type=click.IntRange(1), default=16, show_default=True, help="First N query images.")
@checkpoints_option
@_fail_cleanly
def analyze_influence(store, data, top_k, out, query_timesteps, noise_draws, limit, ckpt_dir, ckpt_base) -> None:
    """TracIn vs ReTrac specificity: unique ratio and generally influential samples."""
    from projidx.reports.analyze import influence_report
    from projidx.search.attribution import store_checkpoints
    from projidx.store.feature_store import FeatureStore

    queries = _data(data).subset(slice(0, limit))
    fs = FeatureStore.open(store)
    report = influence_report(fs, queries, top_k, Path(out), query_timesteps, noise_draws,
                              ckpts=store_checkpoints(fs, ckpt_dir, ckpt_base))
    click.echo(json.dumps(report["summary"], indent=2))


@analyze.command("self-influence")
@click.option("--store", required=True, type=click.Path(), help=STORE_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the JSON and PNGs.")
@click.option("--query-timesteps", default=5, show_default=True, type=click.IntRange(1),
              help="Size of the query timestep grid S for each training image.")
@click.option("--noise-draws", default=2, show_default=True, type=click.IntRange(1),
              help="Noise draws R averaged per timestep.")
@checkpoints_option
@train_data_option
@_fail_cleanly
def analyze_self_influence(store, out, query_timesteps, noise_draws, ckpt_dir, ckpt_base, train_data) -> None:
    """Each training sample's influence on itself, per method (outliers score high)."""
    from projidx.reports.analyze import self_influence_report
    from projidx.search.attribution import store_checkpoints, store_dataset
    from projidx.store.feature_store import FeatureStore

    fs = FeatureStore.open(store)
    report = self_influence_report(fs, Path(out), query_timesteps, noise_draws,
                                   ckpts=store_checkpoints(fs, ckpt_dir, ckpt_base),
                                   train=store_dataset(fs, train_data))
    click.echo(json.dumps(report["highest"]))


@main.group()
def evaluate() -> None:
    """Ground truth for attribution methods: retrain, generate, and measure."""


MEMORIZATION = MemorizationConfig()


@evaluate.command("memorization")
@click.option("--data", required=True, help="DATA to plant copies in (labels, where it has them, score the rest).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the report, PNG, store.")
@click.option("--base", default=MEMORIZATION.base, show_default=True, type=int, help="Unplanted rows (the first).")
@click.option("--sources", default=MEMORIZATION.sources, show_default=True, type=int,
              help="Rows after them planted as copies.")
@click.option("--copies", default=MEMORIZATION.copies, show_default=True, type=int, help="Copies of each source.")
@click.option("--generate", default=MEMORIZATION.generate, show_default=True, type=int, help="DDIM images made.")
@click.option("--steps", default=MEMORIZATION.steps, show_default=True, type=int, help="DDIM steps.")
@click.option("--seed", default=MEMORIZATION.seed, show_default=True, type=int, help="Seed of the DDIM noise.")
@click.option("--quantile", default=MEMORIZATION.quantile, show_default=True, type=float,
              help="A generation reproduces a source when its pixel neighbour is a copy closer than this quantile of"
                   " the unplanted rows' neighbour distances.")
@click.option("--top-k", default=MEMORIZATION.top_k, show_default=True, type=int, help="Ranks scored.")
@click.option("--epochs", default=300, show_default=True, type=click.IntRange(1),
              help="projidx train's recipe: passes over the planted set.")
@click.option("--checkpoints", default=3, show_default=True, type=click.IntRange(1), help="Checkpoints to keep.")
@click.option("--width", default=32, show_default=True, type=click.IntRange(8), help="UNet base channels.")
@click.option("--train-command", default=None,
              help="Train with your own command instead: a template with {data_file} (the planted .npz) and {out}"
                   " (a folder to fill with a projidx checkpoint directory or diffusers folders, one per"
                   " checkpoint).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=FEATURIZE.objective, show_default=True,
              help="featurize's --objective.")
@click.option("--timesteps", default=FEATURIZE.timesteps, show_default=True, type=int, help="featurize's --timesteps.")
@click.option("--noise", type=click.Choice(NOISE_POLICIES), default=FEATURIZE.noise, show_default=True,
              help="featurize's --noise.")
@click.option("--proj-dim", default=FEATURIZE.proj_dim, show_default=True, type=int, help="featurize's --proj-dim.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Where trained models are cached (default $PROJIDX_CACHE or ~/.cache/projidx).")
@data_options
@_fail_cleanly
def evaluate_memorization(data, out, base, sources, copies, generate, steps, seed, quantile, top_k, epochs,
                          checkpoints, width, train_command, objective, timesteps, noise, proj_dim, cache,
                          data_flags) -> None:
    """Plant copies of a few training images, train, generate, and report how often each method ranks a copy of
    the image a generation reproduces first (and in the top k)."""
    from projidx.models.training import TrainConfig
    from projidx.models.unet import UNetConfig
    from projidx.reports.evaluation import evaluate_memorization as run

    config = _flags(MemorizationConfig, base=base, sources=sources, copies=copies, generate=generate, steps=steps,
                    seed=seed, quantile=quantile, top_k=top_k)
    featurize_config = _flags(FeaturizeConfig, objective=objective, timesteps=timesteps, noise=noise,
                              proj_dim=proj_dim)
    train_config = TrainConfig(epochs=epochs, checkpoints=checkpoints, unet=UNetConfig(base=width))
    images = _data(data, data_flags)
    report = run(images, Path(out), config, train_config, featurize_config, train_command, cache)
    k = report["settings"]["top_k"]
    click.echo(f"{report['memorized']} of {report['generated']} generations reproduce a planted image"
               f" (pixel distance < {report['threshold']:.3f})")
    click.echo(f"{'method':<12} {'top-1':>6} {'95% interval':>13} {f'top-{k}':>7} {'copy rank':>9} {'label agr.':>10}")
    for name, row in report["methods"].items():
        interval = "-" if row["top1_interval"] is None else "[{:.2f}, {:.2f}]".format(*row["top1_interval"])
        cells = [row["top1"], interval, row["topk"], row["mean_copy_rank"], row["label_agreement"]]
        click.echo(f"{name:<12} " + " ".join(f"{v if isinstance(v, str) else '-' if v is None else f'{v:.2f}':>{w}}"
                                              for v, w in zip(cells, (6, 13, 7, 9, 10), strict=True)))
    click.echo(f"wrote {Path(out) / 'memorization.json'}")


LDS = LDSConfig()


@evaluate.command("lds")
@click.option("--store", "stores", required=True, multiple=True, type=click.Path(),
              help="A store to score (repeat to compare stores, e.g. of two objectives, on the same retrains; all"
                   " must hold the same training rows; the first store's model is retrained).")
@click.option("--queries", required=True, help="Query DATA whose outputs the retrained models are measured on.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for lds.json, lds.png and the retrains (kept: a re-run resumes).")
@click.option("--subsets", default=LDS.subsets, show_default=True, type=int, help="Retrained subsets M (>= 3).")
@click.option("--alpha", default=LDS.alpha, show_default=True, type=float, help="Share of the rows in each subset.")
@click.option("--seed", default=LDS.seed, show_default=True, type=int, help="Seed of the subsets.")
@click.option("--output-timesteps", default=LDS.output_timesteps, show_default=True, type=int,
              help="Timesteps (a midpoint grid) the retrained models' loss is averaged over.")
@click.option("--output-draws", default=LDS.output_draws, show_default=True, type=int,
              help="Fixed noises per timestep the loss is averaged over.")
@click.option("--workers", default=LDS.workers, show_default=True, type=int, help="Retrains run at once (processes).")
@click.option("--leave-out", default=LDS.leave_out, show_default=True, type=int,
              help="K > 0: also retrain without each query's top-K rows (per --leave-out-methods) and without K random"
                   " rows, and report the loss rise of each (0: off).")
@click.option("--leave-out-queries", default=LDS.leave_out_queries, show_default=True, type=int,
              help="The first N queries get leave-K-out retrains (1 + N + N x stores x methods retrains at most).")
@click.option("--leave-out-methods", default=",".join(LDS.leave_out_methods), show_default=True,
              help="Methods whose top-K rows are removed, comma-separated.")
@click.option("--train-command", default=None,
              help="Retrain with your own command: a template with {subset_file} (an .npz of the subset's images,"
                   " ids and labels) and {out} (a folder to fill with checkpoints). Default: projidx train's recipe"
                   " recorded with the store's checkpoints.")
@data_options
@_fail_cleanly
def evaluate_lds(stores, queries, out, subsets, alpha, seed, output_timesteps, output_draws, workers, leave_out,
                 leave_out_queries, leave_out_methods, train_command, data_flags) -> None:
    """Retrain on random subsets of a store's training rows and report how well each method's scores predict the
    change of the queries' loss (the linear datamodeling score)."""
    from projidx.reports.evaluation import evaluate_lds as run
    from projidx.store.feature_store import FeatureStore

    config = _flags(LDSConfig, subsets=subsets, alpha=alpha, seed=seed, output_timesteps=output_timesteps,
                    output_draws=output_draws, workers=workers, leave_out=leave_out,
                    leave_out_queries=leave_out_queries,
                    leave_out_methods=tuple(m.strip() for m in leave_out_methods.split(",") if m.strip()))
    opened = [FeatureStore.open(s) for s in stores]
    images = _data(queries, data_flags)
    try:
        report = run(opened, images, Path(out), config, train_command)
    except ProjidxError as e:
        raise ProjidxError(str(e).replace("leave_out must", "--leave-out must")) from None
    click.echo(f"LDS over {config.subsets} retrains of {report['n_train']} rows, {report['queries']} queries"
               f" (retraining {report['retrain_s']:.0f}s this run)")
    click.echo(f"{'store':<28} {'method':<12} {'LDS':>7}  95% interval")
    for r in report["results"]:
        value = "-" if r["lds"] is None else f"{r['lds']:.3f}"
        click.echo(f"{r['store']:<28} {r['method']:<12} {value:>7}  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    lo = report["leave_out"]
    if lo is not None:
        click.echo(f"leave-{lo['k']}-out on {lo['queries']} queries ({lo['retrains']} retrains): loss rise when the"
                   " top-K rows are removed vs K random rows")
        click.echo(f"{'store/method':<36} {'top-K':>8} {'random':>8} {'difference':>10}  95% interval  top-K larger")
        for name, r in lo["methods"].items():
            click.echo(f"{name:<36} {r['rise_top']:>8.4f} {r['rise_random']:>8.4f} {r['difference']:>10.4f}"
                       f"  [{r['difference_ci95'][0]:.4f}, {r['difference_ci95'][1]:.4f}]"
                       f"  {r['share_top_larger']:.2f}")
    click.echo(f"wrote {Path(out) / 'lds.json'} and {Path(out) / 'lds.png'}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the report and PNGs.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Where the trained demo model is cached (default $PROJIDX_CACHE or ~/.cache/projidx).")
@_fail_cleanly
def demo(out, cache) -> None:
    """Train (or reuse) a DDPM on digits, index it, and attribute held-out digits with TracIn and ReTrac."""
    from projidx.cli.demo import run_demo

    report = run_demo(Path(out), cache)
    click.echo(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
