"""Diagnostics of SGLD chains: per-chain estimates, the variance estimator, bad-chain detection,
stationarity and step-size checks (pure functions on loss traces).

Symbols (METHOD §7): traces L_c(t) of chain c at draw t, L* = L(θ*), inverse temperature nβ.

* per-chain estimate λ̂_c = nβ (mean_t L_c(t) − L*);
* variance estimator λ̂_var,c = (nβ)² Var_t L_c(t); at equilibrium d λ̂ / d log nβ = λ̂ − λ̂_var.
  With minibatch losses the minibatch noise inflates the variance, so λ̂_var is exact only for
  full-batch losses.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from degeneracy.deprecation import renamed_arguments

__all__ = [
    "LLCWarning",
    "chain_llc",
    "chain_llc_variance",
    "find_bad_chains",
    "stationarity_drift",
    "t_critical_99",
    "step_size_stability",
    "DIVERGENCE_FACTOR",
]

class LLCWarning(UserWarning):
    """A diagnostic of an LLC estimate (bad chains, step size, stationarity, negative estimates).

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warnings.warn("chains not stationary", LLCWarning)
    >>> caught[0].category.__name__
    'LLCWarning'
    """


DIVERGENCE_FACTOR = 10.0
"""A chain is called diverged when its late excess loss nβ (L − L*) exceeds this many times P/2, the
largest learning coefficient P parameters can have."""


def chain_llc(
    traces: Float[Tensor, "chains draws"], init_loss: float, nbeta: float
) -> Float[Tensor, " chains"]:
    """λ̂_c = nβ (mean over draws of L_c − L*), one estimate per chain.

    >>> import torch
    >>> chain_llc(torch.tensor([[0.01, 0.03]], dtype=torch.float64), 0.0, 50.0).tolist()
    [1.0]
    """
    return nbeta * (traces.mean(dim=1) - init_loss)


def chain_llc_variance(traces: Float[Tensor, "chains draws"], nbeta: float) -> Float[Tensor, " chains"]:
    """λ̂_var,c = (nβ)² Var over draws of L_c (unbiased variance; NaN with a single draw).

    >>> import torch
    >>> chain_llc_variance(torch.tensor([[0.0, 0.02]], dtype=torch.float64), 50.0).tolist()
    [0.5]
    """
    if traces.shape[1] < 2:
        return torch.full(traces.shape[:1], math.nan, dtype=traces.dtype)
    return nbeta**2 * traces.var(dim=1)


@renamed_arguments(num_params="num_parameters")
def find_bad_chains(
    traces: Float[Tensor, "chains draws"],
    final_params: Float[Tensor, "chains P"] | None,
    init_loss: float,
    nbeta: float,
    num_parameters: int,
    divergence_factor: float = DIVERGENCE_FACTOR,
    burnin_traces: Float[Tensor, "chains burnin"] | None = None,
) -> dict[int, str]:
    """Chains that must not be averaged in, with the reason.

    * ``"non-finite"``: a NaN or infinite loss (burn-in included) or final parameter;
    * ``"diverged"``: the mean excess loss nβ (L − L*) over the last quarter of draws exceeds
      ``divergence_factor · max(P/2, 1)`` (P = ``num_parameters``; ``num_params=`` is its former,
      deprecated name). At equilibrium around a minimum the mean excess is λ ≤ P/2,
      so such a chain has left the basin (too large a step size, or a loss unbounded below is not
      the cause: that gives negative values, which are reported as a warning instead).

    >>> import torch
    >>> traces = torch.tensor([[0.01] * 6, [1e3] * 6], dtype=torch.float64)
    >>> sorted(find_bad_chains(traces, torch.zeros(2, 1), 0.0, 50.0, 1))
    [1]
    """
    bad: dict[int, str] = {}
    limit = divergence_factor * max(num_parameters / 2.0, 1.0)
    tail = traces[:, -max(1, traces.shape[1] // 4) :]
    for c in range(traces.shape[0]):
        finite = bool(torch.isfinite(traces[c]).all())
        if burnin_traces is not None and burnin_traces.shape[1] > 0:
            finite = finite and bool(torch.isfinite(burnin_traces[c]).all())
        if final_params is not None:
            finite = finite and bool(torch.isfinite(final_params[c]).all())
        if not finite:
            bad[c] = "non-finite loss or parameters (NaN/inf): lower the step size"
            continue
        late = nbeta * (float(tail[c].mean()) - init_loss)
        if late > limit:
            bad[c] = (
                f"diverged: late excess loss nβ(L − L*) = {late:.4g} exceeds {divergence_factor:g} × P/2 = "
                f"{limit:.4g}; lower the step size"
            )
    return bad


def stationarity_drift(
    traces: Float[Tensor, "chains draws"], init_loss: float, nbeta: float
) -> tuple[float, float]:
    """Drift of the chains after burn-in, in units of λ: mean over chains of
    nβ (mean of the last third − mean of the first third of draws), and its standard error over chains
    (NaN with one chain). A drift large compared with λ̂ means the burn-in was too short.

    >>> import torch
    >>> drift, _ = stationarity_drift(torch.full((2, 9), 0.01, dtype=torch.float64), 0.0, 50.0)
    >>> drift
    0.0
    """
    d = traces.shape[1]
    if d < 3:
        return 0.0, math.nan
    third = d // 3
    per_chain = nbeta * (traces[:, -third:].mean(dim=1) - traces[:, :third].mean(dim=1))
    mean = float(per_chain.mean())
    se = float(per_chain.std() / math.sqrt(per_chain.numel())) if per_chain.numel() > 1 else math.nan
    return mean, se


_T99 = (63.66, 9.925, 5.841, 4.604, 4.032, 3.707, 3.499, 3.355, 3.250, 3.169)


def t_critical_99(dof: int) -> float:
    """Two-sided 1 % critical value of Student's t with ``dof`` degrees of freedom (table up to 10,
    then 2.576 + 5.6 / dof, within 1 % of the exact value).

    >>> t_critical_99(1)
    63.66
    """
    if dof < 1:
        return math.inf
    return _T99[dof - 1] if dof <= len(_T99) else 2.576 + 5.6 / dof


def step_size_stability(step_size: float, nbeta: float, localization: float, curvature: float) -> str | None:
    """A warning when η is too large for the stiffest direction of the loss at θ*.

    For a quadratic direction of curvature a = nβ h + γ, SGLD is stable only for η a < 4 and its
    stationary variance is 1 / (a (1 − η a / 4)): the direction's contribution to λ̂ is inflated by
    that factor. We warn from η a > 0.5 (a 14 % inflation in the stiffest direction).

    >>> step_size_stability(1e-4, 100.0, 0.0, 1.0) is None, step_size_stability(0.1, 100.0, 0.0, 1.0) is None
    (True, False)
    """
    a = nbeta * curvature + localization
    stiffness = step_size * a
    if not math.isfinite(stiffness):
        return "the Hessian at θ* is not finite: the loss cannot be sampled there"
    if stiffness >= 4.0:
        return (
            f"step size {step_size:.3g} is unstable: η (nβ h_max + γ) = {stiffness:.3g} ≥ 4 in the stiffest "
            f"direction (h_max = {curvature:.3g}); use step_size ≤ {0.1 / a:.3g}"
        )
    if stiffness > 0.5:
        return (
            f"step size {step_size:.3g} is large: η (nβ h_max + γ) = {stiffness:.3g} > 0.5 inflates the "
            f"stiffest direction's variance by {100 * (1 / (1 - stiffness / 4) - 1):.0f} %; "
            f"consider step_size ≤ {0.1 / a:.3g}"
        )
    return None
