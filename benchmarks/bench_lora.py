"""What does attributing a LoRA fine-tune through its adapter cost, per training row, against the whole UNet?

One pipeline: a diffusers ``UNet2DModel`` of 32x32 RGB images (block_out_channels (64, 128, 128), attention in the
two lower-resolution levels) saved as a base ``DDPMPipeline`` folder, and two LoRA checkpoints over it
(``LoraConfig(r=4, target_modules=to_q, to_k, to_v, to_out.0)``, B matrices made non-zero) saved as diffusers saves
them. The same rows are featurized through the library with the same projector settings (featurize's defaults:
sjlt, k = 2048, a grid of 10 timesteps, the dtrak objective) under three selections:

- ``all``: every parameter of the adapted UNet (base and adapter): full-model gradients;
- ``lora``: the adapter only (``--params lora``, the default for LoRA checkpoints);
- ``floor``: one bias at the UNet's input (``unet.conv_in.bias``): the backward pass still runs through the whole
  network, so this is the forward/backward cost every selection shares.

Reports seconds per row (one row = one image at every checkpoint and timestep), the parameters attributed and the
speed-up of ``lora`` over ``all`` (the issue's target: >= 3x). Run it alone on the machine:

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py --out benchmarks/results/bench_lora.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from projidx.data.datasets import load_dataset
from projidx.features.featurization import featurize
from projidx.models.checkpoints import load_checkpoints
from projidx.settings import FeaturizeConfig

SELECTIONS = {"all": "all", "lora": "lora", "floor": "unet.conv_in.bias"}
UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32)


def write_pipeline(root: Path, checkpoints: int, unet: dict = UNET) -> tuple[Path, list[Path]]:
    """The base DDPMPipeline folder and ``checkpoints`` LoRA folders (pytorch_lora_weights.safetensors) over it."""
    import diffusers
    import peft
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    torch.manual_seed(0)
    diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**unet),
                           scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "base")
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    folders = []
    for c in range(checkpoints):
        unet = peft.inject_adapter_in_model(config, diffusers.UNet2DModel.from_pretrained(root / "base" / "unet"))
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        folders.append(root / f"lora-{c + 1}")
        StableDiffusionLoraLoaderMixin.save_lora_weights(folders[-1], unet_lora_layers=peft.get_peft_model_state_dict(
            unet), unet_lora_adapter_metadata=config.to_dict())
    return root / "base", folders


def images(root: Path, rows: int) -> Path:
    """``rows`` 32x32 RGB images (the bundled photo patches, upsampled) as an .npz."""
    data = load_dataset("photos:train").subset(slice(0, rows))
    upsampled = torch.nn.functional.interpolate(data.images, size=(32, 32), mode="bilinear", align_corners=False)
    pixels = ((upsampled.clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    np.savez(root / "train.npz", images=pixels)
    return root / "train.npz"


def time_selection(base: Path, folders: list[Path], data: Path, params: str, store: Path) -> dict:
    """Featurize ``data`` at every checkpoint with ``params`` selected; seconds per row and what was attributed."""
    ckpts = load_checkpoints(folders, base=base)
    rows = load_dataset(str(data))
    start = time.perf_counter()
    fs = featurize(ckpts, rows, store, FeaturizeConfig(params=params), progress=False)
    seconds = time.perf_counter() - start
    return {"params": params, "tensors": fs.meta.params["tensors"], "parameters": fs.meta.params["count"],
            "seconds": seconds, "seconds_per_row": seconds / len(rows), "rows": len(rows),
            "checkpoints": len(folders), "timesteps": len(fs.meta.timesteps), "proj_dim": fs.meta.projector.proj_dim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="training rows featurized per selection")
    parser.add_argument("--checkpoints", type=int, default=2, help="LoRA checkpoints")
    parser.add_argument("--channels", default="64,128,128", help="the UNet's block_out_channels (its size)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_lora.json"))
    args = parser.parse_args()
    unet = {**UNET, "block_out_channels": tuple(int(c) for c in args.channels.split(","))}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, folders = write_pipeline(root, args.checkpoints, unet)
        data = images(root, args.rows)
        results = {name: time_selection(base, folders, data, params, root / f"{name}.zarr")
                   for name, params in SELECTIONS.items()}
    speedup = results["all"]["seconds_per_row"] / results["lora"]["seconds_per_row"]
    print(f"{'selection':<10} {'parameters':>11} {'s/row':>8} {'vs all':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['parameters']:>11,} {r['seconds_per_row']:>8.3f}"
              f" {results['all']['seconds_per_row'] / r['seconds_per_row']:>6.2f}x")
    print(f"lora vs all: {speedup:.2f}x per row (target >= 3x: {'met' if speedup >= 3 else 'missed'})")
    report = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()}, "results": results,
              "lora_speedup": speedup, "target": 3.0, "torch_threads": torch.get_num_threads(),
              "machine": platform.platform(), "processor": platform.processor() or platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
