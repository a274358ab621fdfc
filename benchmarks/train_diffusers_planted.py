"""A plain diffusers training loop, as a user outside projidx would write it: a ``UNet2DModel`` (with attention)
trained on an .npz of images with ``DDPMScheduler.add_noise`` and the noise-prediction MSE, saving a
``DDPMPipeline`` folder at three evenly spaced epochs. ``projidx evaluate memorization --train-command`` runs it:

    projidx evaluate memorization --data digits:train --out OUT \\
        --train-command 'python benchmarks/train_diffusers_planted.py --data {data_file} --out {out} --epochs 150'
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help=".npz with images (N, C, H, W) in [-1, 1]")
    p.add_argument("--out", required=True, help="folder for step-<epoch> DDPMPipeline folders")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    x = torch.from_numpy(np.load(args.data)["images"]).float()
    size = x.shape[-1]
    torch.manual_seed(args.seed)
    unet = UNet2DModel(sample_size=size, in_channels=x.shape[1], out_channels=x.shape[1], layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    saves = {round(args.epochs * (c + 1) / 3) for c in range(3)}
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            batch = x[order[start:start + 64]]
            noise = torch.randn(batch.shape, generator=gen)
            t = torch.randint(0, 1000, (len(batch),), generator=gen)
            loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in saves:
            DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(f"{args.out}/step-{epoch:04d}")


if __name__ == "__main__":
    main()
