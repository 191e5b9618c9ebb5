"""``degeneracy graph CONFIG.yaml``: bases, interaction graphs, ablations, modules and Fourier labels.

A config names the model and data (:class:`~degeneracy.commands.config.ModelSpec`) and the options of
each stage; every field has a default, unknown fields are errors::

    model: {name: modadd, split: train, dtype: float64}
    methods: [lib, pca]              # bases to compare (lib, global, pca, neuron)
    basis: {center: true}            # keyword options of degeneracy.interaction_basis
    edges: {batch_size: 1024}        # keyword options of degeneracy.interaction_graph
    shortcuts: true                  # TransformerLens section shortcuts when recognised (checked)
    ablation: {delta: 0.001, node_points: 16, limit: null}
    modules: {epsilon: ablation, resolution: 1.0, seed: 0, methods: [lib]}
    fourier: null                    # Fourier labels: null = on for the modular-addition model

Every stage (``basis.M``, ``edges.M``, ``node_ablation.M``, ``edge_ablation.M``, ``modules.M`` per basis
method M) is a resumable stage (:func:`degeneracy.commands.resume.run_stage`): its result goes under OUT
(``bases/``, ``graphs/``, ``ablation/``, ``modules/``), its config to ``OUT/stages/``, and a rerun skips
it only when its config — which includes the configs of the stages it builds on — is unchanged.
Figures, ``graph_summary.json`` and ``graph_report.md`` are written on every run.
:func:`graph_demo_section` is the demo's (faster) version of the same pipeline.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import typer

from degeneracy.commands.ablation_data import ablation_data, bundled_labels
from degeneracy.commands.basis import basis_stage, basis_stage_config, preflight, run_fingerprint
from degeneracy.commands.basis_files import basis_file_config, load_basis_files
from degeneracy.commands.config import (
    AblationOptions,
    GraphRunConfig,
    ModuleOptions,
    check_methods,
    load_run,
)
from degeneracy.commands.errors import (
    AllowOtherModelOption,
    ConfigArgument,
    ForceOption,
    OutOption,
    echo_err,
    exit_if_invalid,
    user_errors,
)
from degeneracy.commands.graph_files import (
    edge_result_from_dict,
    edge_results_from_json,
    modules_from_json,
    node_curves_from_json,
)
from degeneracy.commands.resume import StageLog, run_stage
from degeneracy.commands.user_data import batches_carry_labels, check_labels, check_limits
from degeneracy.distributed import writes_enabled
from degeneracy.io import atomic_write_text, json_text

__all__ = [
    "run_graph",
    "graph_command",
    "graph_demo_section",
    "default_labels",
    "node_curves_from_json",
    "edge_results_from_json",
    "modules_from_json",
    "edge_result_from_dict",
    "demo_graph_config",
]


# ---------------------------------------------------------------------------------------------------
# Helpers


def _is_modadd(data: Any) -> bool:
    from torch import Tensor

    return (
        isinstance(data, Tensor)
        and data.dim() == 2
        and data.shape[1] == 3
        and not data.is_floating_point()
        and bool((data[:, 2] == data[0, 2]).all())
    )


def default_labels(data: Any) -> Any:
    """Labels the bundled data imply: (a + b) mod p for modular-addition inputs, else ``None``.

    >>> import torch
    >>> default_labels(torch.tensor([[3, 5, 7], [6, 6, 7]])).tolist(), default_labels(torch.zeros(2, 4))
    ([1, 5], None)
    """
    if _is_modadd(data):
        from degeneracy.fourier import modadd_labels

        return modadd_labels(data)
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


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json_text(payload, indent=2, default=str))


def _pair_key(pair: tuple[str, str]) -> str:
    return f"{pair[0]}->{pair[1]}"


def _json_file(out: Path, relative: str, dump: Callable[[Any], Any], read: Callable[[Any], Any]) -> Any:
    """``(save, load)`` of a stage whose result is one JSON file ``out/relative``."""

    def save(value: Any) -> dict[str, str]:
        _write_json(out / relative, dump(value))
        return {"file": relative}

    def load(record: Mapping[str, Any]) -> Any:
        return read(json.loads((out / record["file"]).read_text()))

    return save, load


def _object_file(out: Path, relative: str, read: Callable[[Path], Any]) -> Any:
    """``(save, load)`` of a stage whose result saves itself (``.save(path)``) to ``out/relative``."""

    def save(value: Any) -> dict[str, str]:
        value.save(out / relative)
        return {"file": relative}

    return save, lambda record: read(out / record["file"])


# ---------------------------------------------------------------------------------------------------
# The pipeline


def run_graph(
    cfg: GraphRunConfig,
    model: Any,
    data: Any,
    labels: Any,
    out: Path,
    *,
    node_layers: list[Any] | None = None,
    bases: Mapping[str, Any] | None = None,
    progress: bool = True,
    force: bool = False,
    log: StageLog | None = print,
) -> dict[str, Any]:
    """Run every stage of ``cfg`` on ``model``/``data``; write results under ``out``; return a summary.

    ``cfg.model`` names the model in the stage configs: ``model`` and ``data`` must be what it resolves
    to. ``bases`` may supply already built bases (by method), made from ``cfg.model``, ``node_layers``
    and ``cfg.basis``; the others are built, or loaded when ``out`` holds them with the same config.
    ``force`` recomputes every stage.

    >>> unchecked = GraphRunConfig.model_construct(methods=["lib", "lob"])  # a config built unvalidated
    >>> run_graph(unchecked, None, None, None, Path("runs/graph"))
    Traceback (most recent call last):
    ...
    ValueError: unknown basis method 'lob'; choose from ('lib', 'global', 'pca', 'neuron')
    """
    import degeneracy
    from degeneracy.ablation import edge_ablation, node_ablation_curves
    from degeneracy.edges import load_graph, sparsity

    out = Path(out)
    say = log or (lambda _: None)
    check_methods(cfg.methods)
    other = {"allow_other_model": True} if cfg.allow_other_model else {}  # bases of another model: warned
    supplied = load_basis_files(cfg.basis_files, model, **other)  # checked before any stage runs
    bases = {**(bases or {}), **supplied}
    layers = list(node_layers or cfg.node_layers or [])
    if not layers and set(cfg.methods) - set(bases or {}):
        raise ValueError("node_layers must be given for a model that is not bundled")
    summary: dict[str, Any] = {"n_examples": _n(data), "methods": list(cfg.methods)}
    timings: dict[str, float] = {}
    sections = "auto" if cfg.shortcuts else None

    def staged(name: str, config: dict[str, Any], compute: Callable[[], Any], files: Any) -> Any:
        """One resumable stage of this run, timed (a skipped stage takes the time to load it)."""
        t0 = time.perf_counter()
        save, load = files
        value = run_stage(out, name, config, compute, save=save, load=load, force=force, log=log)
        timings[name] = time.perf_counter() - t0
        return value

    # bases and edges
    have, graphs, configs = dict(bases or {}), {}, {}
    preflight(model, data, layers)  # before the first stage: node layers exist, the model takes the data
    check_limits(data, edge_limit=cfg.edge_limit, **{"ablation.limit": cfg.ablation.limit})
    if cfg.ablation.node_curves or cfg.ablation.edges:
        check_labels(data, labels, cfg.ablation.metrics)
    if cfg.fourier and not _is_modadd(data):  # failed after every stage, in the model's first layer
        raise ValueError("fourier: true labels features on modular-addition inputs (a, b, =), not this "
                         "model's data: leave fourier out (null: on for modular addition)")
    if layers and cfg.modules.methods:  # the module graph's range, checked before any stage
        from degeneracy.capture import as_node_layers

        names = [layer.name for layer in as_node_layers(model, layers)]
        for field in ("first_layer", "last_layer"):
            if (name := getattr(cfg.modules, field)) not in (None, *names):
                raise ValueError(f"modules.{field} {name!r} is not a node layer: {names}")
    fingerprint = run_fingerprint(model, data)  # in every stage config: another model recomputes
    for method in cfg.methods:
        if method not in have:
            t0 = time.perf_counter()
            have[method] = basis_stage(
                model, data, layers, method, cfg.basis, out, spec=cfg.model, progress=progress, force=force,
                log=log, fingerprint=fingerprint,
            )
            timings[f"basis.{method}"] = time.perf_counter() - t0
        configs[method] = {
            "basis": basis_file_config(have[method], cfg.basis_files[method], fingerprint)
            if method in supplied
            else basis_stage_config(cfg.model, layers, method, cfg.basis, fingerprint),
            "edges": cfg.edges,
            "edge_limit": cfg.edge_limit,
            "shortcuts": cfg.shortcuts,
        }
        basis = have[method]
        graphs[method] = staged(
            f"edges.{method}",
            configs[method],
            partial(
                degeneracy.interaction_graph,
                model,
                _head(data, cfg.edge_limit),
                basis,
                sections=sections,
                progress=progress,
                **{**cfg.edges, **other},
            ),
            _object_file(out, f"graphs/{method}.safetensors", load_graph),
        )
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
    ablation_configs: dict[str, dict[str, Any]] = {}
    opts = cfg.ablation
    eval_data, eval_labels, ablated, options = ablation_data(opts, cfg.model, data, labels, bundled_labels)
    metric = {} if opts.metrics == "classification" else {"metrics": opts.metrics}
    if "split" in ablated:  # built on one split, ablated on another
        say(f"[graph] ablations on the {opts.split} split ({_n(eval_data)} examples)")
    if eval_labels is None and not metric and not batches_carry_labels(eval_data) and (
        opts.node_curves or opts.edges
    ):
        say(
            "[graph] no labels for this data: ablations skipped (return (model, (inputs, labels)) from the "
            "factory, or set ablation: {metrics: mse} or {metrics: embedding} to compare with the model's "
            "own output)"
        )
    elif opts.node_curves or opts.edges:
        summary["ablation_examples"] = _n(eval_data)
        summary["ablation_split"] = opts.split or cfg.model.split
        for method in cfg.methods:
            basis, graph = have[method], graphs[method]
            if opts.node_curves:
                node_curves[method] = staged(
                    f"node_ablation.{method}",
                    {"basis": configs[method]["basis"], "limit": opts.limit, "points": opts.node_points,
                     **{k: v for k, v in ablated.items() if k != "scaling"}} | metric,
                    partial(
                        node_ablation_curves,
                        model,
                        eval_data,
                        basis,
                        labels=eval_labels,
                        num_points=opts.node_points,
                        progress=progress,
                        **options,
                        **metric,
                        **other,
                    ),
                    _json_file(
                        out,
                        f"ablation/{method}_nodes.json",
                        lambda curves: {k: v.to_dict() for k, v in curves.items()},
                        node_curves_from_json,
                    ),
                )
            if opts.edges and method in (opts.edge_methods or cfg.methods):
                ablation_configs[method] = {
                    "edges": configs[method],
                    "limit": opts.limit,
                    "delta": opts.delta,
                    "shortcuts": cfg.shortcuts,
                    **ablated,
                    **metric,
                }
                edge_results[method] = staged(
                    f"edge_ablation.{method}",
                    ablation_configs[method],
                    partial(
                        edge_ablation,
                        model,
                        eval_data,
                        basis,
                        graph,
                        labels=eval_labels,
                        delta=opts.delta,
                        sections=sections,
                        scaling=opts.scaling,
                        **options,
                        **metric,
                        **other,
                    ),
                    _json_file(
                        out,
                        f"ablation/{method}_edges.json",
                        lambda results: [r.to_dict() for r in results.values()],
                        edge_results_from_json,
                    ),
                )
        summary["edges_needed"] = {
            m: {_pair_key(p): r.num_needed for p, r in res.items()} for m, res in edge_results.items()
        }
        summary["edges_total"] = {
            m: {_pair_key(p): r.num_edges for p, r in res.items()} for m, res in edge_results.items()
        }

    # modules
    modules, module_graphs = {}, {}
    mo = cfg.modules
    if mo.methods and not set(mo.methods) & set(graphs):
        say(f"[graph] no modules: modules.methods {mo.methods} names no basis of this run (methods)")
    for method in mo.methods:
        if method not in graphs:
            continue
        kwargs: dict[str, Any] = {"resolution": mo.resolution, "seed": mo.seed}
        rule = "fraction" if mo.epsilon == "relative" else mo.epsilon  # the former name
        if rule == "ablation" and method not in edge_results:
            rule = "fraction"
        if rule == "quantile":
            kwargs["quantile"] = mo.quantile
        elif rule == "fraction":
            kwargs["epsilon_fraction"] = mo.epsilon_fraction
        elif rule != "ablation":
            kwargs["epsilon"] = float(rule)
        names = graphs[method].names
        first, last = mo.first_layer or names[0], mo.last_layer or names[-1]
        module_graph = module_graphs[method] = graphs[method].subgraph(first, last)
        if rule == "ablation":
            kwargs["epsilon"] = {p: edge_results[method][p] for p in module_graph.pairs}
        modules[method] = staged(
            f"modules.{method}",
            {
                "edges": configs[method],
                "modules": mo.model_dump(exclude={"methods"}),
                "epsilon_rule": rule,
                "edge_ablation": ablation_configs.get(method) if rule == "ablation" else None,
            },
            partial(degeneracy.find_modules, module_graph, **kwargs),
            _json_file(
                out,
                f"modules/{method}.json",
                lambda found, rule=rule: {"epsilon_rule": rule, **found.to_dict()},
                modules_from_json,
            ),
        )
    summary["modules"] = {
        m: {
            "num_modules": found.num_modules,
            "modularity": found.modularity,
            "inter_module_strength": found.inter_module_strength,
            "sizes": [len(x) for x in found.modules],
        }
        for m, found in modules.items()
    }

    # Fourier labels (modular addition)
    fourier = cfg.fourier if cfg.fourier is not None else _is_modadd(data)
    tables = {}
    if fourier and modules:
        from degeneracy.fourier import fourier_labels, frequency_module_table, modadd_feature_grid

        p = int(data[0, 2]) if _is_modadd(data) else 113
        for method, found in modules.items():
            basis = have[method]
            labs = {
                name: fourier_labels(modadd_feature_grid(model, basis, name, p=p)) for name in basis.names
            }
            rows, alignment = frequency_module_table(found, labs)
            tables[method] = (rows, alignment, labs)
            _write_json(out / "fourier" / f"{method}.json", _fourier_payload(rows, alignment, labs))
        summary["frequency_alignment"] = {m: t[1] for m, t in tables.items()}

    _figures(out / "figures", module_graphs, modules, node_curves, edge_results, tables, say)
    summary["timings"] = timings
    from degeneracy.report.markdown import graph_report_markdown

    _write_json(out / "graph_summary.json", summary)
    atomic_write_text(out / "graph_report.md", graph_report_markdown(summary, tables))
    return summary


def _fourier_payload(rows: Any, alignment: Mapping[str, Any], labels: Mapping[str, Any]) -> dict[str, Any]:
    """``fourier/METHOD.json`` (read by the HTML report): each feature's dominant frequency, power
    fraction per node layer, the frequency/module rows and the AMI."""
    per_layer = {n: {"frequency": x.frequency.tolist(), "fraction": x.fraction.tolist()}
                 for n, x in labels.items()}
    table = [{**vars(r), "frequencies": {str(k): v for k, v in r.frequencies.items()}} for r in rows]
    return {"layers": per_layer, "rows": table, "alignment": dict(alignment)}


def _figures(
    figs: Path,
    module_graphs: Mapping[str, Any],
    modules: Mapping[str, Any],
    node_curves: Mapping[str, Any],
    edge_results: Mapping[str, Any],
    tables: Mapping[str, Any],
    say: Callable[[str], None],
) -> None:
    try:
        from degeneracy.report.graph_plots import (
            plot_edge_ablation,
            plot_frequency_modules,
            plot_interaction_graph,
            plot_node_ablation,
        )
    except ImportError:  # pragma: no cover - matplotlib missing
        say("[graph] matplotlib not installed: figures skipped")
        return
    for method, found in modules.items():
        plot_interaction_graph(module_graphs[method], found, figs / f"graph_{method}.png")
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


# ---------------------------------------------------------------------------------------------------
# Entry points


def graph_command(
    config: ConfigArgument,
    out: OutOption = Path("runs/graph"),
    force: ForceOption = False,
    allow_other_model: AllowOtherModelOption = False,
) -> None:
    """Build bases and interaction graphs, run ablations, find modules from a config file (a
    :class:`GraphRunConfig`); results and figures in OUT (a rerun with the same config skips the
    finished stages).

    >>> import tempfile
    >>> from typer.testing import CliRunner
    >>> from degeneracy.commands import app
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (Path(tmp) / "graph.yaml").write_text("{methods: [lib], modules: {epsilon: tiny}}")
    ...     result = CliRunner().invoke(app, ["graph", f"{tmp}/graph.yaml", "--out", tmp])
    >>> result.exit_code, result.output.splitlines()[0].endswith("graph.yaml: invalid config")
    (2, True)
    """
    with user_errors():
        cfg, model, data, default_layers = load_run(config, GraphRunConfig)
        if allow_other_model:
            cfg = cfg.model_copy(update={"allow_other_model": True})
        labels = None
        if isinstance(data, tuple | list) and len(data) == 2:  # a factory returning (inputs, labels)
            data, labels = data
        labels = labels if labels is not None else bundled_labels(cfg.model, data)
        summary = run_graph(
            cfg,
            model,
            data,
            labels,
            out,
            node_layers=cfg.node_layers or default_layers,
            force=force,
            log=echo_err,
        )
    typer.echo(json_text(summary, indent=2, default=str))
    exit_if_invalid(summary, "graph")  # a stage without a valid result: exit code 1


DEMO_EXAMPLES = 1024


def demo_graph_config(
    examples: int = DEMO_EXAMPLES, basis: Mapping[str, Any] | None = None
) -> GraphRunConfig:
    """The demo's graph config: LIB and PCA, edges and ablations on the first ``examples`` inputs.

    >>> cfg = demo_graph_config(256)
    >>> cfg.methods, cfg.edge_limit, cfg.ablation.limit, cfg.modules.epsilon
    (['lib', 'pca'], 256, 256, 'ablation')
    """
    return GraphRunConfig(
        methods=["lib", "pca"],
        basis=dict(basis or {}),
        edges={"batch_size": 1024},
        edge_limit=examples,
        ablation=AblationOptions(node_points=10, limit=examples, delta=0.001),
        modules=ModuleOptions(epsilon="ablation", methods=["lib"]),
    )


def graph_demo_section(
    model: Any,
    data: Any,
    bases: Mapping[str, Any],
    out_dir: Path,
    *,
    cfg: GraphRunConfig | None = None,
    node_layers: list[Any] | None = None,
    labels_fn: Callable[[Any], Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The demo's graph section on given LIB and PCA ``bases``: edges, sparsity table, node and edge
    ablations, LIB modules (ε from the edge-ablation thresholds) and, for modular addition, the
    frequency/module table; stages in ``out_dir/graph``, figures in ``out_dir/figures``.

    To stay within about a minute on two CPU cores, edges and ablations use the first 1024 inputs
    (``cfg``: :func:`demo_graph_config`; the summary says how many); Fourier labels use all p² inputs.
    A model other than the bundled ones needs ``node_layers`` (or every basis in ``bases``):

    >>> graph_demo_section(None, None, {}, Path("demo-report"))
    Traceback (most recent call last):
    ...
    ValueError: node_layers must be given for a model that is not bundled
    """
    start = time.perf_counter()
    cfg = cfg or demo_graph_config()
    labels = labels_fn(data) if labels_fn is not None else default_labels(data)
    folder = Path(out_dir) / "graph"
    summary = run_graph(
        cfg, model, data, labels, folder, node_layers=node_layers, bases=bases, progress=False, force=force,
        log=None,
    )
    figs = folder / "figures"
    target = Path(out_dir) / "figures"
    target.mkdir(parents=True, exist_ok=True)
    for fig in figs.glob("*.png") if figs.exists() and writes_enabled() else []:  # rank 0 under torchrun
        name = fig.name if fig.name.startswith("graph") else f"graph_{fig.name}"
        (target / name).write_bytes(fig.read_bytes())
    summary["note"] = (
        f"edges and ablations on the first {summary.get('edge_examples')} inputs "
        f"(of {summary.get('n_examples')}); report in {folder / 'graph_report.md'}"
    )
    summary["seconds"] = time.perf_counter() - start
    return summary
