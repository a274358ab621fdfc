"""Parameter subsets (--params): only the selected parameters get per-sample gradients (the same as single backward
passes over them), the store records the selection and is sized to it, queries use the store's, and a store is never
resumed or queried with another."""

from __future__ import annotations

import json

import pytest
import torch

from projidx.data.datasets import ImageSet
from projidx.errors import ProjidxError
from projidx.features.factorized import FactorizedGradients
from projidx.features.grads import GradientComputer, resolve_params, select_parameters
from projidx.models.diffusion import diffusion_loss
from projidx.models.lora import is_adapter_parameter
from projidx.models.unet import SmallUNet
from projidx.settings import FeaturizeConfig
from projidx.store.feature_store import FeatureStore
from tests.conftest import TINY_UNET, save_npz
from tests.test_cli import assert_clean_error, run

SUBSET = "mid.*,*conv1.weight"


def single_pass_grads(model: torch.nn.Module, x0, t, eps, abar, cond=None) -> list[dict[str, torch.Tensor]]:
    """{name: grad} of each sample's mean loss over its draws, from one backward pass per sample, for the parameters
    that require gradients (the reference per-sample gradients are checked against)."""
    out = []
    for b in range(len(x0)):
        model.zero_grad()
        r = eps.shape[1]
        one = {k: v[b : b + 1].expand(r, *v.shape[1:]) for k, v in (cond or {}).items()}
        diffusion_loss(model, x0[b : b + 1].expand(r, -1, -1, -1), t[b : b + 1].expand(r), eps[b], abar, "mse",
                       "epsilon", one).mean().backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    return out


def assert_per_sample_equal(model, schedule, x0, t, eps, cond=None) -> None:
    """vmap and the hooks source give, for the selected parameters only, each sample's single-pass gradient."""
    expected = single_pass_grads(model, x0, t, eps, schedule.alphas_cumprod().float(), cond)
    for source in (GradientComputer(model, schedule, "mse", objective="loss"),
                   FactorizedGradients(model, schedule, "mse", objective="loss")):
        got = source.per_sample(x0, t, eps, cond)
        assert sorted(got) == sorted(expected[0]), type(source).__name__
        for b, want in enumerate(expected):
            for name, g in want.items():
                torch.testing.assert_close(got[name][b], g, rtol=1e-3, atol=1e-6)


def test_selection_resolves_all_lora_globs_and_refuses_nothing():
    model = SmallUNet(TINY_UNET)
    names = [n for n, _ in model.named_parameters()]
    assert resolve_params("auto", names) == "all" and resolve_params(" mid.* , stem.* ", names) == "mid.*,stem.*"
    assert resolve_params("auto", ["a.to_q.lora_A.default.weight"]) == "lora"
    assert is_adapter_parameter("unet.x.to_k.lora_B.default.weight") and not is_adapter_parameter("unet.flora.weight")
    record = select_parameters(model, SUBSET)
    chosen = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert chosen and all(n.startswith("mid.") or n.endswith("conv1.weight") for n in chosen)
    assert record["patterns"] == SUBSET and record["tensors"] == len(chosen)
    assert record["count"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert select_parameters(model, "all")["tensors"] == len(names)
    with pytest.raises(ProjidxError, match="params must select a parameter: 'nothing.*' matches none"):
        select_parameters(model, "nothing.*")
    with pytest.raises(ProjidxError, match="params must be"):
        FeaturizeConfig(params="mid.*,,stem.*")


def test_subset_gradients_equal_single_backward_passes(tiny_ckpts):
    """Only the selected parameters' per-sample gradients are computed, and they are exact (vmap and hooks)."""
    model = tiny_ckpts.model
    select_parameters(model, SUBSET)
    torch.manual_seed(0)
    x0, t, eps = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([5, 400, 950]), torch.randn(3, 2, 1, 8, 8)
    assert_per_sample_equal(model, tiny_ckpts.schedule, x0, t, eps)


def test_params_on_the_cli(tmp_path, tiny_ckpt_dir, tiny_data: ImageSet):
    """featurize --params GLOBS -> the store is sized to the subset and records it; query and validate use it;
    resuming with another selection, or a selection of nothing, is refused in one line and writes nothing."""
    data = save_npz(tmp_path / "d.npz", ((tiny_data.images[:12].numpy() + 1) * 127.5).round().astype("uint8"))
    store = tmp_path / "s.zarr"
    common = ["--checkpoints", tiny_ckpt_dir, "--data", data, "--timesteps", 2, "--proj-dim", 32, "--chunk-rows", 8]
    run("featurize", *common, "--store", store, "--params", SUBSET)
    meta = FeatureStore.open(store).meta
    model = SmallUNet(TINY_UNET)
    record = select_parameters(model, SUBSET)
    assert meta.params == record and meta.projector.input_dim == record["count"]
    assert set(meta.projector.param_shapes) == {n for n, p in model.named_parameters() if p.requires_grad}
    run("query", "--store", store, "--data", data, "--exact", "--top-k", 3, "--out", tmp_path / "r.json")
    hits = json.loads((tmp_path / "r.json").read_text())["queries"]
    assert sum(q["ids"][0] == q["query_id"] for q in hits) >= 10  # a training image finds itself through the subset
    assert_clean_error(run("featurize", *common, "--store", store, "--params", "all", ok=False),
                       "parameter selection (store: mid.*,*conv1.weight, given: all)", "refusing to mix")
    assert_clean_error(run("featurize", *common, "--store", tmp_path / "none.zarr", "--params", "attn*", ok=False),
                       "--params must select a parameter", "'attn*' matches none")
    assert not (tmp_path / "none.zarr").exists()


def test_a_store_written_before_params_were_recorded_resumes_and_answers(tmp_path, tiny_ckpts, tiny_data,
                                                                         monkeypatch):
    """Stores without a ``params`` record attributed every parameter: resumed with --params all (the default for
    a full model) they are the same store, never refused as another selection; a glob is refused."""
    from dataclasses import replace

    from projidx.features import featurization
    from projidx.features.featurization import featurize, featurize_queries
    from projidx.search.scoring import exact_topk, query_vectors

    real = featurization._store_meta
    monkeypatch.setattr(featurization, "_store_meta", lambda *a: replace(real(*a), params={}))
    data = tiny_data.subset(slice(0, 12))
    config = FeaturizeConfig(proj_dim=32, timesteps=2, chunk_rows=6)
    old = featurize(tiny_ckpts, data.subset(slice(0, 6)), tmp_path / "old.zarr", replace(config), progress=False,
                    allow_other_data=True)
    assert old.meta.params == {}
    monkeypatch.setattr(featurization, "_store_meta", real)
    store = featurize(tiny_ckpts, data.subset(slice(0, 6)), tmp_path / "old.zarr", config, progress=False,
                      allow_other_data=True)
    _, top = exact_topk(store, query_vectors(store, featurize_queries(store, tiny_ckpts, data.subset(slice(0, 2)),
                                                                      progress=False), "matched"), "matched", 1)
    assert top[:, 0].tolist() == data.ids[:2].tolist()
    try:
        with pytest.raises(ProjidxError, match="parameter selection"):
            featurize(tiny_ckpts, data.subset(slice(0, 6)), tmp_path / "old.zarr",
                      replace(config, params="time_mlp.*"), progress=False, allow_other_data=True)
    finally:
        select_parameters(tiny_ckpts.model, "all")  # the fixture's model is shared: unfreeze it again
