"""Closed-form learning coefficients (degeneracy.llc.theory) and behavioral losses on tensors."""

from __future__ import annotations

import math

import pytest
import torch

from degeneracy.llc import behavioral_kl, behavioral_loss_from_outputs, behavioral_mse, theory

pytestmark = pytest.mark.usefixtures("one_thread")


def test_method_reference_numbers() -> None:
    # METHOD §7: reduced-rank regression (N, H, M, r) = (5, 3, 5, 0) -> 6.5;
    # deep linear widths (10, 10, 10, 10), r = 0 -> 33.5
    assert theory.rrr_llc(5, 3, 5, 0) == pytest.approx(6.5)
    assert theory.deep_linear_llc([5, 3, 5], 0) == pytest.approx(6.5)
    assert theory.deep_linear_llc([10, 10, 10, 10], 0) == pytest.approx(33.5)


def test_deep_linear_formula_reduces_to_reduced_rank_regression() -> None:
    # Aoyagi 2024 with two layers must equal Aoyagi & Watanabe 2005 in all four of its cases.
    cases = set()
    for m in range(1, 8):
        for h in range(1, 8):
            for n in range(1, 8):
                for r in range(min(m, h, n) + 1):
                    assert theory.deep_linear_llc([m, h, n], r) == pytest.approx(theory.rrr_llc(m, h, n, r))
                    if n + r <= m + h and m + r <= n + h and h + r <= m + n:
                        cases.add(1)
                    elif m + h < n + r:
                        cases.add(2)
                    elif n + h < m + r:
                        cases.add(3)
                    else:
                        cases.add(4)
    assert cases == {1, 2, 3, 4}


def test_linear_formulas_regular_limits() -> None:
    # full rank r = H: the model is regular modulo GL(H): λ = (H (M + N) − H²) / 2
    m, h, n = 6, 3, 4
    assert theory.rrr_llc(m, h, n, h) == pytest.approx((h * (m + n) - h * h) / 2)
    # case 4 (M + N < H + r): a wide hidden layer, λ = M N / 2 as for an unconstrained matrix
    assert theory.rrr_llc(2, 9, 3, 0) == pytest.approx(2 * 3 / 2)
    # huge inner widths: the deep linear network is no more than one matrix (M N / 2 bounds λ)
    assert theory.deep_linear_llc([3, 50, 50, 4], 0) <= 3 * 4 / 2 + 1e-12


def test_monomial_and_crossover_formulas() -> None:
    assert theory.monomial_llc([1, 2, 4]) == pytest.approx(1.75)
    c = 0.01
    assert theory.quadratic_quartic_llc(1e-2, c) == pytest.approx(0.25, abs=1e-3)
    assert theory.quadratic_quartic_llc(1e-16, c) == pytest.approx(0.5, abs=1e-3)
    # λ(ε) is ε d/dε log V: compare with a finite difference of the closed-form log V
    for eps in (1e-12, 1e-9, 1e-8, 1e-6):
        h = 1e-4
        fd = (
            theory.quadratic_quartic_log_volume(eps * (1 + h), c)
            - theory.quadratic_quartic_log_volume(eps * (1 - h), c)
        ) / (math.log1p(h) - math.log1p(-h))
        assert theory.quadratic_quartic_llc(eps, c) == pytest.approx(fd, rel=1e-6)
        fd = (theory.cross_log_volume(eps * (1 + h)) - theory.cross_log_volume(eps * (1 - h))) / (
            math.log1p(h) - math.log1p(-h)
        )
        assert theory.cross_llc(eps) == pytest.approx(fd, rel=1e-6)


def test_cross_volume_matches_monte_carlo() -> None:
    # area of {|w1 w2| < sqrt(eps)} in [-1, 1]^2 by plain Monte Carlo
    g = torch.Generator().manual_seed(0)
    w = 2 * torch.rand(400_000, 2, generator=g, dtype=torch.float64) - 1
    eps = 1e-3
    frac = float(((w[:, 0] * w[:, 1]) ** 2 < eps).double().mean())
    assert math.log(4 * frac) == pytest.approx(theory.cross_log_volume(eps), abs=0.02)


def test_invalid_theory_inputs() -> None:
    with pytest.raises(ValueError):
        theory.rrr_llc(3, 2, 3, 4)
    with pytest.raises(ValueError):
        theory.deep_linear_llc([3], 0)
    with pytest.raises(ValueError):
        theory.monomial_llc([0.0])


def test_behavioral_losses(unchecked) -> None:
    g = torch.Generator().manual_seed(0)
    out = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    ref = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    # METHOD §6 (issue #8 item 2): sum over features AND positions, mean over examples; this was the
    # mean over positions before (expected values here grew by the factor P = 3)
    assert float(behavioral_mse(out, ref)) == pytest.approx(float(((out - ref) ** 2).sum((1, 2)).mean()))
    assert float(behavioral_mse(ref, ref)) == 0.0
    assert float(behavioral_mse(out[:, 0, 0], ref[:, 0, 0])) == pytest.approx(
        float(((out[:, 0, 0] - ref[:, 0, 0]) ** 2).mean())
    )
    kl = behavioral_kl(out, ref)
    p = torch.softmax(ref, -1)
    expected = (p * (p.log() - torch.log_softmax(out, -1))).sum((1, 2)).mean()
    assert float(kl) == pytest.approx(float(expected))
    assert float(behavioral_kl(ref, ref)) == pytest.approx(0.0, abs=1e-15)
    assert float(behavioral_loss_from_outputs(out, ref, "kl")) == pytest.approx(float(kl))
    with unchecked(), pytest.raises(ValueError):
        behavioral_mse(out, ref[:, :2])
    with unchecked(), pytest.raises(ValueError):
        behavioral_loss_from_outputs(out, ref, "l1")  # type: ignore[arg-type]
