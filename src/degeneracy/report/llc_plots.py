"""Figures of LLC estimates: SGLD loss traces and λ(ε) / N_eff(ε) curves.

They take result objects only (:class:`~degeneracy.llc.LLCResult`, :class:`~degeneracy.llc.LLCCurve`,
:class:`~degeneracy.llc.EffectiveParameterCount`, :class:`~degeneracy.llc.VolumeResult`); matplotlib is
imported inside the functions, so importing this module does not need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from degeneracy.report.figure import pyplot, save_figure

__all__ = ["plot_loss_traces", "plot_llc_curve"]


def _figure(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = pyplot().subplots(figsize=figsize)
    return fig, ax


def _finish(fig: Any, path: str | Path | None) -> Any:
    if path is not None:
        save_figure(fig, path, close=False, bbox_inches="tight")
    return fig


def plot_loss_traces(
    result: Any, path: str | Path | None = None, ax: Any = None, title: str | None = None
) -> Any:
    """Excess loss nβ (L − L*) of every chain against the SGLD step, burn-in included (shaded).

    At equilibrium the traces fluctuate around λ̂ (dashed line); excluded chains are drawn dotted, in
    grey. Returns the matplotlib figure (saved to ``path`` when given).

    >>> import tempfile
    >>> from degeneracy.llc import sample_sgld
    >>> result = sample_sgld(lambda w, _: w.square().sum(), torch.zeros(1, dtype=torch.float64), nbeta=100.0,
    ...                      step_size=1e-3, num_chains=2, num_draws=20, warn=False)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     fig = plot_loss_traces(result, Path(folder) / "traces.png")
    ...     (Path(folder) / "traces.png").stat().st_size > 0, len(fig.axes[0].get_lines())  # 2 chains + λ̂
    (True, 3)
    >>> pyplot().close(fig)
    """
    fig, ax = _figure(ax, (7.0, 3.6))
    nbeta, init = result.nbeta, result.init_loss
    burn = result.burnin_traces.shape[1]
    thinning = int(result.config.get("thinning", 1))
    draws = result.loss_traces.shape[1]
    for c in range(result.loss_traces.shape[0]):
        excluded = c in result.excluded_chains
        style: dict[str, Any] = {"lw": 0.8, "alpha": 0.9}
        if excluded:
            style.update(color="0.6", ls=":", label=f"chain {c} (excluded)")
        elif c < 10:
            style["label"] = f"chain {c}"
        if burn:
            (line,) = ax.plot(
                range(burn), (nbeta * (result.burnin_traces[c] - init)).numpy(), **{**style, "label": None}
            )
            style.setdefault("color", line.get_color())  # a chain keeps its colour after the burn-in
        steps = [burn + i * thinning for i in range(draws)]
        ax.plot(steps, (nbeta * (result.loss_traces[c] - init)).numpy(), **style)
    if burn:
        ax.axvspan(0, burn, color="0.9", zorder=0, label="burn-in")
    ax.axhline(result.mean, color="k", ls="--", lw=1.0, label=f"λ̂ = {result.mean:.3g} ± {result.std:.2g}")
    ax.set_xlabel("SGLD step")
    ax.set_ylabel("nβ (L − L*)")
    ax.set_title(title or f"SGLD loss traces (nβ = {nbeta:.3g}, ε = {result.epsilon:.3g})")
    ax.legend(fontsize=7, ncol=2, loc="best")
    return _finish(fig, path)


def _curve_arrays(curve: Any, n_eff: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(ε, value, error) of any curve-like result."""
    scale = 2.0 if n_eff else 1.0
    if hasattr(curve, "achieved_epsilons"):  # EffectiveParameterCount
        value = curve.n_eff if n_eff else curve.llc
        err = curve.n_eff_std if n_eff else curve.n_eff_std / 2.0
        return curve.achieved_epsilons, value, err, f"{curve.method}"
    if hasattr(curve, "log_volume"):  # VolumeResult
        return curve.epsilons, scale * curve.llc, scale * curve.llc_std, "volume"
    return curve.epsilons, scale * curve.llc, scale * curve.llc_std, "SGLD"  # LLCCurve


def plot_llc_curve(
    curves: Any,
    path: str | Path | None = None,
    ax: Any = None,
    n_eff: bool = True,
    references: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Any:
    """N_eff(ε) = 2 λ(ε) (or λ(ε) with ``n_eff=False``) against the loss scale ε, with error bars.

    Args:
        curves: one result or a ``{label: result}`` mapping of LLCCurve / EffectiveParameterCount /
            VolumeResult objects.
        references: horizontal lines, e.g. ``{"N (parameters)": 3466, "Hessian rank": 1200}``.

    Returns the matplotlib figure (saved to ``path`` when given).

    >>> import tempfile
    >>> from degeneracy.llc import sgld_llc_curve
    >>> curve = sgld_llc_curve(lambda w, _: w.square().sum(), torch.zeros(1, dtype=torch.float64),
    ...                        nbetas=[10.0, 100.0], num_chains=2, num_draws=20, warn=False)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     fig = plot_llc_curve({"quadratic": curve}, Path(folder) / "curve.png", references={"N": 1.0})
    ...     (Path(folder) / "curve.png").stat().st_size > 0, fig.axes[0].get_xscale()
    (True, 'log')
    >>> pyplot().close(fig)
    """
    fig, ax = _figure(ax, (6.0, 4.0))
    items = curves.items() if isinstance(curves, Mapping) else [(None, curves)]
    for label, curve in items:
        eps, value, err, kind = _curve_arrays(curve, n_eff)
        order = torch.argsort(eps)
        err = torch.nan_to_num(err[order], nan=0.0)
        ax.errorbar(
            eps[order].numpy(),
            value[order].numpy(),
            yerr=err.numpy(),
            marker="o",
            ms=4,
            capsize=3,
            label=label or kind,
        )
    for name, level in (references or {}).items():
        ax.axhline(level, ls=":", lw=1.0, color="0.4")
        ax.annotate(
            name, (1.0, level), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7
        )
    ax.set_xscale("log")
    ax.set_xlabel("loss scale ε")
    ax.set_ylabel("N_eff(ε) = 2 λ(ε)" if n_eff else "λ(ε)")
    ax.set_title(title or ("effective parameter count" if n_eff else "learning coefficient"))
    ax.legend(fontsize=8)
    return _finish(fig, path)
