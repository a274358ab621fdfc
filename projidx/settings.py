"""Settings: every choice and default the library and the CLI share, as validated dataclasses (no torch here,
so ``projidx --help`` starts fast). The CLI derives its options' choices and defaults from this module; library
errors name the field, which the CLI shows as its flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from projidx.errors import ProjidxError

LOSSES = ("mse", "l1")
OBJECTIVES = ("loss", "dtrak", "output")  # what is differentiated: the training loss, D-TRAK's mean squared output,
# or DAS's mean output
SCHEDULES = ("linear", "cosine", "cosine-clipped")  # named beta schedules ("custom": betas given, e.g. by diffusers)
PREDICTIONS = ("epsilon", "v_prediction")  # the network's output: the noise, or v = sqrt(abar) eps - sqrt(1-abar) x0
GRIDS = ("midpoints", "paper")  # timestep_grid kinds
NOISE_POLICIES = ("shared", "per-sample")
MODES = ("replay", "grid")  # training-side timesteps
TRAIN_TIMESTEP_MODES = (*MODES, "auto")
KINDS = ("sjlt", "srht", "dense", "factorized", "identity")  # projector kinds
PROJECTOR_CHOICES = ("auto", *KINDS)  # what featurize accepts as a projector
METHODS = ("tracin", "retrac", "cosine", "matched", "dtrak", "das", "matched-trak")
TIMESTEP_MATCHED = ("matched", "matched-trak")  # methods that pair each timestep with itself: grid stores only
SUBSET_METHODS = ("matched-trak", "das", "dtrak")  # the default on a parameter subset's store: the first scorable
VALUE_RANGES = ("auto", "-1,1", "0,1", "0,255")  # how data values are read
LATENTS = ("mean", "sample")  # a VAE's latent of an image: its posterior mean, or a draw seeded by the noise seed
# what is attributed (besides comma-separated glob patterns over parameter names): every parameter, the LoRA adapter's,
# or auto (lora where the checkpoints carry an adapter, else all)
PARAMS_CHOICES = ("auto", "all", "lora")


def require_at_least(settings: object, names: tuple[str, ...], minimum: int) -> None:
    """ProjidxError naming the first field of ``names`` below ``minimum``."""
    for name in names:
        if getattr(settings, name) < minimum:
            raise ProjidxError(f"{name} must be >= {minimum}, got {getattr(settings, name)}")


def require_fraction(settings: object, name: str) -> None:
    """ProjidxError unless the field ``name`` lies strictly between 0 and 1."""
    if not 0 < getattr(settings, name) < 1:
        raise ProjidxError(f"{name} must be in (0, 1), got {getattr(settings, name)}")



@dataclass(frozen=True)
class DataOptions:
    """How a DATA spec's values are read: ``value_range`` (VALUE_RANGES; auto: uint8 = [0, 255], float = [-1, 1]
    and refused when it looks like another range), ``resize`` (H, W) or None, for Hugging Face datasets the
    ``image_column`` and ``label_column`` (None: "label" if the dataset has it), and ``caption_column``: the text
    of each image in a Hugging Face dataset or an image folder's metadata.jsonl / metadata.csv (None: "text" where
    present)."""

    value_range: str = "auto"
    resize: tuple[int, int] | None = None
    image_column: str = "image"
    label_column: str | None = None
    caption_column: str | None = None

    def __post_init__(self) -> None:
        if self.value_range not in VALUE_RANGES:
            raise ProjidxError(f"value_range must be one of {', '.join(VALUE_RANGES)}, got {self.value_range!r}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 8):
            raise ProjidxError(f"resize must be (H, W) with both >= 8, got {self.resize}")

    def to_dict(self) -> dict:
        return {"value_range": self.value_range, "resize": list(self.resize) if self.resize else None,
                "image_column": self.image_column, "label_column": self.label_column,
                "caption_column": self.caption_column}

    @classmethod
    def from_dict(cls, d: dict | None) -> DataOptions:
        d = d or {}
        return cls(d.get("value_range", "auto"), tuple(d["resize"]) if d.get("resize") else None,
                   d.get("image_column", "image"), d.get("label_column"), d.get("caption_column"))


def check_params(params: str) -> None:
    """ProjidxError unless ``params`` is a PARAMS_CHOICES word or comma-separated non-empty glob patterns."""
    if not params or any(not part.strip() for part in params.split(",")):
        raise ProjidxError(f"params must be one of {', '.join(PARAMS_CHOICES)} or comma-separated glob patterns over"
                           f" parameter names (e.g. '*attn2.to_k*,*attn2.to_v*'), got {params!r}")


def check_grid_size(name: str, size: int, T: int) -> None:
    """ProjidxError unless a timestep grid of ``size`` points fits the model's T timesteps (a grid holds distinct
    integer timesteps in [0, T); a larger one would only repeat them, after building a list of ``size``)."""
    if size > T:
        raise ProjidxError(f"{name} must be <= T = {T} (the model's diffusion timesteps), got {size}")

@dataclass(frozen=True)
class FeaturizeConfig:
    """Training-side featurization settings, validated on construction (errors name the argument). The CLI
    takes its defaults and choices from here. ``batch_size`` counts gradient evaluations per call (samples x
    timesteps x ``train_draws``); it never changes results.

    Defaults are the ones the ground-truth checks pass best (docs/results.md): a grid of 10 timesteps per training
    image (bin midpoints) and shared noise, which the timestep-matched method (``matched``) needs, and D-TRAK's
    attributed function (``objective="dtrak"``: the gradient of the mean squared model output, not of the loss),
    with which a generated image's gradients point at the training image it reproduces (the loss gradient of a
    memorized image is its tiny residual's, of a generation its deviation's). ``train_timesteps="replay"`` with
    ``noise="per-sample"`` and ``objective="loss"`` is the paper's setting. ``params`` names the attributed parameters
    (the others are frozen: no gradient of theirs is computed, the projection is sized to the selection): ``all``,
    ``lora`` (a LoRA adapter's weights), glob patterns over parameter names, or ``auto`` (``lora`` where the model
    carries an adapter, else ``all``).
    """

    projector: str = "sjlt"  # a projection.KINDS kind, or auto: factorized where the model allows it, else sjlt
    proj_dim: int = 2048
    projection_seed: int = 0  # seeds the JL projection only
    noise_seed: int = 0  # seeds every noise draw only
    noise: str = "shared"  # diffusion.NOISE_POLICIES
    dtype: str = "float16"
    sparsity: int = 1
    train_timesteps: str = "grid"  # replay | grid | auto (replay where the checkpoints record it, else grid)
    timesteps: int = 10  # grid mode: the grid's size K
    grid: str = "midpoints"  # grid mode: diffusion.GRIDS kind (midpoints of K bins of [0, T), or the paper's)
    batch_size: int = 32
    chunk_rows: int = 256
    device: str = "cpu"
    objective: str = "dtrak"  # OBJECTIVES: D-TRAK's mean squared output (docs/results.md: generated images)
    train_draws: int = 1  # noise draws averaged per training-side gradient (the paper: 1)
    latents: str = "mean"  # LATENTS: what a pipeline's VAE makes of an image (pixel-space models: unused)
    params: str = "auto"  # PARAMS_CHOICES or glob patterns "p1,p2" over parameter names: the attributed parameters

    def __post_init__(self) -> None:
        check_params(self.params)
        choices = {"projector": PROJECTOR_CHOICES, "noise": NOISE_POLICIES, "train_timesteps": TRAIN_TIMESTEP_MODES,
                   "objective": OBJECTIVES, "dtype": ("float16", "float32"), "grid": GRIDS, "latents": LATENTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ProjidxError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        require_at_least(self, ("proj_dim", "timesteps", "batch_size", "chunk_rows", "train_draws", "sparsity"), 1)


@dataclass(frozen=True)
class IndexConfig:
    """How an index is built. ``factory``: a FAISS index-factory string. ``index_dim``: the dimension of the second
    JL (None: the full C x k). ``train_rows``: rows sampled (seeded) to train an index that needs training.
    ``on_disk``: IVF inverted lists in a file, memory-mapped. ``nprobe``: the IVF lists a query visits unless
    told otherwise (None: FAISS's 1). ``recall_queries``: store rows used as queries for the recall report."""

    factory: str = "Flat"
    index_dim: int | None = None
    train_rows: int = 100_000
    on_disk: bool = False
    nprobe: int | None = None
    recall_queries: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, ("train_rows", "recall_queries"), 1)
        for name in ("index_dim", "nprobe"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ProjidxError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class MemorizationConfig:
    """``projidx evaluate memorization``: the first ``base`` rows of the data plus ``copies`` copies of each of the
    next ``sources`` rows; ``generate`` DDIM images of ``steps`` steps from ``seed``; a generation reproduces a source
    when its pixel nearest neighbour is a copy closer than the ``quantile`` of the unplanted rows' nearest-neighbour
    distances; rankings are scored in their first ``top_k``."""

    base: int = 1000
    sources: int = 10
    copies: int = 25
    generate: int = 96
    steps: int = 50
    seed: int = 0
    quantile: float = 0.05
    top_k: int = 10

    def __post_init__(self) -> None:
        require_at_least(self, ("sources", "copies", "generate", "steps", "top_k"), 1)
        require_at_least(self, ("base",), 2)
        require_fraction(self, "quantile")


@dataclass(frozen=True)
class SampleConfig:
    """``projidx sample``: ``count`` images from ``seed``, with ``steps`` DDIM steps (None: 50 for a pixel-space
    model, PIPELINE_STEPS for a text-to-image pipeline, whose steps each run the UNet twice); a text-to-image
    pipeline's classifier-free ``guidance_scale`` (1: no guidance)."""

    count: int = 16
    steps: int | None = None
    seed: int = 0
    guidance_scale: float = 7.5

    PIXEL_STEPS = 50
    PIPELINE_STEPS = 20

    def __post_init__(self) -> None:
        require_at_least(self, ("count",), 1)
        if self.steps is not None:
            require_at_least(self, ("steps",), 1)
        if not self.guidance_scale >= 1:
            raise ProjidxError(f"guidance_scale must be >= 1, got {self.guidance_scale}")

    def steps_for(self, pipeline: bool) -> int:
        """The DDIM steps to run: ``steps``, else the default of a pipeline (True) or a pixel-space model."""
        return self.steps if self.steps is not None else self.PIPELINE_STEPS if pipeline else self.PIXEL_STEPS


@dataclass(frozen=True)
class ServeLimits:
    """What one ``projidx serve`` request may ask for, so that no request can exhaust the server.

    ``max_images``: images per request. ``max_noise_draws``: R per request. ``max_gradients``: per-sample gradient
    evaluations per request, images x |S| x R x checkpoints (the work a request holds the model for; a query at
    the store's defaults needs images x K x R x C). ``max_upload_bytes``: the whole request body, in bytes (and a
    file read under ``data_root``). ``timeout``: seconds a request waits for the model (then 503) and a client
    connection may stay idle. ``threads``: requests handled at once (gradient computations run one at a time).
    ``data_root``: a directory whose regular files requests may name as DATA (None: uploads only).
    ``builtin_data``: whether requests may name the built-in data sets (digits, photos). ``max_prompt_chars``: the
    characters of a query's prompt (text-to-image stores; the tokenizer truncates to its own length anyway)."""

    max_images: int = 16
    max_noise_draws: int = 16
    max_gradients: int = 8192
    max_upload_bytes: int = 8 << 20
    timeout: float = 60.0
    threads: int = 4
    data_root: str | None = None
    builtin_data: bool = False
    max_prompt_chars: int = 1000

    def __post_init__(self) -> None:
        require_at_least(self, ("max_images", "max_noise_draws", "max_gradients", "max_upload_bytes", "threads",
                                "max_prompt_chars"), 1)
        if not self.timeout > 0:
            raise ProjidxError(f"timeout must be > 0 seconds, got {self.timeout}")


@dataclass(frozen=True)
class LDSConfig:
    """``projidx evaluate lds``: ``subsets`` M random subsets of round(``alpha`` N) training rows (seeded by
    ``seed``), each retrained on; the output measured per query is the diffusion loss of the retrained model's last
    checkpoint averaged over ``output_timesteps`` (a midpoint grid) and ``output_draws`` fixed noises; ``workers``
    retrains run at once (processes). ``leave_out`` K > 0 adds leave-K-out retrains for the first
    ``leave_out_queries`` queries: each query's top-K rows under each of ``leave_out_methods`` (every store that
    scores it) removed, K random rows removed, and the full data (1 + Q + Q x stores x methods retrains at most;
    equal removal sets share one)."""

    subsets: int = 32
    alpha: float = 0.5
    seed: int = 0
    output_timesteps: int = 10
    output_draws: int = 4
    workers: int = 1
    leave_out: int = 0
    leave_out_queries: int = 8
    leave_out_methods: tuple[str, ...] = ("matched", "dtrak")

    def __post_init__(self) -> None:
        require_at_least(self, ("output_timesteps", "output_draws", "workers", "leave_out_queries"), 1)
        require_at_least(self, ("leave_out",), 0)
        unknown = [m for m in self.leave_out_methods if m not in METHODS]
        if unknown or not self.leave_out_methods:
            raise ProjidxError(f"leave_out_methods must name methods of {', '.join(METHODS)}, got"
                               f" {','.join(self.leave_out_methods) or 'none'}")
        require_at_least(self, ("subsets",), 3)  # a rank correlation over fewer is meaningless
        require_fraction(self, "alpha")
