"""Golden test: the same spec projects the same on a CUDA GPU as on the CPU (matrices are drawn on the CPU)."""

from __future__ import annotations

import pytest
import torch

from projidx.features.factorized import FactorizedGradients, project_capture
from projidx.features.grads import GradientComputer, parameter_shapes
from projidx.features.projection import KINDS, ProjectorSpec, make_projector
from projidx.models.diffusion import NoiseSchedule
from projidx.models.unet import SmallUNet, UNetConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = {"conv.weight": (8, 4, 3, 3), "conv.bias": (8,), "lin.weight": (300, 20), "norm.weight": (5,)}


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "identity"])
def test_cpu_and_gpu_projections_agree(kind):
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(7, *s, generator=gen) for n, s in SHAPES.items()}
    spec = ProjectorSpec(kind, 256, SHAPES, seed=9)
    cpu = make_projector(spec, "cpu").project_with_norms(grads, groups=7)
    gpu = make_projector(spec, "cuda").project_with_norms({n: g.cuda() for n, g in grads.items()}, groups=7)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)


def test_cpu_and_gpu_factorized_featurization_agree():
    torch.manual_seed(0)
    model = SmallUNet(UNetConfig(channels=1, base=8, mults=(1, 2), time_dim=16, groups=4))
    spec = ProjectorSpec("factorized", 256, parameter_shapes(model), seed=1)
    gen = torch.Generator().manual_seed(0)
    x0, t, eps = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([1, 300, 600, 999]), torch.randn(4, 2, 1, 8, 8)
    results = []
    for device in ("cpu", "cuda"):
        fg = FactorizedGradients(model, NoiseSchedule(), "mse", device)
        got = project_capture(make_projector(spec, device), fg.capture(x0, t, eps), fg.names)
        results.append([r.cpu() for r in got])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_hooks_on_the_gpu_equal_vmap_on_the_cpu():
    """The default gradient source (layer hooks, one batched pass) on CUDA gives the CPU torch.func projection."""
    torch.manual_seed(0)
    model = SmallUNet(UNetConfig(channels=3, base=8, mults=(1, 2), time_dim=16, groups=4))
    spec = ProjectorSpec("sjlt", 256, parameter_shapes(model), seed=1)
    gen = torch.Generator().manual_seed(0)
    x0, t = torch.randn(4, 3, 12, 12, generator=gen), torch.tensor([1, 300, 600, 999])
    eps = torch.randn(4, 2, 3, 12, 12, generator=gen)
    vmap = GradientComputer(model, NoiseSchedule(), "mse", "cpu")
    hooks = FactorizedGradients(model, NoiseSchedule(), "mse", "cuda")
    ref = vmap.project(make_projector(spec, "cpu"), x0, t, eps, groups=2)
    got = hooks.project(make_projector(spec, "cuda"), x0, t, eps, groups=2)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-5)
