"""Johnson-Lindenstrauss projectors for per-parameter gradients.

Every projector maps a gradient {name: (B, *shape)} to (B, proj_dim) float32 by projecting each
parameter tensor on its own and summing the results in sorted-name order, so no flat (B, p)
gradient is ever built. Random matrices are regenerated from (seed, parameter name, block) on the
CPU, so one :class:`ProjectorSpec` gives the same projection on every machine, device, thread count,
batch size and parameter order. All are scaled so that E[P^T P] = I: <P a, P b> is an unbiased
estimate of <a, b>. The sum over parameters of independent unbiased projections is an unbiased
projection of the concatenated gradient.

Kinds (``KINDS``):
- ``sjlt``: sparse JL / count-sketch, ``s`` nonzeros +-1/sqrt(s) per input coordinate, one in each of
  s equal blocks of the output (the CPU default: O(s) work per coordinate).
- ``srht``: block subsampled randomized Hadamard. Each parameter is cut into power-of-two blocks of at
  most ``SRHT_BLOCK`` coordinates, largest first (:func:`srht_blocks`; only a last piece under
  ``SRHT_MIN_BLOCK`` is padded); a block of width w is zero-padded to n = 2^ceil(log2 w), multiplied by
  random signs D, transformed by the Walsh-Hadamard matrix H (entries +-1, a fast transform), and k of
  its n coefficients are sampled uniformly with replacement: P_block = sqrt(1/k) S H D, so that
  E[P^T P] = (n/k) * k * (1/n) I = I.
- ``dense``: i.i.d. Rademacher (or Gaussian) entries / sqrt(k), generated in blocks of input rows;
  rows are drawn output-major, so the first k' outputs of a seed are those of a k'-dim projection
  (times sqrt(k/k')). Its cost is random-number generation: generated blocks are cached up to
  ``DENSE_CACHE_BYTES`` (Rademacher as int8 signs), and :attr:`Projector.preferred_rows` asks the
  featurizer to project many gradients per call.
- ``factorized``: structured per-layer projection (LoGra-style). A weight of ndim >= 2, shaped
  (d_out, *rest) with d_in = prod(rest), is projected as P_o G P_i^T (P_o: k_o x d_out, P_i: k_i x d_in,
  Rademacher / sqrt(k_o), / sqrt(k_i); k_o * k_i = k), i.e. by the Kronecker product P_o (x) P_i, which is
  unbiased but *not* i.i.d. Every other parameter (biases, norms) goes through ``sjlt``. Its fast path
  (:meth:`FactorizedProjector.project_factors`) never forms a per-sample weight gradient:
  P_o G P_i^T = sum_p (P_o o_p)(P_i i_p)^T over the layer's positions p (see projidx/features/factorized.py).
- ``identity``: no projection (proj_dim = number of parameters): the exact reference.

Shapes: B gradients, p_name coordinates of a parameter, k = proj_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from projidx.seeding import generator
from projidx.settings import KINDS

DTYPES = ("float32", "float16")
DENSE_BLOCK = 4096  # input coordinates per regenerated block of the dense projector
DENSE_CACHE_BYTES = 1 << 30  # generated dense blocks kept across calls, per projector
DENSE_PREFERRED_ROWS = 256  # gradients per dense projection call, so each generated block serves many
SRHT_BLOCK = 1 << 16  # most input coordinates per Hadamard block
SRHT_MIN_BLOCK = 1 << 10  # a parameter's last piece below this is padded to a power of two, not split further
HADAMARD_BITS = 4  # the fast transform applies Sylvester Hadamard matrices of about 2^4 per axis


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything that defines a projection; serialized into the store.

    kind: one of KINDS; proj_dim: output dimension k; seed: global seed; dtype: storage dtype of the
    projected features; param_shapes: the input layout {parameter name: shape};
    sparsity: nonzeros per input coordinate (sjlt, and the non-weight parameters of factorized);
    distribution: rademacher | gaussian (dense).
    """

    kind: str
    proj_dim: int
    param_shapes: dict[str, tuple[int, ...]] = field(compare=True)
    seed: int = 0
    dtype: str = "float32"
    sparsity: int = 1
    distribution: str = "rademacher"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown projector {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {self.proj_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kind == "identity" and self.proj_dim != self.input_dim:
            raise ValueError(f"the identity projector needs proj_dim = {self.input_dim} (the parameter count)")
        if self.kind in ("sjlt", "factorized") and (self.sparsity < 1 or self.proj_dim % self.sparsity):
            raise ValueError(f"sjlt sparsity must be >= 1 and divide proj_dim, got s={self.sparsity}")
        if self.distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be rademacher or gaussian, got {self.distribution!r}")
        if self.kind == "factorized":
            k_o, _ = kronecker_dims(self.proj_dim)
            if k_o * k_o * 16 < self.proj_dim:
                raise ValueError(f"the factorized projector needs proj_dim = k_o * k_i with k_o, k_i near sqrt(k)"
                                 f" (e.g. a power of two), got {self.proj_dim}")

    @property
    def input_dim(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes.values())

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "proj_dim": self.proj_dim,
            "seed": self.seed,
            "dtype": self.dtype,
            "sparsity": self.sparsity,
            "distribution": self.distribution,
            "param_shapes": {n: list(s) for n, s in sorted(self.param_shapes.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ProjectorSpec:
        shapes = {n: tuple(int(v) for v in s) for n, s in d["param_shapes"].items()}
        return cls(
            kind=d["kind"],
            proj_dim=int(d["proj_dim"]),
            param_shapes=shapes,
            seed=int(d["seed"]),
            dtype=d["dtype"],
            sparsity=int(d.get("sparsity", 1)),
            distribution=d.get("distribution", "rademacher"),
        )

    def describe(self) -> str:
        return f"{self.kind} k={self.proj_dim} seed={self.seed} dtype={self.dtype}"


def kronecker_dims(k: int) -> tuple[int, int]:
    """(k_o, k_i) with k_o * k_i = k, k_o the largest divisor of k not above sqrt(k) (k_i >= k_o)."""
    k_o = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    return k_o, k // k_o


def _left_first(d_out: int, d_in: int, k_o: int, k_i: int) -> bool:
    """Whether P_o G P_i^T of a (d_out, d_in) G is cheaper as (P_o G) P_i^T than as P_o (G P_i^T)."""
    return k_o * d_in * (d_out + k_i) <= d_out * k_i * (d_in + k_o)


def kronecker_cost(d_out: int, d_in: int, k_o: int, k_i: int) -> int:
    """Multiply-adds of P_o G P_i^T for one (d_out, d_in) G, in the cheaper order (the one ``FactorizedProjector``
    uses)."""
    return min(k_o * d_in * (d_out + k_i), d_out * k_i * (d_in + k_o))


def is_factorized_weight(shape: tuple[int, ...]) -> bool:
    """A parameter the factorized projector treats as a (d_out, d_in) weight: ndim >= 2."""
    return len(shape) >= 2


class Projector:
    """Projects per-parameter gradients {name: (B, *shape)} to (B, proj_dim) float32.

    ``preferred_rows``: how many gradients one call should carry for the projection to be efficient
    (the featurizer batches up to that many, within a memory budget).
    """

    preferred_rows = 1

    def __init__(self, spec: ProjectorSpec, device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)

    def _check(self, grads: dict[str, torch.Tensor]) -> int:
        if set(grads) != set(self.spec.param_shapes):
            raise ValueError("the gradient's parameters differ from the projector's input layout")
        return next(iter(grads.values())).shape[0]

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, k) float32 P g for g = {name: (B, *shape)}."""
        return self.project_with_norms(grads)[0]

    def project_with_norms(
        self, grads: dict[str, torch.Tensor], groups: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass over the gradient: (B, k) P g, (B,) ||g||^2, and (B/groups,) ||mean over groups g||^2.

        Rows b*groups .. (b+1)*groups-1 form group b (a sample's gradients on a timestep grid); with
        groups = 1 the third output equals the second. Each parameter is read once, while it is hot.
        """
        batch = self._check(grads)
        out = torch.zeros(batch, self.spec.proj_dim, dtype=torch.float32, device=self.device)
        sq = torch.zeros(batch, dtype=torch.float32, device=self.device)
        mean_sq = torch.zeros(batch // groups, dtype=torch.float32, device=self.device)
        for name in sorted(grads):
            self.add_parameter(out, sq, mean_sq, name, grads[name].reshape(batch, -1), groups)
        return out, sq, (sq if groups == 1 else mean_sq)

    def add_parameter(
        self, out: torch.Tensor, sq: torch.Tensor, mean_sq: torch.Tensor, name: str, g: torch.Tensor, groups: int,
        scratch: bool = False,
    ) -> None:
        """Fold one parameter's per-sample gradient g (B, p_name) into out (B, k) += P_name g, sq (B,) += ||g||^2
        and, for groups > 1, mean_sq (B/groups,) += ||mean over each group of g||^2. With ``scratch`` the caller
        gives g up: the projection may overwrite it instead of allocating a copy."""
        moved = g.to(self.device, torch.float32)
        sq += moved.square().sum(dim=1)
        if groups > 1:
            mean_sq += moved.reshape(moved.shape[0] // groups, groups, -1).mean(dim=1).square().sum(dim=1)
        self._accumulate(out, name, moved, scratch or moved is not g)

    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor, scratch: bool) -> None:
        """out (B, k) += P_name g, with g (B, p_name); g may be overwritten if ``scratch``."""
        raise NotImplementedError


class SJLTProjector(Projector):
    def __init__(self, spec: ProjectorSpec, device: str | torch.device = "cpu") -> None:
        super().__init__(spec, device)
        self._hash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def buckets(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, p) int64 output rows and (s, p) float32 signs / sqrt(s) for parameter ``name``."""
        if name not in self._hash:
            spec = self.spec
            p = math.prod(spec.param_shapes[name])
            s, width = spec.sparsity, spec.proj_dim // spec.sparsity
            gen = generator("sjlt", spec.seed, name)
            rows = torch.randint(0, width, (s, p), generator=gen) + width * torch.arange(s)[:, None]
            signs = (torch.randint(0, 2, (s, p), generator=gen) * 2 - 1).float() / math.sqrt(s)
            self._hash[name] = (rows.to(self.device), signs.to(self.device))
        return self._hash[name]

    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor, scratch: bool) -> None:
        rows, signs = self.buckets(name)
        if not scratch:
            for j in range(rows.shape[0]):
                out.index_add_(1, rows[j], g * signs[j])
            return
        # in place: g * signs[j] is (g * signs[j-1]) * (+-1), exactly (a sign flip rounds nothing)
        out.index_add_(1, rows[0], g.mul_(signs[0]))
        for j in range(1, rows.shape[0]):
            out.index_add_(1, rows[j], g.mul_(signs[j].sign() * signs[j - 1].sign()))


def sylvester_hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, n) float32 Sylvester Hadamard matrix (entries +-1, unnormalized), n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h.to(device)


def hadamard_axes(n: int) -> list[int]:
    """Sizes (powers of two of about 2^HADAMARD_BITS, product n) of the Kronecker factors of H_n."""
    bits = n.bit_length() - 1
    parts = max(1, -(-bits // HADAMARD_BITS))
    return [1 << (bits // parts + (i < bits % parts)) for i in range(parts)]


def srht_blocks(p: int) -> list[tuple[int, int]]:
    """[(start, stop)] blocks of a parameter of p coordinates: powers of two <= SRHT_BLOCK, largest first,
    and one last piece under SRHT_MIN_BLOCK (padded). A function of p only."""
    blocks, start = [], 0
    while start < p:
        rest = p - start
        width = rest if rest < SRHT_MIN_BLOCK else min(SRHT_BLOCK, 1 << (rest.bit_length() - 1))
        blocks.append((start, start + width))
        start += width
    return blocks


def fwht(x: torch.Tensor, hadamards: dict[int, torch.Tensor]) -> torch.Tensor:
    """(B, n) -> (B, n) unnormalized Walsh-Hadamard transform x H_n, n a power of two.

    H_n = H_a (x) H_b (x) ... (Sylvester), so the transform is one small matrix product per axis of x
    viewed as (B, a, b, ...): apply the last axis' factor, rotate that axis to the front, repeat; after
    every axis has been visited once the axes are back in their original order. ``hadamards`` maps a
    size to its (size, size) matrix on x's device.
    """
    batch, n = x.shape
    axes = hadamard_axes(n)
    y = x.reshape(batch, *axes)
    for size in reversed(axes):
        y = (y.reshape(-1, size) @ hadamards[size]).reshape(batch, *y.shape[1:])
        y = y.movedim(-1, 1).contiguous()
    return y.reshape(batch, n)


class SRHTProjector(Projector):
    """Block subsampled randomized Hadamard transform (see the module docstring)."""

    def __init__(self, spec: ProjectorSpec, device: str | torch.device = "cpu") -> None:
        super().__init__(spec, device)
        self._blocks: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._hadamards: dict[int, torch.Tensor] = {}

    def block(self, name: str, index: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index`` of ``name``: (n,) float32 signs (D, zero past ``width``) and (k,) int64 sampled rows."""
        key = (name, index)
        if key not in self._blocks:
            n = 1 << max(0, (width - 1).bit_length())
            gen = generator("srht", self.spec.seed, name, index)
            signs = torch.zeros(n)
            signs[:width] = torch.randint(0, 2, (width,), generator=gen).float() * 2 - 1
            rows = torch.randint(0, n, (self.spec.proj_dim,), generator=gen)
            self._blocks[key] = (signs.to(self.device), rows.to(self.device))
            for size in hadamard_axes(n):
                if size not in self._hadamards:
                    self._hadamards[size] = sylvester_hadamard(size, self.device)
        return self._blocks[key]

    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor, scratch: bool) -> None:
        scale = 1.0 / math.sqrt(self.spec.proj_dim)
        for index, (start, stop) in enumerate(srht_blocks(g.shape[1])):
            signs, rows = self.block(name, index, stop - start)
            x = torch.nn.functional.pad(g[:, start:stop], (0, signs.shape[0] - (stop - start))) * signs
            out.add_(fwht(x, self._hadamards)[:, rows], alpha=scale)


class DenseProjector(Projector):
    """Blockwise regenerated dense projection; generated blocks are cached up to ``cache_bytes``."""

    preferred_rows = DENSE_PREFERRED_ROWS

    def __init__(
        self, spec: ProjectorSpec, device: str | torch.device = "cpu", cache_bytes: int = DENSE_CACHE_BYTES
    ) -> None:
        super().__init__(spec, device)
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0

    def _generate(self, name: str, index: int, width: int) -> torch.Tensor:
        """(k, width) raw entries: +-1 as int8 (rademacher) or N(0, 1) float32 (gaussian), on the CPU."""
        k = self.spec.proj_dim
        gen = generator("dense", self.spec.seed, name, index)
        if self.spec.distribution == "gaussian":
            return torch.randn(k, width, generator=gen)
        return (torch.randint(0, 2, (k, width), generator=gen) * 2 - 1).to(torch.int8)

    def block(self, name: str, index: int, width: int) -> torch.Tensor:
        """(k, width) block ``index`` of P for parameter ``name``: entries +-1/sqrt(k) or N(0, 1/k)."""
        key = (name, index)
        raw = self._cache.get(key)
        if raw is None:
            raw = self._generate(name, index, width).to(self.device)
            size = raw.numel() * raw.element_size()
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[key] = raw
                self._cached_bytes += size
        return raw.float() / math.sqrt(self.spec.proj_dim)

    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor, scratch: bool) -> None:
        p = g.shape[1]
        for index, start in enumerate(range(0, p, DENSE_BLOCK)):
            stop = min(start + DENSE_BLOCK, p)
            out.addmm_(g[:, start:stop], self.block(name, index, stop - start).T)


class FactorizedProjector(Projector):
    """Kronecker-factored projection of weights, sparse JL for the rest (see the module docstring)."""

    def __init__(self, spec: ProjectorSpec, device: str | torch.device = "cpu") -> None:
        super().__init__(spec, device)
        self.k_o, self.k_i = kronecker_dims(spec.proj_dim)
        self.sjlt = SJLTProjector(spec, device)
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_o, d_out) P_o and (k_i, d_in) P_i of weight ``name``: Rademacher / sqrt(k_o), / sqrt(k_i)."""
        if name not in self._factors:
            shape = self.spec.param_shapes[name]
            d_out, d_in = shape[0], math.prod(shape[1:])
            gen = generator("factorized", self.spec.seed, name)
            p_o = (torch.randint(0, 2, (self.k_o, d_out), generator=gen) * 2 - 1).float() / math.sqrt(self.k_o)
            p_i = (torch.randint(0, 2, (self.k_i, d_in), generator=gen) * 2 - 1).float() / math.sqrt(self.k_i)
            self._factors[name] = (p_o.to(self.device), p_i.to(self.device))
        return self._factors[name]

    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor, scratch: bool) -> None:
        shape = self.spec.param_shapes[name]
        if not is_factorized_weight(shape):
            self.sjlt._accumulate(out, name, g, scratch)
            return
        p_o, p_i = self.factors(name)
        d_out, d_in = shape[0], math.prod(shape[1:])
        grad = g.reshape(g.shape[0], d_out, d_in)
        if _left_first(d_out, d_in, self.k_o, self.k_i):
            projected = (p_o @ grad).reshape(-1, d_in) @ p_i.T  # (B k_o, k_i)
        else:
            projected = p_o @ (grad.reshape(-1, d_in) @ p_i.T).reshape(g.shape[0], d_out, self.k_i)
        out += projected.reshape(g.shape[0], -1)

    def project_factors(self, out: torch.Tensor, name: str, outgrads: torch.Tensor, inputs: torch.Tensor) -> None:
        """out (B, k) += P_o G P_i^T for G = sum_p o_p i_p^T, without forming G.

        outgrads: (B, P, d_out) o_p; inputs: (B, P, d_in) i_p, over the layer's P positions per sample.
        """
        p_o, p_i = self.factors(name)
        po = outgrads.to(self.device, torch.float32) @ p_o.T  # (B, P, k_o)
        pi = inputs.to(self.device, torch.float32) @ p_i.T  # (B, P, k_i)
        out += (po.transpose(1, 2) @ pi).reshape(out.shape[0], -1)


class IdentityProjector(Projector):
    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor, scratch: bool) -> None:
        start = sum(math.prod(s) for n, s in self.spec.param_shapes.items() if n < name)
        out[:, start : start + g.shape[1]] = g


def make_projector(spec: ProjectorSpec, device: str | torch.device = "cpu") -> Projector:
    """The projector of ``spec.kind`` on ``device``."""
    classes: dict[str, type[Projector]] = {
        "sjlt": SJLTProjector,
        "srht": SRHTProjector,
        "dense": DenseProjector,
        "factorized": FactorizedProjector,
        "identity": IdentityProjector,
    }
    return classes[spec.kind](spec, device)
