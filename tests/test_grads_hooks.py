"""Per-sample gradients from one batched pass with layer hooks equal torch.func's (vmap), for every projector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import projidx.features.featurization as featurization_module
from projidx.features.factorized import CaptureError, FactorizedGradients
from projidx.features.featurization import FeaturizeConfig, featurize, gradient_computer
from projidx.features.grads import GradientComputer, parameter_shapes
from projidx.features.projection import ProjectorSpec, make_projector
from projidx.models.diffusion import DiffusersEps, NoiseSchedule
from projidx.models.unet import SmallUNet, UNetConfig


def _inputs(shape: tuple[int, ...], b: int = 4, r: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(b, *shape, generator=gen) * 2 - 1, torch.randint(0, 1000, (b,), generator=gen),
            torch.randn(b, r, *shape, generator=gen))


def _assert_sources_agree(model: nn.Module, shape: tuple[int, ...], kinds: tuple[str, ...], objective: str = "loss"):
    x0, t, eps = _inputs(shape)
    vmap = GradientComputer(model, NoiseSchedule(), "mse", objective=objective)
    hooks = FactorizedGradients(model, NoiseSchedule(), "mse", objective=objective)
    ref = vmap.per_sample(x0, t, eps)
    got = hooks.per_sample(x0, t, eps)
    assert list(got) == sorted(ref)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6)
    for kind in kinds:
        proj = make_projector(ProjectorSpec(kind, 64, parameter_shapes(model), seed=4))
        for a, b in zip(hooks.project(proj, x0, t, eps, groups=2), vmap.project(proj, x0, t, eps, groups=2),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["loss", "dtrak", "output"])
def test_hooks_equal_vmap_on_a_small_unet_at_an_odd_size(objective):
    """Strided and 1x1 convolutions, interpolated skips (28 -> 14 -> 7), 3 channels, R = 2 draws."""
    torch.manual_seed(0)
    model = SmallUNet(UNetConfig(channels=3, base=8, mults=(1, 2), time_dim=16, groups=4))
    _assert_sources_agree(model, (3, 14, 14), ("sjlt", "srht", "dense", "factorized"), objective)


def test_hooks_equal_vmap_on_a_diffusers_unet_with_attention():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    _assert_sources_agree(DiffusersEps(unet), (1, 8, 8), ("sjlt",))


class SharedQuery(nn.Module):
    """A supported layer called on an input without the batch dimension: hooks cannot take it apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.query = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.query(torch.ones(1, 2)).reshape(1, 1, 1, 1)


def test_sources_fall_back_to_vmap_where_hooks_cannot_take_the_model_apart():
    torch.manual_seed(0)
    model = SharedQuery()
    x0, t, eps = _inputs((1, 8, 8))
    shapes = parameter_shapes(model)
    sjlt = make_projector(ProjectorSpec("sjlt", 16, shapes))
    source = gradient_computer(model, NoiseSchedule(), "mse", sjlt.spec, "cpu")
    ref = GradientComputer(model, NoiseSchedule(), "mse").project(sjlt, x0, t, eps)
    for a, b in zip(source.project(sjlt, x0, t, eps), ref, strict=True):
        torch.testing.assert_close(a, b)
    fact = ProjectorSpec("factorized", 16, shapes)
    with pytest.raises(CaptureError, match="dimension 0"):
        gradient_computer(model, NoiseSchedule(), "mse", fact, "cpu").project(make_projector(fact), x0, t, eps)


def test_store_from_hooks_equals_the_store_from_vmap(tmp_path, tiny_ckpts, tiny_data, monkeypatch):
    """The default projector's store is the same (up to float rounding) whichever source computed it."""
    data = tiny_data.subset(slice(0, 10))
    config = FeaturizeConfig(proj_dim=64, timesteps=3, dtype="float32", batch_size=6, chunk_rows=4)
    hooks = featurize(tiny_ckpts, data, tmp_path / "hooks.zarr", config, progress=False)
    monkeypatch.setattr(featurization_module, "gradient_computer",
                        lambda model, schedule, loss, spec, device, objective, prediction: GradientComputer(
                            model, schedule, loss, device, objective, prediction))
    vmap = featurize(tiny_ckpts, data, tmp_path / "vmap.zarr", config, progress=False)
    assert hooks.meta.to_dict() == vmap.meta.to_dict()
    for cid in hooks.meta.checkpoint_ids:
        for name in ("features", "norms", "mean_norms"):
            np.testing.assert_allclose(hooks.group[f"{name}/{cid}"][:], vmap.group[f"{name}/{cid}"][:],
                                       rtol=1e-4, atol=1e-6)
