"""Krylov methods on a symmetric PSD operator given only by its products (float64 throughout).

Every function takes the operator as a callable: ``matvec(v)`` for one vector ``(size,)``, or
``matmat(V)`` for a block ``(size, b)``, so that no ``size × size`` matrix is ever formed:

* :func:`lanczos_top`, :func:`block_krylov_top`: the top k eigenvalues (Lanczos / block Lanczos with
  full reorthogonalisation) with their residual bounds;
* :func:`slq_nodes`, :func:`slq_nodes_batched`, :func:`slq_rank`: stochastic Lanczos quadrature
  (Ubaru, Chen & Saad 2017), tr f(A) ≈ size · mean over Rademacher probes of Σ_j τ_j f(θ_j), here
  used with f = 1[λ > ε] for the rank at any ε;
* :func:`hutchinson_trace`: tr A = E[vᵀAv] over Rademacher v;
* :func:`lanczos_tridiagonal`, :func:`tridiagonal`: the Lanczos recurrence itself.

Random vectors come from a ``torch.Generator`` seeded with ``seed``: results are deterministic.

>>> a = torch.diag(torch.arange(10, dtype=torch.float64))
>>> values, residuals, products = lanczos_top(lambda v: a @ v, 10, 3)
>>> [round(x, 10) for x in values.tolist()]
[9.0, 8.0, 7.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from degeneracy.deprecation import renamed_arguments
from degeneracy.linalg.eigen import eigh_descending

__all__ = [
    "lanczos_tridiagonal",
    "tridiagonal",
    "lanczos_top",
    "block_krylov_top",
    "krylov_max_vectors",
    "slq_nodes",
    "slq_nodes_batched",
    "slq_rank",
    "hutchinson_trace",
]

MatVec = Callable[[Tensor], Tensor]
"""A symmetric operator: ``(size,)`` → ``(size,)`` (or ``(size, b)`` → ``(size, b)`` for a block product)."""

BREAKDOWN = 1e-10
"""A Lanczos step whose new direction has norm ≤ BREAKDOWN × (largest |α| or β so far) found an invariant
Krylov space."""


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """w minus its projection on the rows of ``basis`` (classical Gram–Schmidt, twice)."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def tridiagonal(alphas: Float[Tensor, " m"], betas: Tensor) -> Float[Tensor, "m m"]:
    """The symmetric tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``betas`` (m − 1).

    >>> tridiagonal(torch.tensor([1.0, 2.0]), torch.tensor([3.0])).tolist()
    [[1.0, 3.0], [3.0, 2.0]]
    """
    t = torch.diag(alphas)
    if betas.numel():
        t = t + torch.diag(betas, 1) + torch.diag(betas, -1)
    return t


def lanczos_tridiagonal(
    matvec: MatVec,
    start: Tensor,
    num_steps: int,
    *,
    generator: torch.Generator,
    stop: Callable[[Tensor, Tensor, float], bool] | None = None,
) -> tuple[Float[Tensor, " m"], Tensor]:
    """Lanczos with full reorthogonalisation from ``start``: the tridiagonal T's (alphas, betas).

    A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ. A breakdown (β ≈ 0: the Krylov space is invariant) restarts
    from a random vector orthogonal to the basis with a zero off-diagonal entry, so T stays the
    projection of the operator on an orthonormal basis. ``stop(alphas, betas, β_m)`` is asked after
    each step and may end the iteration. At most ``min(num_steps, size)`` steps.

    >>> a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> alphas, betas = lanczos_tridiagonal(lambda v: a @ v, torch.ones(3), 3, generator=torch.Generator())
    >>> [round(x, 12) for x in torch.linalg.eigvalsh(tridiagonal(alphas, betas)).tolist()]
    [1.0, 2.0, 3.0]
    """
    n = start.numel()
    num_steps = min(num_steps, n)
    basis = torch.zeros(num_steps, n, dtype=torch.float64)
    alphas = torch.zeros(num_steps, dtype=torch.float64)
    betas = torch.zeros(num_steps, dtype=torch.float64)
    q = start.to(torch.float64)
    q = q / q.norm()
    scale = 0.0
    m = 0
    for j in range(num_steps):
        basis[j] = q
        w = matvec(q)
        alphas[j] = torch.dot(q, w)
        w = _orthogonalize(w, basis[: j + 1])
        m = j + 1
        beta = float(w.norm())
        scale = max(scale, abs(float(alphas[j])), beta)
        if stop is not None and stop(alphas[:m], betas[: m - 1], beta):
            break
        if j == num_steps - 1:
            break
        if beta <= BREAKDOWN * max(scale, 1e-300):
            w = _orthogonalize(torch.randn(n, dtype=torch.float64, generator=generator), basis[: j + 1])
            q = w / w.norm()
            betas[j] = 0.0
        else:
            betas[j] = beta
            q = w / beta
    return alphas[:m], betas[: m - 1]


def _pad(values: Tensor, residuals: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Zero eigenvalues and NaN residuals up to length k (when the operator is smaller than asked)."""
    if values.numel() < k:
        values = torch.cat([values, torch.zeros(k - values.numel(), dtype=torch.float64)])
    if residuals.numel() < k:
        nan = torch.full((k - residuals.numel(),), float("nan"), dtype=torch.float64)
        residuals = torch.cat([residuals, nan])
    return values, residuals


def lanczos_top(
    matvec: MatVec,
    size: int,
    k: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-8,
    seed: int = 0,
) -> tuple[Float[Tensor, " k"], Float[Tensor, " k"], int]:
    """The k largest eigenvalues of a symmetric PSD operator by Lanczos with full reorthogonalisation.

    Stops when the residual bound |β_m · y_{m,i}| of each of the top-k Ritz pairs (θ_i, Q_m y_i) is at
    most ``tol · λ_max``, checked every 5 steps, or after ``max_iter`` products (default
    min(size, max(3k, k + 50))).

    Returns:
        (eigenvalues descending (k,), residual bounds (k,), number of operator products).

    >>> a = torch.diag(torch.arange(12, dtype=torch.float64))
    >>> values, residuals, products = lanczos_top(lambda v: a @ v, 12, 2)
    >>> [round(x, 8) for x in values.tolist()], products <= 12
    ([11.0, 10.0], True)
    """
    k = min(k, size)
    max_iter = min(size, max_iter or max(3 * k, k + 50))
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(size, dtype=torch.float64, generator=generator)
    state: dict[str, Tensor] = {}

    def stop(alphas: Tensor, betas: Tensor, beta_m: float) -> bool:
        m = alphas.numel()
        if m < k or ((m - k) % 5 and m < max_iter):
            return False
        eig = eigh_descending(tridiagonal(alphas, betas), one_thread_if_small=True)
        state["residuals"] = (beta_m * eig.vectors[-1, :k]).abs()
        return bool((state["residuals"] <= tol * max(float(eig.values[0]), 1e-300)).all())

    alphas, betas = lanczos_tridiagonal(matvec, start, max_iter, generator=generator, stop=stop)
    top = eigh_descending(tridiagonal(alphas, betas), one_thread_if_small=True).values[:k].clamp_min(0.0)
    residuals = state.get("residuals", torch.full((k,), float("nan"), dtype=torch.float64))
    top, _ = _pad(top, residuals, k)
    return top, residuals, int(alphas.numel())


def krylov_max_vectors(size: int, k: int, *, block_size: int = 16, max_vectors: int | None = None) -> int:
    """The most operator products :func:`block_krylov_top` makes before it stops (it may stop earlier,
    when the residuals are small; the last block may pass it by up to ``block_size``): the length of
    its progress bar.

    >>> krylov_max_vectors(1000, 50), krylov_max_vectors(1000, 50, max_vectors=20), krylov_max_vectors(30, 50)
    (150, 66, 30)
    """
    k = min(k, size)
    b = max(1, min(block_size, size))
    bound = min(size, max_vectors or max(3 * k, k + 100))
    return max(bound, min(size, k + b))


def block_krylov_top(
    matmat: MatVec,
    size: int,
    k: int,
    *,
    block_size: int = 16,
    max_vectors: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
) -> tuple[Float[Tensor, " k"], Float[Tensor, " k"], int]:
    """The k largest eigenvalues of a symmetric PSD operator by block Lanczos (full reorthogonalisation).

    The Krylov basis Q grows by blocks Q_{j+1} R_j = (I − QQᵀ) A Q_j; T = Qᵀ A Q is assembled from the
    same products and its top Ritz values are returned. With A Q = Q T + Q_{j+1} R_j E_jᵀ the residual
    of Ritz pair (θ_i, Q y_i) is ‖R_j y_i[last block]‖; iteration stops when the top-k residuals are at
    most ``tol · λ_max`` or after ``max_vectors`` products (default min(size, max(3k, k + 100))). A
    rank-deficient block (invariant subspace) is refilled with random directions orthogonal to Q.
    ``block_size=1`` is plain Lanczos.

    Returns:
        (eigenvalues descending (k,), residual bounds (k,), number of operator products).

    >>> a = torch.diag(torch.arange(12, dtype=torch.float64))
    >>> values, residuals, products = block_krylov_top(lambda v: a @ v, 12, 2, block_size=4)
    >>> [round(x, 8) for x in values.tolist()]
    [11.0, 10.0]
    """
    k = min(k, size)
    b = max(1, min(block_size, size))
    max_vectors = krylov_max_vectors(size, k, block_size=block_size, max_vectors=max_vectors)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(max_vectors + b, size, dtype=torch.float64)  # rows: contiguous slices
    t = torch.zeros(max_vectors + b, max_vectors + b, dtype=torch.float64)
    block = torch.linalg.qr(torch.randn(size, b, dtype=torch.float64, generator=generator))[0].T
    m = 0
    values = torch.zeros(0, dtype=torch.float64)
    residuals = torch.full((k,), float("nan"), dtype=torch.float64)
    while True:
        width = block.shape[0]
        basis[m : m + width] = block
        w = matmat(block.T.contiguous()).T.contiguous()  # (width, size)
        t[: m + width, m : m + width] = basis[: m + width] @ w.T
        t[m : m + width, :m] = t[:m, m : m + width].T
        m += width
        q = basis[:m]
        for _ in range(2):
            w = w - (w @ q.T) @ q
        eig = eigh_descending(t[:m, :m], one_thread_if_small=True)  # symmetrised inside
        values = eig.values
        next_block, r = torch.linalg.qr(w.T)
        scale = max(float(values[0]), 1e-300)
        residuals = (r @ eig.vectors[m - width : m, :k]).norm(dim=0)
        if m >= k and bool((residuals <= tol * scale).all()):
            break
        room = min(b, size - m, max_vectors - m)
        if room <= 0:
            break
        # columns of w that vanished (invariant subspace): refill with random orthogonal directions
        weak = torch.diagonal(r).abs() <= BREAKDOWN * scale
        if bool(weak.any()):
            fill = torch.randn(size, width, dtype=torch.float64, generator=generator)
            next_block = torch.where(weak[None, :], fill, next_block)
            for _ in range(2):
                next_block = next_block - q.T @ (q @ next_block)
            next_block = torch.linalg.qr(next_block)[0]
        block = next_block[:, :room].T
    top, residuals = _pad(values[:k].clamp_min(0.0), residuals, k)
    return top, residuals, m


def _rademacher(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1


def _quadrature(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss quadrature of a Lanczos run: nodes θ_j (ascending, clamped at 0) and weights τ_j = y_j[0]²."""
    eig = eigh_descending(tridiagonal(alphas, betas), one_thread_if_small=True)
    return eig.values.flip(0).clamp_min(0.0), eig.vectors[0].flip(0).pow(2)


@renamed_arguments(probes="num_probes", steps="num_steps")
def slq_nodes(
    matvec: MatVec,
    size: int,
    *,
    num_probes: int = 8,
    num_steps: int = 40,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Stochastic Lanczos quadrature: for each Rademacher probe v, Lanczos nodes θ_j and weights τ_j.

    tr f(A) ≈ size · mean over probes of Σ_j τ_j f(θ_j) (Ubaru, Chen & Saad 2017); with f = 1[λ > ε]
    this estimates the rank at ε (:func:`slq_rank`). Nodes are ascending; each probe's weights sum
    to 1.

    >>> a = torch.diag(torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    >>> nodes = slq_nodes(lambda v: a @ v, 4, num_probes=2, num_steps=4)
    >>> [round(float(w.sum()), 12) for _, w in nodes]
    [1.0, 1.0]
    """
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_probes):
        v = _rademacher((size,), generator)
        alphas, betas = lanczos_tridiagonal(matvec, v, num_steps, generator=generator)
        out.append(_quadrature(alphas, betas))
    return out


@renamed_arguments(probes="num_probes", steps="num_steps")
def slq_nodes_batched(
    matmat: MatVec,
    size: int,
    *,
    num_probes: int = 8,
    num_steps: int = 40,
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`slq_nodes` with the probes run side by side: one block product per Lanczos step.

    Each probe keeps its own Lanczos recurrence with full reorthogonalisation against its own basis;
    a probe whose Krylov space becomes invariant (β ≈ 0) stops there (its quadrature is then exact).
    The probes differ from :func:`slq_nodes`'s (one block of random signs instead of one vector at a
    time).

    >>> a = torch.diag(torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    >>> density = slq_nodes_batched(lambda v: a @ v, 4, num_probes=3, num_steps=4)
    >>> round(slq_rank(density, 0.5, 4)[0], 10)
    2.0
    """
    generator = torch.Generator().manual_seed(seed)
    v = _rademacher((size, num_probes), generator)
    q = v / v.norm(dim=0, keepdim=True)
    num_steps = min(num_steps, size)
    basis = torch.zeros(num_steps, size, num_probes, dtype=torch.float64)
    alphas = torch.zeros(num_steps, num_probes, dtype=torch.float64)
    betas = torch.zeros(num_steps, num_probes, dtype=torch.float64)
    length = torch.full((num_probes,), num_steps, dtype=torch.long)
    active = torch.ones(num_probes, dtype=torch.bool)
    scale = torch.zeros(num_probes, dtype=torch.float64)
    for j in range(num_steps):
        basis[j] = q
        w = matmat(q)
        alphas[j] = (q * w).sum(0)
        for _ in range(2):
            w = w - torch.einsum("jnp,jp->np", basis[: j + 1], torch.einsum("jnp,np->jp", basis[: j + 1], w))
        beta = w.norm(dim=0)
        scale = torch.maximum(scale, torch.maximum(alphas[j].abs(), beta))
        broke = active & (beta <= BREAKDOWN * scale.clamp_min(1e-300))
        length[broke] = j + 1
        active &= ~broke
        if j == num_steps - 1 or not bool(active.any()):
            break
        betas[j] = torch.where(active, beta, torch.zeros_like(beta))
        q = torch.where(active[None, :], w / beta.clamp_min(1e-300)[None, :], q)
    out = []
    for p in range(num_probes):
        m = int(length[p])
        out.append(_quadrature(alphas[:m, p], betas[: m - 1, p]))
    return out


def slq_rank(density: list[tuple[Tensor, Tensor]], threshold: float, size: int) -> tuple[float, float]:
    """The number of eigenvalues above ``threshold`` from an SLQ density: (mean, standard error).

    Each probe gives size · Σ_j τ_j 1[θ_j > threshold]; the standard error is NaN for one probe.

    >>> density = [(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))]
    >>> slq_rank(density, 0.5, 10)[0]
    5.0
    """
    per_probe = torch.tensor(
        [float((w * (v > threshold)).sum()) * size for v, w in density], dtype=torch.float64
    )
    stderr = float(per_probe.std() / math.sqrt(len(per_probe))) if len(per_probe) > 1 else float("nan")
    return float(per_probe.mean()), stderr


@renamed_arguments(probes="num_probes")
def hutchinson_trace(
    quadratic_form: Callable[[Tensor], Any],
    size: int,
    *,
    num_probes: int = 16,
    seed: int = 0,
    batched: bool = False,
    block_size: int = 16,
) -> tuple[float, float]:
    """Hutchinson's estimate of tr A = E[vᵀAv] (Rademacher v): (mean, standard error).

    ``quadratic_form(v)`` takes one vector ``(size,)`` and returns vᵀAv, or with ``batched`` a block
    ``(size, b)`` and returns the b values. For a diagonal A every probe gives the trace exactly.

    >>> d = torch.arange(5, dtype=torch.float64)
    >>> hutchinson_trace(lambda v: float((d * v * v).sum()), 5, num_probes=4)
    (10.0, 0.0)
    """
    generator = torch.Generator().manual_seed(seed)
    vectors = _rademacher((size, num_probes), generator)
    if batched:
        t = torch.cat(
            [
                torch.as_tensor(quadratic_form(vectors[:, i : i + block_size]), dtype=torch.float64)
                for i in range(0, num_probes, block_size)
            ]
        )
    else:
        t = torch.tensor(
            [float(quadratic_form(vectors[:, i])) for i in range(num_probes)], dtype=torch.float64
        )
    values = t.tolist()
    stderr = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(t.mean()), stderr
