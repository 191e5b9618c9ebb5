"""The data behind the HTML report's interactive interaction graph (drawn by ``assets/graph.js``).

:func:`graph_payload` turns an :class:`~degeneracy.graph_result.InteractionGraph` (and, when the run
has them, its modules and the Fourier labels of modular addition) into plain JSON: one entry per
feature (layer, index, eigenvalue, module, dominant frequency) and one per nonzero edge (from, to,
strength E). The constant directions are left out, as :func:`degeneracy.find_modules` leaves them out.
The threshold ε of each layer pair is the one the modules were found with, or, without modules,
10⁻³ of the pair's largest edge; the page's slider scales it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["graph_payload", "MAX_EDGES"]

MAX_EDGES = 30_000
"""At most this many edges (the strongest) go into the page; the payload says how many were left out."""


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def graph_payload(
    graph: Any,
    modules: Any | None = None,
    fourier: Mapping[str, Any] | None = None,
    *,
    max_edges: int = MAX_EDGES,
) -> dict[str, Any]:
    """JSON-ready nodes, edges and per-pair ε of ``graph`` for the interactive view.

    Args:
        graph: an :class:`~degeneracy.graph_result.InteractionGraph`.
        modules: its :class:`~degeneracy.modules.Modules` (colours and ε), or None.
        fourier: ``{"layers": {name: {"frequency": [...], "fraction": [...]}}}`` as the graph command
            writes to ``fourier/METHOD.json``, or None.
        max_edges: keep only the strongest this many edges.

    >>> import degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "output"], progress=False)
    >>> data = graph_payload(degeneracy.interaction_graph(model, x, B, progress=False))
    >>> [layer["name"] for layer in data["layers"]], len(data["nodes"]) == sum(B.dims.values()) - 2
    (['1', 'output'], True)
    >>> all(data["nodes"][s]["layer"] == 0 and data["nodes"][t]["layer"] == 1 for s, t, _ in data["edges"])
    True
    """
    names = graph.names
    skip = 1 if graph.has_constant else 0
    labels = modules.labels if modules is not None else {}
    layers_fourier = (fourier or {}).get("layers", {})
    nodes: list[dict[str, Any]] = []
    ids: dict[tuple[str, int], int] = {}
    for k, name in enumerate(names):
        eigenvalues = graph.eigenvalues[name].tolist()
        freq = layers_fourier.get(name, {})
        for i in range(skip, len(eigenvalues)):
            ids[(name, i)] = len(nodes)
            node: dict[str, Any] = {
                "layer": k,
                "index": i,
                "eigenvalue": _round(eigenvalues[i]),
                "module": labels.get((name, i), -1),
            }
            if freq and i < len(freq.get("frequency", [])):
                node["frequency"] = int(freq["frequency"][i])
                node["fraction"] = round(float(freq["fraction"][i]), 4)
            nodes.append(node)
    edges: list[tuple[int, int, float]] = []
    epsilons: list[float] = []
    saved = modules.epsilon if modules is not None else {}
    for a, b in graph.pairs:
        e = graph.edges[(a, b)][skip:, skip:].to(torch.float64)
        top = float(e.max()) if e.numel() else 0.0
        epsilons.append(_round(saved.get((a, b), 1e-3 * top if top > 0 else 1.0)))
        out_idx, in_idx = torch.nonzero(e > 0, as_tuple=True)
        for i, j, value in zip(out_idx.tolist(), in_idx.tolist(), e[out_idx, in_idx].tolist(), strict=True):
            edges.append((ids[(a, j + skip)], ids[(b, i + skip)], _round(value)))
    total = len(edges)
    if total > max_edges:
        edges = sorted(edges, key=lambda edge: -edge[2])[:max_edges]
    return {
        "method": graph.basis_method,
        "layers": [{"name": name, "dim": graph.dims[name] - skip} for name in names],
        "pairs": [f"{a} → {b}" for a, b in graph.pairs],
        "epsilon": epsilons,
        "epsilon_source": "modules" if modules is not None else "1e-3 × largest edge of the pair",
        "nodes": nodes,
        "edges": [list(edge) for edge in edges],
        "edges_left_out": total - len(edges),
        "has_modules": modules is not None,
        "num_modules": modules.num_modules if modules is not None else 0,
        "has_fourier": bool(layers_fourier),
    }
