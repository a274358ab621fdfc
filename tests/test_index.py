"""Issue 'A million-row index': streamed builds, on-disk IVF, exact re-rank, the second JL (--index-dim) and the
recall report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from projidx.features.featurization import FeaturizeConfig, featurize, featurize_queries
from projidx.search.index import IndexConfig, Sketch, build_index, index_dir, load_index
from projidx.search.scoring import exact_scores, exact_topk, query_vectors
from tests.test_cli import run

faiss = pytest.importorskip("faiss", reason="needs projidx[cpu] or projidx[gpu]")


@pytest.fixture(scope="module")
def store_and_queries(tmp_path_factory, tiny_ckpt_dir, tiny_data, tiny_queries):
    from projidx.models.checkpoints import load_checkpoint_dir

    ckpts = load_checkpoint_dir(tiny_ckpt_dir)
    store = featurize(ckpts, tiny_data, tmp_path_factory.mktemp("ix") / "s.zarr",
                      FeaturizeConfig(proj_dim=64, timesteps=2, chunk_rows=7, dtype="float32"), progress=False)
    return store, featurize_queries(store, ckpts, tiny_queries, progress=False)


def test_on_disk_ivf_with_full_probe_is_exact(store_and_queries):
    store, qf = store_and_queries
    path = build_index(store, "matched", IndexConfig(factory="IVF4,Flat", on_disk=True, nprobe=4, train_rows=30))
    assert len(list(path.parent.glob("matched.*.ivfdata"))) == 1
    qv = query_vectors(store, qf, "matched")
    _, ids = load_index(store, "matched").search(qv, 6)
    np.testing.assert_array_equal(ids, exact_topk(store, qv, "matched", 6)[1])
    sidecar = json.loads((index_dir(store) / "matched.json").read_text())
    assert sidecar["recall"]["recall_at_10"] == 1.0 and sidecar["recall"]["nprobe"] == 4


def test_rerank_restores_the_exact_order_and_scores(store_and_queries):
    store, qf = store_and_queries
    build_index(store, "tracin", IndexConfig(factory="IVF2,PQ4x4", nprobe=2, train_rows=40))
    qv = query_vectors(store, qf, "tracin")
    index = load_index(store, "tracin")
    approx_s, _ = index.search(qv, 5)
    exact_s, exact_i = exact_topk(store, qv, "tracin", 5)
    assert not np.allclose(approx_s, exact_s, rtol=1e-3)  # PQ scores are approximate
    scores, ids = index.search(qv, 5, rerank=40)  # every row is a candidate
    np.testing.assert_array_equal(ids, exact_i)
    np.testing.assert_allclose(scores, exact_s, rtol=1e-5, atol=1e-7 * np.abs(exact_s).max())
    with pytest.raises(Exception, match="--rerank must be >= --top-k"):
        index.search(qv, 5, rerank=3)


def test_index_dim_keeps_the_dimension_whatever_the_checkpoints(store_and_queries):
    store, qf = store_and_queries
    build_index(store, "retrac", IndexConfig(factory="Flat", index_dim=32))
    sidecar = json.loads((index_dir(store) / "retrac.json").read_text())
    assert sidecar["dim"] == 32 and store.meta.projector.proj_dim * len(store.meta.checkpoints) == 128
    qv = query_vectors(store, qf, "retrac")
    scores, ids = load_index(store, "retrac").search(qv, 40)
    # the index scores are the inner products of the sketched vectors, both sides sketched alike
    from projidx.search.scoring import train_vectors

    sketch = Sketch(128, 32, store.meta.projector.seed)
    train = np.concatenate([train_vectors(store, "retrac", i) for i in range(store.n_chunks)])
    by_hand = sketch(qv) @ sketch(train).T
    row = {int(i): r for r, i in enumerate(store.ids())}
    for q in range(len(qv)):
        np.testing.assert_allclose(scores[q], by_hand[q, [row[int(i)] for i in ids[q]]], rtol=1e-4, atol=1e-6)
    # and re-ranking from the store gives the full-dimension scores back
    full = exact_scores(store, qv, "retrac")
    reranked, ids = load_index(store, "retrac").search(qv, 5, rerank=40)
    np.testing.assert_allclose(reranked, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-5)


def test_the_sketch_preserves_inner_products_in_expectation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1, 512)), rng.normal(size=(1, 512))
    b = 0.6 * a + 0.8 * b
    estimates = [float((Sketch(512, 64, s)(a) @ Sketch(512, 64, s)(b).T)[0, 0]) for s in range(300)]
    exact = float((a @ b.T)[0, 0])
    assert abs(np.mean(estimates) - exact) < 4 * np.std(estimates) / np.sqrt(300)
    assert np.std(estimates) < 2 * np.linalg.norm(a) * np.linalg.norm(b) / np.sqrt(64)


def test_info_shows_each_index_and_its_recall(tmp_path, tiny_ckpt_dir):
    from projidx.data.datasets import load_dataset

    d = load_dataset("digits").subset(slice(0, 40))
    npz = tmp_path / "train.npz"
    np.savez(npz, images=((d.images.numpy() + 1) * 127.5).round().astype(np.uint8), ids=d.ids.numpy() + 1000)
    run("featurize", "--checkpoints", tiny_ckpt_dir, "--data", npz, "--store", tmp_path / "s.zarr", "--timesteps", 2,
        "--proj-dim", 16, "--chunk-rows", 16)
    out = run("index", "--store", tmp_path / "s.zarr", "--factory", "IVF2,Flat", "--nprobe", 2).output
    assert "recall@10 vs the exact scan: 1.000" in out
    info = json.loads(run("info", tmp_path / "s.zarr").output)
    assert info["indices"]["matched"]["recall"]["recall_at_10"] == 1.0
    assert info["indices"]["matched"]["factory"] == "IVF2,Flat"


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat"])
def test_recall_counts_tied_copies_as_right_answers(tmp_path, tiny_ckpts, tiny_data, factory):
    """Identical copies of one image score the same for every query: an exact index that returns other copies
    than the exact scan's has recall 1 (issue 17: a Flat index reported 0.77 on a store of planted copies)."""
    from projidx.data.datasets import ImageSet

    rows = np.repeat(np.arange(8), 4)  # 8 images, 4 identical copies each
    data = ImageSet("copies", tiny_data.images[rows], tiny_data.ids[:32])
    store = featurize(tiny_ckpts, data, tmp_path / "c.zarr", FeaturizeConfig(proj_dim=32, timesteps=2, chunk_rows=8),
                      progress=False, allow_other_data=True)
    build_index(store, "matched", IndexConfig(factory=factory, nprobe=2 if "IVF" in factory else None, train_rows=32))
    sidecar = json.loads((index_dir(store) / "matched.json").read_text())
    assert sidecar["recall"]["recall_at_10"] == 1.0
