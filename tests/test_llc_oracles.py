"""SGLD and volume estimates against problems whose learning coefficient is known (METHOD §7).

Tolerances are stated per test; seeds are fixed. Step sizes are chosen so that η times the curvature at
the posterior's typical scale is about 0.02–0.05 (discretisation bias ≲ 1 %).
"""

from __future__ import annotations

import math

import pytest
import torch

from degeneracy.llc import sample_sgld, sgld_llc_curve, theory, volume_llc

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _tempered_llc_1d(loss, nbeta: float, half_width: float, points: int = 400_001) -> float:
    """nβ E[L] under exp(−nβ L(w)) on the real line, by quadrature (the exact target of SGLD, γ = 0)."""
    w = torch.linspace(-half_width, half_width, points, dtype=F64)
    values = loss(w)
    weights = torch.exp(-nbeta * (values - values.min()))
    return float(nbeta * (values * weights).sum() / weights.sum())


@pytest.mark.parametrize(
    ("coefficients", "powers", "nbeta", "step_size"),
    [
        # mixed powers, coefficients balanced so that every coordinate has scale ~1 at nβ = 100
        ((0.01, 0.005, 0.005), (1.0, 2.0, 4.0), 100.0, 1e-2),
        ((1e-3, 1e-3, 1e-3), (2.0, 2.0, 3.0), 1e3, 1e-2),
        # one law at two temperatures 10^4 apart, η following the posterior scale (nβ c)^(-1/p)
        ((1.0, 1.0), (4.0, 4.0), 1e2, 5e-3 / 1e2**0.5),
        ((1.0, 1.0), (4.0, 4.0), 1e6, 5e-3 / 1e6**0.5),
        ((1.0, 2.0), (1.0, 1.0), 10.0, 1e-2 / 10.0**2),
    ],
)
def test_separable_monomials_give_sum_of_inverse_powers(coefficients, powers, nbeta, step_size) -> None:
    c, p = torch.tensor(coefficients, dtype=F64), torch.tensor(powers, dtype=F64)

    def loss(w: torch.Tensor, batch: object) -> torch.Tensor:
        return (c * w.abs() ** p).sum()

    result = sample_sgld(
        loss,
        torch.zeros(len(powers), dtype=F64),
        nbeta=nbeta,
        step_size=step_size,
        num_chains=256,
        num_draws=3000,
        num_burnin=500,
        seed=0,
    )
    expected = theory.monomial_llc(powers)
    assert not result.excluded_chains
    assert result.mean == pytest.approx(expected, rel=0.05)  # stated tolerance: 5 %
    assert result.stderr < 0.025 * expected
    # nβ L_i is Gamma(1/p_i, 1) distributed, so (nβ)² Var(L) = Σ 1/p_i too (it converges more slowly)
    assert result.variance_estimate == pytest.approx(expected, rel=0.2)


def test_quadratic_plus_quartic_crosses_from_quarter_to_half() -> None:
    """L = c² w² + w⁴, c = 0.01: λ ≈ 1/4 at large ε, 1/2 at small ε (paper §2.2.2), and SGLD matches the
    exact tempered expectation nβ E[L] (quadrature) within 5 % at each temperature."""
    c = 0.01

    def loss(w: torch.Tensor, batch: object = None) -> torch.Tensor:
        return (c**2 * w**2 + w**4).sum()

    # (nβ, η, quadrature half-width); ε = λ/nβ spans 2.5e-4 (quartic) .. 5e-13 (quadratic)
    settings = [(1e3, 5e-4, 2.0), (3e7, 2e-6, 0.2), (1e12, 2e-10, 1e-3)]
    estimates, exact = [], []
    for nbeta, eta, half_width in settings:
        r = sample_sgld(
            loss,
            torch.zeros(1, dtype=F64),
            nbeta=nbeta,
            step_size=eta,
            num_chains=64,
            num_draws=3000,
            num_burnin=500,
            seed=1,
        )
        estimates.append(r.mean)
        exact.append(_tempered_llc_1d(lambda w: c**2 * w**2 + w**4, nbeta, half_width))
        assert r.mean == pytest.approx(exact[-1], rel=0.05)
    assert exact[0] == pytest.approx(0.25, rel=0.02)
    assert exact[-1] == pytest.approx(0.5, rel=0.01)
    assert estimates[0] == pytest.approx(0.25, rel=0.05)
    assert estimates[-1] == pytest.approx(0.5, rel=0.05)
    assert estimates[0] < estimates[1] < estimates[2]  # monotone crossover


def test_rank_r_quadratic_gives_half_rank() -> None:
    g = torch.Generator().manual_seed(0)
    d, rank = 10, 4
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q[:, :rank]
    hessian = basis @ torch.diag(torch.linspace(1.0, 3.0, rank, dtype=F64)) @ basis.T

    def loss(w: torch.Tensor, batch: object) -> torch.Tensor:
        return 0.5 * w @ hessian @ w

    # γ = 0: the d − r flat directions wander freely without changing L
    r = sample_sgld(
        loss,
        torch.zeros(d, dtype=F64),
        nbeta=100.0,
        localization=0.0,
        step_size="auto",
        num_chains=32,
        num_draws=3000,
        num_burnin=300,
        seed=0,
    )
    assert r.mean == pytest.approx(rank / 2, rel=0.05)
    assert r.config["max_curvature"] == pytest.approx(3.0, rel=1e-2)  # power iteration found h_max


def test_variance_identity_along_a_temperature_sweep() -> None:
    """dλ̂/d log nβ = λ̂ − λ̂_var (METHOD §7) on L = w² + w⁴, whose λ̂(nβ) moves from 1/4 to 1/2."""

    def loss(w: torch.Tensor, batch: object) -> torch.Tensor:
        return (w**2 + w**4).sum()

    nbetas = [0.3, 1.0, 3.0, 10.0, 30.0]
    curve = sgld_llc_curve(
        loss,
        torch.zeros(1, dtype=F64),
        nbetas=nbetas,
        step_size=lambda nb: 0.02 / (2 * nb + 12 * nb**0.5),
        num_chains=64,
        num_draws=3000,
        num_burnin=500,
        seed=0,
    )
    exact = torch.tensor([_tempered_llc_1d(lambda w: w**2 + w**4, nb, 8.0) for nb in nbetas], dtype=F64)
    torch.testing.assert_close(curve.llc, exact, rtol=0.05, atol=0.0)
    # the exact log-derivative of the tempered expectation, by quadrature
    h = 1e-3
    exact_slope = torch.tensor(
        [
            (
                _tempered_llc_1d(lambda w: w**2 + w**4, nb * math.exp(h), 8.0)
                - _tempered_llc_1d(lambda w: w**2 + w**4, nb * math.exp(-h), 8.0)
            )
            / (2 * h)
            for nb in nbetas
        ],
        dtype=F64,
    )
    inner = slice(1, -1)
    assert exact_slope[inner].min() > 0.025  # the identity is not a trivial 0 = 0 on this sweep
    # right-hand side λ̂ − λ̂_var and left-hand side (finite differences of λ̂) against the exact slope
    assert ((curve.llc - curve.llc_var)[inner] - exact_slope[inner]).abs().max() < 0.015
    assert (curve.slope[inner] - exact_slope[inner]).abs().max() < 0.015
    assert curve.consistency_residual[inner].abs().max() < 0.03
    assert torch.all(curve.epsilons[1:] < curve.epsilons[:-1])  # larger nβ probes smaller ε
    torch.testing.assert_close(curve.epsilons, curve.llc / curve.nbetas)


def test_volume_estimator_cross_loss_tends_to_half() -> None:
    """L = w1² w2² on [−1, 1]²: λ(ε) = 1/2 − 1/(2 + log 1/ε) → 1/2 with multiplicity 2 (paper Fig. 1)."""

    def loss(w: torch.Tensor) -> torch.Tensor:
        return w[0] ** 2 * w[1] ** 2

    eps = torch.logspace(-12, -3, 19, dtype=F64)
    r = volume_llc(
        loss,
        torch.zeros(2, dtype=F64),
        epsilons=eps,
        num_points=4000,
        num_repeats=4,
        seed=0,
        fit_range=(1e-12, 1e-4),
    )
    exact_llc = torch.tensor([theory.cross_llc(float(e)) for e in eps], dtype=F64)
    exact_logv = torch.tensor([theory.cross_log_volume(float(e)) for e in eps], dtype=F64)
    # V(ε) itself, down to a volume fraction of 1e-5 of the box
    assert (r.log_volume - exact_logv).abs().max() < 0.1
    # the local slope against its closed form (the finite-difference window adds < 0.005 here)
    assert (r.llc - exact_llc).abs().max() < 0.04
    # extrapolated λ and multiplicity from the fit of log V = λ log ε + (m − 1) log log(1/ε)
    assert r.fit["llc"] == pytest.approx(0.5, rel=0.05)
    assert r.fit["multiplicity"] == pytest.approx(2.0, abs=0.5)
    assert r.n_eff[0] == pytest.approx(2 * r.llc[0])


def test_volume_estimator_sees_the_quadratic_quartic_crossover() -> None:
    c = 0.01

    def loss(w: torch.Tensor) -> torch.Tensor:
        return c**2 * w[0] ** 2 + w[0] ** 4

    eps = torch.logspace(-14, -2, 13, dtype=F64)
    r = volume_llc(loss, torch.zeros(1, dtype=F64), epsilons=eps, num_points=2000, num_repeats=4, seed=0)
    h = math.sqrt(r.config["slope_window"])
    exact = torch.tensor(
        [
            (
                theory.quadratic_quartic_log_volume(float(e) * h, c)
                - theory.quadratic_quartic_log_volume(float(e) / h, c)
            )
            / (2 * math.log(h))
            for e in eps
        ],
        dtype=F64,
    )
    assert (r.llc - exact).abs().max() < 0.04
    assert r.llc[:3].mean() == pytest.approx(0.5, abs=0.02)  # ε ≤ 1e-12: quadratic
    assert r.llc[-4:].mean() == pytest.approx(0.25, abs=0.02)  # ε ≥ 1e-5: quartic


def test_volume_estimator_regular_quadratic_and_guards() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, generator=g, dtype=F64) + 0.5

    def batched(points: torch.Tensor) -> torch.Tensor:
        return (a * points**2).sum(dim=1)

    r = volume_llc(batched, torch.zeros(3, dtype=F64), epsilons=[1e-6, 1e-4, 1e-2], batched=True, seed=0)
    torch.testing.assert_close(r.llc, torch.full((3,), 1.5, dtype=F64), atol=0.06, rtol=0)
    with pytest.raises(ValueError, match="at most"):
        volume_llc(lambda w: w.sum(), torch.zeros(40))
    with pytest.raises(ValueError, match="positive"):
        volume_llc(lambda w: w.square().sum(), torch.zeros(2), epsilons=[0.0, 1.0])
