"""Eigenvalue spectra of interaction bases (LIB vs PCA and friends)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from degeneracy.report.figure import pyplot, save_figure

__all__ = ["plot_spectra"]


def plot_spectra(bases: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per node layer: the retained eigenvalues of each basis, normalised to the largest,
    on a log scale (the constant direction, when present, is left out).

    >>> import tempfile, torch, degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> bases = {m: degeneracy.interaction_basis(model, x, ["2", "output"], method=m, progress=False)
    ...          for m in ("lib", "pca")}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = plot_spectra(bases, Path(folder) / "spectra.png")
    ...     path.suffix, path.stat().st_size > 0
    ('.png', True)
    """
    plt = pyplot()
    names = list(dict.fromkeys(n for basis in bases.values() for n in basis.names))  # every basis's layers
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for colour, (method, basis) in enumerate(bases.items()):
            if name not in basis.bases:
                continue
            b = basis[name]
            values = b.eigenvalues[1:] if (b.has_constant and basis.config.center) else b.eigenvalues
            values = values.clamp_min(1e-300)
            ax.semilogy(
                range(1, len(values) + 1),
                (values / values.max()).numpy(),
                ".-",
                ms=3,
                color=f"C{colour}",  # one colour per basis in every panel
                label=f"{method} ({b.dim})",
            )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("direction")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eigenvalue / largest")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
