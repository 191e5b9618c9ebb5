"""Figures (and the reports built from them): the one documented module for plotting.

Every plotting function takes result objects (or their JSON-able summaries) and a path, writes a PNG and
returns the path; matplotlib is imported lazily (the core never imports this package)::

    plot_spectra(bases, path)                        # basis eigenvalue spectra, LIB vs PCA
    plot_interaction_graph(graph, path, modules=...) # layered interaction graph coloured by module
    plot_node_ablation(curves, path), plot_edge_ablation(results, path)
    plot_frequency_modules(rows, path)               # modules vs Fourier frequencies (modular addition)
    plot_hessian_spectrum(spectrum, path), plot_sources(report, path)   # degeneracy accounting
    plot_loss_traces(result, path), plot_llc_curve(curve, path)          # learning coefficient

>>> import degeneracy.report as report
>>> "plot_spectra" in report.__all__
True
"""

from __future__ import annotations

from degeneracy.lazy import lazy_exports

_EXPORTS = {
    "plot_spectra": "degeneracy.report.basis_plots",
    "plot_interaction_graph": "degeneracy.report.graph_plots",
    "plot_node_ablation": "degeneracy.report.graph_plots",
    "plot_edge_ablation": "degeneracy.report.graph_plots",
    "plot_frequency_modules": "degeneracy.report.graph_plots",
    "plot_hessian_spectrum": "degeneracy.report.accounting_plots",
    "plot_sources": "degeneracy.report.accounting_plots",
    "plot_loss_traces": "degeneracy.report.llc_plots",
    "plot_llc_curve": "degeneracy.report.llc_plots",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
