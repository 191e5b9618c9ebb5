"""Streaming, mergeable float64 accumulators (METHOD §1).

Every accumulator is a sum plus a count, so batches, processes and machines merge by addition:
``a.merge(b)`` in one process, ``a.all_reduce()`` across a ``torch.distributed`` group (gloo on
CPU, NCCL on GPU). Dividing by the count happens only when a statistic is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from degeneracy.distributed import all_reduce_sum, is_distributed

__all__ = ["MomentAccumulator", "MatrixAccumulator", "check_finite"]


def check_finite(x: Tensor, where: str) -> None:
    """Raise ``ValueError`` saying where NaN or Inf values appeared.

    >>> check_finite(torch.ones(2), "the Gram")
    >>> check_finite(torch.tensor([1.0, float("nan")]), "the Gram")
    Traceback (most recent call last):
    ...
    ValueError: ...
    """
    if not torch.isfinite(x).all():
        bad = ~torch.isfinite(x)
        kind = "NaN" if torch.isnan(x).any() else "Inf"
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{kind} in {where} (first at index {first}, {int(bad.sum())} values in all)")


class _Sum:
    """Shared merge / all-reduce behaviour of the accumulators below."""

    def _tensors(self) -> list[Tensor]:
        raise NotImplementedError

    def merge(self, other: _Sum) -> _Sum:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        mine, theirs = self._tensors(), other._tensors()
        for a, b in zip(mine, theirs, strict=True):
            if a.shape != b.shape:
                raise ValueError(f"cannot merge accumulators of shapes {tuple(a.shape)} and {tuple(b.shape)}")
            a += b.to(a.device)
        self.count += other.count  # type: ignore[attr-defined]
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> _Sum:
        """Sum this accumulator over all processes of a ``torch.distributed`` group (in place)."""
        if group is not None:  # a sub-group: reduce in place on it
            count = torch.tensor([float(self.count)], dtype=torch.float64)  # type: ignore[attr-defined]
            for t in [*self._tensors(), count]:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            self.count = int(count.item())  # type: ignore[attr-defined]
            return self
        if not is_distributed():
            return self
        for t in self._tensors():
            t.copy_(all_reduce_sum(t))
        count = all_reduce_sum(torch.tensor([float(self.count)], dtype=torch.float64))  # type: ignore[attr-defined]
        self.count = int(count.item())  # type: ignore[attr-defined]
        return self


@dataclass
class MomentAccumulator(_Sum):
    """First and second moments of vectors of width ``d``: Σ f, Σ f fᵀ and the count (float64).

    >>> acc = MomentAccumulator(2)
    >>> acc.update(torch.tensor([[1.0, 0.0], [3.0, 2.0]], dtype=torch.float64))
    >>> acc.mean.tolist(), acc.gram.tolist()
    ([2.0, 1.0], [[5.0, 3.0], [3.0, 2.0]])
    """

    d: int
    sum: Tensor = field(init=False)
    sum_outer: Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.sum = torch.zeros(self.d, dtype=torch.float64)
        self.sum_outer = torch.zeros(self.d, self.d, dtype=torch.float64)

    def _tensors(self) -> list[Tensor]:
        return [self.sum, self.sum_outer]

    def update(self, x: Float[Tensor, "... d"], mask: Tensor | None = None) -> None:
        """Add every vector in ``x`` (all leading dimensions are samples), or only those where
        ``mask`` (shaped like ``x`` without its last axis, e.g. the valid positions) is true."""
        if x.shape[-1] != self.d:
            raise ValueError(f"expected vectors of width {self.d}, got shape {tuple(x.shape)}")
        if mask is not None:
            x = x[mask.to(x.device)]
        flat = x.reshape(-1, self.d).to(device=self.sum.device, dtype=torch.float64)
        self.sum += flat.sum(0)
        self.sum_outer += flat.T @ flat
        self.count += flat.shape[0]

    def _require(self) -> None:
        if self.count == 0:
            raise ValueError("no samples accumulated")

    @property
    def mean(self) -> Float[Tensor, " d"]:
        self._require()
        return self.sum / self.count

    @property
    def gram(self) -> Float[Tensor, "d d"]:
        """Uncentred second moment E[f fᵀ] (eq 14)."""
        self._require()
        return self.sum_outer / self.count

    @property
    def covariance(self) -> Float[Tensor, "d d"]:
        """Centred second moment E[(f − μ)(f − μ)ᵀ]."""
        mu = self.mean
        return self.gram - torch.outer(mu, mu)


@dataclass
class MatrixAccumulator(_Sum):
    """A running sum of ``d × d`` matrices and the number of samples behind it (e.g. Jacobian Grams).

    >>> acc = MatrixAccumulator(2)
    >>> acc.add(torch.eye(2, dtype=torch.float64) * 4, count=2)
    >>> acc.value.tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    """

    d: int
    sum: Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.sum = torch.zeros(self.d, self.d, dtype=torch.float64)

    def _tensors(self) -> list[Tensor]:
        return [self.sum]

    def add(self, matrix: Float[Tensor, "d d"], count: int) -> None:
        self.sum += matrix.to(device=self.sum.device, dtype=torch.float64)
        self.count += count

    @property
    def value(self) -> Float[Tensor, "d d"]:
        if self.count == 0:
            raise ValueError("no samples accumulated")
        return self.sum / self.count
