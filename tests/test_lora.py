"""LoRA fine-tunes attributed through their adapter: a base diffusers folder (--base) plus one folder per checkpoint
with pytorch_lora_weights.safetensors as diffusers saves it, loaded by diffusers / peft; per-sample gradients through
peft's wrapped layers equal single backward passes; featurize -> index -> query -> validate on the CLI; bad inputs
refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from projidx.features.grads import select_parameters
from projidx.files import file_sha256
from projidx.models.diffusion import DiffusersEps
from projidx.search.scoring import default_method
from projidx.store.feature_store import FeatureStore
from tests.test_cli import assert_clean_error, run
from tests.test_diffusers import TOKENS, WIDTH, checkpoint_flags, digits_npz, load_schedule, tiny_text_unet, tiny_unet
from tests.test_params import assert_per_sample_equal

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)


def with_lora(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``unet`` with a LoRA adapter injected by peft, its B matrices made non-zero (as if fine-tuned)."""
    peft.inject_adapter_in_model(lora_config(), unet)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return unet


def save_lora(unet: torch.nn.Module, folder: Path) -> Path:
    """The adapter of ``unet`` saved as diffusers' training scripts save it (save_lora_weights, with its config)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=peft.get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=lora_config().to_dict())
    return folder


def lora_run(root: Path, block_out_channels=(8, 16)) -> tuple[Path, list[Path], list[torch.nn.Module]]:
    """A base DDPMPipeline folder and two LoRA checkpoint folders over it; also the fine-tuned UNets themselves."""
    torch.manual_seed(0)
    base = diffusers.UNet2DModel(**{**tiny_unet().config, "block_out_channels": block_out_channels})
    diffusers.DDPMPipeline(unet=base, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        root / "base")
    tuned = []
    for c in range(2):
        unet = with_lora(diffusers.UNet2DModel.from_pretrained(root / "base" / "unet"), seed=c + 1)
        save_lora(unet, root / f"lora-{c + 1}")
        tuned.append(unet.eval())
    return root / "base", [root / "lora-1", root / "lora-2"], tuned


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    return lora_run(tmp_path_factory.mktemp("lora"))


def test_loaded_adapters_are_the_fine_tuned_models(run_dirs):
    """Each checkpoint's state dict is its fine-tuned model (base + adapter, alpha/r scaling included), and the
    store records the LoRA file's hash and the base's."""
    from projidx.models.checkpoints import load_checkpoints

    base, folders, tuned = run_dirs
    ckpts = load_checkpoints(folders, base=base)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 700])
    for ckpt, unet in zip(ckpts.checkpoints, tuned, strict=True):
        ckpts.model.load_state_dict(ckpt.load()["state_dict"])
        with torch.no_grad():
            torch.testing.assert_close(ckpts.model.eval()(x, t), unet(x, t).sample)
    base_hash = file_sha256(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert ckpts.describe() == [{"id": f.name, "sha256": file_sha256(f / "pytorch_lora_weights.safetensors"),
                                 "weight": 1.0, "base_sha256": base_hash} for f in folders]


@pytest.mark.parametrize("params", ["lora", "*.to_k.*"])
def test_gradients_through_peft_layers_equal_single_backward_passes(run_dirs, params):
    """--params lora (the adapter's A and B) and a glob over peft's wrapped layers (to_k's base weights and its
    adapter): vmap and the hooks source give each sample's single-pass gradient, nothing else."""
    from projidx.models.checkpoints import load_checkpoints

    base, folders, _ = run_dirs
    ckpts = load_checkpoints(folders, base=base)
    ckpts.model.load_state_dict(ckpts.checkpoints[1].load()["state_dict"])
    record = select_parameters(ckpts.model, params)
    names = [n for n, p in ckpts.model.named_parameters() if p.requires_grad]
    if params == "lora":
        assert record["tensors"] == 2 * len(TARGETS) * 4 and all(".lora_" in n for n in names)  # 4 attention layers
    else:
        assert {n.rpartition(".to_k.")[2] for n in names} == {"base_layer.weight", "base_layer.bias",
                                                               "lora_A.default.weight", "lora_B.default.weight"}
    torch.manual_seed(2)
    x0, t, eps = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([5, 400, 950]), torch.randn(3, 2, 1, 8, 8)
    assert_per_sample_equal(ckpts.model, ckpts.schedule, x0, t, eps)


def test_gradients_of_a_text_conditional_unet_with_an_adapter():
    """The same through a UNet2DConditionModel's cross-attention LoRA, with per-sample encoder states."""
    torch.manual_seed(3)
    unet = tiny_text_unet()
    unet.add_adapter(lora_config())  # diffusers' own way (its training scripts)
    model = DiffusersEps(unet)
    select_parameters(model, "lora")
    x0, t, eps = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([50, 600]), torch.randn(2, 2, 1, 8, 8)
    assert_per_sample_equal(model, load_schedule(), x0, t, eps, {"encoder_hidden_states": torch.randn(2, TOKENS,
                                                                                                        WIDTH)})


def test_lora_fine_tune_on_the_cli(tmp_path, run_dirs):
    """featurize (--params lora by default) -> index -> query -> validate; the store is sized to the adapter; LoRA
    for another base, LoRA without --base, --params matching nothing and a store of another selection are refused
    in one line, writing nothing."""
    base, folders, _ = run_dirs
    data = digits_npz(tmp_path / "train.npz", slice(0, 16))
    store = tmp_path / "s.zarr"
    ckpt = ["--base", base, *checkpoint_flags(folders)]
    common = ["--data", data, "--timesteps", 3, "--proj-dim", 64, "--chunk-rows", 8]
    run("featurize", *ckpt, *common, "--store", store)
    meta = FeatureStore.open(store).meta
    adapter = sum(p.numel() for n, p in run_dirs[2][0].named_parameters() if "lora_" in n)
    assert meta.params["patterns"] == "lora" and meta.params["count"] == meta.projector.input_dim == adapter
    assert meta.checkpoint_base == str(base.resolve()) and all("base_sha256" in c for c in meta.checkpoints)
    assert default_method(FeatureStore.open(store)) == "matched-trak"  # per-timestep kernels on an adapter's grid store
    run("index", "--store", store)
    run("query", "--store", store, "--data", data, "--top-k", 3, "--out", tmp_path / "r.json")
    hits = json.loads((tmp_path / "r.json").read_text())["queries"]
    assert sum(q["ids"][0] == q["query_id"] for q in hits) >= 14  # found through the adapter's gradients alone
    run("validate", "--store", store, "--samples", 8, "--out", tmp_path / "v.json")

    other_base, other_folders, _ = lora_run(tmp_path / "other", block_out_channels=(8, 12))
    for args, needles in [
        (["--base", base, *checkpoint_flags(other_folders)], ["do not fit the base's unet", "size mismatch"]),
        (checkpoint_flags(folders), ["lora weights", "--base"]),
        ([*ckpt, "--params", "*nothing*"], ["--params must select a parameter"]),
    ]:
        assert_clean_error(run("featurize", *args, *common, "--store", tmp_path / "new.zarr", ok=False), *needles)
        assert not (tmp_path / "new.zarr").exists()
    assert_clean_error(run("featurize", *ckpt, *common, "--store", store, "--params", "all", ok=False),
                       "parameter selection (store: lora, given: all)", "refusing to mix")


def test_a_moved_base_is_named_with_base_and_checked(tmp_path, run_dirs):
    """A LoRA store whose base folder moved: query says to pass --base; --base with the moved folder answers as
    before; a base with other weights of the same shapes, and --base on a store without one, are refused in one
    line."""
    import shutil

    base, folders, _ = run_dirs
    run_root = tmp_path / "run"
    shutil.copytree(base, run_root / "base")
    for f in folders:
        shutil.copytree(f, run_root / f.name)
    data = digits_npz(tmp_path / "train.npz", slice(0, 8))
    store = tmp_path / "s.zarr"
    run("featurize", "--base", run_root / "base", *checkpoint_flags([run_root / f.name for f in folders]),
        "--data", data, "--timesteps", 2, "--proj-dim", 64, "--store", store)
    query = ["query", "--store", store, "--data", data, "--top-k", 3, "--exact"]
    run(*query, "--out", tmp_path / "before.json")
    moved = tmp_path / "moved-base"
    shutil.move(run_root / "base", moved)
    assert_clean_error(run(*query, "--out", tmp_path / "r.json", ok=False), "--base")
    run(*query, "--base", moved, "--out", tmp_path / "after.json")
    before, after = (json.loads((tmp_path / n).read_text())["queries"] for n in ("before.json", "after.json"))
    assert [q["ids"] for q in after] == [q["ids"] for q in before]

    other = tmp_path / "other-base"
    shutil.copytree(moved, other)
    unet = diffusers.UNet2DModel.from_pretrained(other / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(other / "unet")
    assert_clean_error(run(*query, "--base", other, "--out", tmp_path / "r.json", ok=False),
                       "not the ones store", "--base")

    plain = tmp_path / "plain.zarr"
    run("featurize", "--checkpoints", moved, "--data", data, "--timesteps", 2, "--proj-dim", 64, "--store", plain)
    assert default_method(FeatureStore.open(plain)) == "matched"  # the whole model's store
    assert_clean_error(run("query", "--store", plain, "--data", data, "--base", moved, "--out", tmp_path / "r.json",
                           ok=False), "not built from lora checkpoints")
