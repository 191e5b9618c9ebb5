"""The sections of the HTML report (:mod:`degeneracy.report.html`), one function per kind of result.

Each takes the run folder and the result folders :func:`~degeneracy.report.html.find_results` found,
reads the saved results (JSON and safetensors; no stage is run) and returns the section's HTML, or ""
when the run holds nothing for it.

>>> [key for key, _, _ in SECTIONS]
['bases', 'graph', 'ablations', 'modules', 'accounting', 'llc']
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from degeneracy.display import escape, format_value, html_table
from degeneracy.io import json_text
from degeneracy.report.html_figures import ablation_note, embed_figure, source_line

__all__ = ["SECTIONS"]

Found = Mapping[str, Path]


def _json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _table(headers: list[str], rows: list[list[Any]], caption: str | None = None) -> str:
    return f'<div class="table-wrap">{html_table(headers, rows, caption=caption)}</div>'


def _facts(items: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f'<div class="fact"><b>{escape(format_value(v))}</b><span>{escape(k)}</span></div>'
        for k, v in items
        if v is not None
    )
    return f'<div class="facts">{cells}</div>'


def _section(run_dir: Path, parts: list[str], sources: Iterable[Path]) -> str:
    """A section's HTML: its parts, then the line naming the files they were read from ("" without parts)."""
    if not parts:
        return ""
    return "".join([*parts, source_line(run_dir, *sources)])


def _pair(key: str) -> str:
    return key.replace("->", " → ")


def _methods(folder: Path, pattern: str) -> list[tuple[str, Path]]:
    return [(p.name.split("_")[0].removesuffix(".json"), p) for p in sorted(folder.glob(pattern))]


# ---------------------------------------------------------------------------------------------------
# bases


def _bases(run_dir: Path, found: Found) -> str:
    if "bases" not in found:
        return ""
    import degeneracy

    files = sorted(found["bases"].glob("*.safetensors"))
    bases = {f.stem: degeneracy.load_basis(f) for f in files}
    methods = list(bases)
    names = list(dict.fromkeys(n for b in bases.values() for n in b.names))  # (bases of other runs too)
    headers = ["node layer", "width d (with constant)", "positions"]
    headers += [f"d̂ kept ({m})" for m in methods] + [f"Λ max ({m})" for m in methods]
    rows = []
    for name in names:
        first = next(b for b in bases.values() if name in b.bases)[name]
        row: list[Any] = [name, first.width, first.positions]
        row += [bases[m][name].dim if name in bases[m].bases else None for m in methods]
        row += [float(bases[m][name].eigenvalues.max()) if name in bases[m].bases else None for m in methods]
        rows.append(row)
    sources = list(files)
    timing_rows = []
    for m in methods:
        stage = run_dir / "stages" / f"basis.{m}.json"
        if stage.exists():
            record = _json(stage)
            timing_rows.append([m, record.get("result", {}).get("seconds", record.get("seconds"))])
            sources.append(stage)
    summary = run_dir / "stages" / "bases.json"
    model = _json(summary).get("result", {}).get("model") if summary.exists() else None
    if model:
        sources.append(summary)
    parts = [f'<p class="note">{escape(model)}.</p>' if model else ""]
    parts.append(
        _table(
            headers,
            rows,
            "Retained directions d̂ per node layer and basis (fewer is a more compact description); "
            "Λ: the basis importance (LIB/global: E[f̂²] of the feature; PCA: Gram eigenvalue).",
        )
    )
    if timing_rows:
        parts.append(_table(["basis", "build time (s)"], timing_rows))

    def plot(path: Path) -> Any:
        from degeneracy.report import plot_spectra

        return plot_spectra(bases, path)

    parts.append(
        embed_figure(plot, "basis spectra", "Retained eigenvalues per node layer, normalised to the largest.")
    )
    return _section(run_dir, parts, sources)


# ---------------------------------------------------------------------------------------------------
# interaction graph


def _graph_files(found: Found) -> tuple[Path, dict[str, Path]]:
    folder = found["graph"]
    return folder, {p.stem: p for p in sorted((folder / "graphs").glob("*.safetensors"))}


def _graph(run_dir: Path, found: Found) -> str:
    if "graph" not in found:
        return ""
    import degeneracy
    from degeneracy.report.graph_view import graph_payload

    folder, graphs = _graph_files(found)
    parts: list[str] = []
    sources: list[Path] = []
    if graphs:
        with_modules = [m for m in graphs if (folder / "modules" / f"{m}.json").exists()]
        method = with_modules[0] if with_modules else next(iter(graphs))
        graph = degeneracy.load_graph(graphs[method])
        modules_file = folder / "modules" / f"{method}.json"
        fourier_file = folder / "fourier" / f"{method}.json"
        modules = degeneracy.load_modules(modules_file) if modules_file.exists() else None
        fourier = _json(fourier_file) if fourier_file.exists() else None
        data = graph_payload(graph, modules, fourier)
        sources += [graphs[method], *(f for f in (modules_file, fourier_file) if f.exists())]
        payload = json_text(data, separators=(",", ":")).replace("</", "<\\/")  # JSON.parse: no NaN
        colour = (
            '<label><input type="radio" name="colour-by" value="modules"> modules saved with the run</label>'
            '<label><input type="radio" name="colour-by" value="components"> connected components at this ε'
            "</label>"
        )
        parts.append(
            f"<h3>{escape(method.upper())} interaction graph ({len(data['nodes']):,} features, "
            f"{len(data['edges']):,} nonzero edges)</h3>"
            '<p class="note">Layers left to right; a node is a feature (its radius grows with its '
            "eigenvalue Λ, "
            "log scale within the layer), an edge its integrated-gradient strength E (width: log E/ε). "
            "Edges with E ≥ ε are shown; ε of each layer pair starts at the run's "
            f"({data['epsilon_source']}) "
            "and the slider scales all of them. Hover a feature for its facts; click it to highlight its "
            "incoming (red) and outgoing (black) edges, click again to clear. The constant direction is left "
            "out, as the modules leave it out."
            + (f" {data['edges_left_out']:,} weakest edges are not drawn." if data["edges_left_out"] else "")
            + "</p>"
            '<div id="graph-view"><div class="controls">'
            '<label for="eps-slider">threshold ε (log₁₀ × run ε)</label><input type="range" id="eps-slider">'
            f"{colour}</div>"
            '<div id="eps-label"></div><canvas width="800" height="500"></canvas>'
            '<div id="graph-tooltip" hidden></div><div id="graph-stats"></div>'
            '<div id="graph-legend"></div></div>'
            f'<script type="application/json" id="graph-data">{payload}</script>'
        )
        eps_rows = [[pair, eps] for pair, eps in zip(data["pairs"], data["epsilon"], strict=True)]
        parts.append(_table(["layer pair", "ε at slider 0 (edge strength E)"], eps_rows))
    summary_file = folder / "graph_summary.json"
    if summary_file.exists():
        summary = _json(summary_file)
        sources.append(summary_file)
        rows = []
        for m, per_pair in summary.get("sparsity", {}).items():
            for pair, r in per_pair.items():
                completeness = summary.get("completeness", {}).get(m, {}).get(pair)
                rows.append(
                    [
                        _pair(pair),
                        m,
                        r.get("num_edges"),
                        r.get("num_90"),
                        r.get("num_99"),
                        r.get("num_99.9"),
                        r.get("gini"),
                        completeness,
                    ]
                )
        if rows:
            parts.append(
                _table(
                    [
                        "layer pair",
                        "basis",
                        "nonzero edges",
                        "edges holding 90 %",
                        "99 %",
                        "99.9 %",
                        "Gini",
                        "completeness residual (relative)",
                    ],
                    rows,
                    f"Sparsity of the edges (on the first {format_value(summary.get('edge_examples'))} of "
                    f"{format_value(summary.get('n_examples'))} inputs): how many of the strongest edges "
                    "hold "
                    "90/99/99.9 % of the total strength.",
                )
            )
    return _section(run_dir, parts, sources)


# ---------------------------------------------------------------------------------------------------
# ablations


def _ablations(run_dir: Path, found: Found) -> str:
    if "graph" not in found or not (found["graph"] / "ablation").is_dir():
        return ""
    from degeneracy.ablation import EdgeAblationResult, NodeAblationCurve

    folder = found["graph"] / "ablation"
    parts: list[str] = []
    edge_files = _methods(folder, "*_edges.json")
    node_files = _methods(folder, "*_nodes.json")
    rows = []
    edges: dict[str, dict[Any, Any]] = {}
    for method, path in edge_files:
        results = [EdgeAblationResult.from_dict(r) for r in _json(path)]
        edges[method] = {r.pair: r for r in results}
        for r in results:
            rows.append(
                [
                    f"{r.pair[0]} → {r.pair[1]}",
                    method,
                    r.num_needed,
                    r.num_edges,
                    r.delta,
                    r.threshold,
                    r.base_accuracy,
                ]
            )
    if rows:
        parts.append(
            _table(
                [
                    "layer pair",
                    "basis",
                    "edges needed",
                    "of edges",
                    "δ (accuracy drop allowed)",
                    "threshold ε (edge strength E)",
                    "model accuracy",
                ],
                rows,
                "Edge ablation: the fewest strongest edges that keep the accuracy within δ of the model's "
                "(the others replaced by their mean).",
            )
        )
    nodes = {m: {k: NodeAblationCurve.from_dict(v) for k, v in _json(p).items()} for m, p in node_files}
    if nodes:
        from degeneracy.report import plot_node_ablation

        parts.append(
            embed_figure(
                lambda path: plot_node_ablation(nodes, path),
                "node ablation",
                "Node ablation: accuracy (top) and loss (bottom) keeping the most important features.",
            )
        )
    if edges:
        from degeneracy.report import plot_edge_ablation

        parts.append(
            embed_figure(
                lambda path: plot_edge_ablation(edges, path),
                "edge ablation",
                "Edge ablation: accuracy against edges kept (the bisection's points), answer marked.",
            )
        )
    note = [ablation_note(found["graph"])] if parts else []  # what "accuracy" is, when not a classifier's
    return _section(run_dir, note + parts, (p for _, p in edge_files + node_files))


# ---------------------------------------------------------------------------------------------------
# modules and Fourier


def _modules(run_dir: Path, found: Found) -> str:
    if "graph" not in found or not (found["graph"] / "modules").is_dir():
        return ""
    import degeneracy

    folder = found["graph"]
    parts: list[str] = []
    sources: list[Path] = []
    for path in sorted((folder / "modules").glob("*.json")):
        method = path.stem
        raw = _json(path)
        found_modules = degeneracy.load_modules(path)
        sources.append(path)
        parts.append(f"<h3>{escape(method.upper())} modules</h3>")
        parts.append(
            _facts(
                [
                    ("modules", found_modules.num_modules),
                    ("modularity Q", found_modules.modularity),
                    ("inter-module Σ s", found_modules.inter_module_strength),
                    ("intra-module Σ s", found_modules.intra_module_strength),
                    ("features with no edge above ε", len(found_modules.isolated)),
                    ("ε rule", raw.get("epsilon_rule")),
                ]
            )
        )
        fourier_file = folder / "fourier" / f"{method}.json"
        fourier = _json(fourier_file) if fourier_file.exists() else None
        by_module = {r["module"]: r for r in (fourier or {}).get("rows", [])}
        layers = list(dict.fromkeys(name for members in found_modules.modules for name, _ in members))
        headers = ["module", "features", *[f"in {layer}" for layer in layers]]
        if fourier:
            headers += ["dominant frequency k", "purity (share at k)"]
        rows = []
        for k, members in enumerate(found_modules.modules):
            row: list[Any] = [
                k,
                len(members),
                *[sum(1 for n, _ in members if n == layer) for layer in layers],
            ]
            if fourier:
                r = by_module.get(k, {})
                row += [r.get("dominant_frequency"), r.get("purity")]
            rows.append(row)
        parts.append(
            _table(
                headers,
                rows,
                f"Leiden modules (resolution {found_modules.resolution}, seed {found_modules.seed})"
                " on s = max(0, log E/ε).",
            )
        )
        if fourier:
            sources.append(fourier_file)
            a = fourier.get("alignment", {})
            parts.append(
                _table(
                    ["features", "count", "AMI(modules, dominant frequencies)"],
                    [
                        ["active (an edge above ε)", a.get("num_active"), a.get("ami_active")],
                        ["clean (power fraction ≥ 0.5)", a.get("num_clean"), a.get("ami_clean")],
                        ["all", a.get("num_features"), a.get("ami")],
                    ],
                    "Alignment of modules with the Fourier frequencies of modular addition "
                    "(adjusted mutual information: 0 chance, 1 identical).",
                )
            )
            from degeneracy.fourier import FrequencyModuleRow
            from degeneracy.report import plot_frequency_modules

            table = [
                FrequencyModuleRow(
                    r["module"],
                    r["layer_counts"],
                    {int(f): c for f, c in r["frequencies"].items()},
                    r["dominant_frequency"],
                    r["purity"],
                )
                for r in fourier.get("rows", [])
            ]
            if table:
                parts.append(
                    embed_figure(
                        lambda path, table=table: plot_frequency_modules(table, path),
                        "modules and frequencies",
                        "Features of each module by dominant Fourier frequency.",
                    )
                )
    return _section(run_dir, parts, sources)


# ---------------------------------------------------------------------------------------------------
# degeneracy accounting


def _accounting(run_dir: Path, found: Found) -> str:
    if "degeneracy" not in found:
        return ""
    import degeneracy
    from degeneracy.accounting import load_hessian_spectrum

    folder = found["degeneracy"]
    path = folder / "degeneracy_report.json"
    report = degeneracy.load_degeneracy_report(path)
    sources = [path]
    eps = f"{report.epsilon:g}" + (" × λ_max" if report.relative else "")
    parts = [
        f'<p class="note">Behavioral loss <code>{escape(report.kind)}</code> on '
        f"{report.num_examples:,} inputs; "
        f"eigenvalues ≤ ε = {escape(eps)} count as zero.</p>",
        _facts(
            [
                ("parameters N", report.num_parameters),
                (f"Hessian rank ({report.hessian_method})", report.hessian_rank),
                (f"Hessian nullity ({report.hessian_method})", report.hessian_nullity),
                ("free directions counted (Σ rows)", report.total),
                ("distinct free directions (span)", report.union),
            ]
        ),
    ]
    rows = [
        [
            r.layer,
            r.source,
            r.count,
            "upper bound" if r.is_upper_bound else "",
            "yes" if r.generic else "",
        ]
        for r in report.rows
    ]
    parts.append(
        _table(
            ["layer", "source", "free directions (count)", "count is", "generic (every θ)"],
            rows,
            "Sources of free directions (parameter directions that leave the behavioral loss unchanged).",
        )
    )
    section4 = folder / "sparsified.json"
    if section4.exists():
        s4 = _json(section4)
        sources.append(section4)
        keys = [
            ("free_directions", "free directions made zeros"),
            ("zeros_before", "zero parameters before"),
            ("zeros_after", "zero parameters after"),
            ("max_output_difference", "max |output difference| (same function)"),
            ("tolerance", "tolerance"),
            ("verified", "outputs unchanged"),
            ("claim_holds", "claim holds"),
        ]
        s4_rows = [[label, s4[k]] for k, label in keys if k in s4]
        parts.append(
            _table(
                ["quantity", "value"],
                s4_rows,
                "Section 4 check: the construction that turns free directions "
                "into zero parameters without changing the function.",
            )
        )
    spectrum_file = folder / "hessian_spectrum.json"
    if spectrum_file.exists():
        from degeneracy.report import plot_hessian_spectrum

        spectrum = load_hessian_spectrum(spectrum_file)
        sources.append(spectrum_file)
        parts.append(
            embed_figure(
                lambda p: plot_hessian_spectrum(spectrum, p),
                "Hessian spectrum",
                f"Eigenvalues of the behavioral-loss Hessian ({spectrum.method}), descending.",
            )
        )
    from degeneracy.report import plot_sources

    parts.append(
        embed_figure(lambda p: plot_sources(report, p), "sources", "Free directions by source and layer.")
    )
    return _section(run_dir, parts, sources)


# ---------------------------------------------------------------------------------------------------
# learning coefficient


def _llc(run_dir: Path, found: Found) -> str:
    if "llc" not in found:
        return ""
    from degeneracy.llc import load_effective_parameter_count, load_llc, load_llc_curve

    folder = found["llc"]
    parts: list[str] = []
    sources: list[Path] = []
    result_file, curve_file, n_eff_file = (
        folder / n for n in ("llc.safetensors", "llc_curve.safetensors", "n_eff.safetensors")
    )
    result = load_llc(result_file) if result_file.exists() else None
    curve = load_llc_curve(curve_file) if curve_file.exists() else None
    n_eff = load_effective_parameter_count(n_eff_file) if n_eff_file.exists() else None
    if result is not None:
        sources.append(result_file)
        parts.append(
            _facts(
                [
                    ("λ̂ (learning coefficient)", result.mean),
                    ("λ̂ spread over chains", result.std),
                    ("N_eff = 2λ̂", float(result.n_eff)),
                    ("parameters P", result.num_parameters),
                    ("nβ", result.nbeta),
                    ("ε = λ̂/nβ (loss)", result.epsilon),
                ]
            )
        )
        parts += [f'<p class="note"><b>warning:</b> {escape(w)}</p>' for w in result.warnings]  # not silent
    if curve is not None:
        sources.append(curve_file)
        columns = [curve.nbetas, curve.epsilons, curve.llc, curve.llc_std, curve.n_eff]
        rows = [list(r) for r in zip(*(c.tolist() for c in columns), strict=True)]
        parts.append(
            _table(
                ["nβ (inverse temperature)", "ε = λ̂/nβ (loss)", "λ̂", "λ̂ spread", "N_eff = 2λ̂ (parameters)"],
                rows,
                "λ(ε) and N_eff(ε) over the SGLD sweep of nβ.",
            )
        )
    if n_eff is not None:
        sources.append(n_eff_file)
        columns = [n_eff.epsilons, n_eff.achieved_epsilons, n_eff.n_eff, n_eff.n_eff_std]
        rows = [list(r) for r in zip(*(c.tolist() for c in columns), strict=True)]
        parts.append(
            _table(
                ["ε requested (loss)", "ε achieved (loss)", "N_eff (parameters)", "N_eff spread"],
                rows,
                f"N_eff(ε) at the requested loss scales ({n_eff.method}).",
            )
        )
        parts += [f'<p class="note"><b>warning:</b> {escape(w)}</p>' for w in missed_epsilons(n_eff)]
    summary_file = folder / "summary.json"
    if summary_file.exists():
        settings = _json(summary_file).get("settings") or {}
        if settings:
            sources.append(summary_file)
            parts.append(_table(["SGLD setting", "value"], [[k, v] for k, v in settings.items()]))
    if result is not None:
        from degeneracy.report import plot_loss_traces

        parts.append(
            embed_figure(
                lambda p: plot_loss_traces(result, p),
                "loss traces",
                "Sampled losses of every chain (the last nβ).",
            )
        )
    curves = {
        k: v for k, v in (("SGLD sweep over nβ", curve), ("N_eff at requested ε", n_eff)) if v is not None
    }
    if curves:
        from degeneracy.report import plot_llc_curve

        title = f"N_eff(ε) (P = {result.num_parameters} parameters)" if result is not None else None
        parts.append(
            embed_figure(
                lambda p: plot_llc_curve(curves, p, title=title),
                "N_eff(ε)",
                "Effective parameter count against the loss scale ε.",
            )
        )
    return _section(run_dir, parts, sources)


def missed_epsilons(n_eff: Any) -> list[str]:
    """A line for every ε of an :class:`~degeneracy.llc.EffectiveParameterCount` whose search ended away
    from it (λ̂ ≤ 0: no fixed point nβ = λ̂/ε; or outside its ``tolerance``): that N_eff is not N_eff(ε).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> found = SimpleNamespace(epsilons=torch.tensor([0.01, 0.1, 1.0]), method="sgld", config={},
    ...     achieved_epsilons=torch.tensor([-0.33, 0.11, 3.0]), n_eff=torch.tensor([-1908.0, 40.0, 2.0]))
    >>> for line in missed_epsilons(found):
    ...     print(line)
    N_eff at ε = 0.01 was found at ε = -0.33 (N_eff = -1.91e+03): λ̂ ≤ 0, no nβ gives this ε; not N_eff(ε)
    N_eff at ε = 1 was found at ε = 3 (N_eff = 2): outside the tolerance 0.25 of the search (raise max_iter)
    """
    if n_eff.method != "sgld":
        return []
    tolerance = float(n_eff.config.get("tolerance", 0.25))
    lines = []
    rows = zip(n_eff.epsilons.tolist(), n_eff.achieved_epsilons.tolist(), n_eff.n_eff.tolist(), strict=True)
    for eps, got, value in rows:
        head = f"N_eff at ε = {eps:.3g} was found at ε = {got:.3g} (N_eff = {value:.3g})"
        if not (math.isfinite(got) and got > 0):
            lines.append(f"{head}: λ̂ ≤ 0, no nβ gives this ε; not N_eff(ε)")
        elif abs(math.log(got / eps)) > math.log1p(tolerance):
            lines.append(f"{head}: outside the tolerance {tolerance:g} of the search (raise max_iter)")
    return lines


Section = tuple[str, str, Callable[[Path, Found], str]]

SECTIONS: list[Section] = [
    ("bases", "Interaction bases", _bases),
    ("graph", "Interaction graph", _graph),
    ("ablations", "Ablations", _ablations),
    ("modules", "Modules", _modules),
    ("accounting", "Degeneracy accounting", _accounting),
    ("llc", "Learning coefficient", _llc),
]
"""``(anchor, title, render)`` of every section, in page order."""
