"""Jacobian Grams against a direct torch.func.jacrev computation, per example."""

import pytest
import torch
from torch.func import jacrev

from degeneracy.jacobian import jacobian_gram
from degeneracy.linalg import integration_rule


def _section(w1: torch.Tensor, w2: torch.Tensor):
    """A sequence map (batch, 3, 4) -> (batch, 2, 5) mixing positions, with a tanh."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ w1)  # (b, 3, 6)
        mixed = torch.einsum("ts,bsh->bth", w2, h)  # (b, 2, 6)
        return torch.tanh(mixed[..., :5]) * mixed[..., 1:6]

    return fn


def _direct(fn, x, in_map, out_map, rule):
    total = torch.zeros(in_map.shape[1], in_map.shape[1], dtype=torch.float64)
    for b in range(x.shape[0]):
        jint = 0
        for alpha, w in zip(rule.points, rule.weights, strict=True):
            jac = jacrev(lambda xb: fn(xb[None])[0])(alpha * x[b])  # (2, 5, 3, 4)
            jint = jint + w * torch.einsum("io,tosd,da->tisa", out_map, jac, in_map)
        for s in range(x.shape[1]):
            j = jint[:, :, s, :].reshape(-1, in_map.shape[1])
            total += j.T @ j
    return total


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("rule_name,n", [("gradient", 1), ("gauss-legendre", 2), ("trapezoid", 3)])
def test_jacobian_gram_matches_jacrev(mode: str, rule_name: str, n: int) -> None:
    w1 = torch.randn(4, 6, dtype=torch.float64)
    w2 = torch.randn(2, 3, dtype=torch.float64)
    fn = _section(w1, w2)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    in_map = torch.randn(4, 3, dtype=torch.float64)
    out_map = torch.randn(4, 5, dtype=torch.float64)
    rule = integration_rule(rule_name, n)
    got = jacobian_gram(fn, x, in_map, out_map, rule, num_out_positions=2, mode=mode, max_elements=50)
    want = _direct(fn, x, in_map, out_map, rule)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_constant_jacobian_detects_affine_sections() -> None:
    from degeneracy.jacobian import constant_jacobian, gram_of_constant_jacobian

    w = torch.randn(4, 5, dtype=torch.float64)
    mix = torch.randn(2, 3, dtype=torch.float64)
    x = torch.randn(6, 3, 4, dtype=torch.float64)

    def affine(z):
        return torch.einsum("ts,bsd,do->bto", mix, z, w) + 1.0

    j0 = constant_jacobian(affine, x, affine)
    assert j0 is not None
    in_map = torch.randn(4, 3, dtype=torch.float64)
    out_map = torch.randn(4, 5, dtype=torch.float64)
    want = jacobian_gram(affine, x, in_map, out_map, integration_rule("gradient"), num_out_positions=2)
    got = gram_of_constant_jacobian(j0, in_map, out_map, x.shape[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a section that is affine on most of the batch but not everywhere is not taken for affine
    relu = lambda z: torch.relu(affine(z))  # noqa: E731
    assert constant_jacobian(relu, x, relu) is None
