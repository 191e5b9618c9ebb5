import numpy as np
import pytest
import torch

from degeneracy.linalg import eigh_descending, integration_rule, truncate, whitening


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
