"""The factorized projector: Kronecker projection of weights, exact norms, no per-sample weight gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from projidx.features import factorized
from projidx.features.factorized import (
    FactorizedGradients,
    LayerFactors,
    factors_are_cheaper,
    layer_sq_norms,
    project_capture,
)
from projidx.features.featurization import FeaturizeConfig, featurize, resolve_projector
from projidx.features.grads import GradientComputer, parameter_shapes
from projidx.features.projection import ProjectorSpec, kronecker_dims, make_projector
from projidx.models.diffusion import NoiseSchedule


class TinyEps(nn.Module):
    """Every supported layer, one Linear called twice (shared weights), tokens through a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.tok = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.temb = nn.Linear(1, 4)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        h = torch.tanh(self.norm(self.down(h)))
        tokens = self.tok(h.flatten(2).transpose(1, 2))  # (B, 16, 4)
        tokens = self.mix(torch.tanh(self.mix(tokens)))  # the same Linear twice
        h = tokens.transpose(1, 2).reshape(h.shape)
        return self.out(torch.nn.functional.interpolate(h, size=x.shape[-2:]))


def _batch(b: int = 6, r: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 1, 8, 8, generator=gen), torch.randint(0, 1000, (b,), generator=gen),
            torch.randn(b, r, 1, 8, 8, generator=gen))


def test_kronecker_projection_equals_the_explicit_matrix():
    """P_o G P_i^T = (P_o kron P_i) vec(G), with G from its factors or given whole."""
    shapes = {"lin.weight": (6, 5)}
    proj = make_projector(ProjectorSpec("factorized", 12, shapes, seed=3))
    p_o, p_i = proj.factors("lin.weight")
    assert p_o.shape == (3, 6) and p_i.shape == (4, 5)
    gen = torch.Generator().manual_seed(0)
    o, i = torch.randn(2, 7, 6, generator=gen), torch.randn(2, 7, 5, generator=gen)
    grad = LayerFactors(o, i).materialize()  # (2, 6, 5)
    explicit = grad.reshape(2, -1) @ torch.kron(p_o, p_i).T
    torch.testing.assert_close(proj.project({"lin.weight": grad}), explicit, rtol=1e-5, atol=1e-5)
    out = torch.zeros(2, 12)
    proj.project_factors(out, "lin.weight", o, i)
    torch.testing.assert_close(out, explicit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer_sq_norms(o, i), grad.square().sum((1, 2)))


def test_gram_and_materialized_norms_agree():
    gen = torch.Generator().manual_seed(1)
    for positions, d_out, d_in in [(3, 40, 50), (200, 4, 6)]:  # Gram path, then materialized path
        o, i = torch.randn(2, positions, d_out, generator=gen), torch.randn(2, positions, d_in, generator=gen)
        ref = (o.transpose(1, 2) @ i).square().sum((1, 2))
        gram = ((o @ o.transpose(1, 2)) * (i @ i.transpose(1, 2))).sum((1, 2))
        torch.testing.assert_close(layer_sq_norms(o, i), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gram, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_captured_factors_equal_torch_func_gradients(loss):
    """Hooks on one batched pass give the same per-sample projection and exact norms as vmap gradients."""
    torch.manual_seed(0)
    model = TinyEps()
    x0, t, eps = _batch()
    spec = ProjectorSpec("factorized", 64, parameter_shapes(model), seed=5, sparsity=2)
    proj = make_projector(spec)
    grads = GradientComputer(model, NoiseSchedule(), loss).per_sample(x0, t, eps)
    ref = proj.project_with_norms(grads, groups=3)
    fg = FactorizedGradients(model, NoiseSchedule(), loss)
    capture = fg.capture(x0, t, eps)
    for name in fg.names:
        if capture.is_weight(name):  # the factors, and the per-sample gradient formed from the capture
            whole = capture.weight_factors(name.rpartition(".")[0]).materialize()
            torch.testing.assert_close(whole.reshape(grads[name].shape), grads[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(capture.gradient(name), grads[name], rtol=1e-4, atol=1e-6)
    got = project_capture(proj, capture, fg.names, groups=3)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # bitwise deterministic on a repeat
    again = project_capture(proj, fg.capture(x0, t, eps), fg.names, groups=3)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))
    # a sample's result does not depend on the rest of its batch
    one = project_capture(proj, fg.capture(x0[2:3], t[2:3], eps[2:3]), fg.names)
    torch.testing.assert_close(one[0], got[0][2:3], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", [True, False], ids=["factors", "gradient"])
def test_both_paths_of_the_cost_model_give_the_reference_projection(monkeypatch, path):
    """Every weight from its factors, or every weight from its per-sample gradient: the same projection and exact
    norms as projecting vmap gradients (so the cost model's choice never changes a store)."""
    torch.manual_seed(0)
    model = TinyEps()
    x0, t, eps = _batch()
    proj = make_projector(ProjectorSpec("factorized", 64, parameter_shapes(model), seed=5, sparsity=2))
    ref = proj.project_with_norms(GradientComputer(model, NoiseSchedule(), "mse").per_sample(x0, t, eps), groups=3)
    monkeypatch.setattr(factorized, "factors_are_cheaper", lambda *args: path)
    fg = FactorizedGradients(model, NoiseSchedule(), "mse")
    for a, b in zip(project_capture(proj, fg.capture(x0, t, eps), fg.names, groups=3), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cost_model_forms_the_gradient_where_positions_are_many_and_channels_few():
    k_o, k_i = kronecker_dims(2048)
    # a 3x3 convolution 32 -> 32 channels at 28x28 (the default SmallUNet's first level): forming G is cheaper
    assert not factors_are_cheaper(28 * 28, 32 * 9, 32, k_o, k_i)
    # a Linear applied once per sample (the timestep MLP): factors; and a 3x3 conv at 4x4 with 272 channels
    assert factors_are_cheaper(1, 136, 272, k_o, k_i)
    assert factors_are_cheaper(16, 272 * 9, 272, k_o, k_i)
    # a grid of g timesteps makes the Gram norm of the mean g^2 times dearer: the gradient path takes over
    assert factors_are_cheaper(49, 64 * 9, 64, k_o, k_i) and not factors_are_cheaper(49, 64 * 9, 64, k_o, k_i, 10)


def test_unsupported_layers_are_refused():
    class WithEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x, t):
            return x + self.emb(t % 10).mean()

    with pytest.raises(ValueError, match="Embedding"):
        FactorizedGradients(WithEmbedding(), NoiseSchedule(), "mse")
    assert resolve_projector("auto", WithEmbedding()) == "sjlt"  # auto falls back to sjlt there


def test_default_projector_is_sjlt_and_auto_picks_factorized_where_it_can(tmp_path, tiny_ckpts, tiny_data):
    assert resolve_projector("auto", tiny_ckpts.model) == "factorized"
    assert resolve_projector("auto", tiny_ckpts.model, objective="dtrak") == "sjlt"
    assert resolve_projector("dense", tiny_ckpts.model) == "dense"
    store = featurize(tiny_ckpts, tiny_data.subset(slice(0, 8)), tmp_path / "d.zarr",
                      FeaturizeConfig(proj_dim=64, timesteps=2), progress=False)
    assert store.meta.projector.kind == "sjlt"


@pytest.mark.parametrize("mode", ["replay", "grid"])
def test_featurize_factorized_matches_projecting_full_gradients(tmp_path, tiny_ckpts, tiny_data, mode):
    """The store's factorized features and exact norms equal the reference path (vmap gradients -> projector)."""
    data = tiny_data.subset(slice(0, 10))
    base = dict(proj_dim=64, projection_seed=2, noise_seed=2, dtype="float32", train_timesteps=mode, timesteps=3,
                batch_size=6, chunk_rows=4, objective="loss")
    fact = featurize(tiny_ckpts, data, tmp_path / "f.zarr", FeaturizeConfig(projector="factorized", **base),
                     progress=False, allow_other_data=True)
    exact = featurize(tiny_ckpts, data, tmp_path / "e.zarr", FeaturizeConfig(projector="identity", **base),
                      progress=False, allow_other_data=True)
    proj = make_projector(fact.meta.projector)
    shapes = fact.meta.projector.param_shapes
    for cid in fact.meta.checkpoint_ids:
        for name in ("norms", "mean_norms"):
            np.testing.assert_allclose(fact.group[f"{name}/{cid}"][:], exact.group[f"{name}/{cid}"][:], rtol=1e-4)
        k_exact = exact.meta.projector.proj_dim
        flat = torch.from_numpy(np.asarray(exact.group[f"features/{cid}"][:])).reshape(-1, k_exact)
        grads, start = {}, 0
        for name in sorted(shapes):
            size = int(np.prod(shapes[name]))
            grads[name] = flat[:, start : start + size].reshape(-1, *shapes[name])
            start += size
        ref = proj.project(grads).reshape(len(data), -1, 64).numpy()
        np.testing.assert_allclose(fact.group[f"features/{cid}"][:], ref, rtol=1e-4, atol=1e-5)


CONVS = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=2, out_channels=4, kernel_size=(3, 2), padding=(0, 2), dilation=(2, 1)),  # non-square, dilated
    dict(in_channels=3, out_channels=2, kernel_size=1),  # 1x1
    dict(in_channels=1, out_channels=3, kernel_size=5, padding=2),  # one input channel
    dict(in_channels=4, out_channels=3, kernel_size=3, stride=2, padding=1),  # strided, few channels
    dict(in_channels=1, out_channels=3, kernel_size=3, stride=(2, 1), padding=1),  # strided, one channel
    dict(in_channels=130, out_channels=3, kernel_size=3, stride=2, padding=1),  # strided, many channels
]
KERNEL_CASES = [(kernel, conv) for kernel in ("conv_weight_grads", "shifted_weight_grads", "grouped_weight_grads",
                                              "unfolded_weight_grads")
                for conv in CONVS if kernel != "shifted_weight_grads" or "stride" not in conv]  # shifted: stride 1


@pytest.mark.parametrize(("kernel", "conv"), KERNEL_CASES)
@pytest.mark.parametrize("draws", [1, 3])
def test_per_sample_conv_weight_gradients_equal_one_convolution_backward_per_sample(conv, draws, kernel):
    """Every kernel (and the choice among them) against its definition: the weight gradient of each sample's
    summed draws, from autograd on that sample alone."""
    torch.manual_seed(0)
    module = nn.Conv2d(**conv, bias=False)
    batch = 3
    x = torch.randn(batch * draws, conv["in_channels"], 9, 7)
    outgrads = torch.randn_like(module(x))
    got = getattr(factorized, kernel)(module, x, outgrads, batch)
    for b in range(batch):
        rows = slice(b * draws, (b + 1) * draws)
        (ref,) = torch.autograd.grad((module(x[rows]) * outgrads[rows]).sum(), module.weight)
        torch.testing.assert_close(got[b], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sjlt", "factorized"])
def test_gradients_formed_a_few_samples_at_a_time_project_as_a_whole_batch(monkeypatch, kind):
    """project_capture forms per-sample gradients in slices of whole groups (and SJLT overwrites them in place):
    the same projection and norms as projecting the whole batch's gradients at once."""
    torch.manual_seed(0)
    model = TinyEps()
    x0, t, eps = _batch()
    proj = make_projector(ProjectorSpec(kind, 64, parameter_shapes(model), seed=5, sparsity=2))
    fg = FactorizedGradients(model, NoiseSchedule(), "mse")
    capture = fg.capture(x0, t, eps)
    grads = {name: capture.gradient(name) for name in fg.names}
    ref = proj.project_with_norms({name: g.clone() for name, g in grads.items()}, groups=3)
    monkeypatch.setattr(factorized, "factors_are_cheaper", lambda *args: False)
    monkeypatch.setattr(factorized, "SLICE_BYTES", 1)  # one group (3 rows) per slice
    assert factorized.sample_slices(6, 3, 10) == [slice(0, 3), slice(3, 6)]
    got = project_capture(proj, capture, fg.names, groups=3)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    again = proj.project_with_norms(grads, groups=3)  # without scratch the caller's gradients are left alone
    assert all(torch.equal(g, capture.gradient(name)) for name, g in grads.items())
    assert torch.equal(again[0], ref[0])
