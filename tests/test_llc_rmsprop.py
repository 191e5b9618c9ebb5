"""RMSprop-preconditioned SGLD (sampler="rmsprop", issue 13): the update by hand, and the quadratic and
monomial oracles (λ = d/2, λ = Σ 1/p_i; METHOD §7)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from degeneracy.llc import LLCResult, estimate_llc, sample_sgld, theory
from degeneracy.llc.sgld import ParamLayout, SGLDConfig, chain_generator, noise_block_steps, run_sgld_chains

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def test_rmsprop_update_matches_hand_computation() -> None:
    # three steps on L(w) = ½ a w² from θ* = 1, one of burn-in: V ← αV + (1−α) g² and G = 1/(√V + ε) while
    # adapting, then G frozen; w ← w − η/2 G (nβ g + γ (w − θ*)) + √(η G) ξ with g = a w
    a, nbeta, gamma, eta, alpha, eps = 3.0, 10.0, 2.0, 1e-2, 0.9, 0.1
    center = torch.tensor([1.0], dtype=F64)

    def chain_loss(views: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
        return 0.5 * a * views["w"].square().sum(1)

    for adapt in ("burnin", "always"):
        config = SGLDConfig(
            nbeta,
            gamma,
            eta,
            num_chains=2,
            num_draws=2,
            num_burnin=1,
            seed=5,
            preconditioner="rmsprop",
            rmsprop_alpha=alpha,
            rmsprop_eps=eps,
            rmsprop_adapt=adapt,
        )
        run = run_sgld_chains(chain_loss, ParamLayout(("w",), ((1,),)), center, iter([None] * 3), config)
        for c in range(2):
            xi = torch.randn((noise_block_steps(1), 1), generator=chain_generator(5, c), dtype=F64)[:, 0]
            w, v, precond = 1.0, 0.0, math.nan
            for t in range(3):
                g = a * w
                if adapt == "always" or t < 1:
                    v = alpha * v + (1 - alpha) * g * g
                    precond = 1.0 / (math.sqrt(v) + eps)
                w = (
                    w
                    - eta / 2 * precond * (nbeta * g + gamma * (w - 1.0))
                    + math.sqrt(eta * precond) * float(xi[t])
                )
            assert float(run.final_params[c]) == pytest.approx(w, abs=1e-13)
    with pytest.raises(ValueError, match="learnt during burn-in"):
        SGLDConfig(nbeta, gamma, eta, num_burnin=0, preconditioner="rmsprop")


def test_rmsprop_on_an_anisotropic_quadratic_gives_half_the_dimension() -> None:
    """L = ½ Σ h_i w_i², curvatures 1 and 30 (two each), γ = 0: λ = d/2 = 2 exactly. Step chosen so that
    η G nβ h ≤ 0.035 in every direction (G ≈ 1/(√(h/nβ) + ε) at equilibrium): bias ≲ 1 %. Adapting G at
    every draw (devinterp's way, α = 0.99) is biased here: G then follows the state it scales."""
    h = torch.tensor([1.0, 1.0, 30.0, 30.0], dtype=F64)

    def sample(num_chains: int, **options: object) -> LLCResult:
        return sample_sgld(
            lambda w, _: 0.5 * (h * w.square()).sum(),
            torch.zeros(4, dtype=F64),
            nbeta=10.0,
            step_size=2e-4,
            num_chains=num_chains,
            num_draws=2000,
            num_burnin=1000,
            seed=0,
            sampler="rmsprop",
            warn=False,
            **options,
        )

    result = sample(32)
    assert result.config["sampler"] == "rmsprop" and result.config["preconditioner"] == "rmsprop"
    assert not result.excluded_chains
    assert result.mean == pytest.approx(2.0, rel=0.05)  # stated tolerance: 5 %
    assert result.mcse < 0.05
    always = sample(16, sampler_options={"adapt": "always"})
    assert always.mean > 2.0 * 1.15  # measured: 2.60 (+30 %)


def test_rmsprop_on_separable_monomials_gives_the_sum_of_inverse_powers() -> None:
    """L = Σ 10⁻³ |w_i|^{p_i}, powers (2, 2, 3) at nβ = 10³ (an oracle of tests/test_llc_oracles.py):
    λ = Σ 1/p_i = 4/3."""
    c, p = torch.full((3,), 1e-3, dtype=F64), torch.tensor([2.0, 2.0, 3.0], dtype=F64)
    result = sample_sgld(
        lambda w, _: (c * w.abs() ** p).sum(),
        torch.zeros(3, dtype=F64),
        nbeta=1e3,
        step_size=1e-3,  # G ≤ 1/ε = 10: effective steps up to 1e-2, the SGLD oracle's step
        num_chains=32,
        num_draws=2000,
        num_burnin=500,
        seed=0,
        sampler="rmsprop",
        warn=False,
    )
    expected = theory.monomial_llc([2.0, 2.0, 3.0])
    assert not result.excluded_chains
    assert result.mean == pytest.approx(expected, rel=0.05)  # stated tolerance: 5 %
    assert result.mcse < 0.025 * expected


def test_rmsprop_on_a_model_auto_step_and_options(unchecked) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(50, 3, dtype=F64)
    kw = dict(loss="behavioral", nbeta=20.0, num_chains=2, num_draws=30, num_burnin=10, warn=False)
    plain = estimate_llc(model, x, **kw)
    pre = estimate_llc(model, x, sampler="rmsprop", sampler_options={"alpha": 0.9, "eps": 0.5}, **kw)
    # "auto" divides the SGLD rule by the largest preconditioner 1/ε
    assert pre.config["step_size"] == pytest.approx(plain.config["step_size"] * 0.5, rel=1e-12)
    assert pre.config["rmsprop_alpha"] == 0.9 and "preconditioner" not in plain.config
    with pytest.raises(ValueError, match="unknown sampler_options"):
        estimate_llc(model, x, sampler="rmsprop", sampler_options={"beta": 0.9}, **kw)
    with pytest.raises(ValueError, match="sampler_options are for sampler='rmsprop'"):
        estimate_llc(model, x, sampler_options={"eps": 0.9}, **kw)
