"""A small epsilon-prediction UNet for any image size from 8x8 up and 1 or 3 channels.

GroupNorm (never BatchNorm) so that ``torch.func.vmap`` per-sample gradients are well defined.
Down-sampling halves with stride-2 convolutions; up-sampling interpolates back to the skip's exact
size, so odd sizes (28 -> 14 -> 7) work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`SmallUNet`; serialized into the checkpoint manifest."""

    channels: int = 1
    base: int = 32
    mults: tuple[int, ...] = (1, 2)
    time_dim: int = 64
    groups: int = 8

    def to_dict(self) -> dict:
        return {**asdict(self), "mults": list(self.mults)}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**{**d, "mults": tuple(d["mults"])})


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) int timesteps -> (B, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SmallUNet(nn.Module):
    """eps = model(x_t, t): x_t (B, C, H, W) float, t (B,) int64 -> (B, C, H, W)."""

    fingerprint_name = "projidx.unet.SmallUNet"  # what stores record (grads.model_fingerprint); never change it

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        c = self.config
        self.time_mlp = nn.Sequential(nn.Linear(c.time_dim, c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim))
        widths = [c.base * m for m in c.mults]
        self.stem = nn.Conv2d(c.channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = widths[0]
        for w in widths:
            self.down_blocks.append(ResBlock(prev, w, c.time_dim, c.groups))
            self.downsamples.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            prev = w
        self.mid = ResBlock(prev, prev, c.time_dim, c.groups)
        self.up_blocks = nn.ModuleList()
        for w in reversed(widths):
            self.up_blocks.append(ResBlock(prev + w, w, c.time_dim, c.groups))
            prev = w
        self.out_norm = nn.GroupNorm(min(c.groups, prev), prev)
        self.out = nn.Conv2d(prev, c.channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.config.time_dim))
        h = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downsamples, strict=True):
            h = block(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, temb)
        for block in self.up_blocks:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), temb)
        return self.out(F.silu(self.out_norm(h)))
