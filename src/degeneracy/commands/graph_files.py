"""Reading the ``graph`` command's saved JSON results back (ablation curves, edge ablations, modules),
old field names included."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["node_curves_from_json", "edge_result_from_dict", "edge_results_from_json", "modules_from_json"]


def node_curves_from_json(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Node ablation curves (``{layer: NodeAblationCurve}``) from their saved JSON (files written
    before the ``num_*`` names load too: :meth:`~degeneracy.ablation.NodeAblationCurve.from_dict`).

    >>> old = {"layer": "fc1", "basis_method": "lib", "importance": "eigenvalues", "n_features": 3,
    ...        "n_kept": [0, 3], "accuracy": [0.5, 1.0], "loss": [1.0, 0.0], "base_accuracy": 1.0,
    ...        "base_loss": 0.0}
    >>> node_curves_from_json({"fc1": old})["fc1"].num_kept
    [0, 3]
    """
    from degeneracy.ablation import NodeAblationCurve

    return {layer: NodeAblationCurve.from_dict(d) for layer, d in payload.items()}


def edge_result_from_dict(d: Mapping[str, Any]) -> Any:
    """One :class:`~degeneracy.ablation.EdgeAblationResult` from its ``to_dict()`` (old files' ``n_edges``
    and ``n_needed`` load too: :meth:`~degeneracy.ablation.EdgeAblationResult.from_dict`).

    >>> old = {"pair": ["1", "2"], "basis_method": "lib", "n_edges": 4, "n_needed": 1, "threshold": 0.5,
    ...        "delta": 0.1, "base_accuracy": 1.0, "target": 0.9, "evaluations": {"1": 0.95},
    ...        "losses": {"1": 0.1}}
    >>> edge_result_from_dict(old).num_needed
    1
    """
    from degeneracy.ablation import EdgeAblationResult

    return EdgeAblationResult.from_dict(d)


def edge_results_from_json(payload: list[Mapping[str, Any]]) -> dict[tuple[str, str], Any]:
    """Edge-ablation results (``{pair: EdgeAblationResult}``) from their saved JSON list.

    >>> row = {"pair": ["fc1", "fc2"], "basis_method": "lib", "num_edges": 4, "num_needed": 1, "delta": 0.1,
    ...        "threshold": 0.5, "base_accuracy": 1.0, "target": 0.9, "evaluations": {}, "losses": {}}
    >>> {pair: r.num_needed for pair, r in edge_results_from_json([row]).items()}
    {('fc1', 'fc2'): 1}
    """
    results = [edge_result_from_dict(r) for r in payload]
    return {r.pair: r for r in results}


def modules_from_json(payload: Mapping[str, Any]) -> Any:
    """A :class:`~degeneracy.modules.Modules` from its saved ``to_dict()`` (:meth:`Modules.from_dict`).

    >>> modules_from_json({"modules": [[["fc1", 0]]], "epsilon": {}, "inter_module_strength": 0.0,
    ...                    "intra_module_strength": 0.0, "modularity": 0.0, "resolution": 1.0,
    ...                    "seed": 0}).num_modules
    1
    """
    from degeneracy.modules import Modules

    return Modules.from_dict(payload)
