"""The stored scores are the paper's formulas; replay, resume and indices are exact."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from projidx.data.datasets import from_arrays
from projidx.features.featurization import FeaturizeConfig, featurize, featurize_queries
from projidx.models.checkpoints import load_checkpoint_dir
from projidx.models.diffusion import QUERY_NOISE, TRAIN_NOISE, diffusion_loss, noise_for, q_sample, timestep_grid
from projidx.models.training import TrainConfig, train
from projidx.search.index import build_index, load_index
from projidx.search.scoring import METHODS, exact_scores, exact_topk, query_vectors
from projidx.store.feature_store import FeatureStore
from tests.conftest import TINY_TRAIN, TINY_UNET

index_module = importlib.import_module("projidx.search.index")  # the modules, not the functions projidx exports
train_module = importlib.import_module("projidx.models.training")

SEED = 5
S, R, K = 3, 2, 3


def _flat_grad(model, x0, t, eps, abar, loss, objective="loss") -> torch.Tensor:
    """Reference gradient: one plain backward pass, mean over the R draws in eps (R, C, H, W), of the loss, of
    D-TRAK's mean squared output (the mean over pixels of the squared model output at x_t) or of DAS's mean output."""
    r = eps.shape[0]
    x0s, ts = x0[None].expand(r, *x0.shape), torch.full((r,), t)
    if objective == "loss":
        value = diffusion_loss(model, x0s, ts, eps, abar, loss).mean()
    elif objective == "dtrak":
        value = model(q_sample(x0s, ts, eps, abar), ts).square().mean()
    else:
        value = model(q_sample(x0s, ts, eps, abar), ts).mean()
    grads = torch.autograd.grad(value, [p for _, p in sorted(model.named_parameters())])
    return torch.cat([g.flatten() for g in grads]).double()


def _reference(ckpts, data, queries, mode, draws, policy, train_grid, grid_s, objective):
    """TracIn / ReTrac / cosine (M, N) computed from scratch from METHOD.md's formulas, no projection; each
    training-side gradient averaged over ``draws`` noise draws drawn under the noise ``policy``. Grid mode adds
    the exact timestep-matched score sum_c w_c mean_t cos(g_c(x, t), gbar_c(x', t)) (training grid = query grid)."""
    model = ckpts.model
    abar = ckpts.schedule.alphas_cumprod().float()
    shape = data.image_shape
    methods = ("tracin", "retrac", "cosine", "matched") if mode == "grid" else ("tracin", "retrac", "cosine")
    scores = {m: np.zeros((len(queries), len(data))) for m in methods}
    for c, ckpt in enumerate(ckpts.checkpoints):
        blob = ckpt.load()
        model.load_state_dict(blob["state_dict"])
        replay = dict(zip(blob["replay_ids"].tolist(), blob["replay_timesteps"].tolist(), strict=True))
        train_g = []
        for x0, sid in zip(data.images, data.ids.tolist(), strict=True):
            ts = [replay[sid]] if mode == "replay" else train_grid
            train_g.append([
                _flat_grad(model, x0, t, torch.cat([noise_for(SEED, [sid], c, [t], d, shape, TRAIN_NOISE, policy)
                                                    for d in range(draws)]), abar, ckpts.loss, objective)
                for t in ts])
        for i, (x0, qid) in enumerate(zip(queries.images, queries.ids.tolist(), strict=True)):
            gbar = []
            for t in grid_s:
                eps = torch.cat([noise_for(SEED, [qid], c, [t], r, shape, QUERY_NOISE, policy) for r in range(R)])
                gbar.append(_flat_grad(model, x0, t, eps, abar, ckpts.loss, objective))
            q_mean = torch.stack(gbar).mean(0)
            q_unit = torch.stack([g / g.norm() for g in gbar]).mean(0)
            for j, gs in enumerate(train_g):
                g_mean = torch.stack(gs).mean(0)
                g_unit = torch.stack([g / g.norm() for g in gs]).mean(0)
                scores["tracin"][i, j] += ckpt.weight * float(g_mean @ q_mean)
                scores["retrac"][i, j] += ckpt.weight * float(g_unit @ q_unit)
                scores["cosine"][i, j] += ckpt.weight * float(g_mean @ q_mean / (g_mean.norm() * q_mean.norm()))
                if mode == "grid":
                    cos_t = [float(g @ q / (g.norm() * q.norm())) for g, q in zip(gs, gbar, strict=True)]
                    scores["matched"][i, j] += ckpt.weight * float(np.mean(cos_t))
    return scores


@pytest.mark.parametrize(("mode", "draws", "policy", "objective"), [
    ("replay", 1, "per-sample", "loss"), ("grid", 1, "per-sample", "loss"), ("replay", 3, "per-sample", "loss"),
    ("replay", 1, "shared", "loss"), ("grid", 3, "shared", "loss"), ("grid", 1, "shared", "dtrak"),
    ("replay", 3, "per-sample", "dtrak"), ("grid", 2, "shared", "output")])
def test_identity_projection_scores_equal_the_formulas(tmp_path, tiny_ckpts, tiny_data, tiny_queries, mode, draws,
                                                       policy, objective):
    data = tiny_data.subset(slice(0, 12))
    queries = tiny_queries.subset(slice(0, 3))
    config = FeaturizeConfig(projector="identity", projection_seed=SEED + 1, noise_seed=SEED, noise=policy,
                             dtype="float32", train_timesteps=mode, timesteps=K, batch_size=7, chunk_rows=5,
                             train_draws=draws, objective=objective)
    store = featurize(tiny_ckpts, data, tmp_path / "s.zarr", config, progress=False, allow_other_data=True)
    # grid stores: the queries at the store's grid (K midpoints), which matched needs; replay: the paper's grid of S
    qf = featurize_queries(store, tiny_ckpts, queries, query_timesteps=S if mode == "replay" else None,
                           noise_draws=R, batch_size=5, progress=False)
    train_grid = timestep_grid(K, tiny_ckpts.schedule.T, "midpoints")
    assert qf.timesteps == (timestep_grid(S, tiny_ckpts.schedule.T) if mode == "replay" else train_grid)
    ref = _reference(tiny_ckpts, data, queries, mode, draws, policy, train_grid, qf.timesteps, objective)
    for method, expected in ref.items():
        got = exact_scores(store, query_vectors(store, qf, method), method)
        if method == "matched":
            # an estimate: each timestep's signed permutation leaves cross-timestep terms of sd ~ 1/sqrt(k) each
            k = store.meta.projector.proj_dim
            weights = sum(store.weights())
            np.testing.assert_allclose(got, expected, atol=6 * weights * np.sqrt(K * (K - 1) / k) / K)
            assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.95
            continue
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max(), err_msg=method)


def test_replayed_timesteps_are_the_ones_training_drew(tmp_path, monkeypatch):
    gen = np.random.default_rng(0)
    data = from_arrays(gen.integers(0, 256, (24, 8, 8), dtype=np.uint8), np.arange(500, 524), name="random")
    calls = []

    def recording_loss(model, x0, t, eps, abar, loss):
        calls.append((x0.clone(), t.clone()))
        return diffusion_loss(model, x0, t, eps, abar, loss)

    monkeypatch.setattr(train_module, "diffusion_loss", recording_loss)
    config = TrainConfig(**{**TINY_TRAIN.__dict__, "epochs": 4, "checkpoints": 2, "batch_size": 10})
    ckpts = train(data, tmp_path / "ck", config, progress=False)
    monkeypatch.undo()
    store = featurize(ckpts, data, tmp_path / "s.zarr",
                      FeaturizeConfig(proj_dim=16, chunk_rows=8, train_timesteps="replay"), progress=False)
    per_epoch = 3  # ceil(24 / 10) batches
    flat = data.images.reshape(len(data), -1)
    for cid, epoch in zip(store.meta.checkpoint_ids, (2, 4), strict=True):
        drawn = {}
        for x0, t in calls[(epoch - 1) * per_epoch : epoch * per_epoch]:
            for row, tt in zip(x0.reshape(len(x0), -1), t.tolist(), strict=True):
                j = int((flat == row).all(dim=1).nonzero()[0, 0])
                drawn[int(data.ids[j])] = tt
        assert len(drawn) == len(data)
        stored = np.asarray(store.group[f"timesteps/{cid}"][:])[:, 0]
        assert stored.tolist() == [drawn[int(i)] for i in data.ids]


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, tiny_ckpts, tiny_data):
    config = FeaturizeConfig(proj_dim=64, batch_size=4, chunk_rows=8, dtype="float16", timesteps=3)
    whole = featurize(tiny_ckpts, tiny_data, tmp_path / "whole.zarr", config, progress=False)

    class Interrupt(Exception):
        pass

    written = []

    def stop_after_three(cid, chunk):
        written.append((cid, chunk))
        if len(written) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        featurize(tiny_ckpts, tiny_data, tmp_path / "part.zarr", config, progress=False, on_chunk=stop_after_three)
    partial = FeatureStore.open(tmp_path / "part.zarr")
    assert 0 < sum(int(partial.done(c).sum()) for c in partial.meta.checkpoint_ids) < 2 * partial.n_chunks
    recomputed = []
    resumed = featurize(tiny_ckpts, tiny_data, tmp_path / "part.zarr", config, progress=False,
                        on_chunk=lambda cid, chunk: recomputed.append((cid, chunk)))
    assert not set(written) & set(recomputed)  # only the missing chunks were computed
    assert len(written) + len(recomputed) == 2 * whole.n_chunks
    for name in ("features", "norms", "mean_norms", "timesteps", "done"):
        for cid in whole.meta.checkpoint_ids:
            a = np.asarray(whole.group[f"{name}/{cid}"][:])
            b = np.asarray(resumed.group[f"{name}/{cid}"][:])
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, cid)


def test_same_gradient_features_whatever_the_batch_size(tmp_path, tiny_ckpts, tiny_data):
    a = featurize(tiny_ckpts, tiny_data, tmp_path / "a.zarr",
                  FeaturizeConfig(proj_dim=64, batch_size=3, chunk_rows=7, dtype="float32", timesteps=3),
                  progress=False)
    b = featurize(tiny_ckpts, tiny_data, tmp_path / "b.zarr",
                  FeaturizeConfig(proj_dim=64, batch_size=16, chunk_rows=16, dtype="float32", timesteps=3),
                  progress=False)
    cid = a.meta.checkpoint_ids[-1]
    for name in ("features", "norms"):
        np.testing.assert_allclose(a.group[f"{name}/{cid}"][:], b.group[f"{name}/{cid}"][:], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_faiss", [True, False])
def test_flat_index_top_k_equals_exact_scoring(tmp_path, tiny_ckpts, tiny_data, tiny_queries, monkeypatch, with_faiss):
    store = featurize(tiny_ckpts, tiny_data, tmp_path / "s.zarr",
                      FeaturizeConfig(proj_dim=128, chunk_rows=16, dtype="float32", timesteps=3), progress=False)
    qf = featurize_queries(store, tiny_ckpts, tiny_queries, noise_draws=2, progress=False)
    if not with_faiss:
        monkeypatch.setattr(index_module, "faiss_module", lambda: None)
    for method in METHODS:
        path = build_index(store, method, "Flat")
        assert path.suffix == (".faiss" if with_faiss else ".npy")
        qv = query_vectors(store, qf, method)
        scores, ids = load_index(store, method).search(qv, 7)
        exact_s, exact_i = exact_topk(store, qv, method, 7)
        full = exact_scores(store, qv, method)
        np.testing.assert_array_equal(ids, exact_i)
        np.testing.assert_allclose(scores, exact_s, rtol=1e-5, atol=1e-6 * np.abs(exact_s).max())
        # and the exact top-k is the top-k of the full score matrix
        order = np.argsort(-full, axis=1)[:, :7]
        np.testing.assert_array_equal(exact_i, store.ids()[order])


def test_ivf_index_with_full_probe_is_exact(tmp_path, tiny_ckpts, tiny_data, tiny_queries):
    pytest.importorskip("faiss", reason="needs projidx[cpu] or projidx[gpu]")
    store = featurize(tiny_ckpts, tiny_data, tmp_path / "s.zarr", FeaturizeConfig(proj_dim=64, timesteps=3),
                      progress=False)
    qf = featurize_queries(store, tiny_ckpts, tiny_queries, 3, 1, progress=False)
    build_index(store, "retrac", "IVF4,Flat")
    qv = query_vectors(store, qf, "retrac")
    _, ids = load_index(store, "retrac", nprobe=4).search(qv, 5)
    np.testing.assert_array_equal(ids, exact_topk(store, qv, "retrac", 5)[1])


def test_checkpoint_files_load_weights_only(tiny_ckpt_dir):
    ckpts = load_checkpoint_dir(tiny_ckpt_dir)
    for ckpt in ckpts.checkpoints:
        blob = torch.load(ckpt.path, weights_only=True)
        assert set(blob) == {"state_dict", "replay_ids", "replay_timesteps"}
    assert [c.weight for c in ckpts.checkpoints] == pytest.approx([TINY_TRAIN.lr * 3 * 2] * 2)  # 3 steps/epoch
    assert ckpts.model.config == TINY_UNET


def test_query_features_are_refused_by_another_store(tmp_path, tiny_ckpts, tiny_data, tiny_queries):
    from projidx.errors import ProjidxError

    config = FeaturizeConfig(proj_dim=32, chunk_rows=16)
    a = featurize(tiny_ckpts, tiny_data, tmp_path / "a.zarr", config, progress=False)
    b = featurize(tiny_ckpts, tiny_data, tmp_path / "b.zarr", config, progress=False)
    qf = featurize_queries(a, tiny_ckpts, tiny_queries, 2, 1, progress=False)
    query_vectors(a, qf, "retrac")
    with pytest.raises(ProjidxError, match="another store"):
        query_vectors(b, qf, "retrac")


def test_factorized_query_features_equal_projecting_materialized_gradients(tmp_path, tiny_ckpts, tiny_data,
                                                                           tiny_queries):
    """The query side through layer factors (R draws as positions) equals projecting vmap's full gradients."""
    from projidx.features.grads import GradientComputer
    from projidx.features.projection import make_projector

    store = featurize(tiny_ckpts, tiny_data, tmp_path / "f.zarr",
                      FeaturizeConfig(projector="factorized", proj_dim=64, dtype="float32", objective="loss"),
                      progress=False)
    assert store.meta.projector.kind == "factorized"
    qf = featurize_queries(store, tiny_ckpts, tiny_queries, 3, 2, progress=False)
    grid = timestep_grid(3, tiny_ckpts.schedule.T)
    assert store.meta.noise == "shared"
    computer = GradientComputer(tiny_ckpts.model, tiny_ckpts.schedule, tiny_ckpts.loss)
    projector = make_projector(store.meta.projector)
    c = len(tiny_ckpts.checkpoints) - 1
    computer.load_state_dict(tiny_ckpts.checkpoints[c].load()["state_dict"])
    ids = tiny_queries.ids.repeat_interleave(len(grid))
    t = torch.tensor(grid).repeat(len(tiny_queries))
    eps = torch.stack([noise_for(store.meta.noise_seed, ids.tolist(), c, t.tolist(), d, tiny_queries.image_shape,
                                 QUERY_NOISE, "shared") for d in (0, 1)], dim=1)
    grads = computer.per_sample(tiny_queries.images.repeat_interleave(len(grid), dim=0), t, eps)
    projected, sq, mean_sq = projector.project_with_norms(grads, len(grid))
    norms = sq.sqrt().reshape(len(tiny_queries), len(grid))
    np.testing.assert_allclose(qf.norms[c], norms.numpy(), rtol=1e-4)
    np.testing.assert_allclose(qf.features[c], (projected / sq.sqrt()[:, None]).reshape(qf.features[c].shape).numpy(),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(qf.mean_norms[c], mean_sq.sqrt().numpy(), rtol=1e-4)
