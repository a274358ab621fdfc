"""Factorized per-layer gradients: per-sample layer inputs and output gradients from one batched pass.

For a Linear layer y_p = W i_p + b applied at positions p (tokens, or the R noise draws of a sample),
the per-sample weight gradient is G = sum_p o_p i_p^T with o_p = dL_b / dy_p, and the bias gradient is
sum_p o_p. A Conv2d is the same with i_p the unfolded (im2col) input patch at output position p
(d_in = C_in * kh * kw in the weight's own flattening order). So one batched forward pass over B
samples (R draws each) with the summed per-sample losses L = sum_b L_b, and one backward pass to the
layers' *outputs* only (no weight gradients are computed), give every layer's (o_p, i_p) per sample:
a sample's rows never mix with another's (GroupNorm, never BatchNorm; the model in eval mode).

:class:`~projidx.features.projection.FactorizedProjector` then projects G as P_o G P_i^T =
sum_p (P_o o_p)(P_i i_p)^T without forming G. The exact norm ||G||_F^2 (ReTrac divides by the exact
full-gradient norm) is sum_{p,q} (o_p . o_q)(i_p . i_q) (Gram trick), costing B P^2 (d_in + d_out).
Where P is large and channels are few (3x3 convolutions at 28x28 or 32x32) forming G per sample is
cheaper than both, and gives the norm for free: :func:`factors_are_cheaper` compares the multiply-adds of
the two paths per layer, and the cheaper one is taken (one layer and one batch at a time; a per-sample
weight gradient is never kept beyond its layer). Both paths give the same projection and norms, up to
float rounding, so the choice never changes a store. GroupNorm / LayerNorm affine parameters and biases get
exact small per-sample gradients from the same captures (sum_p o_p * xhat_p and sum_p o_p) and go through
sparse JL.

The same capture gives every parameter's exact per-sample gradient (:meth:`Capture.gradient`: for a
stride-1 Conv2d weight, one batched GEMM per kernel offset over shifted windows of the padded input,
:func:`shifted_weight_grads`), which any other projector kind projects as it would torch.func's gradients,
a few samples at a time: cheaper than ``vmap(grad)`` on CPU, and on the 10.7M-parameter UNet about as
fast as the batched weight gradient of plain training (docs/performance.md).

Supported layers: nn.Linear, nn.Conv2d (groups=1, zero padding), nn.GroupNorm, nn.LayerNorm. A model
with trainable parameters in any other layer is refused (use another projector kind).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from projidx.errors import ProjidxError
from projidx.features.grads import Conditioning, GradientComputer, Grads, Projected, trainable_parameters
from projidx.features.projection import FactorizedProjector, Projector, kronecker_cost
from projidx.models.diffusion import (
    NoiseSchedule,
    attribution_output,
    draws_loss,
    per_sample_loss,
    prediction_target,
    q_sample,
)

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


def _gram_is_cheaper(positions: int, d_in: int, d_out: int) -> bool:
    """Whether the Gram trick (P^2 (d_in + d_out) multiply-adds) costs no more than forming G (P d_in d_out)."""
    return positions * (d_in + d_out) <= d_in * d_out


def norm_cost(positions: int, d_in: int, d_out: int) -> int:
    """Multiply-adds of :func:`layer_sq_norms` for one sample of P positions."""
    return positions * min(positions * (d_in + d_out), d_in * d_out)


def factors_are_cheaper(positions: int, d_in: int, d_out: int, k_o: int, k_i: int, groups: int = 1) -> bool:
    """Whether a layer's factorized projection with exact norms costs fewer multiply-adds per sample from its
    factors than from its per-sample gradient G (d_out, d_in) formed over P ``positions``.

    From the factors: P (d_in k_i + d_out k_o + k_o k_i) for P_i i_p, P_o o_p and the sum of their outer
    products, plus the norm (:func:`norm_cost`), plus with ``groups`` g > 1 the norm of the mean over a group of
    g gradients (g P positions, per sample: 1/g of its cost). From G: P d_in d_out to form it, then
    :func:`~projidx.features.projection.kronecker_cost`; its norms cost O(d_in d_out), left out.
    """
    factors = positions * (d_in * k_i + d_out * k_o + k_o * k_i) + norm_cost(positions, d_in, d_out)
    if groups > 1:
        factors += norm_cost(groups * positions, d_in, d_out) // groups
    return factors < positions * d_in * d_out + kronecker_cost(d_out, d_in, k_o, k_i)


def layer_sq_norms(outgrads: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B,) ||sum_p o_p i_p^T||_F^2 for outgrads (B, P, d_out), inputs (B, P, d_in).

    Gram trick sum_{p,q} (o_p . o_q)(i_p . i_q) where it is cheaper, else the layer's gradient is formed
    transiently (both exact).
    """
    _, positions, d_out = outgrads.shape
    d_in = inputs.shape[2]
    if _gram_is_cheaper(positions, d_in, d_out):
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
    """Per-sample factors of one batch: B samples, each with R noise draws (rows b*R .. b*R+R-1), and their
    training losses."""

    def __init__(self, calls: dict[str, list[_Call]], batch: int, draws: int, losses: torch.Tensor) -> None:
        self.calls = calls
        self.batch = batch
        self.draws = draws
        self.losses = losses  # (B,) each sample's training loss, mean over its draws, from the captured pass

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

    def positions(self, module: str) -> int:
        """P: a Linear/Conv2d weight's positions per sample, over its draws and every call of the module."""
        total = 0
        for call in self.calls[module]:
            o = call.outgrad
            spatial = o.shape[2:] if isinstance(call.module, nn.Conv2d) else o.shape[1:-1]
            total += self.draws * math.prod(spatial)
        return total

    def weight_factors(self, module: str) -> LayerFactors:
        """The factors of a Linear/Conv2d weight, all calls of the module concatenated along positions."""
        pairs = [self._positions(c) for c in self.calls[module]]
        if len(pairs) == 1:
            return LayerFactors(self._per_sample(pairs[0][0]), self._per_sample(pairs[0][1]))
        outgrads = torch.cat([self._per_sample(o) for o, _ in pairs], dim=1)
        inputs = torch.cat([self._per_sample(i) for _, i in pairs], dim=1)
        return LayerFactors(outgrads, inputs)

    def _rows(self, call: _Call, samples: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(n R, ...) input and output gradient of ``call`` for the n samples ``samples`` (their R draws each)."""
        rows = slice(samples.start * self.draws, samples.stop * self.draws)
        return call.input[rows], call.outgrad[rows]

    def weight_grad(self, module: str, samples: slice) -> torch.Tensor:
        """(n, *weight shape) exact per-sample gradient of a Linear/Conv2d weight for the n samples ``samples``,
        summed over the module's calls. A Conv2d's comes from :func:`conv_weight_grads`; a Linear's is a batched
        product o^T i."""
        n = samples.stop - samples.start
        total = None
        for call in self.calls[module]:
            x, o = self._rows(call, samples)
            if isinstance(call.module, nn.Conv2d):
                g = conv_weight_grads(call.module, x, o, n)
            else:
                g = LayerFactors(o.reshape(n, -1, o.shape[-1]), x.reshape(n, -1, x.shape[-1])).materialize()
            total = g if total is None else total + g
        return total

    def small_grad(self, module: str, param: str, samples: slice) -> torch.Tensor:
        """(n, *shape) exact per-sample gradient of a bias or normalization parameter for ``samples``."""
        n = samples.stop - samples.start
        total = None
        for call in self.calls[module]:
            g = _small_grad(call.module, *self._rows(call, samples), param)
            g = g.reshape(n, self.draws, *g.shape[1:]).sum(dim=1)
            total = g if total is None else total + g
        return total

    def is_weight(self, name: str) -> bool:
        """Whether parameter ``name`` is a Linear/Conv2d weight (it has factors)."""
        module, _, param = name.rpartition(".")
        return param == "weight" and isinstance(self.calls[module][0].module, (nn.Linear, nn.Conv2d))

    def gradient(self, name: str, samples: slice | None = None) -> torch.Tensor:
        """(n, *shape) exact per-sample gradient of parameter ``name`` for ``samples`` (default: all B)."""
        samples = samples or slice(0, self.batch)
        module, _, param = name.rpartition(".")
        return self.weight_grad(module, samples) if self.is_weight(name) else self.small_grad(module, param, samples)


GROUPED_MAX_CHANNELS = 128  # strided conv_weight_grads: one grouped convolution up to this many channels


def conv_weight_grads(module: nn.Conv2d, inputs: torch.Tensor, outgrads: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, C_out, C_in, kh, kw) per-sample weight gradients of a Conv2d from inputs (B*R, C_in, H, W) and output
    gradients (B*R, C_out, H', W'), rows b*R .. b*R+R-1 being sample b's draws (summed).

    Stride 1: :func:`shifted_weight_grads` (one batched GEMM per kernel offset, no unfolded input). Strided: with
    few channels (2 .. GROUPED_MAX_CHANNELS in and out) one grouped convolution with the samples as groups, else
    a batched product of the unfolded input. Whichever was fastest per layer shape on CPU (docs/performance.md);
    a function of the shapes only, so a result never depends on timing; all are exact.
    """
    return conv_weight_kernel(module)(module, inputs, outgrads, batch)


def conv_weight_kernel(module: nn.Conv2d) -> Callable[[nn.Conv2d, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The kernel :func:`conv_weight_grads` uses for ``module``: a function of its stride and channels only."""
    if module.stride == (1, 1):
        return shifted_weight_grads
    channels = (module.in_channels, module.out_channels)
    if min(channels) >= 2 and max(channels) <= GROUPED_MAX_CHANNELS:
        return grouped_weight_grads
    return unfolded_weight_grads


def grouped_weight_grads(module: nn.Conv2d, inputs: torch.Tensor, outgrads: torch.Tensor, batch: int) -> torch.Tensor:
    """:func:`conv_weight_grads` as one weight-gradient convolution per draw with the B samples as groups."""
    draws = inputs.shape[0] // batch

    def by_sample(x: torch.Tensor) -> torch.Tensor:  # (B*R, C, H, W) -> (R, B*C, H, W)
        return x.reshape(batch, draws, *x.shape[1:]).transpose(0, 1).reshape(draws, -1, *x.shape[2:])

    shape = (batch * outgrads.shape[1], *module.weight.shape[1:])
    g = torch.nn.grad.conv2d_weight(by_sample(inputs), shape, by_sample(outgrads), module.stride, module.padding,
                                    module.dilation, groups=batch)
    return g.reshape(batch, *module.weight.shape)


def unfolded_weight_grads(module: nn.Conv2d, inputs: torch.Tensor, outgrads: torch.Tensor, batch: int) -> torch.Tensor:
    """:func:`conv_weight_grads` as a batched product o^T i of the output gradients and the unfolded (im2col)
    input, kh kw times the input's size."""
    cols = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)  # (B*R, C_in kh kw, P)
    o = outgrads.flatten(2).transpose(1, 2).reshape(batch, -1, outgrads.shape[1])
    i = cols.transpose(1, 2).reshape(batch, -1, cols.shape[1])
    return LayerFactors(o, i).materialize().reshape(batch, *module.weight.shape)


def shifted_weight_grads(module: nn.Conv2d, inputs: torch.Tensor, outgrads: torch.Tensor, batch: int) -> torch.Tensor:
    """:func:`conv_weight_grads` of a stride-1 Conv2d: G_b[:, :, i, j] = sum_p o_b,p x_b,p+s_ij^T, one batched
    GEMM (over the samples) per kernel offset (i, j).

    The input is zero-padded and flattened with the padded row width W_p, so the window of offset (i, j) is the
    contiguous slice starting at s_ij = i dh W_p + j dw; the output gradients are padded with W_p - W' zero
    columns to the same width, which cancels the terms that wrap around a row. One more zero row at the bottom
    keeps the last offset's slice inside the input. The same sums as the batched weight gradient, with no
    unfolded copy of the input (kh kw times its size).
    """
    rows, c_in, _, width = inputs.shape
    c_out, h_out, w_out = outgrads.shape[1:]
    draws = rows // batch
    (kh, kw), (ph, pw), (dh, dw) = module.kernel_size, module.padding, module.dilation
    padded_width = width + 2 * pw
    tail = 1 if kw > 1 else 0
    x = F.pad(inputs, (pw, pw, ph, ph + tail)).flatten(2).reshape(batch, draws, c_in, -1)
    o = F.pad(outgrads, (0, padded_width - w_out)).flatten(2).reshape(batch, draws, c_out, -1)
    span = h_out * padded_width
    g = outgrads.new_empty(kh * kw, batch, c_out, c_in)
    for i in range(kh):
        for j in range(kw):
            start = i * dh * padded_width + j * dw
            for r in range(draws):
                window = x[:, r, :, start:start + span].transpose(1, 2)  # (B, span, C_in)
                if r == 0:
                    torch.bmm(o[:, r], window, out=g[i * kw + j])
                else:
                    g[i * kw + j].baddbmm_(o[:, r], window)
    return g.permute(1, 2, 3, 0).reshape(batch, c_out, c_in, kh, kw)


def _small_grad(m: nn.Module, x: torch.Tensor, o: torch.Tensor, param: str) -> torch.Tensor:
    """(rows, *shape) per-row gradient of ``param`` (bias / norm weight) of module ``m`` from its input x and
    output gradient o."""
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


class CaptureError(ProjidxError):
    """The model's forward pass cannot be taken apart by layer hooks (a supported layer not called, or called on
    an input without the batch in dimension 0)."""


class FactorizedGradients:
    """Per-sample layer factors of the attributed function from one batched forward and backward pass.

    A :class:`~projidx.features.grads.GradientSource` like
    :class:`~projidx.features.grads.GradientComputer` (the same gradients,
    up to float rounding) for models whose trainable layers are all supported; :meth:`capture` returns the
    factors themselves. With ``fallback``, a model whose forward pass the hooks cannot take apart
    (:class:`CaptureError`) has this and every later batch computed by torch.func instead (for projectors that
    need no factors); without it the error is raised.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, loss: str, device: str | torch.device = "cpu",
                 objective: str = "loss", prediction: str = "epsilon", fallback: bool = False):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.schedule = schedule
        self.loss = loss
        self.objective = objective
        self.prediction = prediction
        self.abar = schedule.alphas_cumprod().to(self.device, torch.float32)
        self.modules = factorizable_modules(self.model)
        self.names = list(trainable_parameters(self.model))
        self.fallback = fallback
        self.vmap: GradientComputer | None = None  # the torch.func source, once a capture has failed

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a checkpoint's weights (strict: every key must match the model)."""
        if self.vmap is not None:
            self.vmap.load_state_dict(state_dict)
        else:
            self.model.load_state_dict(state_dict, strict=True)

    def _capture_or_fallback(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                             conditioning: Conditioning | None) -> Capture | None:
        """A capture, or None once the torch.func source has taken over (``fallback``)."""
        if self.vmap is None:
            try:
                return self.capture(x0, t, eps, conditioning)
            except CaptureError:
                if not self.fallback:
                    raise
                self.vmap = GradientComputer(self.model, self.schedule, self.loss, self.device, self.objective,
                                             self.prediction)
        return None

    def project(self, projector: Projector, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                groups: int = 1, conditioning: Conditioning | None = None) -> Projected:
        """:meth:`projidx.features.grads.GradientSource.project` from one capture (:func:`project_capture`)."""
        capture = self._capture_or_fallback(x0, t, eps, conditioning)
        if capture is None:
            return self.vmap.project(projector, x0, t, eps, groups, conditioning)  # type: ignore[union-attr]
        return Projected(*project_capture(projector, capture, self.names, groups), capture.losses)

    def per_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   conditioning: Conditioning | None = None) -> Grads:
        """{name: (B, *shape)} every per-sample gradient, as
        :meth:`~projidx.features.grads.GradientComputer.per_sample`."""
        capture = self._capture_or_fallback(x0, t, eps, conditioning)
        if capture is None:
            return self.vmap.per_sample(x0, t, eps, conditioning)  # type: ignore[union-attr]
        return {name: capture.gradient(name) for name in sorted(self.names)}

    def losses(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
               conditioning: Conditioning | None = None) -> torch.Tensor:
        """:meth:`projidx.features.grads.GradientSource.losses` (one forward pass without hooks)."""
        cond = {name: v.to(self.device) for name, v in (conditioning or {}).items()}
        return draws_loss(self.model, x0.to(self.device), t.to(self.device, torch.int64), eps.to(self.device),
                          self.abar, self.loss, self.prediction, cond)

    def capture(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                conditioning: Conditioning | None = None) -> Capture:
        """Factors of the per-sample gradients of mean_r f(x0_b, t_b, eps_b,r), f the attributed function
        (:func:`~projidx.models.diffusion.attribution_output`).

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
                f = attribution_output(pred, target, self.loss, self.objective)
                total = f.reshape(batch, draws).mean(dim=1).sum()
                losses = per_sample_loss(pred.detach(), target, self.loss).reshape(batch, draws).mean(dim=1)
                flat = [c for name in self.modules for c in calls[name]]
                grads = torch.autograd.grad(total, [c.output for c in flat], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for call, g in zip(flat, grads, strict=True):
            call.outgrad = torch.zeros_like(call.output) if g is None else g.detach()
            call.output = None  # type: ignore[assignment]
            if call.input.shape[0] != batch * draws:
                raise CaptureError("factorized projector: a layer's input does not carry the batch in dimension 0;"
                                   " use --projector sjlt for this model")
        missing = [n for n, c in calls.items() if not c]
        if missing:
            raise CaptureError(f"factorized projector: layer {missing[0]!r} was not called in the forward pass;"
                               " use --projector sjlt for this model")
        return Capture(calls, batch, draws, losses)


def project_capture(projector: Projector, capture: Capture, names: list[str],
                    groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, k) P g, (B,) exact ||g||^2 and (B/groups,) exact ||mean over groups g||^2 from a capture.

    Rows b*groups .. (b+1)*groups-1 are one sample's gradients on a timestep grid. Parameters are
    visited in sorted-name order, so the result does not depend on the model's layer order. A
    :class:`FactorizedProjector` projects each weight from its factors or from its per-sample gradient,
    whichever :func:`factors_are_cheaper` says; every other parameter, and every parameter under any other
    projector, is projected from its per-sample gradient (formed one parameter at a time).
    """
    batch, k = capture.batch, projector.spec.proj_dim
    device = projector.device
    out = torch.zeros(batch, k, dtype=torch.float32, device=device)
    sq = torch.zeros(batch, dtype=torch.float32, device=device)
    mean_sq = torch.zeros(batch // groups, dtype=torch.float32, device=device)
    for name in sorted(names):
        if isinstance(projector, FactorizedProjector) and capture.is_weight(name) and _use_factors(
                projector, capture, name, groups):
            factors = capture.weight_factors(name.rpartition(".")[0])
            o, i = factors.outgrads.to(device, torch.float32), factors.inputs.to(device, torch.float32)
            projector.project_factors(out, name, o, i)
            sq += layer_sq_norms(o, i)
            if groups > 1:
                shape_o, shape_i = (batch // groups, -1, o.shape[-1]), (batch // groups, -1, i.shape[-1])
                mean_sq += layer_sq_norms(o.reshape(shape_o) / groups, i.reshape(shape_i))
        else:
            numel = math.prod(projector.spec.param_shapes[name])
            for rows in sample_slices(batch, groups, numel):
                g = capture.gradient(name, rows).reshape(rows.stop - rows.start, -1)
                projector.add_parameter(out[rows], sq[rows], mean_sq[rows.start // groups:rows.stop // groups], name,
                                        g, groups, scratch=True)
    return out, sq, (sq if groups == 1 else mean_sq)


SLICE_BYTES = 64 * 2**20  # per-sample gradients formed at a time: a bound on their memory (larger slices batch better)


def sample_slices(batch: int, groups: int, numel: int) -> list[slice]:
    """Consecutive slices of the ``batch`` samples, whole groups of ``groups`` each, whose float32 gradients of
    ``numel`` entries fit in SLICE_BYTES (at least one group)."""
    per = max(1, SLICE_BYTES // (4 * numel * groups)) * groups
    return [slice(start, min(start + per, batch)) for start in range(0, batch, per)]


def _use_factors(projector: FactorizedProjector, capture: Capture, name: str, groups: int) -> bool:
    """The cost model's choice for weight ``name`` (:func:`factors_are_cheaper`)."""
    shape = projector.spec.param_shapes[name]
    d_out, d_in = shape[0], math.prod(shape[1:])
    positions = capture.positions(name.rpartition(".")[0])
    return factors_are_cheaper(positions, d_in, d_out, projector.k_o, projector.k_i, groups)
