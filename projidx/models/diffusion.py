"""DDPM noise schedules, the noise-prediction loss, and reproducible noise.

Images x0 are float tensors in [-1, 1], shaped (B, C, H, W). Timesteps are integers in [0, T).
Every noise draw used for attribution comes from :func:`noise_for` under one of two policies
(``NOISE_POLICIES``), a pure function of its named parts whatever the batch, order, worker or machine:

- ``shared`` (common random numbers, as D-TRAK does with a per-timestep seed): (seed, checkpoint, timestep,
  draw) only. Every sample, and both sides, see the same noise at the same (checkpoint, timestep, draw), so a
  query's draw r meets the training side's draw r: differences between scores come from the images, not from
  the noise.
- ``per-sample`` (closest to the authors' code): (side, seed, sample id, checkpoint, timestep, draw); the two
  sides draw from separate streams, so a training image used as its own query never reuses a training noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from projidx.seeding import generator
from projidx.settings import GRIDS, LOSSES, NOISE_POLICIES, OBJECTIVES, PREDICTIONS, SCHEDULES

TRAIN_NOISE, QUERY_NOISE = "noise", "query-noise"  # the per-sample policy's two streams (training, query side)
SHARED_NOISE = "shared-noise"  # the shared policy's one stream, for both sides


class EpsModel(Protocol):
    """Any denoising network: ``out = model(x_t, t, **conditioning)`` with x_t (B, C, H, W), t (B,) int64 and
    conditioning tensors with the batch first (e.g. ``class_labels`` (B,), ``encoder_hidden_states`` (B, L, D));
    ``out`` is the noise (``epsilon`` prediction) or v (``v_prediction``), shaped like x_t. A model that takes
    conditioning says so with a ``conditioning`` attribute (:func:`model_conditioning`)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor: ...


def model_conditioning(model: nn.Module) -> dict[str, dict]:
    """{input name: its requirements} of the conditioning ``model`` takes besides (x_t, t): the model's own
    ``conditioning`` attribute, {} for an unconditional model. Requirements: ``{"classes": n}`` for integer class
    labels in [0, n), ``{"dim": d}`` for per-sample embeddings (L, d)."""
    return dict(getattr(model, "conditioning", None) or {})


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM schedule, ``T`` steps. ``kind``: ``linear`` (Ho et al.), ``cosine`` (Nichol & Dhariwal,
    betas clipped at 0.999), ``cosine-clipped`` (the same curve with betas clipped to [1e-4, 0.02], as the
    ReTrac authors' scheduler does: alpha-bar at t = T-1 is 3.2e-3 instead of 2.4e-9 for T = 1000), or ``custom``:
    the T betas given in ``custom_betas`` (any schedule, e.g. a diffusers scheduler's own)."""

    kind: str = "linear"
    T: int = 1000
    custom_betas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (*SCHEDULES, "custom"):
            raise ValueError(f"unknown noise schedule {self.kind!r}; expected one of {SCHEDULES} or custom")
        if self.T < 2:
            raise ValueError(f"T must be >= 2, got {self.T}")
        if (self.kind == "custom") != bool(self.custom_betas):
            raise ValueError("custom_betas go with kind 'custom', and only with it")
        if self.custom_betas and (len(self.custom_betas) != self.T
                                  or not all(0 < b < 1 for b in self.custom_betas)):
            raise ValueError(f"a custom schedule needs T = {self.T} betas, each in (0, 1)")

    def betas(self) -> torch.Tensor:
        """(T,) float64 betas (see the class docstring)."""
        if self.kind == "custom":
            return torch.tensor(self.custom_betas, dtype=torch.float64)
        if self.kind == "linear":
            scale = 1000.0 / self.T
            return torch.linspace(scale * 1e-4, scale * 0.02, self.T, dtype=torch.float64)
        s = 0.008
        steps = torch.arange(self.T + 1, dtype=torch.float64) / self.T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
        return betas.clamp(1e-4, 0.02) if self.kind == "cosine-clipped" else betas.clamp(max=0.999)

    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float64 abar_t = prod_{s<=t} (1 - beta_s)."""
        return torch.cumprod(1 - self.betas(), dim=0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "T": self.T, **({"betas": list(self.custom_betas)} if self.custom_betas else {})}

    @classmethod
    def from_dict(cls, d: dict) -> NoiseSchedule:
        return cls(kind=str(d["kind"]), T=int(d["T"]), custom_betas=tuple(float(b) for b in d.get("betas", ())))


def timestep_grid(n: int, T: int, kind: str = "paper") -> list[int]:
    """``n`` integer timesteps in [0, T), sorted, duplicates dropped.

    ``paper``: evenly spaced from 1 to T-1, truncated as the authors' code does (``np.linspace(1, 999, 100,
    dtype=int)`` is the paper's query grid; ``[T // 2]`` for n = 1). ``midpoints``: the centres ``(i + 1/2) T / n``
    of n equal bins of [0, T), truncated: each point stands for an equal share of the uniform training distribution
    of t, and none sits at t ~ 0, where the diffusion noise is below any realistic pixel perturbation of an image
    (docs/results.md).
    """
    if n < 1:
        raise ValueError(f"the number of timesteps must be >= 1, got {n}")
    if kind == "midpoints":
        return sorted({int((i + 0.5) * T / n) for i in range(n)})
    if kind != "paper":
        raise ValueError(f"unknown timestep grid {kind!r}; expected one of {GRIDS}")
    if n == 1:
        return [T // 2]
    return sorted({int(v) for v in np.linspace(1, T - 1, n)})


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Shapes (B, ...) with t (B,)."""
    a = abar.to(x0.device, x0.dtype)[t].reshape(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def prediction_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor,
                      prediction: str) -> torch.Tensor:
    """(B, ...) what the network is trained to output at x_t = q_sample(x0, t, eps): the noise eps
    (``epsilon``) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (``v_prediction``, Salimans & Ho)."""
    if prediction == "epsilon":
        return eps
    if prediction != "v_prediction":
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    a = abar.to(x0.device, x0.dtype)[t].reshape(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """(B,) loss per sample: mean over pixels of the squared (mse) or absolute (l1) error."""
    diff = pred - target
    if loss == "mse":
        err = diff.square()
    elif loss == "l1":
        err = diff.abs()
    else:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    return err.flatten(1).mean(dim=1)


def attribution_output(pred: torch.Tensor, target: torch.Tensor, loss: str, objective: str) -> torch.Tensor:
    """(B,) the function whose gradient is attributed: the training loss against ``target`` (``objective="loss"``,
    the paper), D-TRAK's mean squared model output ||out_theta(x_t, t)||^2 / dim (``objective="dtrak"``) or DAS's
    mean model output sum(out_theta(x_t, t)) / dim (``objective="output"``: Lin et al. 2024 attribute the output
    itself; their code reduces it to its mean over elements)."""
    if objective == "loss":
        return per_sample_loss(pred, target, loss)
    if objective == "dtrak":
        return pred.square().flatten(1).mean(dim=1)
    if objective == "output":
        return pred.flatten(1).mean(dim=1)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def diffusion_loss(
    model: EpsModel | nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    abar: torch.Tensor,
    loss: str,
    prediction: str = "epsilon",
    conditioning: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B,) the training loss L(theta; x0, t, eps) of ``model`` at each sample's own t and eps."""
    pred = model(q_sample(x0, t, eps, abar), t, **(conditioning or {}))
    return per_sample_loss(pred, prediction_target(x0, t, eps, abar, prediction), loss)


def draws_loss(
    model: EpsModel | nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    abar: torch.Tensor,
    loss: str,
    prediction: str = "epsilon",
    conditioning: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B,) the training loss of each sample averaged over its R noise draws, without gradients: x0 (B, C, H, W),
    t (B,), eps (B, R, C, H, W), conditioning {name: (B, ...)} (DAS's residual, recorded by featurization)."""
    batch, draws = eps.shape[:2]
    cond = {name: v.repeat_interleave(draws, dim=0) for name, v in (conditioning or {}).items()}
    with torch.no_grad():
        per_draw = diffusion_loss(model, x0.repeat_interleave(draws, dim=0), t.repeat_interleave(draws),
                                  eps.reshape(batch * draws, *eps.shape[2:]), abar, loss, prediction, cond)
    return per_draw.reshape(batch, draws).mean(dim=1)


def noise_for(
    seed: int,
    sample_ids: Sequence[int],
    checkpoint: int,
    timesteps: Sequence[int],
    draw: int,
    shape: Sequence[int],
    stream: str = TRAIN_NOISE,
    policy: str = "per-sample",
) -> torch.Tensor:
    """(B, *shape) float32 standard-normal noise. Row b depends on (stream, seed, ids[b], checkpoint, t[b], draw)
    under the ``per-sample`` policy, on (seed, checkpoint, t[b], draw) only under ``shared`` (``stream`` and the
    ids are then ignored: both sides get the same noise).

    Generated on the CPU (bit-identical on every machine), the caller moves it to its device.
    """
    if policy not in NOISE_POLICIES:
        raise ValueError(f"unknown noise policy {policy!r}; expected one of {NOISE_POLICIES}")
    out = torch.empty((len(sample_ids), *shape), dtype=torch.float32)
    if policy == "shared":
        for t in set(int(t) for t in timesteps):
            rows = [b for b, tb in enumerate(timesteps) if int(tb) == t]
            out[rows] = torch.randn(tuple(shape), generator=generator(SHARED_NOISE, seed, checkpoint, t, draw))
        return out
    for b, (sid, t) in enumerate(zip(sample_ids, timesteps, strict=True)):
        gen = generator(stream, seed, int(sid), checkpoint, int(t), draw)
        out[b] = torch.randn(tuple(shape), generator=gen)
    return out


@dataclass(frozen=True)
class NoiseDraws:
    """The noise one side averages per gradient: draws 0..count-1 of :func:`noise_for` under ``policy``.

    ``stream`` names the side (TRAIN_NOISE or QUERY_NOISE); the shared policy ignores it, so a query's draw r
    is the training side's draw r at the same (checkpoint, timestep).
    """

    policy: str
    seed: int
    stream: str
    count: int

    def sample(
        self, ids: Sequence[int], checkpoint: int, timesteps: Sequence[int], shape: Sequence[int]
    ) -> torch.Tensor:
        """(B, count, *shape) float32 noise for samples ``ids`` at their ``timesteps``."""
        draws = [noise_for(self.seed, ids, checkpoint, timesteps, d, shape, self.stream, self.policy)
                 for d in range(self.count)]
        return torch.stack(draws, dim=1)


class DiffusersEps(nn.Module):
    """Adapter: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` as an :class:`EpsModel` (returns
    ``.sample``). ``conditioning`` says what it takes besides (x_t, t), read from its config: ``class_labels``
    for a class embedding (``num_class_embeds``), ``encoder_hidden_states`` for cross-attention (a text-conditional
    model, given precomputed embeddings (B, L, cross_attention_dim)). Other extra inputs are refused."""

    fingerprint_name = "projidx.diffusion.DiffusersEps"  # what stores record (grads.model_fingerprint); never change it

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.conditioning = diffusers_conditioning(unet.config)  # type: ignore[attr-defined]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, **conditioning).sample


def diffusers_conditioning(config) -> dict[str, dict]:
    """The conditioning inputs (:func:`model_conditioning`) of a diffusers UNet with ``config``; ValueError for
    inputs projidx cannot pass (added embeddings, non-embedding class inputs, per-block cross-attention sizes)."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    out: dict[str, dict] = {}
    if get("class_embed_type") is not None:
        raise ValueError(f"class_embed_type {get('class_embed_type')!r} is not supported: only class labels through"
                         " an embedding table (num_class_embeds)")
    if get("num_class_embeds") is not None:
        out["class_labels"] = {"classes": int(get("num_class_embeds"))}
    if get("addition_embed_type") is not None:
        raise ValueError(f"addition_embed_type {get('addition_embed_type')!r} (added conditioning inputs) is not"
                         " supported")
    if get("cross_attention_dim") is not None:
        dim = get("cross_attention_dim")
        dims = set(dim) if isinstance(dim, list | tuple) else {dim}
        if len(dims) != 1:
            raise ValueError(f"cross_attention_dim {dim} differs per block: not supported")
        out["encoder_hidden_states"] = {"dim": int(dims.pop())}
    return out


def prediction_from_diffusers(scheduler_config) -> str:
    """The scheduler config's ``prediction_type`` if projidx supports it (PREDICTIONS), else ValueError."""
    get = scheduler_config.get if isinstance(scheduler_config, dict) else \
        lambda key, default=None: getattr(scheduler_config, key, default)
    prediction = get("prediction_type", "epsilon") or "epsilon"
    if prediction not in PREDICTIONS:
        raise ValueError(f"the diffusers scheduler's prediction_type is {prediction!r}: projidx supports"
                         f" {', '.join(PREDICTIONS)}")
    return prediction


def schedule_from_diffusers(scheduler: object) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a diffusers scheduler (DDPMScheduler, DDIMScheduler, ...), taken from its
    own betas: a named kind where they are projidx's schedule of that name, else ``custom`` with its betas (any
    beta_schedule, trained betas, zero-SNR rescaling)."""
    betas = scheduler.betas.double()  # type: ignore[attr-defined]
    T = len(betas)
    theirs = torch.cumprod(1 - betas, dim=0)
    for kind in SCHEDULES:
        named = NoiseSchedule(kind, T)
        if torch.allclose(named.alphas_cumprod(), theirs, rtol=1e-4, atol=1e-6):
            return named
    # rescale_betas_zero_snr ends on beta = 1 (abar_T = 0): kept just below 1 so that x_t stays defined
    return NoiseSchedule("custom", T, tuple(float(b) for b in betas.clamp(1e-12, 1 - 1e-6)))


@torch.no_grad()
def ddim_sample(
    model: EpsModel | nn.Module,
    schedule: NoiseSchedule,
    n: int,
    shape: Sequence[int],
    steps: int = 50,
    seed: int = 0,
    prediction: str = "epsilon",
    conditioning: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(n, *shape) images in [-1, 1] from deterministic DDIM (eta = 0) with ``steps`` evenly spaced steps; the
    model's output is read as ``prediction`` says; ``conditioning``: per-image model inputs, batch first."""
    abar = schedule.alphas_cumprod().float()
    times = torch.linspace(schedule.T - 1, 0, steps).round().long().tolist()
    x = torch.randn((n, *shape), generator=generator("ddim", seed))
    for i, t in enumerate(times):
        a_t = abar[t]
        a_prev = abar[times[i + 1]] if i + 1 < len(times) else torch.tensor(1.0)
        out = model(x, torch.full((n,), t, dtype=torch.int64), **(conditioning or {}))
        # the predicted noise, then x0 from it, clipped (for v: eps = sqrt(abar) v + sqrt(1 - abar) x_t)
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x if prediction == "v_prediction" else out
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.clamp(-1, 1)
