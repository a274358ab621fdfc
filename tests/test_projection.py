"""Identity layout, JL unbiasedness and error as predicted, refused specs (determinism per kind:
tests/test_projectors_kinds.py)."""

from __future__ import annotations

import math

import pytest
import torch

from projidx.features.projection import ProjectorSpec, make_projector

SHAPES = {"conv.weight": (8, 4, 3, 3), "conv.bias": (8,), "lin.weight": (300, 20), "norm.weight": (5,)}


def _grads(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, *s, generator=gen) for n, s in SHAPES.items()}


def test_identity_is_the_concatenation_in_name_order():
    p = sum(math.prod(s) for s in SHAPES.values())
    grads = _grads(3)
    out = make_projector(ProjectorSpec("identity", p, SHAPES)).project(grads)
    ref = torch.cat([grads[n].reshape(3, -1) for n in sorted(SHAPES)], dim=1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind,sparsity", [("sjlt", 1), ("sjlt", 4), ("dense", 1)])
def test_inner_products_are_unbiased_with_the_jl_error(kind, sparsity):
    """Over many seeds: mean of <Pa, Pb> -> <a, b>, and its spread matches JL's ||a|| ||b|| / sqrt(k) scale."""
    k, seeds = 128, 200
    g = _grads(2, seed=5)
    a = {n: v[:1] for n, v in g.items()}
    b = {n: (0.6 * v[:1] + 0.8 * v[1:]) for n, v in g.items()}  # correlated with a
    flat_a = torch.cat([v.flatten() for _, v in sorted(a.items())])
    flat_b = torch.cat([v.flatten() for _, v in sorted(b.items())])
    exact = float(flat_a @ flat_b)
    scale = float(flat_a.norm() * flat_b.norm())
    est = []
    for seed in range(seeds):
        proj = make_projector(ProjectorSpec(kind, k, SHAPES, seed=seed, sparsity=sparsity))
        est.append(float(proj.project(a)[0] @ proj.project(b)[0]))
    est_t = torch.tensor(est)
    # Gaussian-like JL: Var<Pa,Pb> = (<a,b>^2 + ||a||^2 ||b||^2) / k (sparse JL: at most that)
    predicted_sd = math.sqrt((exact**2 + scale**2) / k)
    assert abs(est_t.mean().item() - exact) < 4 * predicted_sd / math.sqrt(seeds)
    assert 0.7 * predicted_sd < est_t.std().item() < 1.3 * predicted_sd
    # norms: ||Pa||^2 / ||a||^2 within the JL error at this k for one seed (5 sd)
    proj = make_projector(ProjectorSpec(kind, k, SHAPES, seed=0, sparsity=sparsity))
    ratio = float(proj.project(a)[0].square().sum() / flat_a.square().sum())
    assert abs(ratio - 1) < 5 * math.sqrt(2 / k)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="proj_dim"):
        ProjectorSpec("sjlt", 0, SHAPES)
    with pytest.raises(ValueError, match="identity"):
        ProjectorSpec("identity", 10, SHAPES)
    with pytest.raises(ValueError, match="sparsity"):
        ProjectorSpec("sjlt", 10, SHAPES, sparsity=3)
    with pytest.raises(ValueError, match="unknown projector"):
        ProjectorSpec("fourier", 10, SHAPES)
