"""``degeneracy graph CONFIG.yaml``: bases, interaction graphs, ablations, modules and Fourier labels.

A config names the model and data (:class:`degeneracy.runconfig.ModelSpec`) and the options of each
stage; every field has a default, unknown fields are errors::

    model: {name: modadd, split: train, dtype: float64}
    methods: [lib, pca]              # bases to compare (lib, global, pca, neuron)
    basis: {center: true}            # keyword options of degeneracy.interaction_basis
    edges: {batch_size: 1024}        # keyword options of degeneracy.interaction_graph
    shortcuts: true                  # TransformerLens section shortcuts when recognised (checked)
    ablation: {delta: 0.001, node_points: 16, limit: null}
    modules: {epsilon: ablation, resolution: 1.0, seed: 0, methods: [lib]}
    fourier: null                    # Fourier labels: null = on for the modular-addition model

Stages write their results atomically under OUT (``bases/``, ``graphs/``, ``ablation/``,
``modules/``, ``figures/``, ``graph_summary.json``, ``graph_report.md``); a rerun skips the stages whose
files exist. :func:`graph_demo_section` is the demo's (faster) version of the same pipeline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import typer
from pydantic import Field
from torch import Tensor, nn

from degeneracy.io import atomic_write_text
from degeneracy.runconfig import ModelSpec, StrictModel, load_yaml, resolve_model

__all__ = [
    "AblationOptions",
    "ModuleOptions",
    "GraphRunConfig",
    "run_graph",
    "graph_command",
    "graph_demo_section",
]

METHODS = ("lib", "global", "pca", "neuron")


class AblationOptions(StrictModel):
    """Node ablation curves and edge-ablation bisection (see :mod:`degeneracy.ablation`).

    ``limit`` evaluates on the first examples only; ``edge_methods`` lists the bases whose edges are
    bisected (default: all ``methods``)."""

    node_curves: bool = True
    node_points: int = Field(default=16, ge=2)
    edges: bool = True
    edge_methods: list[str] | None = None
    delta: float = Field(default=0.001, ge=0)
    limit: int | None = Field(default=None, gt=0)


class ModuleOptions(StrictModel):
    """Leiden modules (see :func:`degeneracy.find_modules`).

    ``epsilon``: a number, ``"ablation"`` (the edge-ablation thresholds of the same basis; falls back to
    ``"relative"`` when no ablation ran), ``"quantile"`` or ``"relative"``. ``first_layer`` /
    ``last_layer`` restrict the module graph to a range of node layers (e.g. without an unrotated
    output layer, whose neurons mix every feature)."""

    epsilon: float | Literal["ablation", "quantile", "relative"] = "ablation"
    quantile: float = Field(default=0.5, ge=0, lt=1)
    relative: float = Field(default=1e-9, gt=0)
    resolution: float = Field(default=1.0, gt=0)
    seed: int = 0
    methods: list[str] = ["lib"]
    first_layer: str | None = None
    last_layer: str | None = None


class GraphRunConfig(StrictModel):
    """``degeneracy graph CONFIG.yaml`` (see the module docstring)."""

    model: ModelSpec = ModelSpec()
    node_layers: list[Any] | None = None
    methods: list[str] = ["lib", "pca"]
    basis: dict[str, Any] = {}
    edges: dict[str, Any] = {}
    shortcuts: bool = True
    edge_limit: int | None = Field(default=None, gt=0)
    ablation: AblationOptions = AblationOptions()
    modules: ModuleOptions = ModuleOptions()
    fourier: bool | None = None


# ---------------------------------------------------------------------------------------------------
# Helpers


def _is_modadd(data: Any) -> bool:
    return (
        isinstance(data, Tensor)
        and data.dim() == 2
        and data.shape[1] == 3
        and not data.is_floating_point()
        and bool((data[:, 2] == data[0, 2]).all())
    )


def default_labels(data: Any) -> Tensor | None:
    """Labels the bundled data imply: (a + b) mod p for modular-addition inputs, else ``None``."""
    if _is_modadd(data):
        from degeneracy.fourier import modadd_labels

        return modadd_labels(data)
    return None


def _labels_for_spec(spec: ModelSpec, data: Any) -> Tensor | None:
    if spec.name == "modadd":
        return default_labels(data)
    if spec.name == "digits_mlp":
        from degeneracy.models import digits_all_inputs, digits_dataset

        dtype = getattr(torch, spec.dtype)
        if spec.split == "all":
            _, labels = digits_all_inputs(dtype=dtype)
        else:
            _, ytr, _, yte = digits_dataset(dtype=dtype)
            labels = ytr if spec.split == "train" else yte
        return labels[: spec.limit] if spec.limit is not None else labels
    return None


def _head(data: Any, limit: int | None) -> Any:
    if limit is None:
        return data
    if isinstance(data, Mapping):
        return {k: v[:limit] for k, v in data.items()}
    return data[:limit]


def _n(data: Any) -> int | None:
    from degeneracy.data import num_examples

    return num_examples(data)


def _json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def _node_curve_from(d: Mapping[str, Any]) -> Any:
    from degeneracy.ablation import NodeAblationCurve

    return NodeAblationCurve(**d)


def _edge_result_from(d: Mapping[str, Any]) -> Any:
    from degeneracy.ablation import EdgeAblationResult

    d = dict(d)
    d["pair"] = tuple(d["pair"])
    d["evaluations"] = {int(k): v for k, v in d["evaluations"].items()}
    d["losses"] = {int(k): v for k, v in d["losses"].items()}
    return EdgeAblationResult(**d)


def _pair_key(pair: tuple[str, str]) -> str:
    return f"{pair[0]}->{pair[1]}"


# ---------------------------------------------------------------------------------------------------
# The pipeline


def run_graph(
    cfg: GraphRunConfig,
    model: nn.Module,
    data: Any,
    labels: Tensor | None,
    out: Path,
    *,
    node_layers: list[Any] | None = None,
    bases: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage of ``cfg`` on ``model``/``data``; write results under ``out``; return a summary.

    ``bases`` may supply already built bases (by method); the others are built (or loaded from
    ``out/bases/METHOD.safetensors`` when present).
    """
    import degeneracy
    from degeneracy.ablation import edge_ablation, node_ablation_curves
    from degeneracy.basis import load_basis
    from degeneracy.edges import load_graph, sparsity

    out = Path(out)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown basis methods {unknown}; choose from {METHODS}")
    summary: dict[str, Any] = {"n_examples": _n(data), "methods": list(cfg.methods)}
    timings: dict[str, float] = {}
    have = dict(bases or {})
    graphs = {}
    for method in cfg.methods:
        path = out / "bases" / f"{method}.safetensors"
        if method not in have:
            if path.exists():
                have[method] = load_basis(path)
            else:
                if node_layers is None:
                    raise ValueError("node_layers must be given for a model that is not bundled")
                t0 = time.perf_counter()
                have[method] = degeneracy.interaction_basis(
                    model, data, node_layers, method=method, progress=progress, **cfg.basis
                )
                timings[f"basis/{method}"] = time.perf_counter() - t0
                have[method].save(path)
        gpath = out / "graphs" / f"{method}.safetensors"
        if gpath.exists():
            graphs[method] = load_graph(gpath)
            log(f"[graph] {method}: loaded {gpath}")
        else:
            t0 = time.perf_counter()
            basis = have[method]
            graphs[method] = degeneracy.interaction_graph(
                model,
                _head(data, cfg.edge_limit),
                basis,
                sections="auto" if cfg.shortcuts else None,
                progress=progress,
                **cfg.edges,
            )
            timings[f"edges/{method}"] = time.perf_counter() - t0
            graphs[method].save(gpath)
            log(f"[graph] {method}: edges in {timings[f'edges/{method}']:.1f} s")
    summary["dims"] = {m: have[m].dims for m in cfg.methods}
    summary["edge_examples"] = _n(_head(data, cfg.edge_limit))
    summary["completeness"] = {
        m: {_pair_key(p): g.completeness[p] for p in g.pairs} for m, g in graphs.items()
    }
    summary["sparsity"] = {
        m: {_pair_key(p): row for p, row in sparsity(g).items()} for m, g in graphs.items()
    }
    summary["edge_seconds"] = {m: g.info["timings"]["total"] for m, g in graphs.items()}

    # ablations
    node_curves: dict[str, dict[str, Any]] = {}
    edge_results: dict[str, dict[tuple[str, str], Any]] = {}
    opts = cfg.ablation
    eval_data = _head(data, opts.limit)
    eval_labels = labels[: opts.limit] if labels is not None and opts.limit is not None else labels
    if labels is None and (opts.node_curves or opts.edges):
        log("[graph] no labels for this data: ablations skipped")
    elif opts.node_curves or opts.edges:
        summary["ablation_examples"] = _n(eval_data)
        for method in cfg.methods:
            basis, graph = have[method], graphs[method]
            npath = out / "ablation" / f"{method}_nodes.json"
            if opts.node_curves:
                if npath.exists():
                    node_curves[method] = {
                        k: _node_curve_from(v) for k, v in json.loads(npath.read_text()).items()
                    }
                else:
                    t0 = time.perf_counter()
                    node_curves[method] = node_ablation_curves(
                        model, eval_data, basis, labels=eval_labels, num_points=opts.node_points
                    )
                    timings[f"node_ablation/{method}"] = time.perf_counter() - t0
                    _json(npath, {k: v.to_dict() for k, v in node_curves[method].items()})
            epath = out / "ablation" / f"{method}_edges.json"
            if opts.edges and method in (opts.edge_methods or cfg.methods):
                if epath.exists():
                    edge_results[method] = {
                        tuple(r["pair"]): _edge_result_from(r) for r in json.loads(epath.read_text())
                    }
                else:
                    t0 = time.perf_counter()
                    edge_results[method] = edge_ablation(
                        model,
                        eval_data,
                        basis,
                        graph,
                        labels=eval_labels,
                        delta=opts.delta,
                        sections="auto" if cfg.shortcuts else None,
                    )
                    timings[f"edge_ablation/{method}"] = time.perf_counter() - t0
                    _json(epath, [r.to_dict() for r in edge_results[method].values()])
                    log(f"[graph] {method}: edge ablation in {timings[f'edge_ablation/{method}']:.1f} s")
        summary["edges_needed"] = {
            m: {_pair_key(p): r.n_needed for p, r in res.items()} for m, res in edge_results.items()
        }
        summary["edges_total"] = {
            m: {_pair_key(p): r.n_edges for p, r in res.items()} for m, res in edge_results.items()
        }

    # modules
    modules = {}
    for method in cfg.modules.methods:
        if method not in graphs:
            continue
        mo = cfg.modules
        kwargs: dict[str, Any] = {"resolution": mo.resolution, "seed": mo.seed}
        rule = mo.epsilon
        if rule == "ablation" and method not in edge_results:
            rule = "relative"
        if rule == "quantile":
            kwargs["quantile"] = mo.quantile
        elif rule == "relative":
            kwargs["relative"] = mo.relative
        elif rule != "ablation":
            kwargs["epsilon"] = float(rule)
        names = graphs[method].names
        graph = graphs[method].subgraph(mo.first_layer or names[0], mo.last_layer or names[-1])
        if rule == "ablation":
            kwargs["epsilon"] = {p: edge_results[method][p] for p in graph.pairs}
        modules[method] = degeneracy.find_modules(graph, **kwargs)
        _json(out / "modules" / f"{method}.json", {"epsilon_rule": rule, **modules[method].to_dict()})
    summary["modules"] = {
        m: {
            "n_modules": mo.n_modules,
            "modularity": mo.modularity,
            "inter_module_strength": mo.inter_module_strength,
            "sizes": [len(x) for x in mo.modules],
        }
        for m, mo in modules.items()
    }

    # Fourier labels (modular addition)
    fourier = cfg.fourier if cfg.fourier is not None else _is_modadd(data)
    tables = {}
    if fourier and modules:
        from degeneracy.fourier import fourier_labels, frequency_module_table, modadd_feature_grid

        p = int(data[0, 2]) if _is_modadd(data) else 113
        for method, mo in modules.items():
            basis = have[method]
            labs = {
                name: fourier_labels(modadd_feature_grid(model, basis, name, p=p)) for name in basis.names
            }
            rows, alignment = frequency_module_table(mo, labs)
            tables[method] = (rows, alignment, labs)
        summary["frequency_alignment"] = {m: t[1] for m, t in tables.items()}

    # figures
    try:
        from degeneracy.report.graph_plots import (
            plot_edge_ablation,
            plot_frequency_modules,
            plot_interaction_graph,
            plot_node_ablation,
        )

        figs = out / "figures"
        for method, mo in modules.items():
            names = graphs[method].names
            first, last = cfg.modules.first_layer or names[0], cfg.modules.last_layer or names[-1]
            plot_interaction_graph(graphs[method].subgraph(first, last), mo, figs / f"graph_{method}.png")
        if node_curves:
            plot_node_ablation(node_curves, figs / "node_ablation.png")
        if edge_results:
            plot_edge_ablation(edge_results, figs / "edge_ablation.png")
        for method, (rows, alignment, _) in tables.items():
            plot_frequency_modules(
                rows,
                figs / f"frequency_modules_{method}.png",
                title=f"{method}: AMI(modules, frequencies) = {alignment['ami_active']:.2f} (active)",
            )
    except ImportError:  # pragma: no cover - matplotlib missing
        log("[graph] matplotlib not installed: figures skipped")

    summary["timings"] = timings
    _json(out / "graph_summary.json", summary)
    atomic_write_text(out / "graph_report.md", report_markdown(summary, tables))
    return summary


def report_markdown(summary: Mapping[str, Any], tables: Mapping[str, Any] | None = None) -> str:
    """The sparsity, edges-needed, module and frequency/module tables as markdown."""
    lines = ["# Interaction graph report", ""]
    sp = summary.get("sparsity", {})
    if sp:
        lines += [
            "## Sparsity (edges holding 90 / 99 / 99.9 % of the edge weight; Gini)",
            "",
            "| layer pair | " + " | ".join(sp) + " |",
            "|---|" + "---|" * len(sp),
        ]
        for pair in next(iter(sp.values())):
            cells = []
            for m in sp:
                r = sp[m].get(pair, {})
                cells.append(
                    f"{r.get('n_90', 0):.0f} / {r.get('n_99', 0):.0f} / {r.get('n_99.9', 0):.0f} "
                    f"of {r.get('n_edges', 0):.0f}; G = {r.get('gini', 0):.3f}"
                )
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
        lines.append("")
    needed = summary.get("edges_needed", {})
    if needed:
        lines += ["## Edges needed (accuracy within δ of the model)", ""]
        lines += ["| layer pair | " + " | ".join(needed) + " |", "|---|" + "---|" * len(needed)]
        total = summary.get("edges_total", {})
        for pair in next(iter(needed.values())):
            cells = [f"{needed[m].get(pair, '-')} of {total.get(m, {}).get(pair, '-')}" for m in needed]
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
        lines.append("")
    for m, mo in summary.get("modules", {}).items():
        lines += [
            f"## Modules ({m})",
            "",
            f"{mo['n_modules']} modules, sizes {mo['sizes']}, modularity Q = {mo['modularity']:.4f}, "
            f"inter-module Σ s = {mo['inter_module_strength']:.4g}",
            "",
        ]
    for m, (rows, alignment, _) in (tables or {}).items():
        lines += [
            f"## Frequencies and modules ({m})",
            "",
            f"AMI(modules, frequencies) = {alignment['ami_active']:.3f} over the "
            f"{alignment['n_active']:.0f} active features (an edge above ε); {alignment['ami']:.3f} over "
            f"all {alignment['n']:.0f}, {alignment['ami_clean']:.3f} over the {alignment['n_clean']:.0f} "
            "with power fraction ≥ 0.5.",
            "",
            "| module | active features per layer | frequencies (clean, active) | dominant | purity |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            counts = ", ".join(f"{k}: {v}" for k, v in r.layer_counts.items())
            freqs = ", ".join(f"{k}×{v}" for k, v in r.frequencies.items())
            lines.append(f"| {r.module} | {counts} | {freqs} | {r.dominant_frequency} | {r.purity:.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Entry points


def graph_command(
    config: Path = typer.Argument(..., help="YAML config (see GraphRunConfig)"),
    out: Path = typer.Option(Path("runs/graph"), help="output directory"),
) -> None:
    """Build bases and interaction graphs, run ablations, find modules; results and figures in OUT."""
    try:
        cfg = load_yaml(config, GraphRunConfig)
        model, data, default_layers = resolve_model(cfg.model)
        labels = None
        if isinstance(data, tuple | list) and len(data) == 2:  # a factory returning (inputs, labels)
            data, labels = data
        labels = labels if labels is not None else _labels_for_spec(cfg.model, data)
        summary = run_graph(
            cfg, model, data, labels, out, node_layers=cfg.node_layers or default_layers, log=typer.echo
        )
    except (ValueError, FileNotFoundError, ImportError, KeyError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from err
    typer.echo(json.dumps(summary, indent=2, default=str))


DEMO_EXAMPLES = 1024


def graph_demo_section(
    model: nn.Module,
    data: Any,
    basis_lib: Any,
    basis_pca: Any,
    out_dir: Path,
    *,
    labels_fn: Callable[[Any], Tensor] | None = None,
    examples: int = DEMO_EXAMPLES,
) -> dict[str, Any]:
    """The demo's graph section on given LIB and PCA bases: edges, sparsity table, node and edge
    ablations, LIB modules (ε from the edge-ablation thresholds) and, for modular addition, the
    frequency/module table; figures in ``out_dir/figures``.

    To stay within about a minute on two CPU cores, edges and ablations use the first ``examples``
    inputs (default 1024; the summary says how many); Fourier labels use all p² inputs.
    """
    start = time.perf_counter()
    labels = labels_fn(data) if labels_fn is not None else default_labels(data)
    cfg = GraphRunConfig(
        methods=["lib", "pca"],
        edges={"batch_size": 1024},
        edge_limit=examples,
        ablation=AblationOptions(node_points=10, limit=examples, delta=0.001),
        modules=ModuleOptions(epsilon="ablation", methods=["lib"]),
    )
    folder = Path(out_dir) / "graph"
    summary = run_graph(
        cfg,
        model,
        data,
        labels,
        folder,
        bases={"lib": basis_lib, "pca": basis_pca},
        progress=False,
        log=lambda _: None,
    )
    figs = folder / "figures"
    target = Path(out_dir) / "figures"
    target.mkdir(parents=True, exist_ok=True)
    for fig in figs.glob("*.png") if figs.exists() else []:
        (target / f"graph_{fig.name}" if not fig.name.startswith("graph") else target / fig.name).write_bytes(
            fig.read_bytes()
        )
    summary["note"] = (
        f"edges and ablations on the first {summary.get('edge_examples')} inputs "
        f"(of {summary.get('n_examples')}); report in {folder / 'graph_report.md'}"
    )
    summary["seconds"] = time.perf_counter() - start
    return summary
