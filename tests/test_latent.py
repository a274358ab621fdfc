"""Latent text-to-image pipelines (StableDiffusionPipeline.save_pretrained folders) as checkpoints: images through the
pipeline's VAE, captions through its own tokenizer and text encoder, on both sides; latents cached; captions from
metadata.jsonl; prompts on query, sample and serve. Everything is built here from configs: nothing downloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from projidx.data.datasets import load_dataset
from projidx.store.feature_store import FeatureStore
from tests.test_cli import assert_clean_error, run
from tests.test_diffusers import nudged_checkpoints

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
customization = pytest.importorskip("customization")

N, SIZE, TOKENS, WIDTH = 12, 16, 8, 32
WORDS = ("red", "blue", "cat", "dog", "tree", "sky")


def tiny_tokenizer(folder: Path, max_length: int = TOKENS):
    """A CLIP tokenizer over single letters (no merges), written to ``folder`` (the customization benchmark's)."""
    return customization.tokenizer(folder, max_length)


def tiny_pipeline(root: Path, count: int = 2, vocab: int | None = None, positions: int = TOKENS,
                  seed: int = 0) -> list[Path]:
    """``count`` checkpoints of one run of a tiny latent text-to-image pipeline (16x16 RGB -> 4x8x8 latents, a CLIP
    text encoder 32 wide), the UNet's weights moved a little each time, each saved as a StableDiffusionPipeline
    folder. ``vocab`` / ``positions``: the text encoder's table sizes (to build mismatched pipelines)."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(root / "tokenizer-files")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=SIZE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=positions, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, norm_num_groups=4, attention_head_dim=4)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    return nudged_checkpoints(unet, root, count, lambda folder: diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).save_pretrained(folder))


def image_folder(folder: Path, rows: slice, captions: str = "jsonl") -> Path:
    """Photo patches (16x16 RGB) as PNG files with a caption each: metadata.jsonl, metadata.csv or .txt files."""
    from PIL import Image

    folder.mkdir(parents=True)
    images = load_dataset("photos").subset(rows).images
    records = []
    for i, x in enumerate(images):
        name = f"img_{i:03d}.png"
        Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)).save(folder / name)
        records.append({"file_name": name, "text": f"a {WORDS[i % 6]} {WORDS[(i // 6 + 2) % 6]}"})
    if captions == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    elif captions == "csv":
        (folder / "metadata.csv").write_text("file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n"
                                                                           for r in records))
    else:
        for r in records:
            (folder / r["file_name"]).with_suffix(".txt").write_text(r["text"])
    return folder


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread for these tiny models (after conftest's two): a second thread buys nothing at this size,
    and beside another busy process it made a query 13 s instead of 0.17 s (measured on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> list[Path]:
    return tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data") / "train", slice(0, N))


def checkpoint_flags(folders: list[Path]) -> list:
    return [a for f in folders for a in ("--checkpoints", f)]


def test_latent_gradients_equal_a_backward_pass_from_scratch(tmp_path, pipeline, train_folder):
    """With the identity projector the store holds, for a training image and its caption, exactly the gradient of
    the UNet's loss computed here from scratch with diffusers and transformers: the VAE's posterior mean x
    scaling_factor, the caption padded to the tokenizer's length through the text encoder, the scheduler's
    alpha-bar."""
    from projidx.models.diffusion import noise_for

    store = tmp_path / "s.zarr"
    run("featurize", *checkpoint_flags(pipeline), "--data", train_folder, "--store", store, "--projector", "identity",
        "--timesteps", 2, "--dtype", "float32", "--chunk-rows", 8, "--objective", "loss")
    meta = FeatureStore.open(store).meta
    assert meta.image_shape == (3, SIZE, SIZE) and meta.conditioning == {"encoder_hidden_states": {"dim": WIDTH}}
    assert set(meta.encoders) == {"vae", "tokenizer", "text_encoder", "latents"} and meta.encoders["latents"] == "mean"
    folder = pipeline[1]
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    abar = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").alphas_cumprod.float()
    row, g = 9, 1
    data = load_dataset(str(train_folder))
    t = meta.timesteps[g]
    with torch.no_grad():
        z = vae.encode(data.images[row : row + 1]).latent_dist.mean * vae.config.scaling_factor
        tokens = tokenizer([data.captions[row]], padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
        states = text_encoder(tokens)[0]
    eps = noise_for(meta.noise_seed, [row], 1, [t], 0, z.shape[1:], policy="shared")
    x_t = abar[t].sqrt() * z + (1 - abar[t]).sqrt() * eps
    (unet(x_t, torch.tensor([t]), encoder_hidden_states=states).sample - eps).square().mean().backward()
    expected = torch.cat([p.grad.flatten() for _, p in sorted(unet.named_parameters())])
    stored = FeatureStore.open(store)
    got = np.asarray(stored.group["features/step-200"][row, g]) * np.asarray(stored.group["norms/step-200"][row, g])
    np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, atol=1e-6)


class Interrupted(Exception):
    pass


def test_latents_are_encoded_once_and_cached(tmp_path, pipeline, train_folder):
    """The VAE encodes each training row once for every checkpoint, and not again when an interrupted run resumes
    (the latents are read back from STORE.latents/); the resumed store equals an uninterrupted one; queries are
    encoded once for all checkpoints."""
    from projidx.features.featurization import featurize, featurize_queries
    from projidx.models.checkpoints import load_checkpoints
    from projidx.settings import FeaturizeConfig

    ckpts = load_checkpoints(pipeline)
    vae = ckpts.frozen.vae
    calls = []
    encode = vae.encode
    vae.encode = lambda x: calls.append(len(x)) or encode(x)
    data = load_dataset(str(train_folder), stream=True)
    config = FeaturizeConfig(proj_dim=32, timesteps=2, chunk_rows=4)  # 3 chunks x 2 checkpoints

    def stop_after_two(cid: str, i: int) -> None:
        if (cid, i) == ("step-100", 1):
            raise Interrupted

    with pytest.raises(Interrupted):
        featurize(ckpts, data, tmp_path / "s.zarr", config, progress=False, on_chunk=stop_after_two)
    assert calls == [4, 4]
    store = featurize(ckpts, data, tmp_path / "s.zarr", config, progress=False)
    assert calls == [4, 4, 4]  # the third chunk only; both checkpoints read the cache
    whole = featurize(load_checkpoints(pipeline), data, tmp_path / "whole.zarr", config, progress=False)
    for cid in store.meta.checkpoint_ids:
        np.testing.assert_array_equal(store.group[f"features/{cid}"][:], whole.group[f"features/{cid}"][:])
    featurize_queries(store, ckpts, load_dataset(str(train_folder)).subset(slice(0, 3)), progress=False)
    assert calls == [4, 4, 4, 3]


def test_captions_change_the_features(pipeline, train_folder, tmp_path):
    """A query's features depend on its caption (the same image with another prompt gets other gradients), and
    the training captions are part of the store's data fingerprint."""
    from projidx.data.datasets import with_prompt
    from projidx.features.featurization import featurize, featurize_queries
    from projidx.models.checkpoints import load_checkpoints
    from projidx.settings import FeaturizeConfig

    ckpts = load_checkpoints(pipeline)
    data = load_dataset(str(train_folder))
    store = featurize(ckpts, data, tmp_path / "s.zarr", FeaturizeConfig(proj_dim=32, timesteps=2), progress=False)
    image = data.subset(slice(0, 1))
    red, again, sky = (featurize_queries(store, ckpts, with_prompt(image, p), progress=False).features[0]
                       for p in ("a red cat", "a red cat", "the sky"))
    np.testing.assert_array_equal(red, again)
    assert not np.allclose(red, sky, atol=1e-3)
    assert data.fingerprint(store.meta.conditioning_inputs) == store.meta.dataset_fingerprint
    recaptioned = with_prompt(data, "one caption for all")
    assert recaptioned.fingerprint(store.meta.conditioning_inputs) != store.meta.dataset_fingerprint


def test_pipeline_on_the_cli(tmp_path, pipeline, train_folder):
    """featurize -> index -> sample (prompts written beside the images) -> query (reads them back; --prompt
    overrides) -> validate on pipeline folders with metadata.jsonl captions."""
    store, ckpt = tmp_path / "s.zarr", checkpoint_flags(pipeline)
    run("featurize", *ckpt, "--data", train_folder, "--store", store, "--timesteps", 2, "--proj-dim", 64)
    run("index", "--store", store)
    generated = tmp_path / "gen"
    run("sample", *ckpt, "--out", generated, "--n", 2, "--steps", 2, "--prompt", "a red cat", "--guidance-scale", 3)
    records = [json.loads(line) for line in (generated / "metadata.jsonl").read_text().splitlines()]
    assert records == [{"file_name": f"sample_0000{i}.png", "text": "a red cat"} for i in range(2)]
    run("query", "--store", store, "--data", generated, "--out", tmp_path / "g.json", "--top-k", 3)
    result = json.loads((tmp_path / "g.json").read_text())
    assert [q["query_name"] for q in result["queries"]] == ["sample_00000.png", "sample_00001.png"]
    assert all(len(q["names"]) == 3 and q["names"][0].startswith("img_") for q in result["queries"])
    run("query", "--store", store, "--data", train_folder, "--limit", 2, "--out", tmp_path / "r.json", "--exact")
    assert [q["ids"][0] for q in json.loads((tmp_path / "r.json").read_text())["queries"]] == [0, 1]
    run("query", "--store", store, "--data", generated, "--prompt", "the sky", "--out", tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["queries"] != result["queries"]
    run("validate", "--store", store, "--samples", 3, "--method", "matched", "--out", tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text())["methods"]["matched"]["self"]["top1"] == 1.0


def test_bad_pipeline_inputs(tmp_path, pipeline, train_folder):
    """A caption missing for some image, no captions at all, images of the wrong size, a tokenizer that does not
    fit its text encoder (vocabulary, length), another VAE for a store's queries, other latents or captions on
    resume: one-line errors, nothing written."""
    import shutil

    store, ckpt = tmp_path / "s.zarr", checkpoint_flags(pipeline)
    partial = image_folder(tmp_path / "partial", slice(0, 4))
    lines = (partial / "metadata.jsonl").read_text().splitlines()
    (partial / "metadata.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert_clean_error(run("featurize", *ckpt, "--data", partial, "--store", store, ok=False),
                       "no caption for image img_002.png")
    (partial / "metadata.jsonl").unlink()
    assert_clean_error(run("featurize", *ckpt, "--data", partial, "--store", store, ok=False), "captions",
                       "metadata.jsonl")
    assert_clean_error(run("featurize", *ckpt, "--data", train_folder, "--resize", "8x8", "--store", store,
                           ok=False), "--resize 16x16")
    for bad, words in ((dict(vocab=20), "54 tokens"), (dict(positions=4), "pads captions to 8 tokens")):
        folder = tiny_pipeline(tmp_path / str(len(words)), count=1, **bad)[0]
        assert_clean_error(run("featurize", "--checkpoints", folder, "--data", train_folder, "--store", store,
                               ok=False), "tokenizer", words)
    assert not store.exists()
    run("featurize", *ckpt, "--data", train_folder, "--store", store, "--timesteps", 2, "--proj-dim", 32)
    assert_clean_error(run("featurize", *ckpt, "--data", train_folder, "--store", store, "--latents", "sample",
                           ok=False), "latents")
    other = image_folder(tmp_path / "other", slice(0, N), captions="txt")
    (other / "img_000.txt").write_text("another caption")
    assert_clean_error(run("featurize", *ckpt, "--data", other, "--store", store, ok=False), "dataset")
    moved = []
    for folder in pipeline:
        moved.append(tmp_path / "moved" / folder.name)
        shutil.copytree(folder, moved[-1])
        vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae")
        with torch.no_grad():
            next(vae.parameters()).add_(0.1)
        vae.save_pretrained(moved[-1] / "vae")
    assert_clean_error(run("query", "--store", store, "--data", train_folder, "--out", tmp_path / "r.json",
                           *[a for f in moved for a in ("--checkpoints", f)], ok=False), "another VAE")
    assert_clean_error(run("featurize", "--checkpoints", pipeline[0], "--checkpoints", moved[1], "--data",
                           train_folder, "--store", tmp_path / "mixed.zarr", ok=False), "vae/ differs")


def test_serve_takes_a_prompt_with_each_image(tmp_path, pipeline, train_folder):
    """POST /query with an image and its prompt (multipart: one prompt for all or one per image; JSON: per image
    or top-level): the answer is the one query gives for the same image and prompt; an overlong prompt, a prompt
    count that fits no image count and an image without any prompt are one-line 400s."""
    import base64
    import io

    pytest.importorskip("flask")
    from projidx.cli.service import QueryService, create_app
    from projidx.settings import ServeLimits

    store = tmp_path / "s.zarr"
    run("featurize", *checkpoint_flags(pipeline), "--data", train_folder, "--store", store, "--timesteps", 2,
        "--proj-dim", 32)
    run("index", "--store", store)
    png = (train_folder / "img_003.png").read_bytes()
    run("query", "--store", store, "--data", train_folder / "img_003.png", "--prompt", "a dog", "--out",
        tmp_path / "r.json")
    expected = json.loads((tmp_path / "r.json").read_text())["queries"][0]["ids"]
    app = create_app(QueryService(str(store), limits=ServeLimits(max_prompt_chars=20))).test_client()
    form = app.post("/query", data={"image": (io.BytesIO(png), "q.png"), "prompt": "a dog"})
    assert form.status_code == 200, form.json
    assert form.json["queries"][0]["ids"] == expected
    body = {"images": [{"name": "q.png", "base64": base64.b64encode(png).decode()}], "prompt": "a dog"}
    dog = app.post("/query", json=body).json["queries"][0]
    assert dog["ids"] == expected
    body["images"][0]["prompt"] = "the sky"  # an image's own prompt wins over the top-level one
    assert app.post("/query", json=body).json["queries"][0]["scores"] != dog["scores"]
    for bad, words in (({**body, "prompt": "x" * 21}, "at most 20 characters"),
                       ({"images": [{"name": "q.png", "base64": body["images"][0]["base64"]}]}, "captions")):
        answer = app.post("/query", json=bad)
        assert answer.status_code == 400 and words in answer.json["error"], answer.json
    two = app.post("/query", data={"image": (io.BytesIO(png), "q.png"), "prompt": ["a", "b"]})
    assert two.status_code == 400 and "one per image" in two.json["error"]


def test_caption_sources(tmp_path):
    """The same captions from metadata.jsonl, metadata.csv, .txt files, a Hugging Face caption column and an .npz;
    a named caption column that is missing is refused."""
    from PIL import Image

    from projidx.errors import ProjidxError
    from projidx.settings import DataOptions

    datasets = pytest.importorskip("datasets")
    expected = load_dataset(str(image_folder(tmp_path / "jsonl", slice(0, 4)))).captions
    assert expected[1] == "a blue cat"
    for kind in ("csv", "txt"):
        assert load_dataset(str(image_folder(tmp_path / kind, slice(0, 4), captions=kind))).captions == expected
    assert load_dataset(str(tmp_path / "jsonl" / "img_001.png")).captions == (expected[1],)
    images = [Image.open(tmp_path / "jsonl" / f"img_{i:03d}.png") for i in range(4)]
    datasets.Dataset.from_dict({"image": images, "text": list(expected)}).save_to_disk(tmp_path / "hf")
    assert load_dataset(str(tmp_path / "hf")).captions == expected
    assert load_dataset(str(tmp_path / "hf"), stream=True).captions == expected
    data = load_dataset(str(tmp_path / "jsonl"))
    np.savez(tmp_path / "c.npz", images=((data.images.numpy() + 1) * 127.5).round().astype(np.uint8),
             captions=np.asarray(expected))
    assert load_dataset(str(tmp_path / "c.npz")).captions == expected
    for spec in ("jsonl", "hf"):
        with pytest.raises(ProjidxError, match="no caption column 'prompt'"):
            load_dataset(str(tmp_path / spec), DataOptions(caption_column="prompt"))


def test_sampled_latents_are_seeded_draws(pipeline, train_folder):
    """--latents sample: mean + std x eps with eps seeded by (noise seed, sample id): the same draw for the same
    seed and id, another for another seed, and not the mean."""
    from projidx.models.checkpoints import load_checkpoints

    parts = load_checkpoints(pipeline).frozen
    data = load_dataset(str(train_folder)).subset(slice(0, 3))
    mean = parts.encode_images(data.images, data.ids, "mean", 0)
    first, again, other = (parts.encode_images(data.images, data.ids, "sample", s) for s in (0, 0, 1))
    assert mean.shape == (3, 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, mean)
    torch.testing.assert_close(parts.encode_images(data.images[1:2], data.ids[1:2], "sample", 0), first[1:2])
