"""diffusers models as checkpoints: pipeline and UNet folders on the CLI, the scheduler's own schedule, v-prediction
scored with its own loss, class labels and text embeddings passed to the model (under vmap and in batch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from projidx.data.datasets import load_dataset
from projidx.features.grads import GradientComputer
from projidx.models.checkpoints import load_checkpoints
from projidx.models.diffusion import DiffusersEps, diffusion_loss, noise_for, q_sample
from projidx.store.feature_store import FeatureStore
from tests.test_cli import assert_clean_error, run

diffusers = pytest.importorskip("diffusers")

N, CLASSES, TOKENS, WIDTH = 24, 3, 4, 8


def tiny_unet(num_class_embeds: int | None = None):
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds)


def tiny_text_unet():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, norm_num_groups=4, attention_head_dim=2)


def save_run(root: Path, make_unet, scheduler, pipeline: bool = True, count: int = 2) -> list[Path]:
    """``count`` checkpoints of one 'training run': the same architecture, weights moved a little each time,
    saved as a DDPMPipeline folder each (or as unet/ + scheduler/ folders)."""
    torch.manual_seed(0)
    unet = make_unet()

    def save(folder: Path) -> None:
        if pipeline:
            diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
        else:
            unet.save_pretrained(folder / "unet")
            scheduler.save_pretrained(folder / "scheduler")

    return nudged_checkpoints(unet, root, count, save)


def nudged_checkpoints(unet: torch.nn.Module, root: Path, count: int, save) -> list[Path]:
    """``count`` checkpoint folders root/step-100, step-200, ...: ``unet``'s weights moved a little (seeded by the
    caller) before each, then ``save(folder)``."""
    folders = []
    for c in range(count):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.02 * torch.randn_like(p))
        folders.append(root / f"step-{(c + 1) * 100}")
        save(folders[-1])
    return folders


def digits_npz(path: Path, rows: slice, labels: bool = False, embeddings: np.ndarray | None = None) -> Path:
    d = load_dataset("digits").subset(rows)
    arrays = {"images": ((d.images.numpy() + 1) * 127.5).round().astype(np.uint8), "ids": d.ids.numpy() + 500}
    if labels:
        arrays["labels"] = (d.ids.numpy() % CLASSES).astype(np.int64)
    if embeddings is not None:
        arrays["embeddings"] = embeddings
    np.savez(path, **arrays)
    return path


def checkpoint_flags(folders: list[Path]) -> list:
    return [a for f in folders for a in ("--checkpoints", f)]


def test_vmap_gradients_of_conditional_models_equal_single_backward_passes():
    """Class labels (UNet2DModel) and encoder states (UNet2DConditionModel) reach the model per sample under vmap,
    with the v-prediction loss: the batched per-sample gradients equal one backward pass per sample."""
    schedule = load_schedule()
    torch.manual_seed(1)
    x0, t, eps = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([3, 300, 900]), torch.randn(3, 2, 1, 8, 8)
    cases = [(DiffusersEps(tiny_unet(CLASSES)), {"class_labels": torch.tensor([0, 2, 1])}),
             (DiffusersEps(tiny_text_unet()), {"encoder_hidden_states": torch.randn(3, TOKENS, WIDTH)})]
    abar = schedule.alphas_cumprod().float()
    for model, cond in cases:
        computer = GradientComputer(model, schedule, "mse", prediction="v_prediction")
        batched = computer.per_sample(x0, t, eps, cond)
        for b in range(3):
            model.zero_grad()
            one = {k: v[b : b + 1].expand(2, *v.shape[1:]) for k, v in cond.items()}
            diffusion_loss(model, x0[b : b + 1].expand(2, -1, -1, -1), t[b : b + 1].expand(2), eps[b], abar, "mse",
                           "v_prediction", one).mean().backward()
            for name, p in model.named_parameters():
                torch.testing.assert_close(batched[name][b], p.grad, rtol=1e-3, atol=1e-5)
        other = {k: (v + 1) % CLASSES if k == "class_labels" else torch.randn_like(v) for k, v in cond.items()}
        moved = computer.per_sample(x0, t, eps, other)
        assert any(not torch.allclose(moved[n], batched[n]) for n in batched), "the conditioning changes nothing"


def load_schedule():
    from projidx.models.diffusion import schedule_from_diffusers

    return schedule_from_diffusers(diffusers.DDPMScheduler(num_train_timesteps=1000))


def test_v_prediction_pipeline_is_scored_with_its_own_loss(tmp_path):
    """A v-prediction DDPMPipeline with a schedule projidx has no name for (scaled_linear): the store holds, with
    the identity projector, exactly the gradient of mse(out, sqrt(abar) eps - sqrt(1 - abar) x0), computed here
    from scratch with the scheduler's own alpha-bar."""
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        prediction_type="v_prediction")
    folders = save_run(tmp_path, tiny_unet, scheduler)
    data = digits_npz(tmp_path / "train.npz", slice(0, 6))
    run("featurize", *checkpoint_flags(folders), "--data", data, "--store", tmp_path / "s.zarr", "--projector",
        "identity", "--timesteps", 2, "--dtype", "float32", "--chunk-rows", 4, "--objective", "loss")
    store = FeatureStore.open(tmp_path / "s.zarr")
    meta = store.meta
    assert meta.prediction == "v_prediction" and meta.schedule.kind == "custom"
    assert meta.checkpoint_ids == ["step-100", "step-200"] and [c["weight"] for c in meta.checkpoints] == [1.0, 1.0]
    abar = scheduler.alphas_cumprod.float()
    images = load_dataset(str(data)).images
    model = DiffusersEps(diffusers.UNet2DModel.from_pretrained(folders[1] / "unet"))
    row, g = 4, 1
    t = meta.timesteps[g]
    x0 = images[row : row + 1]
    eps = noise_for(meta.noise_seed, [504], 1, [t], 0, (1, 8, 8), policy="shared")
    a = abar[t]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    model.zero_grad()
    (model(x_t, torch.tensor([t])) - v).square().mean().backward()
    expected = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())])
    stored = np.asarray(store.group["features/step-200"][row, g]) * np.asarray(store.group["norms/step-200"][row, g])
    np.testing.assert_allclose(stored, expected.numpy(), rtol=2e-3, atol=1e-6)
    model.zero_grad()  # the epsilon loss would give another gradient: the test can tell them apart
    (model(q_sample(x0, torch.tensor([t]), eps, abar), torch.tensor([t])) - eps).square().mean().backward()
    eps_grad = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())])
    assert not np.allclose(stored, eps_grad.numpy(), rtol=0.1, atol=1e-4)


def test_class_conditional_pipeline_on_the_cli(tmp_path):
    """featurize -> index -> query on DDPMPipeline folders of a class-conditional UNet, labels from the .npz;
    generated queries with their labels; every missing or wrong input refused in one line."""
    folders = save_run(tmp_path, lambda: tiny_unet(CLASSES), diffusers.DDPMScheduler(num_train_timesteps=1000))
    train = digits_npz(tmp_path / "train.npz", slice(0, N), labels=True)
    queries = digits_npz(tmp_path / "queries.npz", slice(N, N + 3), labels=True)
    store = tmp_path / "s.zarr"
    ckpt = checkpoint_flags(folders)
    assert_clean_error(run("featurize", *ckpt, "--data", digits_npz(tmp_path / "nolabels.npz", slice(0, N)),
                           "--store", store, ok=False), "class_labels", "labels")
    assert_clean_error(run("featurize", *ckpt, "--checkpoint-weights", "1", "--data", train, "--store", store,
                           ok=False), "--checkpoint-weights", "1 weights for 2")
    assert not store.exists()
    run("featurize", *ckpt, "--checkpoint-weights", "0.5,1.5", "--data", train, "--store", store, "--timesteps", 3,
        "--proj-dim", 64, "--chunk-rows", 8)
    meta = FeatureStore.open(store).meta
    assert meta.conditioning == {"class_labels": {"classes": CLASSES}}
    assert [c["weight"] for c in meta.checkpoints] == [0.5, 1.5]
    run("index", "--store", store)
    run("query", "--store", store, "--data", queries, "--out", tmp_path / "r.json", "--top-k", 5)
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["queries"]) == 3
    assert all(set(q["ids"]) <= set(range(500, 500 + N)) and len(set(q["ids"])) == 5 for q in result["queries"])
    # labels are part of what the store was computed from: other labels are refused on resume
    other = digits_npz(tmp_path / "other.npz", slice(0, N), labels=True)
    with np.load(other) as f:
        arrays = dict(f)
    arrays["labels"] = (arrays["labels"] + 1) % CLASSES
    np.savez(other, **arrays)
    assert_clean_error(run("featurize", *ckpt, "--checkpoint-weights", "0.5,1.5", "--data", other, "--store", store,
                           ok=False), "dataset")
    assert_clean_error(run("query", "--store", store, "--data", digits_npz(tmp_path / "q.npz", slice(N, N + 2)),
                           "--out", tmp_path / "x.json", ok=False), "class_labels")
    # generated queries: sampled per label, written with their labels, accepted by query
    assert_clean_error(run("sample", *ckpt, "--out", tmp_path / "gen.npz", "--n", 2, ok=False), "--label")
    assert_clean_error(run("sample", *ckpt, "--out", tmp_path / "gen.npz", "--label", "7", ok=False), "[0, 3)")
    run("sample", *ckpt, "--out", tmp_path / "gen.npz", "--n", 2, "--steps", 4, "--label", "2,0")
    with np.load(tmp_path / "gen.npz") as f:
        assert f["labels"].tolist() == [2, 0] and f["images"].shape == (2, 1, 8, 8)
    run("query", "--store", store, "--data", tmp_path / "gen.npz", "--out", tmp_path / "g.json", "--top-k", 3)
    assert len(json.loads((tmp_path / "g.json").read_text())["queries"]) == 2


def test_text_conditional_unet_with_precomputed_embeddings(tmp_path):
    """A UNet2DConditionModel (unet/ + scheduler/ folders) with per-sample encoder states from the .npz: featurized,
    queried, and the embeddings are part of the store's dataset fingerprint."""
    folders = save_run(tmp_path, tiny_text_unet, diffusers.DDIMScheduler(num_train_timesteps=1000), pipeline=False)
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((N + 2, TOKENS, WIDTH)).astype(np.float32)
    train = digits_npz(tmp_path / "train.npz", slice(0, N), embeddings=embeddings[:N])
    queries = digits_npz(tmp_path / "q.npz", slice(0, 2), embeddings=embeddings[:2])
    store = tmp_path / "s.zarr"
    ckpt = checkpoint_flags(folders)
    wrong = digits_npz(tmp_path / "wrong.npz", slice(0, N), embeddings=embeddings[:N, :, :5])
    assert_clean_error(run("featurize", *ckpt, "--data", wrong, "--store", store, ok=False), "(L, 8)")
    run("featurize", *ckpt, "--data", train, "--store", store, "--timesteps", 2, "--proj-dim", 64)
    assert FeatureStore.open(store).meta.conditioning == {"encoder_hidden_states": {"dim": WIDTH}}
    run("query", "--store", store, "--data", queries, "--out", tmp_path / "r.json", "--top-k", 3, "--exact")
    result = json.loads((tmp_path / "r.json").read_text())
    assert [q["ids"][0] for q in result["queries"]] == [500, 501]  # training images with their own prompts
    shuffled = digits_npz(tmp_path / "shuffled.npz", slice(0, N), embeddings=embeddings[1 : N + 1])
    assert_clean_error(run("featurize", *ckpt, "--data", shuffled, "--store", store, ok=False), "dataset")


def test_bad_diffusers_folders(tmp_path):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    a, b = save_run(tmp_path / "run", tiny_unet, scheduler)
    data = digits_npz(tmp_path / "d.npz", slice(0, 8))
    store = tmp_path / "s.zarr"
    # another architecture in the same run
    other = tmp_path / "other"
    diffusers.DDPMPipeline(unet=tiny_unet(CLASSES), scheduler=scheduler).save_pretrained(other)
    assert_clean_error(run("featurize", "--checkpoints", a, "--checkpoints", other, "--data", data, "--store", store,
                           ok=False), "config differs")
    # an unsupported prediction type
    sample = tmp_path / "x0"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(prediction_type="sample")
                           ).save_pretrained(sample)
    assert_clean_error(run("featurize", "--checkpoints", sample, "--data", data, "--store", store, ok=False),
                       "prediction_type is 'sample'")
    # no weights, no scheduler, not a checkpoint folder at all
    (b / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert_clean_error(run("featurize", "--checkpoints", b, "--data", data, "--store", store, ok=False), "no weights")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "config.json").write_text((a / "unet" / "config.json").read_text())
    assert_clean_error(run("featurize", "--checkpoints", tmp_path / "lonely", "--data", data, "--store", store,
                           ok=False), "scheduler config")
    assert_clean_error(run("featurize", "--checkpoints", tmp_path, "--data", data, "--store", store, ok=False),
                       "neither a projidx checkpoint directory")
    assert_clean_error(run("featurize", "--checkpoints", a, "--checkpoint-weights", "1,x", "--data", data, "--store",
                           store, ok=False), "--checkpoint-weights must be numbers")
    assert not store.exists()
    # a changed weights file is refused when the store's checkpoints are reloaded
    run("featurize", "--checkpoints", a, "--data", data, "--store", store, "--timesteps", 2, "--proj-dim", 32)
    ckpts = load_checkpoints([a])
    assert ckpts.checkpoints[0].id == "step-100" and ckpts.image_shape == (1, 8, 8)
    weights = a / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    assert_clean_error(run("query", "--store", store, "--data", data, "--out", tmp_path / "r.json", "--exact",
                           ok=False), "not the ones store")


def test_factorized_capture_passes_the_conditioning():
    """The factorized path (one batched pass with hooks) gives the text-conditional UNet's v-prediction gradients
    with their encoder states: the same projection and norms as projecting vmap gradients."""
    from projidx.features.factorized import FactorizedGradients, project_capture
    from projidx.features.grads import parameter_shapes
    from projidx.features.projection import ProjectorSpec, make_projector

    torch.manual_seed(0)
    model = DiffusersEps(tiny_text_unet())
    schedule = load_schedule()
    x0, t, eps = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([10, 200, 500, 990]), torch.randn(4, 2, 1, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(4, TOKENS, WIDTH)}
    proj = make_projector(ProjectorSpec("factorized", 64, parameter_shapes(model), seed=1))
    ref = proj.project_with_norms(GradientComputer(model, schedule, "mse", prediction="v_prediction")
                                  .per_sample(x0, t, eps, cond), groups=2)
    fg = FactorizedGradients(model, schedule, "mse", prediction="v_prediction")
    got = project_capture(proj, fg.capture(x0, t, eps, cond), fg.names, groups=2)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
