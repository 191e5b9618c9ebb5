"""Figures of degeneracy accounting: the Hessian spectrum and the sources of free directions.

Takes result objects only (:class:`~degeneracy.accounting.HessianSpectrum`,
:class:`~degeneracy.accounting.DegeneracyReport`); matplotlib is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from degeneracy.report.figure import pyplot, save_figure

__all__ = ["plot_hessian_spectrum", "plot_sources"]


_pyplot = pyplot


def _save(fig: Any, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=120, close=False)


def plot_hessian_spectrum(
    spectrum: Any,
    path: str | Path,
    *,
    epsilons: list[float] | None = None,
    title: str | None = None,
) -> Path:
    """Eigenvalues of the behavioral-loss Hessian (descending, log scale), with the numerical floor
    and optional ε thresholds drawn as horizontal lines (eigenvalues below a line count as zero).

    For a Lanczos spectrum (top k only) the SLQ density, when present, is shown in a second panel
    as a cumulative count of eigenvalues above λ.

    >>> import tempfile, torch
    >>> from degeneracy.accounting import HessianSpectrum
    >>> values = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)  # e.g. nn.Linear(2, 1) on two inputs
    >>> spectrum = HessianSpectrum(values, 3, "exact", "mse", num_examples=2, floor=1e-12)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = plot_hessian_spectrum(spectrum, Path(folder) / "hessian.png", epsilons=[1e-3])
    ...     path.suffix, path.stat().st_size > 0
    ('.png', True)
    """
    import torch

    plt = _pyplot()
    values = spectrum.eigenvalues.to(torch.float64)
    density = getattr(spectrum, "density", None)
    panels = 2 if density else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    top = float(values.max()) if values.numel() else 1.0
    floor = max(spectrum.floor, top * 1e-30, 1e-300)
    shown = values.clamp_min(floor * 1e-2)  # numerical zeros drawn just below the floor line
    index = torch.arange(1, len(values) + 1)
    above = values > floor
    ax.semilogy(index[above].numpy(), shown[above].numpy(), ".", ms=2, label=f"{spectrum.method} eigenvalues")
    if bool((~above).any()):
        ax.semilogy(index[~above].numpy(), shown[~above].numpy(), ".", ms=2, color="tab:grey", label="zero")
    ax.axhline(floor, color="grey", ls=":", lw=1, label="numerical floor")
    for eps in epsilons or []:
        ax.axhline(eps, color="tab:red", ls="--", lw=1, label=f"ε = {eps:g}")
        try:
            rank = spectrum.rank(eps)
            ax.axvline(rank, color="tab:red", ls=":", lw=0.8)
        except ValueError:
            pass
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("eigenvalue of H")
    n_zero = int((values <= spectrum.floor).sum()) if spectrum.complete else None
    subtitle = f"N = {spectrum.num_parameters}" + (f", {n_zero} zero" if n_zero is not None else "")
    ax.set_title(title or f"Behavioral-loss Hessian ({spectrum.kind}); {subtitle}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if density:
        ax2 = axes[0][1]
        nodes = torch.cat([v for v, _ in density])
        weights = torch.cat([w for _, w in density]) * spectrum.num_parameters / len(density)
        order = torch.argsort(nodes, descending=True)
        cumulative = torch.cumsum(weights[order], 0)
        ax2.semilogx(nodes[order].clamp_min(1e-300).numpy(), cumulative.numpy(), "-", lw=1)
        ax2.set_xlabel("λ")
        ax2.set_ylabel("estimated #eigenvalues ≥ λ (SLQ)")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_sources(report: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Horizontal bars: free directions per (layer, source), with the totals and the Hessian nullity.

    >>> import tempfile
    >>> from degeneracy.accounting import DegeneracyReport, SourceRow
    >>> rows = [SourceRow("fc1", "activation rank", 8), SourceRow("fc1", "jacobian rank", 2, True)]
    >>> report = DegeneracyReport(rows, 20, 20, 0.0, False, "mse", 10)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = plot_sources(report, Path(folder) / "sources.png")
    ...     path.suffix, path.stat().st_size > 0
    ('.png', True)
    """
    plt = _pyplot()
    rows = [r for r in report.rows if r.count != 0]
    labels = [f"{r.layer} · {r.source}" for r in rows]
    counts = [r.count for r in rows]
    colors = [
        "tab:grey"
        if r.generic
        else "tab:orange"
        if r.is_upper_bound
        else "tab:red"
        if r.count < 0
        else "tab:blue"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.6))
    ax.barh(range(len(rows)), counts, color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("free directions")
    summary = f"N = {report.num_parameters}, counted {report.total}"
    if report.union is not None:
        summary += f", distinct {report.union}"
    if report.hessian_nullity is not None:
        summary += f", Hessian nullity {report.hessian_nullity:.0f}"
    ax.set_title(title or f"Sources of free directions (ε = {report.epsilon:g}); {summary}", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
