"""Closed forms of learning coefficients, the oracles the estimators are checked against (METHOD §7).

* separable monomials L = Σ_i c_i |w_i|^{p_i}: λ = Σ_i 1/p_i at every loss scale;
* L = c² w² + w⁴ (paper §2.2.2): λ(ε) = ε d/dε log V(ε) crosses from 1/4 (ε ≫ c⁴) to 1/2 (ε ≪ c⁴);
* L = w1² w2² on the box [−R, R]² (paper Fig. 1): λ(ε) = 1/2 − 1/(2 + log(R⁴/ε)) → 1/2, multiplicity 2;
* reduced-rank regression (Aoyagi & Watanabe 2005) and deep linear networks (Aoyagi 2024).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = [
    "monomial_llc",
    "quadratic_quartic_log_volume",
    "quadratic_quartic_llc",
    "cross_log_volume",
    "cross_llc",
    "rrr_llc",
    "deep_linear_llc",
]


def monomial_llc(powers: Sequence[float]) -> float:
    """λ of L = Σ_i c_i |w_i|^{p_i} (any c_i > 0): Σ_i 1 / p_i.

    >>> monomial_llc([2, 4])
    0.75
    """
    if any(p <= 0 for p in powers):
        raise ValueError(f"powers must be positive, got {list(powers)}")
    return float(sum(1.0 / p for p in powers))


def _quartic_root_sq(epsilon: float, c: float) -> float:
    """w(ε)² solving c² w² + w⁴ = ε: (−c² + sqrt(c⁴ + 4ε)) / 2, computed without cancellation."""
    c2 = c * c
    return 2.0 * epsilon / (c2 + math.sqrt(c2 * c2 + 4.0 * epsilon))


def quadratic_quartic_log_volume(epsilon: float, c: float) -> float:
    """log V(ε) for L = c² w² + w⁴ on the real line: V = 2 w(ε).

    >>> round(quadratic_quartic_log_volume(1e-4, 1.0), 3)
    -3.912
    """
    return math.log(2.0) + 0.5 * math.log(_quartic_root_sq(epsilon, c))


def quadratic_quartic_llc(epsilon: float, c: float) -> float:
    """λ(ε) = ε d/dε log V for L = c² w² + w⁴: ε / (2 w² sqrt(c⁴ + 4ε)); 1/4 for ε ≫ c⁴, 1/2 for ε ≪ c⁴.

    >>> round(quadratic_quartic_llc(1e-8, 1.0), 3), round(quadratic_quartic_llc(1e8, 1.0), 3)
    (0.5, 0.25)
    """
    w2 = _quartic_root_sq(epsilon, c)
    return epsilon / (2.0 * w2 * math.sqrt(c**4 + 4.0 * epsilon))


def cross_log_volume(epsilon: float, radius: float = 1.0) -> float:
    """log V(ε) for L = w1² w2² on the box [−R, R]²: with s = sqrt(ε) ≤ R², the area of
    {|w1 w2| < s} is V = 4 s (1 + log(R² / s)).

    >>> round(cross_log_volume(1e-4), 3)
    -1.495
    """
    if epsilon >= radius**4:
        return math.log(4.0 * radius**2)
    s = math.sqrt(epsilon)
    return math.log(4.0 * s * (1.0 + math.log(radius**2 / s)))


def cross_llc(epsilon: float, radius: float = 1.0) -> float:
    """λ(ε) for L = w1² w2² on [−R, R]²: 1/2 − 1/(2 + log(R⁴/ε)) (→ 1/2 slowly: multiplicity 2).

    >>> round(cross_llc(1e-4), 4)
    0.4108
    """
    if epsilon >= radius**4:
        return 0.0
    return 0.5 - 1.0 / (2.0 + math.log(radius**4 / epsilon))


def rrr_llc(input_dim: int, hidden_dim: int, output_dim: int, rank: int) -> float:
    """λ of reduced-rank regression x ↦ B A x (A: H × M, B: N × H) at a true map of rank r
    (Aoyagi & Watanabe 2005, "Stochastic complexities of reduced rank regression in Bayesian
    estimation", Main Theorem), with M = input_dim, H = hidden_dim, N = output_dim.

    >>> rrr_llc(5, 3, 5, 0)
    6.5
    """
    m, h, n, r = input_dim, hidden_dim, output_dim, rank
    if min(m, h, n) < 1 or not 0 <= r <= min(m, h, n):
        raise ValueError(f"need positive dimensions and 0 <= rank <= min(M, H, N); got {(m, h, n, r)}")
    if n + r <= m + h and m + r <= n + h and h + r <= m + n:
        numerator = 2 * (h + r) * (m + n) - (m - n) ** 2 - (h + r) ** 2
        if (m + h + n + r) % 2 == 1:
            numerator += 1
        return numerator / 8.0
    if m + h < n + r:
        return (h * m - h * r + n * r) / 2.0
    if n + h < m + r:
        return (h * n - h * r + m * r) / 2.0
    return m * n / 2.0  # m + n < h + r


def deep_linear_llc(widths: Sequence[int], rank: int) -> float:
    """λ of a deep linear network x ↦ W_L ⋯ W_1 x with layer widths ``widths`` = (H_1 = input, H_2, …,
    H_{L+1} = output) at a true map of rank r (Aoyagi 2024, "Consideration on the learning efficiency
    of multiple-layered neural networks with linear units", Theorem 1).

    With M_i = H_i − r, take the subset Σ of indices, |Σ| = ℓ + 1 (ℓ ≥ 1), with
    max_{Σ} M < min_{not Σ} M,  Σ_{Σ} M ≥ ℓ max_{Σ} M  and  Σ_{Σ} M < ℓ min_{not Σ} M; then with
    M̄ = ⌈Σ_{Σ} M / ℓ⌉ − 1 and a = Σ_{Σ} M − ℓ M̄,

        λ = (−r² + r (H_1 + H_{L+1})) / 2 + a (ℓ − a) / (4ℓ) − ℓ(ℓ − 1)/4 · (Σ_{Σ} M / ℓ)²
            + 1/2 Σ_{i<j in Σ} M_i M_j.

    For two layers this equals :func:`rrr_llc` (checked in the tests).

    >>> deep_linear_llc([5, 3, 5], 0)
    6.5
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"need at least two positive widths (input, ..., output), got {widths}")
    if not 0 <= rank <= min(widths):
        raise ValueError(f"rank must lie in [0, min(widths)] = [0, {min(widths)}], got {rank}")
    ms = [w - rank for w in widths]
    chosen: tuple[int, ...] | None = None
    for size in range(2, len(ms) + 1):
        for subset in itertools.combinations(range(len(ms)), size):
            inside = [ms[i] for i in subset]
            outside = [ms[i] for i in range(len(ms)) if i not in subset]
            ell, total = size - 1, sum(inside)
            if outside and not max(inside) < min(outside):
                continue
            if not total >= ell * max(inside):
                continue
            if outside and not total < ell * min(outside):
                continue
            chosen = subset
            break
        if chosen is not None:
            break
    if chosen is None:  # pragma: no cover - the theorem guarantees a subset
        raise RuntimeError(f"no admissible index subset for widths {widths}, rank {rank}")
    inside = [ms[i] for i in chosen]
    ell, total = len(inside) - 1, sum(inside)
    m_bar = math.ceil(total / ell) - 1
    a = total - ell * m_bar
    pairs = sum(inside[i] * inside[j] for i in range(len(inside)) for j in range(i + 1, len(inside)))
    return (
        (-(rank**2) + rank * (widths[0] + widths[-1])) / 2.0
        + a * (ell - a) / (4.0 * ell)
        - ell * (ell - 1) / 4.0 * (total / ell) ** 2
        + pairs / 2.0
    )
