"""Pure linear algebra used by the bases and edges (float64 throughout).

Symbols follow ``METHOD.md`` §2–3: a Gram matrix G = U diag(D) Uᵀ, the whitening map
R = diag(D)^{-1/2} Uᵀ and its pseudo-inverse R₊ = U diag(D)^{1/2}; integration rules give points
α ∈ [0, 1] with weights summing to one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "Eigh",
    "eigh_descending",
    "intra_op_threads",
    "truncate",
    "whitening",
    "IntegrationRule",
    "integration_rule",
    "INTEGRATION_RULES",
    "homogeneous_rule",
    "centering_maps",
]


@dataclass(frozen=True)
class Eigh:
    """Eigendecomposition with eigenvalues in descending order; ``vectors[:, i]`` goes with ``values[i]``.

    ``k = d`` for a full decomposition (:func:`eigh_descending`), fewer after truncation.

    >>> eig = Eigh(torch.tensor([2.0, 1.0]), torch.eye(2))
    >>> eig.values[0].item(), tuple(eig.vectors.shape)
    (2.0, (2, 2))
    """

    values: Float[Tensor, " k"]
    vectors: Float[Tensor, "d k"]


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (restored after); ``None``: unchanged.

    >>> with intra_op_threads(1):
    ...     torch.get_num_threads()
    1
    """
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


SINGLE_THREAD_EIGH = 1024
"""Largest matrix side decomposed on one intra-op thread: small LAPACK calls gain nothing from threads,
and on an oversubscribed machine a multi-threaded eigensolver on a 128 × 128 matrix can take seconds
(threads spin at barriers while descheduled)."""


def eigh_descending(matrix: Float[Tensor, "d d"]) -> Eigh:
    """Symmetric eigendecomposition in float64, eigenvalues descending (the package's one eigh).

    The input is symmetrised first, so that accumulated round-off cannot make ``eigh`` read only one
    triangle of a slightly asymmetric matrix; matrices up to ``SINGLE_THREAD_EIGH`` run on one thread.

    >>> eigh_descending(torch.diag(torch.tensor([1.0, 3.0, 2.0]))).values.tolist()
    [3.0, 2.0, 1.0]
    """
    m = matrix.to(torch.float64)
    m = 0.5 * (m + m.T)
    with intra_op_threads(1 if m.shape[-1] <= SINGLE_THREAD_EIGH else None):
        values, vectors = torch.linalg.eigh(m)
    return Eigh(values.flip(0), vectors.flip(1))


def truncate(eig: Eigh, threshold: float, *, relative: bool = True) -> tuple[Eigh, int]:
    """Keep the eigenpairs with value > threshold (× the largest value when ``relative``).

    Returns the kept pairs and their number. An all-zero matrix keeps nothing.

    >>> eig = eigh_descending(torch.diag(torch.tensor([4.0, 1.0, 1e-12])))
    >>> kept, k = truncate(eig, 1e-6)
    >>> k, kept.values.tolist()
    (2, [4.0, 1.0])
    """
    vmax = float(eig.values[0]) if eig.values.numel() else 0.0
    if vmax <= 0.0:
        k = 0
    else:
        cut = threshold * vmax if relative else threshold
        k = int((eig.values > cut).sum())
    return Eigh(eig.values[:k], eig.vectors[:, :k]), k


def whitening(eig: Eigh) -> tuple[Float[Tensor, "k d"], Float[Tensor, "d k"]]:
    """R = diag(D)^{-1/2} Uᵀ and R₊ = U diag(D)^{1/2} for a truncated (all-positive) eigensystem.

    >>> eig = eigh_descending(torch.diag(torch.tensor([4.0, 1.0])))
    >>> R, R_plus = whitening(eig)
    >>> (R @ torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)) @ R.T).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    >>> torch.allclose(R_plus @ R, torch.eye(2, dtype=torch.float64))
    True
    """
    sqrt = eig.values.sqrt()
    return eig.vectors.T / sqrt[:, None], eig.vectors * sqrt[None, :]


def centering_maps(mean: Float[Tensor, " d"]) -> tuple[Float[Tensor, "d1 d1"], Float[Tensor, "d1 d1"]]:
    """Linear maps on the augmented vector [f; 1] that centre it and undo the centring.

    S [f; 1] = [f − μ; 1] and S⁻¹ [g; 1] = [g + μ; 1] (METHOD §0, bias option (b)).

    >>> S, S_inv = centering_maps(torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> (S @ torch.tensor([3.0, 3.0, 1.0], dtype=torch.float64)).tolist()
    [2.0, 1.0, 1.0]
    >>> torch.equal(S_inv @ S, torch.eye(3, dtype=torch.float64))
    True
    """
    d = mean.shape[0]
    s = torch.eye(d + 1, dtype=torch.float64)
    s_inv = torch.eye(d + 1, dtype=torch.float64)
    s[:d, d] = -mean
    s_inv[:d, d] = mean
    return s, s_inv


@dataclass(frozen=True)
class IntegrationRule:
    """Points α_a ∈ [0, 1] and weights w_a (summing to 1) of an integration rule (METHOD §3).

    >>> IntegrationRule("gradient", (1.0,), (1.0,)).points
    (1.0,)
    """

    name: str
    points: tuple[float, ...]
    weights: tuple[float, ...]


INTEGRATION_RULES = ("gradient", "trapezoid", "gauss-legendre")


def integration_rule(name: str, n: int = 1) -> IntegrationRule:
    """The named rule: "gradient" (α = 1), "trapezoid" (n intervals), "gauss-legendre" (n + 1 nodes).

    >>> integration_rule("trapezoid", 2)
    IntegrationRule(name='trapezoid', points=(0.0, 0.5, 1.0), weights=(0.25, 0.5, 0.25))
    >>> round(sum(integration_rule("gauss-legendre", 3).weights), 12)
    1.0
    """
    if name == "gradient":
        return IntegrationRule(name, (1.0,), (1.0,))
    if n < 1:
        raise ValueError(f"integration rule {name!r} needs n >= 1, got {n}")
    if name == "trapezoid":
        points = np.linspace(0.0, 1.0, n + 1)
        weights = np.full(n + 1, 1.0 / n)
        weights[0] = weights[-1] = 0.5 / n
    elif name == "gauss-legendre":
        nodes, w = np.polynomial.legendre.leggauss(n + 1)
        points = 0.5 * (nodes + 1.0)
        weights = 0.5 * w
    else:
        raise ValueError(f"unknown integration rule {name!r}; choose one of {INTEGRATION_RULES}")
    return IntegrationRule(name, tuple(float(p) for p in points), tuple(float(w) for w in weights))


def homogeneous_rule(rule: IntegrationRule) -> IntegrationRule:
    """``rule`` for a positively homogeneous section (the constant-coordinate extension).

    Its Jacobian is the same at every α·f with α > 0, and its value at α = 0 is that limit (F(0) is
    0/0 in float arithmetic): a point at α = 0 is evaluated at α = 1 instead.

    >>> homogeneous_rule(integration_rule("trapezoid", 2)).points
    (1.0, 0.5, 1.0)
    """
    return IntegrationRule(rule.name, tuple(a if a > 0 else 1.0 for a in rule.points), rule.weights)
