"""The result of one LLC estimate: the number, its error bar, the chains behind it and their health."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from degeneracy.deprecation import renamed_arguments, renamed_fields
from degeneracy.display import html_summary
from degeneracy.fingerprint import check_model
from degeneracy.llc.diagnostics import (
    DIVERGENCE_FACTOR,
    batch_means_stderr,
    chain_llc,
    chain_llc_variance,
    drift_flagged,
    effective_sample_size,
    find_bad_chains,
    split_rhat,
    stationarity_drift,
    step_size_stability,
)
from degeneracy.llc.record import TensorRecord
from degeneracy.llc.sgld import ChainRun, SGLDConfig

__all__ = ["LLCResult", "EffectiveCount", "Summary", "summarize_chains", "load_llc", "checked_against"]


class Summary(str):
    """Text that a REPL or notebook shows as is (its repr is itself).

    >>> Summary("λ̂ 1.0")
    λ̂ 1.0
    """

    def __repr__(self) -> str:
        return str(self)


def _version() -> str:
    from degeneracy import __version__

    return __version__


class EffectiveCount:
    """N_eff = 2 λ (paper eq 9) and its error bar, for a result whose λ and spread are the fields
    named by ``LLC_FIELDS`` (default ``llc`` and ``llc_std``: the λ(ε) curves).

    >>> from degeneracy.llc import LLCCurve
    >>> curve = LLCCurve(*(torch.tensor([0.5, 1.5], dtype=torch.float64) for _ in range(6)))
    >>> curve.n_eff.tolist(), curve.n_eff_std.tolist()
    ([1.0, 3.0], [1.0, 3.0])
    """

    LLC_FIELDS: ClassVar[tuple[str, str]] = ("llc", "llc_std")

    @property
    def n_eff(self) -> Tensor | float:
        """Effective parameter count N_eff = 2 λ (paper eq 9)."""
        return 2.0 * getattr(self, self.LLC_FIELDS[0])

    @property
    def n_eff_std(self) -> Tensor | float:
        """The error bar of N_eff: twice the spread of λ."""
        return 2.0 * getattr(self, self.LLC_FIELDS[1])


@renamed_fields(num_params="num_parameters")
@dataclass(frozen=True)
class LLCResult(EffectiveCount, TensorRecord):
    """An estimate λ̂ of the local learning coefficient (METHOD §7) and everything behind it.

    Attributes:
        mean: λ̂, the mean of the per-chain estimates over the good chains.
        std: the standard deviation of the per-chain estimates over the good chains (the error bar;
            NaN with fewer than two good chains).
        chain_estimates: λ̂_c = nβ (mean_t L_c(t) − L*) for every chain, excluded ones included.
        variance_estimates: λ̂_var,c = (nβ)² Var_t L_c(t) for every chain.
        loss_traces: the sampled losses, ``(chains, draws)``, float64.
        burnin_traces: the losses during burn-in, ``(chains, burn-in steps)``.
        init_loss: L* = L(θ*) (0 for the behavioral loss).
        nbeta: the inverse temperature nβ.
        num_parameters: P, the number of sampled parameters (``num_params`` is its former, deprecated
            name, as an attribute and a constructor keyword; files saved under it load).
        excluded_chains: chain index → reason, for chains left out of ``mean`` and ``std``.
        config: the sampler settings and what was sampled (JSON-serialisable).
        seconds: wall time of the SGLD loop.
        warnings: what the diagnostics found (step size, stationarity, negative estimates...).
        version: the library version that produced it.

    >>> import os, tempfile, torch
    >>> from degeneracy.llc import sample_sgld
    >>> r = sample_sgld(lambda w, _: w.square().sum(), torch.zeros(1, dtype=torch.float64), nbeta=100.0,
    ...                 step_size=1e-3, num_chains=2, num_draws=20, warn=False)
    >>> r.num_good_chains, r.n_eff == 2 * r.mean, r.epsilon == r.mean / 100.0
    (2, True, True)
    >>> path = r.save(os.path.join(tempfile.mkdtemp(), "llc.safetensors"))
    >>> load_llc(path).mean == r.mean
    True
    """

    KIND: ClassVar[str] = "degeneracy.LLCResult"
    LLC_FIELDS: ClassVar[tuple[str, str]] = ("mean", "std")
    REQUIRED: ClassVar[tuple[str, ...]] = ("loss_traces", "chain_estimates")

    mean: float
    std: float
    chain_estimates: Float[Tensor, " chains"]
    variance_estimates: Float[Tensor, " chains"]
    loss_traces: Float[Tensor, "chains draws"]
    burnin_traces: Float[Tensor, "chains burnin"]
    init_loss: float
    nbeta: float
    num_parameters: int
    excluded_chains: dict[int, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = math.nan
    warnings: tuple[str, ...] = ()
    version: str = ""

    @property
    def good_chains(self) -> Tensor:
        """Boolean mask of the chains averaged into ``mean``."""
        mask = torch.ones(self.chain_estimates.shape[0], dtype=torch.bool)
        for c in self.excluded_chains:
            mask[c] = False
        return mask

    @property
    def num_good_chains(self) -> int:
        """How many chains are averaged into ``mean``."""
        return int(self.good_chains.sum())

    @property
    def stderr(self) -> float:
        """Standard error of ``mean``: ``std / sqrt(good chains)``."""
        n = self.num_good_chains
        return self.std / math.sqrt(n) if n > 0 else math.nan

    @property
    def variance_estimate(self) -> float:
        """Mean of λ̂_var over the good chains."""
        good = self.variance_estimates[self.good_chains]
        return float(good.mean()) if good.numel() else math.nan

    @property
    def epsilon(self) -> float:
        """The loss scale this estimate probes: ε = λ̂ / nβ = E[L] − L* (METHOD §7)."""
        return self.mean / self.nbeta

    @property
    def draws_per_second(self) -> float:
        """Recorded draws of all chains per second of the sampling loop (burn-in time included)."""
        draws = self.loss_traces.shape[0] * self.loss_traces.shape[1]
        return draws / self.seconds if self.seconds > 0 else math.nan

    @property
    def mcse(self) -> float:
        """Monte Carlo standard error of ``mean`` from the draws: batch means within each good chain
        (:func:`~degeneracy.llc.diagnostics.batch_means_stderr`), combined over chains. Unlike
        :attr:`stderr` it is sharp with few chains."""
        good = self.good_chains
        n = int(good.sum())
        if n == 0:
            return math.nan
        per_chain = batch_means_stderr(self.loss_traces[good], self.nbeta)
        return float(per_chain.square().sum().sqrt()) / n

    @property
    def chain_ess(self) -> Tensor:
        """Effective sample size of every chain's mean (batch means), excluded chains included."""
        return effective_sample_size(self.loss_traces)

    @property
    def ess(self) -> float:
        """Effective sample size of ``mean``: the sum of the good chains' effective sample sizes."""
        return float(self.chain_ess[self.good_chains].sum())

    @property
    def rhat(self) -> float:
        """Split-R̂ of the good chains' losses (≈ 1 when they sample one distribution)."""
        return split_rhat(self.loss_traces[self.good_chains])

    @property
    def drift(self) -> tuple[float, float]:
        """(drift, its standard error): nβ × (mean of the last third − mean of the first third of the
        draws), good chains, in units of λ (:func:`~degeneracy.llc.diagnostics.stationarity_drift`)."""
        return stationarity_drift(self.loss_traces[self.good_chains], self.init_loss, self.nbeta)

    def summary(self) -> Summary:
        """The estimate and its diagnostics as text (printed as is in a REPL or notebook).

        >>> import torch
        >>> from degeneracy.llc import sample_sgld
        >>> r = sample_sgld(lambda w, _: w.square().sum(), torch.zeros(1, dtype=torch.float64), nbeta=100.0,
        ...                 step_size=1e-2, num_chains=2, num_draws=400, warn=False)
        >>> print(r.summary().splitlines()[0])
        LLC estimate λ̂ (loss=lambda, sampler=sgld)
        """
        drift, drift_se = self.drift
        chains = self.chain_estimates.shape[0]
        draws = self.loss_traces.shape[1]
        cfg = self.config
        sampler = cfg.get("sampler", "sgld")
        if cfg.get("preconditioner"):
            sampler += f" + {cfg['preconditioner']}"
        head = f"loss={cfg.get('loss', '?')}, sampler={sampler}"
        if "engine" in cfg:
            head += f", engine={cfg['engine']}"
        lines = [
            f"LLC estimate λ̂ ({head})",
            f"  λ̂        {self.mean:.6g} ± {self.mcse:.2g} (batch-means s.e.); spread over chains "
            f"{self.std:.3g} (s.e. {self.stderr:.2g})",
            f"  N_eff    {self.n_eff:.6g}   nβ {self.nbeta:.6g}   ε = λ̂/nβ {self.epsilon:.3g}   "
            f"L(θ*) {self.init_loss:.6g}   P {self.num_parameters}",
            f"  chains   {self.num_good_chains} of {chains} used × {draws} draws; ESS {self.ess:.0f}; "
            f"R̂ {self.rhat:.3f}",
            f"  drift    {drift:+.3g} ± {drift_se:.2g} (last − first third of the draws, units of λ)",
            f"  speed    {self.draws_per_second:.0f} draws/s ({self.seconds:.3g} s)",
            "  chain    λ̂_c       ESS     note",
        ]
        ess = self.chain_ess
        for c in range(chains):
            note = self.excluded_chains.get(c, "")
            lines.append(f"  {c:<8d} {float(self.chain_estimates[c]):<9.4g} {float(ess[c]):<7.0f} {note}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return Summary("\n".join(lines))

    def __repr__(self) -> str:
        bad = f", {len(self.excluded_chains)} chain(s) excluded" if self.excluded_chains else ""
        loss = f"loss={self.config['loss']}, " if "loss" in self.config else ""
        return (
            f"LLCResult({loss}λ̂={self.mean:.4g} ± {self.std:.2g}, N_eff={self.n_eff:.4g}, "
            f"nβ={self.nbeta:.4g}, "
            f"ε={self.epsilon:.3g}, chains={self.chain_estimates.shape[0]}, draws={self.loss_traces.shape[1]}"
            f"{bad}, warnings={len(self.warnings)})"
        )

    def _repr_html_(self) -> str:
        """The estimate, its spread, N_eff, nβ, ε and the per-chain estimates as an HTML table."""
        facts: list[tuple[str, Any]] = [
            ("λ̂ (mean over good chains)", self.mean),
            ("std over chains", self.std),
            ("N_eff = 2 λ̂", float(self.n_eff)),
            ("nβ", self.nbeta),
            ("ε = λ̂ / nβ", self.epsilon),
            ("parameters P", self.num_parameters),
            ("draws per chain", int(self.loss_traces.shape[1])),
            ("warnings", len(self.warnings)),
        ]
        estimates = self.chain_estimates.tolist()
        rows = [[c, float(est), self.excluded_chains.get(c, "")] for c, est in enumerate(estimates)]
        return html_summary("LLCResult", facts, ["chain", "λ̂_c", "excluded because"], rows)


def load_llc(
    path: str | Path, model: nn.Module | None = None, *, allow_other_model: bool = False
) -> LLCResult:
    """An :class:`LLCResult` saved with :meth:`LLCResult.save` (the file's kind is checked).

    With ``model``, the estimate must have been made on it (the model fingerprint in its ``config``):
    one made on another model raises :class:`~degeneracy.fingerprint.ModelMismatchError` unless
    ``allow_other_model=True`` (a warning); a file without a fingerprint loads with a warning.
    See :class:`LLCResult` for an example.

    >>> import os, tempfile, torch
    >>> traces = torch.zeros(1, 2, dtype=torch.float64)
    >>> estimates = torch.full((1,), 0.5, dtype=torch.float64)
    >>> r = LLCResult(0.5, float("nan"), estimates, torch.zeros(1), traces, traces[:, :0], 0.0, 10.0, 1)
    >>> load_llc(r.save(os.path.join(tempfile.mkdtemp(), "llc.safetensors"))).mean
    0.5
    """
    return checked_against(LLCResult.load(path), model, "LLC estimate", allow_other_model)


def checked_against(result: Any, model: nn.Module | None, what: str, allow_other_model: bool) -> Any:
    """``result`` after :func:`degeneracy.fingerprint.check_model` against ``model`` (nothing without one).

    >>> import types
    >>> checked_against(types.SimpleNamespace(config={}), None, "LLC estimate", False).config
    {}
    """
    if model is not None:
        check_model(result, model, what=what, allow_other_model=allow_other_model)
    return result


@renamed_arguments(num_params="num_parameters")
def summarize_chains(
    run: ChainRun,
    init_loss: float,
    config: SGLDConfig,
    num_parameters: int,
    extra_config: dict[str, Any] | None = None,
    curvature: float | None = None,
    divergence_factor: float = DIVERGENCE_FACTOR,
) -> LLCResult:
    """Turn raw chains into an :class:`LLCResult`: per-chain estimates, exclusions and warnings
    (``num_parameters``: P, the number of sampled parameters; ``num_params=`` is its former name).

    >>> import torch
    >>> from degeneracy.llc.sgld import ChainRun, SGLDConfig
    >>> run = ChainRun(torch.full((2, 4), 0.01, dtype=torch.float64), torch.zeros(2, 0),
    ...                torch.zeros(2, 1), seconds=1.0)
    >>> summarize_chains(run, 0.0, SGLDConfig(nbeta=50.0, localization=0.0, step_size=1e-3), 1).mean
    0.5
    """
    traces = run.loss_traces.detach().to(device="cpu", dtype=torch.float64)
    burnin = run.burnin_traces.detach().to(device="cpu", dtype=torch.float64)
    nbeta = float(config.nbeta)
    estimates = chain_llc(traces, init_loss, nbeta)
    variances = chain_llc_variance(traces, nbeta)
    excluded = find_bad_chains(
        traces, run.final_params, init_loss, nbeta, num_parameters, divergence_factor, burnin_traces=burnin
    )
    good = torch.ones(traces.shape[0], dtype=torch.bool)
    for c in excluded:
        good[c] = False
    good_estimates = estimates[good]
    notes: list[str] = []
    if excluded:
        notes.append(
            f"{len(excluded)} of {traces.shape[0]} chains excluded: "
            + "; ".join(f"chain {c}: {why}" for c, why in sorted(excluded.items()))
        )
    if good_estimates.numel() == 0:
        mean, std = math.nan, math.nan
        notes.append("every chain was excluded: no estimate")
    else:
        mean = float(good_estimates.mean())
        std = float(good_estimates.std()) if good_estimates.numel() > 1 else math.nan
        if mean < 0:
            notes.append(
                f"negative estimate λ̂ = {mean:.3g}: the chains found losses below L(θ*), so θ* is not a "
                "local minimum of this loss; use the behavioral loss, or a smaller nβ / larger localization"
            )
        drift, drift_se = stationarity_drift(traces[good], init_loss, nbeta)
        # judged against the draws' own batch-means noise (not only the spread across a few chains)
        flagged = drift_flagged(drift, drift_se, mean)
        if flagged:
            notes.append(
                f"chains are not stationary after burn-in: the excess loss nβ(L − L*) moved by {drift:+.3g} "
                f"± {drift_se:.2g} between the first and last third of the draws (λ̂ = {mean:.3g}, "
                f"{100 * abs(drift) / max(abs(mean), 1e-12):.0f} %); increase num_burnin or "
                "num_draws, or the step size if it is very small"
            )
    if curvature is not None:
        # a preconditioner scales the step by at most max_preconditioner: judge the largest step
        effective = config.step_size * config.max_preconditioner
        warning = step_size_stability(effective, nbeta, config.localization, curvature)
        if warning:
            notes.append(warning)
    cfg = {**config.to_dict(), **(extra_config or {})}
    if curvature is not None:
        cfg["max_curvature"] = curvature
    return LLCResult(
        mean=mean,
        std=std,
        chain_estimates=estimates,
        variance_estimates=variances,
        loss_traces=traces,
        burnin_traces=burnin,
        init_loss=float(init_loss),
        nbeta=nbeta,
        num_parameters=int(num_parameters),
        excluded_chains=excluded,
        config=cfg,
        seconds=float(run.seconds),
        warnings=tuple(notes),
        version=_version(),
    )
