"""λ̂ and N_eff(ε) of models: Hessian bounds on a trained MLP, linear models against Aoyagi's formulas,
the ε → nβ search, the volume method, sweeps and step-size calibration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from degeneracy.llc import (
    EffectiveParameterCount,
    LLCCurve,
    calibrate_step_size,
    effective_parameter_count,
    estimate_llc,
    llc_curve,
    sample_sgld,
    theory,
    volume_llc,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _behavioral_hessian_spectrum(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending) of the Hessian of L_B at θ*: (2/n) Jᵀ J with J the per-example output
    Jacobian (METHOD §6), computed with torch.func.jacrev, independently of the sampler."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    rows = x.shape[0] * model(x).shape[-1]
    j = torch.cat([jac[k].reshape(rows, -1) for k in params], dim=1)
    return torch.linalg.eigvalsh(2.0 / x.shape[0] * j.T @ j).flip(0)


def _trained_tiny_mlp(seed: int = 1) -> tuple[nn.Module, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(4, 3, generator=g, dtype=F64)
    y = torch.randint(0, 2, (4,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x


def test_trained_mlp_lies_between_the_hessian_bounds() -> None:
    """r/2 ≤ λ ≤ r/2 + (N − r)/4 with r the rank of the behavioral Hessian (METHOD §7).

    Tolerance: three standard errors of λ̂ on each side. Here the 4 × 2 outputs give r = 8 of N = 50,
    and the 42 other directions are exactly flat (the fibre of θ ↦ f_θ(X) is a manifold), so λ = r/2:
    the lower bound is attained and only the tolerance separates λ̂ from it."""
    model, x = _trained_tiny_mlp()
    spectrum = _behavioral_hessian_spectrum(model, x)
    n_params = spectrum.numel()
    rank = int((spectrum > 1e-10 * spectrum[0]).sum())
    assert (n_params, rank) == (50, 8)
    smallest = float(spectrum[rank - 1])
    gamma = 1.0
    nbeta = 100.0 * gamma / smallest  # every nonzero direction is resolved: nβ h ≥ 100 γ
    r = estimate_llc(
        model, x, nbeta=nbeta, localization=gamma, num_chains=64, num_draws=2000, num_burnin=2000, seed=0
    )
    assert not r.excluded_chains and not r.warnings
    tol = 3 * r.stderr
    assert rank / 2 - tol <= r.mean <= rank / 2 + (n_params - rank) / 4 + tol
    assert r.stderr < 0.05 * rank / 2
    # the automatic step size came from the same top eigenvalue
    assert r.config["max_curvature"] == pytest.approx(float(spectrum[0]), rel=1e-2)


def _linear_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    return model, x


def test_effective_parameter_count_of_a_regular_model() -> None:
    """A linear layer is regular: the behavioral loss is a full-rank quadratic, N_eff(ε) = N = 8 at every
    ε; the nβ search must land within a factor 1.25 of each requested ε."""
    model, x = _linear_model()
    eps = [1e-2, 1e-4]
    result = effective_parameter_count(
        model, x, eps, localization=0.0, num_chains=16, num_draws=1500, num_burnin=300, seed=0
    )
    assert isinstance(result, EffectiveParameterCount)
    torch.testing.assert_close(result.n_eff, torch.full((2,), 8.0, dtype=F64), rtol=0.05, atol=0)
    assert torch.all((result.achieved_epsilons / result.epsilons).log().abs() <= math.log(1.25))
    assert torch.all(result.n_eff_std > 0)
    assert result.num_parameters == 8 and result.method == "sgld"
    assert result.nbetas[1] > result.nbetas[0]


def test_effective_parameter_count_volume_method_matches_closed_form(tmp_path) -> None:
    """f(x) = b · a · x at θ* = (a, b) = 0: L_B = c (ab)² with c = E[x²], a cross-shaped zero set;
    λ(ε) = cross_llc(ε / c) exactly (box [−1, 1]²), so N_eff(ε) = 2 λ(ε) → 1 slowly."""

    class Product(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(1, 1, bias=False)
            self.b = nn.Linear(1, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Product().double()
    with torch.no_grad():
        model.a.weight.zero_()
        model.b.weight.zero_()
    x = torch.randn(32, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    c = float(x.square().mean())
    eps = [1e-8, 1e-5, 1e-3]
    result = effective_parameter_count(
        model, x, eps, method="volume", volume_kwargs={"num_points": 2000, "num_repeats": 4, "seed": 0}
    )
    exact = torch.tensor([2 * theory.cross_llc(e / c) for e in eps], dtype=F64)
    torch.testing.assert_close(result.n_eff, exact, atol=0.1, rtol=0)
    assert result.method == "volume" and math.isnan(float(result.nbetas[0]))
    back = EffectiveParameterCount.load(result.save(tmp_path / "neff.safetensors"))
    torch.testing.assert_close(back.n_eff, result.n_eff)
    assert back.method == "volume"


def test_llc_curve_over_temperatures_and_io(tmp_path) -> None:
    model, x = _linear_model()
    curve = llc_curve(
        model, x, nbetas=[30.0, 100.0, 300.0], localization=0.0, num_chains=16, num_draws=1500, num_burnin=300
    )
    torch.testing.assert_close(curve.llc, torch.full((3,), 4.0, dtype=F64), rtol=0.05, atol=0)
    torch.testing.assert_close(curve.n_eff, 2 * curve.llc)
    assert torch.all(curve.epsilons[1:] < curve.epsilons[:-1])
    # quadratic: λ̂ constant in nβ and λ̂_var = λ̂, so both sides of dλ̂/dlog nβ = λ̂ − λ̂_var vanish
    assert curve.consistency_residual.abs().max() < 0.4
    back = LLCCurve.load(curve.save(tmp_path / "curve.safetensors"))
    torch.testing.assert_close(back.llc, curve.llc)
    torch.testing.assert_close(back.consistency_residual, curve.consistency_residual)


def test_step_size_calibration_flags_unstable_steps() -> None:
    model, x = _linear_model()
    cal = calibrate_step_size(
        model,
        x,
        step_sizes=[1e-4, 1e-3, 0.5],
        nbeta=100.0,
        localization=0.0,
        num_chains=8,
        num_draws=600,
        num_burnin=200,
    )
    table = cal.table()
    assert [row["step_size"] for row in table] == [1e-4, 1e-3, 0.5]
    assert table[-1]["verdict"] != "ok"  # far beyond 4 / (nβ h_max): diverged or flagged
    assert cal.recommended in (1e-4, 1e-3)


def _rrr_at_rank(widths: tuple[int, int, int], rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """θ* = (A, B) with both factors of rank ``rank`` (the most singular points of the true set)."""
    m, h, n = widths
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(h, rank, generator=g, dtype=F64) @ torch.randn(rank, m, generator=g, dtype=F64) / m**0.5
    b = torch.randn(n, rank, generator=g, dtype=F64) @ torch.randn(rank, h, generator=g, dtype=F64) / h**0.5
    return {"A": a, "B": b}


def _rrr_loss(center: dict[str, torch.Tensor]):
    target = center["B"] @ center["A"]

    def loss(p: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
        # population behavioral loss for x ~ N(0, I): E ‖(BA − B*A*) x‖² = ‖BA − B*A*‖²_F
        return (p["B"] @ p["A"] - target).square().sum()

    return loss


def test_reduced_rank_regression_against_aoyagi() -> None:
    """SGLD on reduced-rank regression (M, H, N) = (5, 3, 5) at true rank 1: λ = 8 (Aoyagi & Watanabe
    2005). Tolerance 10 % at nβ/γ² = 100 (the finite-temperature estimate approaches λ from below)."""
    center = _rrr_at_rank((5, 3, 5), 1)
    r = sample_sgld(
        _rrr_loss(center),
        center,
        nbeta=100.0,
        localization=1.0,
        num_chains=32,
        num_draws=8000,
        num_burnin=2000,
        seed=0,
    )
    expected = theory.rrr_llc(5, 3, 5, 1)
    assert expected == 8.0
    assert r.mean == pytest.approx(expected, rel=0.10)


@pytest.mark.slow
def test_reduced_rank_regression_at_the_origin_against_aoyagi() -> None:
    """(M, H, N, r) = (5, 3, 5, 0) → λ = 6.5 (the METHOD number), θ* = 0, nβ/γ² = 100, within 10 %."""
    center = {"A": torch.zeros(3, 5, dtype=F64), "B": torch.zeros(5, 3, dtype=F64)}
    r = sample_sgld(
        _rrr_loss(center),
        center,
        nbeta=100.0,
        localization=1.0,
        step_size=1e-4,
        num_chains=16,
        num_draws=20000,
        num_burnin=4000,
        seed=0,
    )
    assert r.mean == pytest.approx(6.5, rel=0.10)


def _deep_linear_loss(widths: list[int]):
    shapes = [(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]
    sizes = [a * b for a, b in shapes]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        product = parts[0].view(shapes[0])
        for part, shape in zip(parts[1:], shapes[1:], strict=True):
            product = part.view(shape) @ product
        return product.square().sum()  # ‖W_L ⋯ W_1‖²_F: true map 0 (rank 0)

    return loss, sum(sizes)


@pytest.mark.slow
@pytest.mark.parametrize("widths", [[2, 2, 2], [2, 2, 2, 2]])
def test_linear_networks_at_the_origin_by_volume_against_aoyagi(widths: list[int]) -> None:
    """Reduced-rank regression (2, 2, 2) and the deep linear network (2, 2, 2, 2) at r = 0 both have
    λ = 3/2 (Aoyagi); the volume estimator's multiplicity fit must agree within 10 %."""
    loss, dim = _deep_linear_loss(widths)
    eps = torch.logspace(-14, -2, 25, dtype=F64)
    r = volume_llc(
        loss,
        torch.zeros(dim, dtype=F64),
        epsilons=eps,
        num_points=2000,
        num_repeats=4,
        seed=0,
        fit_range=(1e-14, 1e-6),
    )
    expected = theory.deep_linear_llc(widths, 0)
    assert expected == 1.5
    assert r.fit["llc"] == pytest.approx(expected, rel=0.10)
    # the local slopes approach λ from below (log corrections), never exceed it by much
    assert float(r.llc[:10].max()) < expected * 1.05


def test_bundled_digits_mlp_estimate() -> None:
    from degeneracy.models import digits_dataset, load_digits_mlp

    model = load_digits_mlp()
    x = digits_dataset()[0]
    r = estimate_llc(model, x, num_chains=2, num_draws=100, num_burnin=50, batch_size=64, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    assert r.config["engine"] == "batched" and r.num_parameters == n_params
    assert 0 < r.mean < n_params / 2
    assert r.loss_traces.dtype == F64
    kl = estimate_llc(model, x, loss="kl", num_chains=2, num_draws=50, num_burnin=20, batch_size=64, seed=0)
    assert kl.config["loss"] == "behavioral-kl" and math.isfinite(kl.mean)
