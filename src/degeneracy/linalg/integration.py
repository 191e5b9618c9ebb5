"""Integration rules on [0, 1] for integrated gradients (METHOD §3): points α with weights summing to one.

>>> integration_rule("gauss-legendre", 1).weights
(0.5, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IntegrationRule", "integration_rule", "INTEGRATION_RULES", "homogeneous_rule"]


@dataclass(frozen=True)
class IntegrationRule:
    """Points α_a ∈ [0, 1] and weights w_a (summing to 1) of an integration rule (METHOD §3).

    >>> rule = integration_rule("trapezoid", 2)
    >>> rule.points, sum(rule.weights)
    ((0.0, 0.5, 1.0), 1.0)
    """

    name: str
    points: tuple[float, ...]
    weights: tuple[float, ...]


INTEGRATION_RULES = ("gradient", "trapezoid", "gauss-legendre")


def integration_rule(name: str, n: int = 1) -> IntegrationRule:
    """The named rule: "gradient" (α = 1), "trapezoid" (n intervals), "gauss-legendre" (n + 1 nodes).

    >>> integration_rule("trapezoid", 2).weights
    (0.25, 0.5, 0.25)
    """
    if name == "gradient":
        return IntegrationRule(name, (1.0,), (1.0,))
    if n < 1:
        raise ValueError(f"integration rule {name!r} needs n >= 1, got {n}")
    if name == "trapezoid":
        points = np.linspace(0.0, 1.0, n + 1)
        weights = np.full(n + 1, 1.0 / n)
        weights[0] = weights[-1] = 0.5 / n
    elif name == "gauss-legendre":
        nodes, w = np.polynomial.legendre.leggauss(n + 1)
        points = 0.5 * (nodes + 1.0)
        weights = 0.5 * w
    else:
        raise ValueError(f"unknown integration rule {name!r}; choose one of {INTEGRATION_RULES}")
    return IntegrationRule(name, tuple(float(p) for p in points), tuple(float(w) for w in weights))


def homogeneous_rule(rule: IntegrationRule) -> IntegrationRule:
    """``rule`` for a positively homogeneous section (the constant-coordinate extension).

    Its Jacobian is the same at every α·f with α > 0, and its value at α = 0 is that limit (F(0) is
    0/0 in float arithmetic): a point at α = 0 is evaluated at α = 1 instead.

    >>> homogeneous_rule(integration_rule("trapezoid", 2)).points
    (1.0, 0.5, 1.0)
    """
    return IntegrationRule(rule.name, tuple(a if a > 0 else 1.0 for a in rule.points), rule.weights)
