"""degeneracy: find the computationally relevant structure of a neural network.

Public API (imported lazily so that ``import degeneracy`` stays light)::

    interaction_basis, load_basis            # bases: LIB, global, PCA, neuron
    interaction_graph, load_graph, sparsity  # integrated-gradient edges
    node_ablation_curves, edge_ablation      # ablations
    find_modules, fourier_labels             # modules on the interaction graph; Fourier labels
    behavioral_loss, hessian_spectrum, hessian_rank, synchronized_blocks, degeneracy_report, sparsify
    load_hessian_spectrum, load_degeneracy_report                   # saved accounting results
    estimate_llc, llc_curve, effective_parameter_count, volume_llc  # learning coefficient, N_eff(eps)
    load_llc, load_llc_curve, load_effective_parameter_count, load_volume
    ModelRun, ParamLayout                    # the run layer (a model on data; flat parameters)

Plotting functions live in one module, :mod:`degeneracy.report`.
"""

from __future__ import annotations

from degeneracy.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "interaction_basis": "degeneracy.basis",
    "load_basis": "degeneracy.basis",
    "Basis": "degeneracy.basis",
    "NodeLayer": "degeneracy.capture",
    "interaction_graph": "degeneracy.edges",
    "load_graph": "degeneracy.edges",
    "sparsity": "degeneracy.edges",
    "node_ablation_curves": "degeneracy.ablation",
    "edge_ablation": "degeneracy.ablation",
    "find_modules": "degeneracy.modules",
    "load_modules": "degeneracy.modules",
    "fourier_labels": "degeneracy.fourier",
    "sparsify": "degeneracy.accounting",
    "behavioral_loss": "degeneracy.accounting",
    "hessian_spectrum": "degeneracy.accounting",
    "hessian_rank": "degeneracy.accounting",
    "load_hessian_spectrum": "degeneracy.accounting",
    "load_degeneracy_report": "degeneracy.accounting",
    "synchronized_blocks": "degeneracy.accounting",
    "degeneracy_report": "degeneracy.accounting",
    "estimate_llc": "degeneracy.llc",
    "effective_parameter_count": "degeneracy.llc",
    "llc_curve": "degeneracy.llc",
    "volume_llc": "degeneracy.llc",
    "load_llc": "degeneracy.llc",
    "load_llc_curve": "degeneracy.llc",
    "load_effective_parameter_count": "degeneracy.llc",
    "load_volume": "degeneracy.llc",
    "ModelRun": "degeneracy.run",
    "ParamLayout": "degeneracy.run",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
