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
    "drift_flagged",
    "DRIFT_Z",
    "batch_means_stderr",
    "effective_sample_size",
    "split_rhat",
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


def _batch_means_variance(x: Float[Tensor, "chains draws"]) -> Float[Tensor, " chains"]:
    """σ²_BM of each row: the asymptotic variance of its mean (Var(mean) ≈ σ²_BM / draws), from
    ⌊√draws⌋ non-overlapping batches; NaN with fewer than 4 draws."""
    d = x.shape[1]
    b = int(math.isqrt(d))
    if b < 2:
        return torch.full(x.shape[:1], math.nan, dtype=x.dtype)
    m = d // b
    means = x[:, d - b * m :].reshape(x.shape[0], b, m).mean(dim=2)
    return m * means.var(dim=1)


def _detrended(traces: Float[Tensor, "chains draws"]) -> Float[Tensor, "chains draws"]:
    """Each chain minus its least-squares line over the draws (the noise a drift is judged against)."""
    d = traces.shape[1]
    t = torch.arange(d, dtype=traces.dtype) - (d - 1) / 2
    slope = (traces * t).sum(dim=1, keepdim=True) / t.square().sum().clamp_min(1e-300)
    return traces - traces.mean(dim=1, keepdim=True) - slope * t


def batch_means_stderr(traces: Float[Tensor, "chains draws"], nbeta: float = 1.0) -> Float[Tensor, " chains"]:
    """Monte Carlo standard error of each chain's estimate nβ mean_t L_c(t), by batch means over its
    draws (⌊√draws⌋ batches: autocorrelation within a batch is accounted for). NaN with < 4 draws.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> iid = torch.randn(1, 10_000, generator=g, dtype=torch.float64)   # i.i.d.: s.e. = 1/√10⁴
    >>> round(float(batch_means_stderr(iid)[0]), 2)
    0.01
    """
    return nbeta * (_batch_means_variance(traces) / traces.shape[1]).sqrt()


def effective_sample_size(traces: Float[Tensor, "chains draws"]) -> Float[Tensor, " chains"]:
    """Effective sample size of each chain's mean: draws × Var_t / σ²_BM (batch means), at most the
    number of draws.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> iid = torch.randn(2, 2500, generator=g, dtype=torch.float64)
    >>> bool(((effective_sample_size(iid) > 1500) & (effective_sample_size(iid) <= 2500)).all())
    True
    """
    d = traces.shape[1]
    if d < 4:
        return torch.full(traces.shape[:1], math.nan, dtype=traces.dtype)
    ess = d * traces.var(dim=1) / _batch_means_variance(traces).clamp_min(1e-300)
    return ess.clamp(max=float(d))


def split_rhat(traces: Float[Tensor, "chains draws"]) -> float:
    """Split-R̂ (Gelman et al.): each chain cut in halves, between- vs within-half variance of the
    halves; ≈ 1 for chains that sample one distribution, > 1.01 flags disagreement. NaN with < 4 draws.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> round(split_rhat(torch.randn(4, 1000, generator=g, dtype=torch.float64)), 2)
    1.0
    """
    d = traces.shape[1] // 2
    if d < 2 or traces.shape[0] == 0:
        return math.nan
    halves = torch.cat([traces[:, :d], traces[:, -d:]])
    within = float(halves.var(dim=1).mean())
    between = d * float(halves.mean(dim=1).var())
    if within <= 0:
        return math.nan if between <= 0 else math.inf
    return math.sqrt(((d - 1) / d * within + between / d) / within)


def stationarity_drift(
    traces: Float[Tensor, "chains draws"], init_loss: float, nbeta: float
) -> tuple[float, float]:
    """Drift of the chains after burn-in, in units of λ: mean over chains of
    nβ (mean of the last third − mean of the first third of draws), and its standard error from the
    draws themselves: batch means of each chain's detrended trace (so a few chains give a sharp
    test), combined over chains. NaN standard error with fewer than 6 draws.

    >>> import torch
    >>> drift, _ = stationarity_drift(torch.full((2, 9), 0.01, dtype=torch.float64), 0.0, 50.0)
    >>> drift
    0.0
    """
    d = traces.shape[1]
    if traces.shape[0] == 0:
        return math.nan, math.nan
    if d < 3:
        return 0.0, math.nan
    third = d // 3
    per_chain = nbeta * (traces[:, -third:].mean(dim=1) - traces[:, :third].mean(dim=1))
    mean = float(per_chain.mean())
    if d < 6:
        return mean, math.nan
    sigma2 = _batch_means_variance(_detrended(traces))  # asymptotic variance of one draw's mean
    per_chain_var = nbeta**2 * 2 * sigma2 / third
    se = float(per_chain_var.sum().sqrt()) / per_chain.numel()
    return mean, se


DRIFT_Z = 3.0
"""A drift is flagged when it exceeds DRIFT_Z standard errors (and 10 % of λ̂)."""


def drift_flagged(drift: float, drift_se: float, estimate: float) -> bool:
    """Whether a drift (:func:`stationarity_drift`) is significant: above ``DRIFT_Z`` batch-means
    standard errors and above 10 % of max(|λ̂|, 0.5); without a standard error, above 25 %.

    >>> drift_flagged(3.0, 0.5, 10.0), drift_flagged(3.0, 2.0, 10.0), drift_flagged(0.5, 0.01, 10.0)
    (True, False, False)
    """
    scale = max(abs(estimate), 0.5)
    if math.isfinite(drift_se):
        return abs(drift) > DRIFT_Z * drift_se and abs(drift) > 0.1 * scale
    return abs(drift) > 0.25 * scale


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
