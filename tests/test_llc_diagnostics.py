"""Diagnostics of SGLD chains with power: batch-means standard errors, ESS, split-R̂ and the drift
warning (issue 13), against closed forms of AR(1) processes and of SGLD on a quadratic."""

from __future__ import annotations

import math

import pytest
import torch

from degeneracy.llc import LLCWarning, sample_sgld
from degeneracy.llc.diagnostics import (
    batch_means_stderr,
    drift_flagged,
    effective_sample_size,
    split_rhat,
    stationarity_drift,
)

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _ar1(chains: int, draws: int, phi: float, seed: int, variance: float = 1.0) -> torch.Tensor:
    """Stationary AR(1) rows with marginal variance ``variance`` (started in the stationary law)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(chains, draws, generator=g, dtype=F64) * math.sqrt(variance * (1 - phi**2))
    x = torch.empty(chains, draws, dtype=F64)
    x[:, 0] = torch.randn(chains, generator=g, dtype=F64) * math.sqrt(variance)
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x


def test_batch_means_stderr_and_ess_match_the_ar1_closed_form() -> None:
    phi, draws = 0.8, 40_000
    x = _ar1(4, draws, phi, seed=0)
    # Var(mean) → σ²/(1−φ)² / draws with innovation variance σ² = 1 − φ²; ESS = draws (1 − φ)/(1 + φ)
    exact_se = math.sqrt((1 - phi**2) / (1 - phi) ** 2 / draws)
    torch.testing.assert_close(batch_means_stderr(x), torch.full((4,), exact_se, dtype=F64), rtol=0.2, atol=0)
    exact_ess = draws * (1 - phi) / (1 + phi)
    torch.testing.assert_close(
        effective_sample_size(x), torch.full((4,), exact_ess, dtype=F64), rtol=0.25, atol=0
    )


def test_split_rhat_separates_agreeing_from_disagreeing_chains() -> None:
    x = _ar1(4, 2000, 0.5, seed=1)
    assert split_rhat(x) < 1.01
    shifted = x + torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=F64)[:, None]  # one chain 2 σ away
    assert split_rhat(shifted) > 1.2


def test_a_30_percent_drift_is_flagged_and_stationary_chains_are_not() -> None:
    """4 chains × 500 draws of nβ L with λ = 10, AR(1) noise (φ = 0.8) of variance λ: a linear drift of
    30 % of λ between the first and last third is flagged in ≥ 95 % of 40 seeds, stationary chains in
    ≤ 2 of 40; the former 1 % t test across the 4 chains fired in 20 of the 40 (measured)."""
    lam, draws = 10.0, 500
    third = draws // 3
    # a line whose last-third mean minus first-third mean is 0.3 λ
    t = torch.arange(draws, dtype=F64)
    slope = 0.3 * lam / (draws - third)  # last-third mean index − first-third mean index
    line = slope * (t - t.mean())
    fired, false_alarms, old_fired = 0, 0, 0
    for seed in range(40):
        noise = _ar1(4, draws, 0.8, seed=100 + seed, variance=lam)
        drifting = lam + noise + line
        drift, se = stationarity_drift(drifting, 0.0, 1.0)
        assert drift == pytest.approx(
            float((drifting[:, -third:].mean(1) - drifting[:, :third].mean(1)).mean())
        )
        fired += drift_flagged(drift, se, float(drifting.mean()))
        per_chain = drifting[:, -third:].mean(1) - drifting[:, :third].mean(1)
        old_fired += abs(drift) > 5.841 * float(per_chain.std()) / 2  # the former 1 % t test, 3 dof
        stationary = lam + _ar1(4, draws, 0.8, seed=500 + seed, variance=lam)
        false_alarms += drift_flagged(*stationarity_drift(stationary, 0.0, 1.0), float(stationary.mean()))
    assert fired >= 38, (fired, old_fired)
    assert false_alarms <= 2
    assert old_fired < fired  # the power gained


def test_sgld_relaxing_by_30_percent_during_the_draws_warns() -> None:
    """SGLD on L = ½‖w‖² in d = 20 dimensions from θ* with a short burn-in: the exact mean of nβ L at
    step t is (a d / 2) η (1 − r^{2t}) / (1 − r²), r = 1 − aη/2, a = nβ; the settings make its last-third
    mean exceed its first-third mean by ~30 % of λ̂, and the warning fires."""
    d, nbeta, eta, burnin, draws = 20, 10.0, 1.5e-3, 20, 500
    a, r = nbeta, 1 - nbeta * eta / 2
    steps = torch.arange(burnin, burnin + draws, dtype=F64)
    exact = (a * d / 2) * eta * (1 - r ** (2 * steps)) / (1 - r**2)
    third = draws // 3
    exact_drift = float(exact[-third:].mean() - exact[:third].mean())
    assert 0.25 < exact_drift / float(exact.mean()) < 0.35
    with pytest.warns(LLCWarning, match="not stationary"):
        result = sample_sgld(
            lambda w, _: 0.5 * w.square().sum(),
            torch.zeros(d, dtype=F64),
            nbeta=nbeta,
            step_size=eta,
            num_chains=4,
            num_draws=draws,
            num_burnin=burnin,
            seed=0,
        )
    drift, se = result.drift
    assert abs(drift - exact_drift) < 4 * se  # the standard error is honest
    assert abs(drift) > 3 * se


def test_summary_reports_every_diagnostic() -> None:
    result = sample_sgld(
        lambda w, _: 0.5 * w.square().sum(),
        torch.zeros(4, dtype=F64),
        nbeta=10.0,
        step_size=1e-2,
        num_chains=3,
        num_draws=400,
        num_burnin=200,
        seed=0,
        warn=False,
    )
    text = result.summary()
    assert repr(text) == str(text)  # shown as is in a REPL
    for word in ("λ̂", "batch-means s.e.", "ESS", "R̂", "drift", "N_eff", "draws/s"):
        assert word in text
    assert f"{result.rhat:.3f}" in text and f"{result.ess:.0f}" in text
    assert len(result.chain_ess) == 3 and 0 < result.ess <= 3 * 400
    assert result.mcse > 0 and 0.9 < result.rhat < 1.1
