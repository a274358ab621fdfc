"""Ground truth for latent text-to-image LoRA fine-tunes: the AbC protocol (Wang et al. 2023) in miniature.

A tiny Stable-Diffusion-style pipeline is built here from configs (nothing downloads): an ``AutoencoderKL`` trained
briefly for reconstruction (16x16 RGB -> 4x8x8 latents) on the base images and generic two-colour patterns (so that
it can represent a concept the UNet never saw, as a web-scale VAE can), a CLIP text encoder over letters, a
``UNet2DConditionModel`` pretrained on a base set (``--base-rows`` photo patches, captions "a photo of <two words>"
from a pool; ``--single-caption``: all "a photo", the first run's setting), captions dropped 10% of the time so
that classifier-free guidance has an unconditional model. Each concept is a few exemplar images of a pattern the
base set lacks (coloured checkerboards, rings or stripes) with its own caption ("a photo of sks", "... zqv",
"... vbn"); the pretrained UNet is LoRA-fine-tuned on them (peft ``LoraConfig`` r = 8 on every Linear of the
transformer blocks, ``--targets attention``: on to_q, to_k, to_v, to_out.0 only; two checkpoints saved as diffusers
saves LoRA weights).
Images generated with the concept's caption (``projidx sample --prompt``, its default guidance) are attributed over
base + exemplar rows through the adapter (``--params`` auto: lora), every method the store scores, beside pixel and
latent nearest neighbours (which say whether the generations reproduce the exemplars). Reported per concept and
method: exemplar recall@10 (the share of the exemplars in the top-10, mean over generations), hit@10 (at least one
exemplar in the top-10) and the mean rank of the best exemplar, over all generations (the AbC protocol) and over the
generations that depict the concept (their latent nearest neighbour is an exemplar; a fine-tune this small does not
always reproduce its concept). ``projidx validate`` runs on the pretrained (full-UNet) store of the base rows.
``--seed`` makes a whole new instance (base photos, exemplars, every training and sampling seed).

    python benchmarks/customization.py --out bench-out/customization     # ~23 min at 1 thread, models cached in OUT

Prints a table, writes OUT/customization.json (with ``--guidance-scale G`` other than sample's default:
OUT/customization-gG.json, the same models, generations of their own).
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

from projidx.data.datasets import load_dataset
from projidx.features.featurization import featurize, featurize_queries
from projidx.models.checkpoints import load_checkpoints
from projidx.reports.validate import validate_store
from projidx.search.scoring import exact_topk, query_vectors, scorable_methods
from projidx.settings import FeaturizeConfig, SampleConfig

SIZE, WIDTH, TOKENS = 16, 32, 32
CONCEPTS = {"checker": "a photo of sks", "ring": "a photo of zqv", "stripes": "a photo of vbn"}
BASE_CAPTION = "a photo"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' LoRA training scripts' targets
TRANSFORMER = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")  # every Linear of the transformer blocks
BASE_WORDS = ("red", "blue", "green", "cat", "dog", "tree", "sky", "road", "house", "field")


def base_captions(n: int, varied: bool) -> list[str]:
    """Captions of the n base rows: one shared caption, or "a photo of <word> <word>" from a fixed pool (varied: the
    concepts' captions are then not the only ones that differ)."""
    if not varied:
        return [BASE_CAPTION] * n
    k = len(BASE_WORDS)
    return [f"a photo of {BASE_WORDS[i % k]} {BASE_WORDS[(i // k + 3) % k]}" for i in range(n)]


def tokenizer(folder: Path, max_length: int = TOKENS):
    """A CLIP tokenizer over single letters (no merges) and ``max_length`` positions, written to ``folder`` (also
    the tokenizer of tests/test_latent.py's tiny pipelines)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=max_length)


def concept_images(kind: str, n: int, seed: int) -> np.ndarray:
    """(n, 16, 16, 3) uint8 exemplars of a concept: checkerboards, concentric rings or stripes (horizontal,
    vertical or diagonal), each in its own colours (also the VAE's generic patterns, from other seeds)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if kind == "checker":
            cell = int(rng.integers(2, 5))
            mask = ((yy // cell + xx // cell) % 2).astype(bool)
        elif kind == "stripes":
            coord = (yy, xx, yy + xx, yy - xx + SIZE)[int(rng.integers(0, 4))]
            mask = (coord // int(rng.integers(2, 5)) % 2).astype(bool)
        else:
            r = np.hypot(yy - 7.5 + rng.uniform(-1, 1), xx - 7.5 + rng.uniform(-1, 1))
            mask = (r // int(rng.integers(2, 4)) % 2).astype(bool)
        out.append(np.where(mask[..., None], a, b).astype(np.uint8))
    return np.stack(out)


def write_folder(folder: Path, images: np.ndarray, captions: list[str]) -> Path:
    """PNG files plus metadata.jsonl (file_name, text): an image folder with captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (x, text) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(x).save(folder / f"img_{i:04d}.png")
        lines.append(json.dumps({"file_name": f"img_{i:04d}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def encode_text(tok, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tok(captions, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def vae_images(base: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """What the VAE is trained on: the base images and ``n`` generic two-colour patterns (checkerboards and rings from
    seeds no concept uses), so that it can represent a concept the UNet has never seen, as a web-scale VAE can."""
    patterns = np.concatenate([concept_images(kind, n // len(CONCEPTS), seed=1000 + 10 * seed + i)
                               for i, kind in enumerate(CONCEPTS)])
    return torch.cat([base, torch.from_numpy(patterns).permute(0, 3, 1, 2).float() / 127.5 - 1])


def pretrain(root: Path, pixels: torch.Tensor, captions: list[str], steps: int, patterns: int = 300,
             seed: int = 0) -> Path:
    """The base pipeline folder: a VAE trained for reconstruction (base images and ``patterns`` generic patterns),
    its scaling factor 1 / the standard deviation of the base images' latents (as Rombach et al. set it), then the
    UNet trained on the base latents, captions dropped 10% of the time (the empty caption is what classifier-free
    guidance runs unconditionally, as in Stable Diffusion's training); ``seed`` seeds both."""
    import diffusers
    import transformers

    folder = root / "base"
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    tok = tokenizer(root / "tokenizer-files")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=SIZE)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generic = vae_images(pixels, patterns, seed)
    for _ in range(steps):
        x = generic[torch.randint(0, len(generic), (32,))]
        posterior = vae.encode(x).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # Stable Diffusion's recipe: latents rescaled to unit variance over the UNet's data
        vae.register_to_config(scaling_factor=float(1 / vae.encode(pixels).latent_dist.mean.std()))
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval().requires_grad_(False)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, norm_num_groups=16, attention_head_dim=8)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        states = encode_text(tok, text_encoder, captions)
        empty = encode_text(tok, text_encoder, [""])[0]
    diffusion_steps(unet, scheduler, latents, states, steps, lr=1e-3, unconditional=empty)
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(folder)
    return folder


def diffusion_steps(unet, scheduler, latents: torch.Tensor, states: torch.Tensor, steps: int, lr: float,
                    params=None, unconditional: torch.Tensor | None = None) -> None:
    """``steps`` Adam steps of the epsilon-prediction loss on (latents, encoder states) batches of 32; with
    ``unconditional`` (the empty caption's states), each caption is replaced by it with probability 0.1."""
    optimizer = torch.optim.Adam(params if params is not None else unet.parameters(), lr=lr)
    abar = scheduler.alphas_cumprod.float()
    unet.train()
    for _ in range(steps):
        i = torch.randint(0, len(latents), (32,))
        t = torch.randint(0, len(abar), (32,))
        eps = torch.randn_like(latents[i])
        a = abar[t].view(-1, 1, 1, 1)
        cond = states[i]
        if unconditional is not None:
            cond = torch.where(torch.rand(len(i), 1, 1) < 0.1, unconditional, cond)
        pred = unet(a.sqrt() * latents[i] + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()


def fine_tune(base: Path, out: Path, exemplars: torch.Tensor, caption: str, steps: int,
              targets: tuple[str, ...] = ATTENTION, seed: int = 1) -> list[Path]:
    """Two LoRA checkpoints (after steps/2 and steps) of the base UNet on the exemplars, LoRA on the ``targets``
    layers, saved as diffusers does; ``seed`` seeds the LoRA's initialization and the training draws."""
    import diffusers
    import peft

    folders = [out / f"lora-{c}" for c in (1, 2)]
    if all((f / "pytorch_lora_weights.safetensors").is_file() for f in folders):
        return folders
    torch.manual_seed(seed)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base)
    unet = pipe.unet
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=list(targets))
    unet.add_adapter(config)
    with torch.no_grad():
        latents = pipe.vae.encode(exemplars).latent_dist.mean * pipe.vae.config.scaling_factor
        states = encode_text(pipe.tokenizer, pipe.text_encoder, [caption] * len(exemplars))
    adapter = [p for n, p in unet.named_parameters() if "lora_" in n]
    for folder in folders:
        diffusion_steps(unet, pipe.scheduler, latents, states, steps // 2, lr=1e-3, params=adapter)
        diffusers.StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=peft.get_peft_model_state_dict(unet), unet_lora_adapter_metadata=config.to_dict())
    return folders


def ranks_of(top: np.ndarray, exemplar_rows: np.ndarray, k: int) -> dict:
    """recall@k, hit@k and the mean rank of the best exemplar (k where none is in the list) of rankings (G, >= k)."""
    inside = np.isin(top[:, :k], exemplar_rows)
    best = np.where(inside.any(axis=1), inside.argmax(axis=1), k)
    return {"recall_at_10": float(inside.sum(axis=1).mean() / len(exemplar_rows)),
            "hit_at_10": float(inside.any(axis=1).mean()), "best_rank": float(best.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/customization")
    p.add_argument("--base-rows", type=int, default=300)
    p.add_argument("--exemplars", type=int, default=5)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--tune-steps", type=int, default=2000)
    p.add_argument("--targets", choices=("attention", "transformer"), default="transformer",
                   help="LoRA on the attention projections (diffusers' scripts) or every Linear of the transformer"
                        " blocks (attention, proj_in/out, feed-forward)")
    p.add_argument("--generate", type=int, default=16)
    p.add_argument("--guidance-scale", type=float, default=SampleConfig.guidance_scale,
                   help="classifier-free guidance of the generations (projidx sample's default); another value"
                        " samples into OUT/<concept>/generated-g<value> and reports to customization-g<value>.json,"
                        " reusing the models")
    p.add_argument("--validate-samples", type=int, default=16)
    p.add_argument("--single-caption", action="store_true", help="every base row captioned 'a photo'")
    p.add_argument("--seed", type=int, default=0,
                   help="a whole new instance: other base photos (rows seed*base_rows on), exemplars, VAE patterns,"
                        " pretraining, fine-tune and sampling seeds (0: the run reported in docs/results.md)")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    start = time.perf_counter()
    photos = load_dataset("photos")
    first = args.seed * args.base_rows
    if first + args.base_rows > len(photos):
        sys.exit(f"--seed {args.seed} with --base-rows {args.base_rows} needs {first + args.base_rows} photos;"
                 f" the set has {len(photos)}")
    photos = photos.subset(slice(first, first + args.base_rows)).images
    base_u8 = ((photos.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    concepts = {k: concept_images(k, args.exemplars, seed=10 * args.seed + i) for i, k in enumerate(CONCEPTS)}
    everything = np.concatenate([base_u8, *concepts.values()])
    pixels = torch.from_numpy(everything).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = base_captions(args.base_rows, not args.single_caption)
    base = pretrain(out, pixels[: args.base_rows], captions, args.pretrain_steps, seed=args.seed)
    report = {"settings": vars(args), "concepts": {}}
    suffix = "" if args.guidance_scale == SampleConfig.guidance_scale else f"-g{args.guidance_scale:g}"
    base_folder = write_folder(out / "data-base", base_u8, captions)
    base_store = featurize(load_checkpoints([base]), load_dataset(str(base_folder)), out / "base.zarr",
                           FeaturizeConfig(), progress=False)
    report["validate"] = validate_store(base_store, load_checkpoints([base]), load_dataset(str(base_folder)),
                                        samples=args.validate_samples)["methods"]
    for kind, caption in CONCEPTS.items():
        rows = np.concatenate([base_u8, concepts[kind]])
        data_folder = write_folder(out / f"data-{kind}", rows, captions + [caption] * args.exemplars)
        exemplars = torch.from_numpy(concepts[kind]).permute(0, 3, 1, 2).float() / 127.5 - 1
        loras = fine_tune(base, out / kind, exemplars, caption, args.tune_steps,
                          TRANSFORMER if args.targets == "transformer" else ATTENTION, seed=1 + args.seed)
        gen_folder = out / kind / f"generated{suffix}"
        if not (gen_folder / "metadata.jsonl").is_file():
            from click.testing import CliRunner

            from projidx.cli.main import main as cli

            result = CliRunner().invoke(cli, ["sample", "--checkpoints", str(loras[-1]), "--base", str(base),
                                              "--prompt", caption, "--n", str(args.generate), "--seed",
                                              str(args.seed), "--guidance-scale", str(args.guidance_scale),
                                              "--out", str(gen_folder)])
            if result.exit_code != 0:
                sys.exit(f"sample failed: {result.output}")
        ckpts = load_checkpoints([str(f) for f in loras], None, base)
        train = load_dataset(str(data_folder))
        store = featurize(ckpts, train, out / kind / "store.zarr", FeaturizeConfig(), progress=False)
        generated = load_dataset(str(gen_folder))
        qf = featurize_queries(store, ckpts, generated, progress=False)
        exemplar_rows = np.arange(args.base_rows, args.base_rows + args.exemplars)
        ids = store.ids()
        rankings = {method: np.searchsorted(ids, exact_topk(store, query_vectors(store, qf, method), method, 10)[1])
                    for method in scorable_methods(store)}
        gen = generated.images.flatten(1)
        rankings["pixel"] = torch.topk(-torch.cdist(gen, train.images.flatten(1)), 10).indices.numpy()
        vae = ckpts.frozen.vae
        with torch.no_grad():
            z_gen = vae.encode(generated.images).latent_dist.mean.flatten(1)
            z_train = vae.encode(train.images).latent_dist.mean.flatten(1)
        rankings["latent"] = torch.topk(-torch.cdist(z_gen, z_train), 10).indices.numpy()
        # the generations that depict the concept: their latent nearest neighbour is an exemplar
        depicting = np.isin(rankings["latent"][:, 0], exemplar_rows)
        methods = {name: {**ranks_of(top, exemplar_rows, 10),
                          "depicting": ranks_of(top[depicting], exemplar_rows, 10) if depicting.any() else None}
                   for name, top in rankings.items()}
        report["concepts"][kind] = {"caption": caption, "store_dim": store.meta.projector.proj_dim,
                                    "params": store.meta.params, "depicting": int(depicting.sum()),
                                    "methods": methods}
    report["wall_s"] = time.perf_counter() - start
    (out / f"customization{suffix}.json").write_text(json.dumps(report, indent=1))
    print(f"{'concept':<8} {'method':<12} {'recall@10':>9} {'hit@10':>7} {'best rank':>9}   depicting: {'recall@10':>9}"
          f" {'hit@10':>7}")
    for kind, c in report["concepts"].items():
        for method, r in c["methods"].items():
            d = r["depicting"] or {"recall_at_10": float("nan"), "hit_at_10": float("nan")}
            print(f"{kind:<8} {method:<12} {r['recall_at_10']:>9.2f} {r['hit_at_10']:>7.2f} {r['best_rank']:>9.2f}"
                  f"   {c['depicting']:>2} of {args.generate:<3}  {d['recall_at_10']:>9.2f} {d['hit_at_10']:>7.2f}")
    for method, checks in report["validate"].items():
        print(f"validate (base store) {method}: " + ", ".join(f"{name} top-1 {c['top1']:.2f} top-10 {c['top10']:.2f}"
                                                           for name, c in checks.items()))
    print(f"wall time {report['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
