"""Train a small DDPM and keep C checkpoints with everything attribution needs.

Each epoch visits every sample once, at a timestep drawn uniformly from [0, T) for that sample and
epoch; that draw is recorded so that featurization can replay it (the paper's replay mode).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from projidx.data.datasets import ImageSet
from projidx.errors import ProjidxError
from projidx.models.checkpoints import CheckpointSet, load_checkpoint_dir, save_checkpoint, write_manifest
from projidx.models.diffusion import NoiseSchedule, diffusion_loss
from projidx.models.unet import SmallUNet, UNetConfig


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    checkpoints: int = 4
    seed: int = 0
    loss: str = "mse"
    lr: float = 1e-3
    batch_size: int = 64
    schedule: NoiseSchedule = NoiseSchedule()
    unet: UNetConfig = UNetConfig()


def checkpoint_epochs(epochs: int, count: int) -> list[int]:
    """The 1-based epochs after which the ``count`` checkpoints are saved, evenly spread, last = epochs."""
    if count < 1 or epochs < count:
        raise ProjidxError(f"need 1 <= checkpoints <= epochs, got {count} checkpoints over {epochs} epochs")
    return [round(epochs * (c + 1) / count) for c in range(count)]


def train(data: ImageSet, out: str | Path, config: TrainConfig, progress: bool = True) -> CheckpointSet:
    """Train :class:`SmallUNet` on ``data`` and write checkpoints + manifest to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet = replace(config.unet, channels=data.image_shape[0])
    torch.manual_seed(config.seed)
    model = SmallUNet(unet)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    abar = config.schedule.alphas_cumprod().float()
    gen = torch.Generator().manual_seed(config.seed)
    n = len(data)
    save_at = checkpoint_epochs(config.epochs, config.checkpoints)
    records, step, last_step = [], 0, 0
    bar = tqdm(range(1, config.epochs + 1), desc="train", disable=not progress, unit="epoch")
    for epoch in bar:
        order = torch.randperm(n, generator=gen)
        t_epoch = torch.randint(0, config.schedule.T, (n,), generator=gen)
        model.train()
        for start in range(0, n, config.batch_size):
            rows = order[start : start + config.batch_size]
            eps = torch.randn(data.images[rows].shape, generator=gen)
            loss = diffusion_loss(model, data.images[rows], t_epoch[rows], eps, abar, config.loss).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if epoch in save_at:
            c = len(records)
            cid = f"ckpt-{c:03d}"
            sha = save_checkpoint(out / f"{cid}.pt", model, data.ids, t_epoch)
            records.append({"id": cid, "file": f"{cid}.pt", "epoch": epoch, "step": step, "lr": config.lr,
                            "weight": config.lr * (step - last_step), "sha256": sha})
            last_step = step
    write_manifest(out, {
        "model": {"kind": "projidx.SmallUNet", "config": unet.to_dict()},
        "loss": config.loss,
        "schedule": config.schedule.to_dict(),
        "image_shape": list(data.image_shape),
        "dataset": {"name": data.name, "fingerprint": data.fingerprint(), "n": n},
        "training": {"epochs": config.epochs, "seed": config.seed, "lr": config.lr,
                     "batch_size": config.batch_size, "optimizer": "adam", "steps": step},
        "checkpoints": records,
    })
    return load_checkpoint_dir(out)


def cache_dir(cache: str | Path | None = None) -> Path:
    """Where trained models are cached: ``cache``, else $PROJIDX_CACHE, else ~/.cache/projidx."""
    return Path(cache or os.environ.get("PROJIDX_CACHE") or Path.home() / ".cache" / "projidx")


def cached_model(data, config: TrainConfig, cache: str | Path | None) -> CheckpointSet:
    """Train ``config`` on ``data`` once; later calls with the same inputs reuse the checkpoints."""
    key = hashlib.sha256(f"{config}|{data.fingerprint()}".encode()).hexdigest()[:16]
    target = cache_dir(cache) / f"model-{key}"
    if (target / "manifest.json").is_file():
        try:
            return load_checkpoint_dir(target)
        except ProjidxError:
            shutil.rmtree(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    train(data, partial, config)
    partial.rename(target)
    return load_checkpoint_dir(target)
