"""What does attributing a LoRA fine-tune through its adapter cost, per training row, against the whole UNet?

Two pipelines (``--pipeline``), each saved as a base folder with two LoRA checkpoints over it
(``LoraConfig(r=4, target_modules=to_q, to_k, to_v, to_out.0)``, B matrices made non-zero) saved as diffusers saves
them:

- ``ddpm``: a pixel-space ``UNet2DModel`` of 32x32 RGB images (block_out_channels (64, 128, 128), self-attention in
  the two lower-resolution levels), a ``DDPMPipeline`` folder;
- ``sd``: a Stable-Diffusion-style ``StableDiffusionPipeline`` folder: an ``AutoencoderKL`` (32x32 RGB -> 4x16x16
  latents), a CLIP text encoder over letters, and a ``UNet2DConditionModel`` laid out like Stable Diffusion's
  (cross-attention transformer blocks in the upper levels, a plain lowest level; block_out_channels (64, 128, 256),
  2 layers per block), the rows captioned in a metadata.jsonl.
 The same rows are featurized through the library with the same projector settings (featurize's defaults:
sjlt, k = 2048, a grid of 10 timesteps, the dtrak objective) under three selections:

- ``all``: every parameter of the adapted UNet (base and adapter): full-model gradients;
- ``lora``: the adapter only (``--params lora``, the default for LoRA checkpoints);
- ``floor``: one bias at the UNet's input (``unet.conv_in.bias``): the backward pass still runs through the whole
  network, so this is the forward/backward cost every selection shares.

Reports seconds per row (one row = one image at every checkpoint and timestep), the parameters attributed and the
speed-up of ``lora`` over ``all`` (the issue's target: >= 3x). Run it alone on the machine:

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py --out benchmarks/results/bench_lora.json
    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py --pipeline sd --out benchmarks/results/bench_lora_sd.json
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
SIZE = 32
UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32)
SD_UNET = dict(sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256),
               layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
               attention_head_dim=8)
PIPELINES = {"ddpm": UNET, "sd": SD_UNET}


def write_base(folder: Path, pipeline: str, unet: dict) -> type:
    """The base pipeline folder (``ddpm``: DDPMPipeline; ``sd``: StableDiffusionPipeline); returns the UNet class."""
    import diffusers
    import transformers
    from customization import tokenizer

    torch.manual_seed(0)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    if pipeline == "ddpm":
        diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(**unet), scheduler=scheduler).save_pretrained(folder)
        return diffusers.UNet2DModel
    tok = tokenizer(folder.parent / "tokenizer-files", max_length=16)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=SIZE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=unet["cross_attention_dim"], intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                      unet=diffusers.UNet2DConditionModel(**unet), scheduler=scheduler,
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(folder)
    return diffusers.UNet2DConditionModel


def write_pipeline(root: Path, checkpoints: int, pipeline: str = "ddpm",
                   unet: dict = UNET) -> tuple[Path, list[Path]]:
    """The base pipeline folder and ``checkpoints`` LoRA folders (pytorch_lora_weights.safetensors) over it."""
    import peft
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet_class = write_base(root / "base", pipeline, unet)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    folders = []
    for c in range(checkpoints):
        unet = peft.inject_adapter_in_model(config, unet_class.from_pretrained(root / "base" / "unet"))
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        folders.append(root / f"lora-{c + 1}")
        StableDiffusionLoraLoaderMixin.save_lora_weights(folders[-1], unet_lora_layers=peft.get_peft_model_state_dict(
            unet), unet_lora_adapter_metadata=config.to_dict())
    return root / "base", folders


def images(root: Path, rows: int, captions: bool) -> Path:
    """``rows`` 32x32 RGB images (the bundled photo patches, upsampled): an .npz, or with ``captions`` an image
    folder whose metadata.jsonl captions each "a photo of <word> <word>"."""
    from customization import base_captions, write_folder

    data = load_dataset("photos:train").subset(slice(0, rows))
    upsampled = torch.nn.functional.interpolate(data.images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    pixels = ((upsampled.clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    if captions:
        return write_folder(root / "train", pixels.transpose(0, 2, 3, 1), base_captions(rows, varied=True))
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
    parser.add_argument("--pipeline", choices=sorted(PIPELINES), default="ddpm")
    parser.add_argument("--channels", default=None, help="the UNet's block_out_channels (its size; default: the"
                        " pipeline's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_lora.json"))
    args = parser.parse_args()
    unet = dict(PIPELINES[args.pipeline])
    if args.channels:
        unet["block_out_channels"] = tuple(int(c) for c in args.channels.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, folders = write_pipeline(root, args.checkpoints, args.pipeline, unet)
        data = images(root, args.rows, captions=args.pipeline == "sd")
        results = {name: time_selection(base, folders, data, params, root / f"{name}.zarr")
                   for name, params in SELECTIONS.items()}
    speedup = results["all"]["seconds_per_row"] / results["lora"]["seconds_per_row"]
    print(f"{'selection':<10} {'parameters':>11} {'s/row':>8} {'vs all':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['parameters']:>11,} {r['seconds_per_row']:>8.3f}"
              f" {results['all']['seconds_per_row'] / r['seconds_per_row']:>6.2f}x")
    print(f"lora vs all: {speedup:.2f}x per row (target >= 3x: {'met' if speedup >= 3 else 'missed'})")
    report = {"pipeline": args.pipeline,
              "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet.items()}, "results": results,
              "lora_speedup": speedup, "target": 3.0, "torch_threads": torch.get_num_threads(),
              "machine": platform.platform(), "processor": platform.processor() or platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
