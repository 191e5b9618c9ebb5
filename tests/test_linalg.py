import numpy as np
import pytest
import torch

from degeneracy.linalg import (
    block_krylov_top,
    eigh_descending,
    hutchinson_trace,
    integration_rule,
    lanczos_top,
    lanczos_tridiagonal,
    psd_eigenvalues,
    rank_at,
    slq_nodes,
    slq_nodes_batched,
    slq_rank,
    tridiagonal,
    truncate,
    whitening,
)


@pytest.mark.parametrize("name,n", [("gradient", 1), ("trapezoid", 4), ("gauss-legendre", 3)])
def test_rules_are_normalised(name: str, n: int) -> None:
    rule = integration_rule(name, n)
    assert sum(rule.weights) == pytest.approx(1.0, abs=1e-14)
    assert all(0.0 <= a <= 1.0 for a in rule.points)


def test_gauss_legendre_integrates_polynomials_exactly() -> None:
    rule = integration_rule("gauss-legendre", 3)  # 4 nodes: exact up to degree 7
    for degree in range(8):
        value = sum(w * a**degree for a, w in zip(rule.points, rule.weights, strict=True))
        assert value == pytest.approx(1.0 / (degree + 1), abs=1e-14)


def test_trapezoid_is_exact_for_linear_and_converges() -> None:
    assert sum(
        w * a
        for a, w in zip(
            *[integration_rule("trapezoid", 3).points, integration_rule("trapezoid", 3).weights], strict=True
        )
    ) == pytest.approx(0.5)
    errors = []
    for n in (4, 8):
        rule = integration_rule("trapezoid", n)
        errors.append(
            abs(sum(w * np.exp(a) for a, w in zip(rule.points, rule.weights, strict=True)) - (np.e - 1))
        )
    assert errors[1] == pytest.approx(errors[0] / 4, rel=0.02)  # second order


def test_unknown_rule() -> None:
    with pytest.raises(ValueError, match="gauss-legendre"):
        integration_rule("simpson", 2)


def test_whitening_and_truncation() -> None:
    a = torch.randn(50, 4, dtype=torch.float64) @ torch.randn(4, 6, dtype=torch.float64)  # rank 4
    gram = a.T @ a / 50
    kept, k = truncate(eigh_descending(gram), 1e-10)
    assert k == 4
    R, Rp = whitening(kept)
    torch.testing.assert_close(R @ gram @ R.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(R @ Rp, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)
    assert truncate(eigh_descending(torch.zeros(3, 3, dtype=torch.float64)), 1e-10)[1] == 0


# --- Krylov methods on planted spectra (closed-form oracles) ----------------------------------------------


def planted_matrix(values: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(values) Qᵀ with a random orthogonal Q (float64): the spectrum is known exactly."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


SPECTRUM = [10.0, 7.0, 5.0, 3.0, 2.0] + [1.0 / (i + 2) for i in range(55)]  # 60 distinct, top gaps ≥ 1


def test_lanczos_top_finds_the_planted_top_eigenvalues() -> None:
    a = planted_matrix(SPECTRUM)
    values, residuals, products = lanczos_top(lambda v: a @ v, 60, 4, tol=1e-10)
    torch.testing.assert_close(values, torch.tensor(SPECTRUM[:4], dtype=torch.float64), rtol=1e-10, atol=0)
    assert bool((residuals <= 1e-10 * 10.0).all()) and products <= 60


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_block_krylov_top_finds_the_planted_top_eigenvalues(block_size: int) -> None:
    a = planted_matrix(SPECTRUM, seed=1)
    values, residuals, products = block_krylov_top(lambda v: a @ v, 60, 5, block_size=block_size, tol=1e-10)
    torch.testing.assert_close(values, torch.tensor(SPECTRUM[:5], dtype=torch.float64), rtol=1e-10, atol=0)
    assert bool((residuals <= 1e-10 * 10.0).all()) and products <= 60


def test_block_krylov_top_of_a_rank_deficient_matrix_returns_zeros_past_the_rank() -> None:
    values = [4.0, 3.0, 2.0] + [0.0] * 27  # rank 3: the Krylov space becomes invariant and is refilled
    a = planted_matrix(values, seed=2)
    top, residuals, _ = block_krylov_top(lambda v: a @ v, 30, 6, block_size=4, tol=1e-10)
    torch.testing.assert_close(
        top[:3], torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64), rtol=1e-10, atol=0
    )
    assert bool((top[3:] <= 1e-10).all())


def test_block_krylov_top_of_a_small_operator_is_its_whole_spectrum() -> None:
    a = planted_matrix([3.0, 2.0, 1.0], seed=3)
    top, residuals, products = block_krylov_top(lambda v: a @ v, 3, 5, block_size=2)
    torch.testing.assert_close(top, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), rtol=1e-12, atol=0)
    assert products == 3


def test_full_lanczos_tridiagonal_has_the_planted_spectrum() -> None:
    a = planted_matrix(SPECTRUM[:20], seed=4)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(20, generator=g, dtype=torch.float64)
    alphas, betas = lanczos_tridiagonal(lambda v: a @ v, start, 20, generator=g)
    t = tridiagonal(alphas, betas)
    assert t.shape == (20, 20) and torch.equal(t, t.T)
    torch.testing.assert_close(
        eigh_descending(t).values, torch.tensor(SPECTRUM[:20], dtype=torch.float64), rtol=1e-10, atol=1e-12
    )


def test_slq_rank_of_a_diagonal_matrix_is_exact() -> None:
    # Rademacher probes have v_i² = 1, so Σ_{θ>ε} τ = |P v|²/|v|² = r/N on every probe
    diag = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0] + [0.0] * 15, dtype=torch.float64)
    for slq in (slq_nodes, slq_nodes_batched):
        density = slq(
            lambda v: diag[:, None] * v if v.dim() == 2 else diag * v, 20, num_probes=4, num_steps=20
        )
        mean, stderr = slq_rank(density, 0.5, 20)
        assert mean == pytest.approx(5.0, abs=1e-10) and stderr == pytest.approx(0.0, abs=1e-10)
        for nodes, weights in density:
            assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
            assert bool((nodes[:-1] <= nodes[1:]).all())  # ascending


@pytest.mark.parametrize("batched", [False, True])
def test_slq_rank_of_a_rank_r_matrix_is_unbiased(batched: bool) -> None:
    a = planted_matrix([3.0, 2.5, 2.0, 1.5, 1.0, 0.5] + [0.0] * 24, seed=5)
    slq = slq_nodes_batched if batched else slq_nodes
    density = slq(lambda v: a @ v, 30, num_probes=64, num_steps=10, seed=1)
    mean, stderr = slq_rank(density, 0.1, 30)
    assert abs(mean - 6.0) <= 4 * stderr and stderr < 1.0


def test_hutchinson_trace_is_exact_for_diagonal_and_unbiased_otherwise() -> None:
    diag = torch.linspace(0.0, 2.0, 25, dtype=torch.float64)
    mean, stderr = hutchinson_trace(lambda v: float((diag * v * v).sum()), 25, num_probes=8)
    assert mean == pytest.approx(float(diag.sum()), abs=1e-12) and stderr == pytest.approx(0.0, abs=1e-12)
    a = planted_matrix(SPECTRUM, seed=6)
    one = hutchinson_trace(lambda v: float(v @ a @ v), 60, num_probes=64, seed=3)
    block = hutchinson_trace(
        lambda v: ((a @ v) * v).sum(0), 60, num_probes=64, seed=3, batched=True, block_size=5
    )
    assert one[0] == pytest.approx(block[0], rel=1e-12) and one[1] == pytest.approx(block[1], rel=1e-9)
    assert abs(one[0] - sum(SPECTRUM)) <= 4 * one[1]


def test_old_probe_keywords_warn() -> None:
    diag = torch.ones(4, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="num_probes"):
        assert hutchinson_trace(lambda v: float((diag * v * v).sum()), 4, probes=2) == (4.0, 0.0)
    with pytest.warns(DeprecationWarning, match="num_steps"):
        assert len(slq_nodes(lambda v: diag * v, 4, probes=2, steps=2)) == 2


def test_psd_eigenvalues_and_rank_at() -> None:
    a = torch.randn(30, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a[:, 2] = 0.0  # a zero row and column of the Gram
    gram = a.T @ a
    values = psd_eigenvalues(gram)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(gram).flip(0).clamp_min(0), rtol=0, atol=1e-12)
    assert values[-1] == 0.0 and rank_at(values, floor=1e-10) == 5
    assert rank_at(values, float(values[0]), relative=True) == 0 and rank_at(torch.zeros(0)) == 0
