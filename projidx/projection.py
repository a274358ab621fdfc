"""Johnson-Lindenstrauss projectors for per-parameter gradients.

Every projector maps a gradient {name: (B, *shape)} to (B, proj_dim) float32 by projecting each
parameter tensor on its own and summing the results in sorted-name order, so no flat (B, p)
gradient is ever built. Random matrices are regenerated from (seed, parameter name, block) on the
CPU, so one :class:`ProjectorSpec` gives the same projection on every machine, thread count, batch
size and parameter order. All are scaled so that E[P^T P] = I: <P a, P b> is an unbiased estimate
of <a, b>.

Kinds:
- ``sjlt``: sparse JL / count-sketch, ``s`` nonzeros +-1/sqrt(s) per input coordinate, one in each of
  s equal blocks of the output (the CPU default: O(s) work per coordinate).
- ``dense``: i.i.d. Rademacher (or Gaussian) entries / sqrt(k), generated in blocks of input rows;
  rows are drawn output-major, so the first k' outputs of a seed are those of a k'-dim projection
  (times sqrt(k/k')).
- ``identity``: no projection (proj_dim = number of parameters): the exact reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from projidx.seeding import generator

KINDS = ("sjlt", "dense", "identity")
DTYPES = ("float32", "float16")
DENSE_BLOCK = 4096  # input coordinates per regenerated block of the dense projector


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything that defines a projection; serialized into the store.

    kind: one of KINDS; proj_dim: output dimension k; seed: global seed; dtype: storage dtype of the
    projected features; param_shapes: the input layout {parameter name: shape};
    sparsity: nonzeros per input coordinate (sjlt); distribution: rademacher | gaussian (dense).
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
        if self.kind == "sjlt" and (self.sparsity < 1 or self.proj_dim % self.sparsity):
            raise ValueError(f"sjlt sparsity must be >= 1 and divide proj_dim, got s={self.sparsity}")
        if self.distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be rademacher or gaussian, got {self.distribution!r}")

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


class Projector:
    """Projects per-parameter gradients {name: (B, *shape)} to (B, proj_dim) float32."""

    def __init__(self, spec: ProjectorSpec, device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        if set(grads) != set(self.spec.param_shapes):
            raise ValueError("the gradient's parameters differ from the projector's input layout")
        batch = next(iter(grads.values())).shape[0]
        out = torch.zeros(batch, self.spec.proj_dim, dtype=torch.float32, device=self.device)
        for name in sorted(grads):
            self._accumulate(out, name, grads[name].reshape(batch, -1).to(self.device, torch.float32))
        return out

    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor) -> None:
        """out (B, k) += P_name g, with g (B, p_name)."""
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

    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor) -> None:
        rows, signs = self.buckets(name)
        for j in range(rows.shape[0]):
            out.index_add_(1, rows[j], g * signs[j])


class DenseProjector(Projector):
    def block(self, name: str, index: int, width: int) -> torch.Tensor:
        """(k, width) block ``index`` of P for parameter ``name``: entries +-1/sqrt(k) or N(0, 1/k)."""
        k = self.spec.proj_dim
        gen = generator("dense", self.spec.seed, name, index)
        if self.spec.distribution == "gaussian":
            m = torch.randn(k, width, generator=gen)
        else:
            m = torch.randint(0, 2, (k, width), generator=gen).float() * 2 - 1
        return (m / math.sqrt(k)).to(self.device)

    def _accumulate(self, out: torch.Tensor, name: str, g: torch.Tensor) -> None:
        p = g.shape[1]
        for index, start in enumerate(range(0, p, DENSE_BLOCK)):
            stop = min(start + DENSE_BLOCK, p)
            out.addmm_(g[:, start:stop], self.block(name, index, stop - start).T)


class IdentityProjector(Projector):
    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        if set(grads) != set(self.spec.param_shapes):
            raise ValueError("the gradient's parameters differ from the projector's input layout")
        batch = next(iter(grads.values())).shape[0]
        return torch.cat([grads[n].reshape(batch, -1).float() for n in sorted(grads)], dim=1).to(self.device)


def make_projector(spec: ProjectorSpec, device: str | torch.device = "cpu") -> Projector:
    """The projector of ``spec.kind`` on ``device``."""
    classes: dict[str, type[Projector]] = {
        "sjlt": SJLTProjector,
        "dense": DenseProjector,
        "identity": IdentityProjector,
    }
    return classes[spec.kind](spec, device)
