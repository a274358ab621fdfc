"""Featurization with every projector kind: independent of batch size; dense batches its projection calls."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from projidx.features.featurization import FeaturizeConfig, featurize, projection_rows
from projidx.features.projection import KINDS, ProjectorSpec, make_projector

featurize_module = importlib.import_module("projidx.features.featurization")  # projidx exports a function of that name


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("identity", "sjlt")])
def test_same_features_whatever_the_batch_size(tmp_path, tiny_ckpts, tiny_data, kind):
    data = tiny_data.subset(slice(0, 12))
    a = featurize(tiny_ckpts, data, tmp_path / "a.zarr", FeaturizeConfig(
        projector=kind, proj_dim=64, batch_size=3, chunk_rows=7, dtype="float32", timesteps=2,
        objective="loss" if kind == "factorized" else "dtrak"), progress=False)
    b = featurize(tiny_ckpts, data, tmp_path / "b.zarr", FeaturizeConfig(
        projector=kind, proj_dim=64, batch_size=16, chunk_rows=16, dtype="float32", timesteps=2,
        objective="loss" if kind == "factorized" else "dtrak"), progress=False)
    cid = a.meta.checkpoint_ids[-1]
    for name in ("features", "norms", "mean_norms"):
        np.testing.assert_allclose(a.group[f"{name}/{cid}"][:], b.group[f"{name}/{cid}"][:], rtol=1e-4, atol=1e-6)


def test_dense_projects_many_gradients_per_call_within_the_memory_budget(monkeypatch):
    shapes = {"w": (1000,)}
    dense = make_projector(ProjectorSpec("dense", 8, shapes))
    sjlt = make_projector(ProjectorSpec("sjlt", 8, shapes))
    assert projection_rows(sjlt, 16, 1) == 16
    assert projection_rows(dense, 16, 1) == dense.preferred_rows
    assert projection_rows(dense, 16, 4) == -(-dense.preferred_rows // 4)
    monkeypatch.setattr(featurize_module, "PROJECT_BUFFER_BYTES", 4 * 1000 * 40)
    assert projection_rows(dense, 16, 1) == 40
    assert projection_rows(dense, 64, 1) == 64  # never fewer than one gradient batch
