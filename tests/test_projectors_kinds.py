"""Every projector kind: deterministic (any batch, parameter order, threads), unbiased, seeded by name."""

from __future__ import annotations

import math

import pytest
import torch

from projidx.features.projection import (
    KINDS,
    DenseProjector,
    ProjectorSpec,
    fwht,
    hadamard_axes,
    kronecker_dims,
    make_projector,
    sylvester_hadamard,
)

SHAPES = {"conv.weight": (8, 4, 3, 3), "conv.bias": (8,), "lin.weight": (300, 20), "norm.weight": (5,)}
RANDOM_KINDS = [k for k in KINDS if k != "identity"]


def _grads(batch: int, seed: int = 0, shapes=SHAPES) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, *s, generator=gen) for n, s in shapes.items()}


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal up to float32 summation order: another thread count or batch shape may reorder the sums of a
    matrix product (observed: 1e-4 on entries of size 15), so the tolerance scales with the entries."""
    return torch.allclose(x, y, rtol=1e-5, atol=1e-4 * float(y.abs().max()))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_projection_for_any_batch_order_and_threads(kind):
    """Bitwise on a repeat; across batch sizes and threads bitwise for sjlt, allclose for matrix-product kinds."""
    same = torch.equal if kind == "sjlt" else _close
    spec = ProjectorSpec(kind, 64, SHAPES, seed=11)
    grads = _grads(6)
    full = make_projector(spec).project(grads)
    assert torch.equal(make_projector(spec).project(grads), full)  # a fresh projector, same bits
    singles = torch.cat([make_projector(spec).project({n: g[i : i + 1] for n, g in grads.items()}) for i in range(6)])
    assert same(full, singles)
    reordered = {n: grads[n] for n in reversed(list(grads))}
    spec_reordered = ProjectorSpec(kind, 64, {n: SHAPES[n] for n in reversed(list(SHAPES))}, seed=11)
    assert same(make_projector(spec_reordered).project(reordered), full)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = make_projector(spec).project(grads)
    finally:
        torch.set_num_threads(before)
    assert same(one_thread, full)
    assert torch.equal(make_projector(ProjectorSpec.from_dict(spec.to_dict())).project(grads), full)
    assert not torch.equal(make_projector(ProjectorSpec(kind, 64, SHAPES, seed=12)).project(grads), full)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_a_parameter_matrix_depends_only_on_seed_and_name(kind):
    """Adding another parameter to the layout leaves the projection of the others unchanged."""
    a = {"lin.weight": (300, 20)}
    b = {"lin.weight": (300, 20), "extra.bias": (7,)}
    g = _grads(3, shapes=b)
    pa = make_projector(ProjectorSpec(kind, 64, a, seed=3)).project({"lin.weight": g["lin.weight"]})
    zero = {"lin.weight": g["lin.weight"], "extra.bias": torch.zeros(3, 7)}
    pb = make_projector(ProjectorSpec(kind, 64, b, seed=3)).project(zero)
    assert torch.equal(pa, pb)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_inner_products_are_unbiased(kind):
    """Over many seeds the mean of <Pa, Pb> is <a, b> within 4 standard errors; one seed is within JL error."""
    k, seeds = 256, 200
    g = _grads(2, seed=5)
    a = {n: v[:1] for n, v in g.items()}
    b = {n: (0.6 * v[:1] + 0.8 * v[1:]) for n, v in g.items()}
    flat_a = torch.cat([v.flatten() for _, v in sorted(a.items())])
    flat_b = torch.cat([v.flatten() for _, v in sorted(b.items())])
    exact = float(flat_a @ flat_b)
    est = []
    for seed in range(seeds):
        proj = make_projector(ProjectorSpec(kind, k, SHAPES, seed=seed))
        est.append(float(proj.project(a)[0] @ proj.project(b)[0]))
    est_t = torch.tensor(est)
    assert abs(est_t.mean().item() - exact) < 4 * est_t.std().item() / math.sqrt(seeds)
    jl_sd = math.sqrt((exact**2 + float(flat_a.norm() * flat_b.norm()) ** 2) / k)
    assert est_t.std().item() < 3 * jl_sd  # structured kinds are within a small factor of i.i.d. JL here


def test_srht_transform_is_the_hadamard_matrix():
    for n in (1, 2, 8, 64, 128, 4096):
        x = torch.randn(3, n, dtype=torch.float64).float()
        hs = {s: sylvester_hadamard(s) for s in hadamard_axes(n)}
        # float32 rounding of a length-n sum of entries of size ~sqrt(n) (observed 2.5e-4 at n = 4096)
        torch.testing.assert_close(fwht(x, hs), x @ sylvester_hadamard(n), rtol=1e-5, atol=2e-5 * math.sqrt(n))


def test_srht_equals_its_explicit_matrix():
    """P = sqrt(1/k) S H D per block, built explicitly from the projector's signs and rows."""
    shapes = {"w": (50, 3)}  # one block of 150 -> padded to 256
    spec = ProjectorSpec("srht", 32, shapes, seed=2)
    proj = make_projector(spec)
    g = _grads(4, shapes=shapes)
    signs, rows = proj.block("w", 0, 150)
    matrix = (torch.diag(signs) @ sylvester_hadamard(256))[:150, rows] / math.sqrt(32)  # (p, k)
    torch.testing.assert_close(proj.project(g), g["w"].reshape(4, -1) @ matrix, rtol=1e-5, atol=1e-5)


def test_dense_prefix_is_a_smaller_projection():
    """The first k' outputs of a k-dim dense projection are sqrt(k'/k) times the k'-dim one of the same seed."""
    g = _grads(3)
    for distribution in ("rademacher", "gaussian"):
        big = make_projector(ProjectorSpec("dense", 64, SHAPES, seed=4, distribution=distribution)).project(g)
        small = make_projector(ProjectorSpec("dense", 16, SHAPES, seed=4, distribution=distribution)).project(g)
        torch.testing.assert_close(big[:, :16] * math.sqrt(64 / 16), small, rtol=1e-5, atol=1e-5)


def test_dense_cache_changes_nothing_and_respects_its_budget():
    spec = ProjectorSpec("dense", 32, SHAPES, seed=1)
    g = _grads(5)
    uncached = DenseProjector(spec, cache_bytes=0)
    cached = DenseProjector(spec, cache_bytes=1 << 20)
    first = cached.project(g)
    assert cached._cached_bytes > 0 and uncached._cached_bytes == 0
    assert torch.equal(cached.project(g), first)
    torch.testing.assert_close(uncached.project(g), first, rtol=0, atol=0)
    small = DenseProjector(spec, cache_bytes=32 * 100)
    small.project(g)
    assert small._cached_bytes <= 32 * 100


def test_project_with_norms_is_one_pass_over_exact_norms():
    g = _grads(6)
    flat = torch.cat([g[n].reshape(6, -1) for n in sorted(g)], dim=1)
    for kind in RANDOM_KINDS:
        proj = make_projector(ProjectorSpec(kind, 64, SHAPES, seed=0))
        out, sq, mean_sq = proj.project_with_norms(g, groups=3)
        torch.testing.assert_close(out, proj.project(g))
        torch.testing.assert_close(sq, flat.square().sum(1))
        torch.testing.assert_close(mean_sq, flat.reshape(2, 3, -1).mean(1).square().sum(1))


def test_kronecker_dims_and_bad_factorized_dims():
    assert kronecker_dims(2048) == (32, 64) and kronecker_dims(512) == (16, 32) and kronecker_dims(8192) == (64, 128)
    assert kronecker_dims(36) == (6, 6)
    with pytest.raises(ValueError, match="factorized"):
        ProjectorSpec("factorized", 2 * 1021, SHAPES)  # 2 x prime: no balanced factorization
