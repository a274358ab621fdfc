"""Bring your own model: any nn.Module with eps = model(x_t, t), and diffusers' UNet2DModel through the adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from projidx import (
    Checkpoint,
    CheckpointSet,
    DiffusersEps,
    FeaturizeConfig,
    NoiseSchedule,
    attribute,
    build_index,
    featurize,
    save_checkpoint,
    schedule_from_diffusers,
)
from projidx.features.grads import GradientComputer
from projidx.models.checkpoints import file_sha256
from projidx.models.diffusion import diffusion_loss, prediction_from_diffusers


class MLPEps(nn.Module):
    """Not a UNet: an MLP on the flattened pixels and t / T."""

    def __init__(self, pixels: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(pixels + 1, 32), nn.SiLU(), nn.Linear(32, pixels))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_t.flatten(1), t[:, None].float() / 1000], dim=1)
        return self.net(h).view_as(x_t)


def test_own_module_through_the_library(tmp_path, tiny_data, tiny_queries):
    torch.manual_seed(0)
    model = MLPEps()
    ckpts = []
    for c in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = tmp_path / f"c{c}.pt"
        replay_t = torch.randint(0, 1000, (len(tiny_data),))
        sha = save_checkpoint(path, model, tiny_data.ids, replay_t)
        ckpts.append(Checkpoint(f"c{c}", path, weight=0.5, sha256=sha))
    assert file_sha256(ckpts[0].path) == ckpts[0].sha256
    cset = CheckpointSet(model=MLPEps(), checkpoints=ckpts, loss="l1", schedule=NoiseSchedule("cosine"),
                         image_shape=(1, 8, 8))
    store = featurize(cset, tiny_data, tmp_path / "s.zarr", FeaturizeConfig(proj_dim=64, chunk_rows=16,
                                                                            train_timesteps="replay"), progress=False)
    stored_t = np.asarray(store.group["timesteps/c1"][:])[:, 0]
    np.testing.assert_array_equal(stored_t, torch.load(ckpts[1].path, weights_only=True)["replay_timesteps"])
    build_index(store, "retrac")
    exact = attribute(store, tiny_queries, "retrac", 5, exact=True, ckpts=cset, query_timesteps=3, noise_draws=2)
    indexed = attribute(store, tiny_queries, "retrac", 5, ckpts=cset, query_timesteps=3, noise_draws=2)
    np.testing.assert_array_equal(exact.ids, indexed.ids)
    assert set(exact.ids.ravel()) <= set(tiny_data.ids.tolist())


def _tiny_diffusers_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)


def test_diffusers_unet_per_sample_gradients_match_a_loop():
    """Through the adapter, including an attention block: vmap per-sample gradients equal single backward passes."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    schedule = schedule_from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    assert schedule == NoiseSchedule("linear", 1000)
    with pytest.raises(ValueError, match="prediction_type is 'sample'"):
        prediction_from_diffusers(DDPMScheduler(prediction_type="sample").config)
    assert prediction_from_diffusers(DDPMScheduler(prediction_type="v_prediction").config) == "v_prediction"
    # a schedule projidx has no name for is taken from the scheduler's own betas
    scaled = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012)
    custom = schedule_from_diffusers(scaled)
    assert custom.kind == "custom"
    torch.testing.assert_close(custom.alphas_cumprod().float(), scaled.alphas_cumprod.float(), rtol=1e-5, atol=1e-7)
    assert NoiseSchedule.from_dict(custom.to_dict()) == custom
    model = DiffusersEps(_tiny_diffusers_unet())
    computer = GradientComputer(model, schedule, "mse")
    x0, t, eps = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([3, 300, 900]), torch.randn(3, 1, 1, 8, 8)
    batched = computer.per_sample(x0, t, eps)
    abar = schedule.alphas_cumprod().float()
    for b in range(3):
        model.zero_grad()
        diffusion_loss(model, x0[b : b + 1], t[b : b + 1], eps[b], abar, "mse").sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(batched[name][b], p.grad, rtol=1e-3, atol=1e-5)
