"""Factorized per-layer gradients: per-sample layer inputs and output gradients from one batched pass.

For a Linear layer y_p = W i_p + b applied at positions p (tokens, or the R noise draws of a sample),
the per-sample weight gradient is G = sum_p o_p i_p^T with o_p = dL_b / dy_p, and the bias gradient is
sum_p o_p. A Conv2d is the same with i_p the unfolded (im2col) input patch at output position p
(d_in = C_in * kh * kw in the weight's own flattening order). So one batched forward pass over B
samples (R draws each) with the summed per-sample losses L = sum_b L_b, and one backward pass to the
layers' *outputs* only (no weight gradients are computed), give every layer's (o_p, i_p) per sample:
a sample's rows never mix with another's (GroupNorm, never BatchNorm; the model in eval mode).

:class:`~projidx.projection.FactorizedProjector` then projects G as P_o G P_i^T =
sum_p (P_o o_p)(P_i i_p)^T without forming G. The exact norm ||G||_F^2 (ReTrac divides by the exact
full-gradient norm) is sum_{p,q} (o_p . o_q)(i_p . i_q) (Gram trick), costing B P^2 (d_in + d_out);
where P is large enough that this exceeds B P d_in d_out (e.g. 3x3 convolutions at 32x32), G of that
one layer is formed transiently for its norm instead (one layer and one batch at a time, never kept).
GroupNorm / LayerNorm affine parameters and biases get exact small per-sample gradients from the same
captures (sum_p o_p * xhat_p and sum_p o_p) and go through sparse JL.

Supported layers: nn.Linear, nn.Conv2d (groups=1, zero padding), nn.GroupNorm, nn.LayerNorm. A model
with trainable parameters in any other layer is refused (use another projector kind).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from projidx.diffusion import NoiseSchedule, per_sample_loss, prediction_target, q_sample
from projidx.errors import ProjidxError
from projidx.grads import trainable_parameters
from projidx.projection import FactorizedProjector

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class LayerFactors:
    """The factors of one weight's per-sample gradient G_b = sum_p o_bp i_bp^T.

    outgrads: (B, P, d_out) o_p; inputs: (B, P, d_in) i_p.
    """

    outgrads: torch.Tensor
    inputs: torch.Tensor

    def materialize(self) -> torch.Tensor:
        """(B, d_out, d_in) the gradient itself (tests and references only)."""
        return self.outgrads.transpose(1, 2) @ self.inputs


def layer_sq_norms(outgrads: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B,) ||sum_p o_p i_p^T||_F^2 for outgrads (B, P, d_out), inputs (B, P, d_in).

    Gram trick sum_{p,q} (o_p . o_q)(i_p . i_q) when P (d_in + d_out) <= d_in d_out, else the layer's
    gradient is formed transiently (the cheaper of the two; both exact).
    """
    _, positions, d_out = outgrads.shape
    d_in = inputs.shape[2]
    if positions * (d_in + d_out) <= d_in * d_out:
        gram_o = outgrads @ outgrads.transpose(1, 2)
        gram_i = inputs @ inputs.transpose(1, 2)
        return (gram_o * gram_i).sum(dim=(1, 2))
    return (outgrads.transpose(1, 2) @ inputs).square().sum(dim=(1, 2))


def _check_module(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"factorized projector: Conv2d {name!r} needs groups=1 and explicit zero padding")
    elif not isinstance(module, SUPPORTED):
        raise ValueError(
            f"factorized projector: trainable parameters in {type(module).__name__} {name!r} are not supported"
            " (Linear, Conv2d, GroupNorm, LayerNorm only); use --projector sjlt"
        )


def factorizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: module} owning the model's trainable parameters; ValueError if any is unsupported."""
    owners: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        own = [p for _, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            _check_module(name, module)
            owners[name] = module
    return owners


@dataclass
class _Call:
    """One call of a layer in the forward pass: its input and, after backward, its output gradient."""

    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor
    outgrad: torch.Tensor | None = None


class Capture:
    """Per-sample factors of one batch: B samples, each with R noise draws (rows b*R .. b*R+R-1)."""

    def __init__(self, calls: dict[str, list[_Call]], batch: int, draws: int) -> None:
        self.calls = calls
        self.batch = batch
        self.draws = draws

    def _per_sample(self, rows: torch.Tensor) -> torch.Tensor:
        """(B*R, P, d) -> (B, R*P, d): a sample's positions are its draws' positions."""
        return rows.reshape(self.batch, -1, rows.shape[-1])

    def _positions(self, call: _Call) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*R, P, d_out) output gradients and (B*R, P, d_in) inputs of one Linear/Conv2d call."""
        m, x, o = call.module, call.input, call.outgrad
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            return o.flatten(2).transpose(1, 2), cols.transpose(1, 2)
        return o.reshape(o.shape[0], -1, o.shape[-1]), x.reshape(x.shape[0], -1, x.shape[-1])

    def weight_factors(self, module: str) -> LayerFactors:
        """The factors of a Linear/Conv2d weight, all calls of the module concatenated along positions."""
        pairs = [self._positions(c) for c in self.calls[module]]
        if len(pairs) == 1:
            return LayerFactors(self._per_sample(pairs[0][0]), self._per_sample(pairs[0][1]))
        outgrads = torch.cat([self._per_sample(o) for o, _ in pairs], dim=1)
        inputs = torch.cat([self._per_sample(i) for _, i in pairs], dim=1)
        return LayerFactors(outgrads, inputs)

    def small_grad(self, module: str, param: str) -> torch.Tensor:
        """(B, *shape) exact per-sample gradient of a bias or normalization parameter."""
        total = None
        for call in self.calls[module]:
            g = _small_grad(call, param)
            g = g.reshape(self.batch, self.draws, *g.shape[1:]).sum(dim=1)
            total = g if total is None else total + g
        return total

    def items(self, names: list[str]) -> Iterator[tuple[str, LayerFactors | torch.Tensor]]:
        """(parameter name, factors or per-sample gradient) for each name, computed lazily in that order."""
        for full in names:
            module, _, param = full.rpartition(".")
            if param == "weight" and isinstance(self.calls[module][0].module, (nn.Linear, nn.Conv2d)):
                yield full, self.weight_factors(module)
            else:
                yield full, self.small_grad(module, param)


def _small_grad(call: _Call, param: str) -> torch.Tensor:
    """(B*R, *shape) per-row gradient of ``param`` (bias / norm weight) of one call."""
    m, x, o = call.module, call.input, call.outgrad
    if isinstance(m, nn.Conv2d):
        return o.sum(dim=(2, 3))  # bias
    if isinstance(m, nn.Linear):
        return o.reshape(o.shape[0], -1, o.shape[-1]).sum(dim=1)  # bias
    if isinstance(m, nn.GroupNorm):
        reduce = tuple(range(2, o.dim()))
        if param == "bias":
            return o.sum(dim=reduce)
        xhat = F.group_norm(x, m.num_groups, eps=m.eps)
        return (o * xhat).sum(dim=reduce)
    lead = tuple(range(1, o.dim() - len(m.normalized_shape)))  # LayerNorm
    if param == "bias":
        return o.sum(dim=lead)
    return (o * F.layer_norm(x, m.normalized_shape, eps=m.eps)).sum(dim=lead)


class FactorizedGradients:
    """Per-sample layer factors of the diffusion loss from one batched forward and backward pass.

    Same interface as :class:`~projidx.grads.GradientComputer` (``load_state_dict``), but :meth:`capture`
    returns factors instead of gradients.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, loss: str, device: str | torch.device = "cpu",
                 prediction: str = "epsilon"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.loss = loss
        self.prediction = prediction
        self.abar = schedule.alphas_cumprod().to(self.device, torch.float32)
        self.modules = factorizable_modules(self.model)
        self.names = list(trainable_parameters(self.model))

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a checkpoint's weights (strict: every key must match the model)."""
        self.model.load_state_dict(state_dict, strict=True)

    def project(self, projector, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, groups: int = 1,
                conditioning: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`projidx.grads.GradientSource.project` through layer factors: no weight gradient is formed."""
        return project_capture(projector, self.capture(x0, t, eps, conditioning), self.names, groups)

    def capture(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                conditioning: dict[str, torch.Tensor] | None = None) -> Capture:
        """Factors of the per-sample gradients of mean_r L(x0_b, t_b, eps_b,r).

        x0: (B, C, H, W); t: (B,) int64; eps: (B, R, C, H, W); conditioning: {name: (B, ...)} model inputs.
        """
        batch, draws = eps.shape[:2]
        x0, t, eps = x0.to(self.device), t.to(self.device, torch.int64), eps.to(self.device)
        xs = x0.repeat_interleave(draws, dim=0)
        ts = t.repeat_interleave(draws)
        flat_eps = eps.reshape(batch * draws, *eps.shape[2:])
        cond = {name: v.to(self.device).repeat_interleave(draws, dim=0) for name, v in (conditioning or {}).items()}
        calls: dict[str, list[_Call]] = {name: [] for name in self.modules}
        handles = [
            module.register_forward_hook(
                lambda mod, args, out, name=name: calls[name].append(_Call(mod, args[0].detach(), out))
            )
            for name, module in self.modules.items()
        ]
        try:
            with torch.enable_grad():
                pred = self.model(q_sample(xs, ts, flat_eps, self.abar), ts, **cond)
                target = prediction_target(xs, ts, flat_eps, self.abar, self.prediction)
                total = per_sample_loss(pred, target, self.loss).reshape(batch, draws).mean(dim=1).sum()
                flat = [c for name in self.modules for c in calls[name]]
                grads = torch.autograd.grad(total, [c.output for c in flat], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for call, g in zip(flat, grads, strict=True):
            call.outgrad = torch.zeros_like(call.output) if g is None else g.detach()
            call.output = None  # type: ignore[assignment]
            if call.input.shape[0] != batch * draws:
                raise ProjidxError("factorized projector: a layer's input does not carry the batch in dimension 0;"
                                   " use --projector sjlt for this model")
        missing = [n for n, c in calls.items() if not c]
        if missing:
            raise ProjidxError(f"factorized projector: layer {missing[0]!r} was not called in the forward pass;"
                               " use --projector sjlt for this model")
        return Capture(calls, batch, draws)


def project_capture(
    projector: FactorizedProjector, capture: Capture, names: list[str], groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, k) P g, (B,) exact ||g||^2 and (B/groups,) exact ||mean over groups g||^2 from a capture.

    Rows b*groups .. (b+1)*groups-1 are one sample's gradients on a timestep grid. Parameters are
    visited in sorted-name order, so the result does not depend on the model's layer order.
    """
    batch, k = capture.batch, projector.spec.proj_dim
    device = projector.device
    out = torch.zeros(batch, k, dtype=torch.float32, device=device)
    sq = torch.zeros(batch, dtype=torch.float32, device=device)
    mean_sq = torch.zeros(batch // groups, dtype=torch.float32, device=device)
    for name, item in capture.items(sorted(names)):
        if isinstance(item, LayerFactors):
            o, i = item.outgrads.to(device, torch.float32), item.inputs.to(device, torch.float32)
            projector.project_factors(out, name, o, i)
            sq += layer_sq_norms(o, i)
            if groups > 1:
                shape_o, shape_i = (batch // groups, -1, o.shape[-1]), (batch // groups, -1, i.shape[-1])
                mean_sq += layer_sq_norms(o.reshape(shape_o) / groups, i.reshape(shape_i))
        else:
            projector.add_parameter(out, sq, mean_sq, name, item.reshape(batch, -1), groups)
    return out, sq, (sq if groups == 1 else mean_sq)
