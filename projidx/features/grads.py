"""Per-sample gradients of the diffusion loss with ``torch.func`` (``functional_call``, ``vmap``, ``grad``).

A gradient is a dict ``{parameter name: (B, *parameter shape)}`` over the trainable parameters, in
sorted-name order; it is never concatenated into a flat (B, p) tensor. For a sample x with R noise
draws eps_1..eps_R at timestep t, the gradient returned is that of the mean loss over the draws,
which by linearity is the mean of the R per-draw gradients (the paper's query-side gbar).
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from projidx.errors import ProjidxError
from projidx.models.diffusion import (
    NoiseSchedule,
    attribution_output,
    draws_loss,
    per_sample_loss,
    prediction_target,
    q_sample,
)
from projidx.models.lora import is_adapter_parameter

if TYPE_CHECKING:
    from projidx.features.projection import Projector

Grads = dict[str, torch.Tensor]
Conditioning = dict[str, torch.Tensor]  # model inputs besides (x_t, t), batch first (diffusion.model_conditioning)


class Projected(NamedTuple):
    """B per-sample gradients g, projected, with what featurization records beside them.

    features: (B, k) P g; sq_norms: (B,) ||g||^2; mean_sq_norms: (B/groups,) ||mean over each group of g||^2 (rows
    b*groups .. (b+1)*groups-1 are group b); losses: (B,) each sample's training loss, mean over its draws, from the
    forward pass that gave g, whatever function g differentiates (DAS's residual).
    """

    features: torch.Tensor
    sq_norms: torch.Tensor
    mean_sq_norms: torch.Tensor
    losses: torch.Tensor


class GradientSource(Protocol):
    """What featurization needs of a per-sample gradient source (:class:`GradientComputer` for any model, or
    ``projidx.features.factorized.FactorizedGradients`` from one batched pass where every trainable layer is supported):
    a checkpoint's weights in; projected gradients with exact norms out."""

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None: ...

    def project(self, projector: Projector, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                groups: int = 1, conditioning: Conditioning | None = None) -> Projected:
        """B per-sample gradients projected, with their exact norms and training losses, from one forward and
        backward pass; x0 (B, C, H, W), t (B,), eps (B, R, C, H, W), conditioning {name: (B, ...)}."""
        ...

    def per_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   conditioning: Conditioning | None = None) -> Grads:
        """{name: (B, *shape)} the per-sample gradients themselves (for projectors that batch many gradients)."""
        ...

    def losses(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
               conditioning: Conditioning | None = None) -> torch.Tensor:
        """(B,) the training loss of each sample, mean over its draws (:func:`~projidx.models.diffusion.draws_loss`),
        whatever the attributed function, from a forward pass of its own (:meth:`project` returns the same losses
        from its own pass)."""
        ...


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: detached parameter} for every parameter with ``requires_grad``, sorted by name."""
    return {n: p.detach() for n, p in sorted(model.named_parameters()) if p.requires_grad}


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the trainable parameters: the projector's input layout."""
    return {n: tuple(p.shape) for n, p in trainable_parameters(model).items()}


def shapes_digest(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> str:
    """sha256 of ``prefix`` and the parameter names and shapes ``shapes``, in their order."""
    h = hashlib.sha256(prefix.encode())
    for name, shape in shapes.items():
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model class and its trainable parameters' names and shapes (not their values).

    The class is named by its ``fingerprint_name`` where it has one (projidx's own models: the dotted name they
    had when stores began recording it, so moving a module never orphans a store), else module + qualname."""
    cls = type(model)
    name = getattr(cls, "fingerprint_name", f"{cls.__module__}.{cls.__qualname__}")
    return shapes_digest(parameter_shapes(model), name)


def resolve_params(params: str, names: Iterable[str]) -> str:
    """``auto`` -> ``lora`` where any of ``names`` is an adapter's (:func:`is_adapter_parameter`), else ``all``; any
    other selection is returned as is (stripped of spaces around its patterns)."""
    if params == "auto":
        return "lora" if any(is_adapter_parameter(n) for n in names) else "all"
    return ",".join(part.strip() for part in params.split(","))


def selected_names(params: str, names: list[str]) -> list[str]:
    """The parameters of ``names`` that a resolved selection picks, sorted: ``all``, ``lora`` (the adapter's), or
    comma-separated glob patterns (``fnmatch``, case-sensitive) of which any may match; ProjidxError naming
    ``params`` when none does."""
    if params == "all":
        picked = list(names)
    elif params == "lora":
        picked = [n for n in names if is_adapter_parameter(n)]
    else:
        patterns = params.split(",")
        picked = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not picked:
        example = f" (e.g. {min(names)})" if names else ""
        raise ProjidxError(f"params must select a parameter: {params!r} matches none of the model's {len(names)}"
                           f" parameters{example}")
    return sorted(picked)


def select_parameters(model: nn.Module, params: str) -> dict:
    """Freeze every parameter of ``model`` but those ``params`` selects (:func:`resolve_params`,
    :func:`selected_names`; ``requires_grad``, so no gradient of a frozen one is ever computed) and return the
    selection's record: {"patterns": the resolved selection, "tensors": how many, "count": their entries,
    "digest": sha256 of their names and shapes}."""
    names = [n for n, _ in model.named_parameters()]
    params = resolve_params(params, names)
    keep = set(selected_names(params, names))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    shapes = parameter_shapes(model)
    return {"patterns": params, "tensors": len(shapes), "count": sum(math.prod(s) for s in shapes.values()),
            "digest": shapes_digest(shapes)}


class GradientComputer:
    """Per-sample gradients of the attributed function of a diffusion model at given (x0, t, eps).

    ``model`` is any ``nn.Module`` with ``out = model(x_t, t, **conditioning)`` (an :class:`EpsModel`; ``out``
    read as ``prediction`` says); it is put in eval mode. Load each checkpoint's weights with
    :meth:`load_state_dict`. ``objective`` "dtrak" differentiates D-TRAK's mean squared model output instead of
    the loss.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, loss: str, device: str | torch.device = "cpu",
                 objective: str = "loss", prediction: str = "epsilon"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.loss = loss
        self.objective = objective
        self.prediction = prediction
        self.abar = schedule.alphas_cumprod().to(self.device, torch.float32)
        self._refresh()
        self._vmapped = vmap(grad(self._sample_output, has_aux=True), in_dims=(None, 0, 0, 0, 0))

    def _refresh(self) -> None:
        self.params = trainable_parameters(self.model)
        self.buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        self.buffers.update(frozen)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a checkpoint's weights (strict: every key must match the model)."""
        self.model.load_state_dict(state_dict, strict=True)
        self._refresh()

    def _sample_output(
        self, params: dict[str, torch.Tensor], x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
        conditioning: Conditioning,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attributed function of one sample x0 (C,H,W) at timestep t (), mean over its R draws eps (R,C,H,W),
        and (aux) its training loss, mean over the same draws; conditioning {name: (...)} of this sample."""
        r = eps.shape[0]
        xs = x0.unsqueeze(0).expand(r, *x0.shape)
        ts = t.reshape(1).expand(r)
        cond = {name: v.unsqueeze(0).expand(r, *v.shape) for name, v in conditioning.items()}
        pred = functional_call(self.model, (params, self.buffers), (q_sample(xs, ts, eps, self.abar), ts), cond)
        target = prediction_target(xs, ts, eps, self.abar, self.prediction)
        output = attribution_output(pred, target, self.loss, self.objective).mean()
        return output, per_sample_loss(pred, target, self.loss).mean().detach()

    def _gradients(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   conditioning: Conditioning | None) -> tuple[Grads, torch.Tensor]:
        """{name: (B, *shape)} per-sample gradients and (B,) training losses on the computer's device."""
        cond = {name: v.to(self.device) for name, v in (conditioning or {}).items()}
        return self._vmapped(
            self.params, x0.to(self.device), t.to(self.device, torch.int64), eps.to(self.device), cond
        )

    def project(self, projector: Projector, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                groups: int = 1, conditioning: Conditioning | None = None) -> Projected:
        """:meth:`GradientSource.project`: each parameter's per-sample gradient read once, for its projection and
        its norm together."""
        grads, losses = self._gradients(x0, t, eps, conditioning)
        return Projected(*projector.project_with_norms(grads, groups), losses)

    def per_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   conditioning: Conditioning | None = None) -> Grads:
        """Per-sample gradients.

        x0: (B, C, H, W); t: (B,) int64; eps: (B, R, C, H, W) noise draws per sample; conditioning: {name: (B,
        ...)} model inputs per sample. Returns {name: (B, *shape)} float32 on the computer's device: grad of
        mean_r L(x0_b, t_b, eps_b,r).
        """
        return self._gradients(x0, t, eps, conditioning)[0]

    def losses(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
               conditioning: Conditioning | None = None) -> torch.Tensor:
        """:meth:`GradientSource.losses` on the computer's device."""
        cond = {name: v.to(self.device) for name, v in (conditioning or {}).items()}
        return draws_loss(self.model, x0.to(self.device), t.to(self.device, torch.int64), eps.to(self.device),
                          self.abar, self.loss, self.prediction, cond)


def squared_norms(grads: Grads) -> torch.Tensor:
    """(B,) float32 squared L2 norm of each sample's gradient over all parameters together."""
    return sum(g.flatten(1).float().square().sum(dim=1) for _, g in sorted(grads.items()))  # type: ignore[return-value]
