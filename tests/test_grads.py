"""Per-sample gradients from vmap equal single backward passes; noise is reproducible."""

from __future__ import annotations

import hashlib

import pytest
import torch

from projidx.features.grads import GradientComputer, parameter_shapes, squared_norms
from projidx.features.projection import ProjectorSpec, make_projector
from projidx.models.diffusion import QUERY_NOISE, NoiseSchedule, diffusion_loss, noise_for, timestep_grid
from projidx.models.unet import SmallUNet, UNetConfig


def _loop_grad(model, x0, t, eps, abar, loss):
    """Reference: mean over R draws of single-sample backward passes."""
    model.zero_grad()
    r = eps.shape[0]
    value = diffusion_loss(model, x0.expand(r, *x0.shape[1:]), t.expand(r), eps, abar, loss).mean()
    value.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_vmap_equals_loop_of_backward_passes():
    torch.manual_seed(0)
    for loss, shape, r in [("mse", (1, 8, 8), 1), ("l1", (3, 12, 10), 3)]:
        model = SmallUNet(UNetConfig(channels=shape[0], base=8, mults=(1, 2), time_dim=16, groups=4))
        schedule = NoiseSchedule("cosine" if loss == "l1" else "linear")
        computer = GradientComputer(model, schedule, loss)
        x0 = torch.rand(5, *shape) * 2 - 1
        t = torch.tensor([0, 10, 500, 900, 999])
        eps = torch.randn(5, r, *shape)
        batched = computer.per_sample(x0, t, eps)
        abar = schedule.alphas_cumprod().float()
        for b in range(5):
            ref = _loop_grad(model, x0[b : b + 1], t[b : b + 1], eps[b], abar, loss)
            for name, g in ref.items():
                torch.testing.assert_close(batched[name][b], g, rtol=1e-4, atol=1e-6)
        norms = squared_norms(batched).sqrt()
        for b in range(5):
            ref = _loop_grad(model, x0[b : b + 1], t[b : b + 1], eps[b], abar, loss)
            flat = torch.cat([g.flatten() for g in ref.values()])
            torch.testing.assert_close(norms[b], flat.norm(), rtol=1e-4, atol=1e-6)


def test_noise_depends_only_on_its_key():
    a = noise_for(7, [3, 4, 5], 1, [10, 20, 30], 0, (1, 8, 8))
    b = noise_for(7, [5, 3], 1, [30, 10], 0, (1, 8, 8))
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], noise_for(7, [3], 1, [10], 1, (1, 8, 8))[0])  # another draw
    assert not torch.equal(a[0], noise_for(7, [3], 2, [10], 0, (1, 8, 8))[0])  # another checkpoint
    assert not torch.equal(a[0], noise_for(8, [3], 1, [10], 0, (1, 8, 8))[0])  # another seed
    assert not torch.equal(a[0], noise_for(7, [3], 1, [10], 0, (1, 8, 8), QUERY_NOISE)[0])  # the query side


def test_timestep_grid_matches_the_paper():
    grid = timestep_grid(100, 1000)
    assert len(grid) == 100 and grid[0] == 1 and grid[-1] == 999
    assert timestep_grid(10, 1000) == sorted(set(timestep_grid(10, 1000)))


def test_ddim_sampler_is_deterministic_and_in_range():
    from projidx.models.diffusion import ddim_sample

    model = SmallUNet(UNetConfig(channels=1, base=8, mults=(1, 2), time_dim=16, groups=4)).eval()
    a = ddim_sample(model, NoiseSchedule(), 3, (1, 8, 8), steps=5, seed=1)
    b = ddim_sample(model, NoiseSchedule(), 3, (1, 8, 8), steps=5, seed=1)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize(("objective", "reduce"), [("dtrak", lambda out: out.square()), ("output", lambda out: out)])
def test_output_objectives_are_the_gradient_of_the_mean_of_the_output(objective, reduce):
    """dtrak: D-TRAK's mean squared output; output: DAS's mean output."""
    torch.manual_seed(1)
    model = SmallUNet(UNetConfig(channels=1, base=8, mults=(1, 2), time_dim=16, groups=4))
    schedule = NoiseSchedule()
    computer = GradientComputer(model, schedule, "mse", objective=objective)
    x0, t, eps = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([5, 400, 800]), torch.randn(3, 2, 1, 8, 8)
    batched = computer.per_sample(x0, t, eps)
    abar = schedule.alphas_cumprod().float()
    for b in range(3):
        model.zero_grad()
        from projidx.models.diffusion import q_sample

        xt = q_sample(x0[b : b + 1].expand(2, -1, -1, -1), t[b : b + 1].expand(2), eps[b], abar)
        reduce(model(xt, t[b : b + 1].expand(2))).flatten(1).mean(1).mean().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(batched[name][b], p.grad, rtol=1e-4, atol=1e-6)


def test_model_fingerprint_keeps_the_recorded_class_names():
    """Stores record the fingerprint: moving a module must not change it (a store built before the sub-package
    move named SmallUNet projidx.unet.SmallUNet and the diffusers adapter projidx.diffusion.DiffusersEps)."""
    from projidx.features.grads import model_fingerprint, parameter_shapes
    from projidx.models.diffusion import DiffusersEps

    model = SmallUNet(UNetConfig(base=8, mults=(1, 2), time_dim=16))
    h = hashlib.sha256(b"projidx.unet.SmallUNet")
    for name, shape in parameter_shapes(model).items():
        h.update(f"{name}:{shape};".encode())
    assert model_fingerprint(model) == h.hexdigest()
    assert DiffusersEps.fingerprint_name == "projidx.diffusion.DiffusersEps"


@pytest.mark.parametrize("source", ["vmap", "hooks"])
def test_losses_are_the_training_loss_averaged_over_the_draws(source):
    """DAS's residual input: each sample's MSE at its own (t, draws), whatever the attributed function."""
    from projidx.features.factorized import FactorizedGradients

    torch.manual_seed(2)
    model = SmallUNet(UNetConfig(channels=1, base=8, mults=(1, 2), time_dim=16, groups=4))
    schedule = NoiseSchedule()
    kind = GradientComputer if source == "vmap" else FactorizedGradients
    computer = kind(model, schedule, "mse", objective="output")
    x0, t, eps = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([5, 400, 800]), torch.randn(3, 2, 1, 8, 8)
    abar = schedule.alphas_cumprod().float()
    with torch.no_grad():
        expected = torch.stack([diffusion_loss(model, x0[b : b + 1].expand(2, -1, -1, -1), t[b : b + 1].expand(2),
                                               eps[b], abar, "mse").mean() for b in range(3)])
    torch.testing.assert_close(computer.losses(x0, t, eps), expected, rtol=1e-5, atol=1e-7)
    # the projection call returns the same losses from its own forward pass (featurize records these)
    spec = ProjectorSpec("sjlt", 64, parameter_shapes(model), seed=1)
    projected = computer.project(make_projector(spec), x0, t, eps)
    torch.testing.assert_close(projected.losses, expected, rtol=1e-5, atol=1e-7)
