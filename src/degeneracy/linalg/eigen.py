"""Symmetric eigendecompositions, truncation, whitening and spectrum counts (float64 throughout).

Symbols follow ``METHOD.md`` §2–3: a Gram matrix G = U diag(D) Uᵀ, the whitening map
R = diag(D)^{-1/2} Uᵀ and its pseudo-inverse R₊ = U diag(D)^{1/2}.

>>> eigh_descending(torch.diag(torch.tensor([1.0, 3.0]))).values.tolist()
[3.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "Eigh",
    "eigh_descending",
    "intra_op_threads",
    "SINGLE_THREAD_EIGH",
    "truncate",
    "whitening",
    "centering_maps",
    "psd_eigenvalues",
    "rank_at",
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


def eigh_descending(matrix: Float[Tensor, "d d"], *, one_thread_if_small: bool = False) -> Eigh:
    """Symmetric eigendecomposition in float64, eigenvalues descending (the package's one eigh).

    The input is symmetrised first, so that accumulated round-off cannot make ``eigh`` read only one
    triangle of a slightly asymmetric matrix. With ``one_thread_if_small``, matrices up to
    ``SINGLE_THREAD_EIGH`` run on one intra-op thread (the many small decompositions of the accounting
    and of Krylov methods); otherwise torch's thread setting is used (the bases: LAPACK's round-off
    depends on the thread count, and it decides directions at an absolute truncation threshold).

    >>> eigh_descending(torch.diag(torch.tensor([1.0, 3.0, 2.0]))).values.tolist()
    [3.0, 2.0, 1.0]
    """
    m = matrix.to(torch.float64)
    m = 0.5 * (m + m.T)
    with intra_op_threads(1 if one_thread_if_small and m.shape[-1] <= SINGLE_THREAD_EIGH else None):
        values, vectors = torch.linalg.eigh(m)
    return Eigh(values.flip(0), vectors.flip(1))


def truncate(eig: Eigh, threshold: float, *, relative: bool = True) -> tuple[Eigh, int]:
    """Keep the eigenpairs with value > threshold (× the largest value when ``relative``).

    Returns the kept pairs and their number. An all-zero matrix keeps nothing.

    >>> kept, k = truncate(eigh_descending(torch.diag(torch.tensor([4.0, 1.0, 0.0]))), 0.1)
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

    >>> r, r_plus = whitening(eigh_descending(torch.diag(torch.tensor([4.0, 1.0]))))
    >>> (r @ r_plus).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    sqrt = eig.values.sqrt()
    return eig.vectors.T / sqrt[:, None], eig.vectors * sqrt[None, :]


def centering_maps(mean: Float[Tensor, " d"]) -> tuple[Float[Tensor, "d1 d1"], Float[Tensor, "d1 d1"]]:
    """Linear maps on the augmented vector [f; 1] that centre it and undo the centring.

    S [f; 1] = [f − μ; 1] and S⁻¹ [g; 1] = [g + μ; 1] (METHOD §0, bias option (b)).

    >>> s, s_inv = centering_maps(torch.tensor([2.0], dtype=torch.float64))
    >>> (s @ torch.tensor([5.0, 1.0], dtype=torch.float64)).tolist()
    [3.0, 1.0]
    """
    d = mean.shape[0]
    s = torch.eye(d + 1, dtype=torch.float64)
    s_inv = torch.eye(d + 1, dtype=torch.float64)
    s[:d, d] = -mean
    s_inv[:d, d] = mean
    return s, s_inv


def psd_eigenvalues(gram: Float[Tensor, "g g"]) -> Float[Tensor, " g"]:
    """All eigenvalues of a PSD Gram matrix, descending, clamped at 0.

    Rows with an exactly zero diagonal are zero rows (|G_ij|² ≤ G_ii G_jj), e.g. the incoming weights
    of a dead neuron or the weights of an input that is always 0, and contribute exact zero
    eigenvalues; they are removed before ``eigvalsh``, whose cost is cubic in the size.

    >>> psd_eigenvalues(torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])).tolist()
    [3.0, 1.0, 0.0]
    """
    keep = torch.diagonal(gram) > 0
    reduced = gram[keep][:, keep] if not bool(keep.all()) else gram
    values = torch.linalg.eigvalsh(reduced).flip(0).clamp_min(0.0)
    missing = gram.shape[0] - values.numel()
    if missing:
        values = torch.cat([values, torch.zeros(missing, dtype=values.dtype)])
    return values


def rank_at(
    eigenvalues: Float[Tensor, " g"],
    epsilon: float = 0.0,
    *,
    relative: bool = False,
    floor: float = 0.0,
) -> int:
    """Number of eigenvalues above the threshold max(ε or ε·λ_max, floor); the rest count as zero.

    >>> values = torch.tensor([4.0, 1.0, 1e-3, 0.0])
    >>> rank_at(values), rank_at(values, 1e-2), rank_at(values, 0.1, relative=True)
    (3, 2, 2)
    """
    if eigenvalues.numel() == 0:
        return 0
    top = float(eigenvalues.max())
    threshold = max(epsilon * top if relative else epsilon, floor)
    return int((eigenvalues > threshold).sum())
