"""Figures of interaction graphs, ablations and modules (matplotlib, imported inside each function).

* :func:`plot_interaction_graph`: the layered graph as in the companion paper's figure: one column of
  nodes per node layer, nodes coloured by module, edge widths by the cut-off-normalised log strength.
* :func:`plot_node_ablation`: node ablation curves (accuracy and loss against features kept) per
  basis, e.g. LIB vs PCA.
* :func:`plot_edge_ablation`: accuracy against the number of edges kept per layer pair, with the
  bisection answer marked.
* :func:`plot_frequency_modules`: how many features of each module sit at each Fourier frequency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from degeneracy.report.figure import pyplot, save_figure

__all__ = [
    "plot_interaction_graph",
    "plot_node_ablation",
    "plot_edge_ablation",
    "plot_frequency_modules",
]


_pyplot = pyplot


def _save(fig: Any, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=130)


def plot_interaction_graph(
    graph: Any,
    modules: Any,
    path: str | Path,
    *,
    max_edges_per_pair: int = 400,
    title: str | None = None,
    layer_labels: Mapping[str, str] | None = None,
) -> Path:
    """The layered interaction graph: nodes coloured by module, edge width ∝ s = log(E/ε).

    Within a layer, the active nodes (an edge above ε) come first, grouped by module and ordered by
    importance Λ; isolated nodes follow, small and faint.
    The ``max_edges_per_pair`` strongest edges (by s) of each layer pair are drawn, coloured by their
    module when both ends share one, grey otherwise. Constant directions are drawn as grey squares.

    >>> import tempfile, degeneracy
    >>> from degeneracy.modules import find_modules
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["2", "output"], progress=False)
    >>> G = degeneracy.interaction_graph(model, x, B, progress=False)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = plot_interaction_graph(G, find_modules(G, epsilon=1e-3), Path(folder) / "graph.png")
    ...     path.suffix, path.stat().st_size > 0
    ('.png', True)
    """
    from degeneracy.modules import log_strengths

    plt = _pyplot()
    names = graph.names
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(2.6 * len(names) + 1.5, 7.5))
    isolated = set(getattr(modules, "isolated", ()))
    pos: dict[tuple[str, int], tuple[float, float]] = {}
    for x, name in enumerate(names):
        dim = graph.dims[name]
        start = 1 if graph.has_constant else 0
        importance = graph.eigenvalues[name]
        feats = list(range(start, dim))
        feats.sort(
            key=lambda j: ((name, j) in isolated, modules.labels.get((name, j), 10**6), -float(importance[j]))
        )
        active = [j for j in feats if (name, j) not in isolated]
        quiet = [j for j in feats if (name, j) in isolated]
        top = 0.25 if quiet else 0.0  # active nodes use the upper 75 %, isolated ones the lower 20 %
        n = max(1, len(active) + start)
        for rank, j in enumerate(active):
            pos[(name, j)] = (float(x), 1.0 - (1.0 - top) * (rank + start + 0.5) / n)
        for rank, j in enumerate(quiet):
            pos[(name, j)] = (float(x), 0.2 * (1.0 - (rank + 0.5) / len(quiet)))
        if start:
            pos[(name, 0)] = (float(x), 1.0 - (1.0 - top) * 0.5 / n)
    for a, b in graph.pairs:
        eps = modules.epsilon[(a, b)]
        s = log_strengths(graph.edges[(a, b)], eps)
        if graph.has_constant:
            s[:, 0] = 0.0
            s[0, :] = 0.0
        flat = s.flatten()
        k = min(max_edges_per_pair, int((flat > 0).sum()))
        if k == 0:
            continue
        top = torch.topk(flat, k).indices
        smax = float(flat[top[0]])
        for idx in reversed(top.tolist()):
            i, j = divmod(idx, s.shape[1])
            (x0, y0), (x1, y1) = pos[(a, j)], pos[(b, i)]
            ma, mb = modules.labels.get((a, j)), modules.labels.get((b, i))
            colour = cmap(ma % 20) if ma is not None and ma == mb else (0.6, 0.6, 0.6)
            w = float(s[i, j]) / smax
            ax.plot([x0, x1], [y0, y1], color=colour, lw=0.2 + 2.5 * w, alpha=0.15 + 0.6 * w, zorder=1)
    for (name, j), (x, y) in pos.items():
        m = modules.labels.get((name, j))
        if m is None:
            ax.scatter([x], [y], marker="s", s=18, color="0.4", zorder=2)
        elif (name, j) in isolated:  # no edge above ε: drawn small and faint, below the active nodes
            ax.scatter([x], [y], s=5, color=cmap(m % 20), alpha=0.35, linewidths=0, zorder=2)
        else:
            ax.scatter([x], [y], s=16, color=cmap(m % 20), edgecolors="k", linewidths=0.3, zorder=2)
    ax.set_xticks(range(len(names)))
    labels = [(layer_labels or {}).get(n, n) for n in names]
    ax.set_xticklabels(
        [f"{lab}\n({graph.dims[n]})" for lab, n in zip(labels, names, strict=True)], fontsize=8
    )
    ax.set_yticks([])
    ax.set_xlim(-0.4, len(names) - 0.6)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    default = f"{graph.basis_method} interaction graph: {modules.num_modules} modules"
    ax.set_title(title or f"{default}, Q = {modules.modularity:.3f}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_node_ablation(curves: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """``curves[method][layer]`` = :class:`~degeneracy.ablation.NodeAblationCurve`: accuracy (top)
    and loss (bottom) against the number of features kept, one column per layer.

    >>> import tempfile
    >>> from degeneracy.ablation import NodeAblationCurve
    >>> curves = {  # as node_ablation_curve returns them, for a LIB and a PCA basis of layer "fc1"
    ...     "lib": {"fc1": NodeAblationCurve("fc1", "lib", "eigenvalues", 3, [0, 1, 3], [0.5, 0.9, 1.0],
    ...                                      [1.0, 0.2, 0.01], 1.0, 0.01)},
    ...     "pca": {"fc1": NodeAblationCurve("fc1", "pca", "eigenvalues", 3, [0, 1, 3], [0.5, 0.6, 1.0],
    ...                                      [1.0, 0.7, 0.01], 1.0, 0.01)}}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = plot_node_ablation(curves, Path(folder) / "nodes.png")
    ...     path.suffix, path.stat().st_size > 0
    ('.png', True)
    """
    plt = _pyplot()
    methods = list(curves)
    layers = list(next(iter(curves.values())))
    fig, axes = plt.subplots(2, len(layers), figsize=(3.6 * len(layers), 5.6), squeeze=False)
    for col, layer in enumerate(layers):
        for method in methods:
            c = curves[method].get(layer)
            if c is None:
                continue
            axes[0][col].plot(c.num_kept, c.accuracy, ".-", ms=3, label=f"{method} ({c.num_features})")
            axes[1][col].semilogy(c.num_kept, [max(v, 1e-12) for v in c.loss], ".-", ms=3, label=method)
        base = next(iter(curves.values()))[layer]
        axes[0][col].axhline(base.base_accuracy, color="k", lw=0.6, ls=":")
        axes[0][col].set_title(layer, fontsize=9)
        axes[1][col].set_xlabel("features kept (mean-ablating the rest)")
        for row in axes:
            row[col].grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[1][0].set_ylabel("loss")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_edge_ablation(results: Mapping[str, Mapping[tuple[str, str], Any]], path: str | Path) -> Path:
    """``results[method][pair]`` = :class:`~degeneracy.ablation.EdgeAblationResult`: the evaluated
    bisection points (accuracy against edges kept, log scale) with the answer marked.

    >>> import tempfile
    >>> from degeneracy.ablation import EdgeAblationResult
    >>> r = EdgeAblationResult(("1", "2"), "lib", num_edges=4, num_needed=1, threshold=0.5, delta=0.1,
    ...                        base_accuracy=1.0, target=0.9, evaluations={0: 0.5, 1: 0.95, 4: 1.0},
    ...                        losses={0: 1.0, 1: 0.1, 4: 0.0})
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = plot_edge_ablation({"lib": {("1", "2"): r}}, Path(folder) / "edges.png")
    ...     path.suffix, path.stat().st_size > 0
    ('.png', True)
    """
    plt = _pyplot()
    methods = list(results)
    pairs = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.8 * len(pairs), 3.3), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        for k, method in enumerate(methods):
            r = results[method].get(pair)
            if r is None:
                continue
            ns = [max(n, 0.8) for n in r.evaluations]
            line = ax.semilogx(ns, list(r.evaluations.values()), "o", ms=3, label=f"{method}: {r.num_needed}")
            ax.axvline(max(r.num_needed, 0.8), color=line[0].get_color(), lw=0.8, ls="--")
            if k == 0:
                ax.axhline(r.target, color="k", lw=0.6, ls=":")
        ax.set_title(f"{pair[0]} → {pair[1]}", fontsize=9)
        ax.set_xlabel("edges kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="edges needed", title_fontsize=8)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    return _save(fig, path)


def plot_frequency_modules(rows: Sequence[Any], path: str | Path, *, title: str | None = None) -> Path:
    """Heat map: features of each module (rows) at each Fourier frequency (columns).

    >>> import tempfile
    >>> from degeneracy.fourier import FrequencyModuleRow
    >>> rows = [FrequencyModuleRow(0, {"mlp": 2}, {3: 2}, 3, 1.0),  # module 0: two features at k = 3
    ...         FrequencyModuleRow(1, {"mlp": 3}, {1: 2, 5: 1}, 1, 2 / 3)]
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = plot_frequency_modules(rows, Path(folder) / "frequencies.png")
    ...     path.suffix, path.stat().st_size > 0
    ('.png', True)
    """
    plt = _pyplot()
    freqs = sorted({k for r in rows for k in r.frequencies})
    mat = torch.zeros(len(rows), max(1, len(freqs)))
    for a, r in enumerate(rows):
        for k, count in r.frequencies.items():
            mat[a, freqs.index(k)] = count
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * max(1, len(freqs)), 1.0 + 0.35 * max(1, len(rows))))
    ax.imshow(mat.numpy(), cmap="Blues", aspect="auto")
    for a in range(mat.shape[0]):
        for b in range(mat.shape[1]):
            if mat[a, b] > 0:
                ax.text(b, a, int(mat[a, b]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(freqs)))
    ax.set_xticklabels([str(k) for k in freqs], fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"module {r.module}" for r in rows], fontsize=8)
    ax.set_xlabel("dominant Fourier frequency k")
    ax.set_title(title or "features per module and frequency", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
