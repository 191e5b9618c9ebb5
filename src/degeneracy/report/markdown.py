"""Markdown rendering of result dicts: the demo report's sections and the graph report's tables.

Everything here takes results (JSON-able dicts, Fourier rows); nothing here runs a stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["markdown", "graph_report_markdown"]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{int(value):,}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, Mapping) and not (
        isinstance(value, list | tuple) and any(isinstance(v, Mapping | list | tuple) for v in value)
    )


def markdown(result: Mapping[str, Any], level: int = 3) -> list[str]:
    """A stage's result dict as markdown: scalars in a two-column table, a dict of dicts of scalars as
    one table (its keys as columns), anything deeper under its own heading.

    >>> print("\\n".join(markdown({"accuracy": 0.98, "kept": {"lib": {"fc1": 3}, "pca": {"fc1": 5}}})))
    | | |
    |---|---|
    | accuracy | 0.98 |
    <BLANKLINE>
    **kept**
    <BLANKLINE>
    | | lib | pca |
    |---|---|---|
    | fc1 | 3 | 5 |
    <BLANKLINE>
    """
    lines: list[str] = []
    scalars = {k: v for k, v in result.items() if _is_scalar(v)}
    lengths = [len(v) for v in scalars.values() if isinstance(v, list | tuple) and len(v) > 1]
    common = max(set(lengths), key=lengths.count) if lengths else 0
    series = {k: v for k, v in scalars.items() if isinstance(v, list | tuple) and len(v) == common}
    if len(series) < 2:
        series = {}
    single = {k: v for k, v in scalars.items() if k not in series}
    if single:
        lines += ["| | |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in single.items()), ""]
    if series:  # parallel lists (a sweep): one row per point
        lines += [f"| {' | '.join(series)} |", "|---" * len(series) + "|"]
        lines += ["| " + " | ".join(_fmt(v[i]) for v in series.values()) + " |" for i in range(common)]
        lines.append("")
    for key, value in result.items():
        if key in scalars or not isinstance(value, Mapping):
            continue
        columns = list(value)
        if value and all(
            isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()) for v in value.values()
        ):
            rows = list(dict.fromkeys(r for v in value.values() for r in v))
            lines += [
                f"**{key}**",
                "",
                f"| | {' | '.join(map(str, columns))} |",
                "|---" * (len(columns) + 1) + "|",
            ]
            lines += [
                f"| {r} | " + " | ".join(_fmt(value[c].get(r, "")) for c in columns) + " |" for r in rows
            ]
            lines.append("")
        else:
            lines += [f"{'#' * level} {key}", "", *markdown(value, level + 1)]
    return lines


def graph_report_markdown(summary: Mapping[str, Any], tables: Mapping[str, Any] | None = None) -> str:
    """The sparsity, edges-needed, module and frequency/module tables as markdown.

    >>> modules = {"num_modules": 2, "sizes": [3, 2], "modularity": 0.41, "inter_module_strength": 1.5}
    >>> needed, total = {"lib": {"1 → 2": 3}}, {"lib": {"1 → 2": 12}}
    >>> summary = {"edges_needed": needed, "edges_total": total, "modules": {"lib": modules}}
    >>> print(graph_report_markdown(summary))
    # Interaction graph report
    <BLANKLINE>
    ## Edges needed (accuracy within δ of the model)
    <BLANKLINE>
    | layer pair | lib |
    |---|---|
    | 1 → 2 | 3 of 12 |
    <BLANKLINE>
    ## Modules (lib)
    <BLANKLINE>
    2 modules, sizes [3, 2], modularity Q = 0.4100, inter-module Σ s = 1.5
    <BLANKLINE>
    <BLANKLINE>
    """
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
                n = {k: r.get(f"num_{k}", r.get(f"n_{k}", 0)) for k in ("90", "99", "99.9", "edges")}
                cells.append(
                    f"{n['90']:.0f} / {n['99']:.0f} / {n['99.9']:.0f} of {n['edges']:.0f}; "
                    f"G = {r.get('gini', 0):.3f}"
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
        num_modules = mo.get("num_modules", mo.get("n_modules"))  # "n_modules": written before num_*
        lines += [
            f"## Modules ({m})",
            "",
            f"{num_modules} modules, sizes {mo['sizes']}, modularity Q = {mo['modularity']:.4f}, "
            f"inter-module Σ s = {mo['inter_module_strength']:.4g}",
            "",
        ]
    for m, (rows, alignment, _) in (tables or {}).items():
        former = {"active": "n_active", "features": "n", "clean": "n_clean"}  # written before num_*
        counts = {k: alignment.get(f"num_{k}", alignment.get(old, 0)) for k, old in former.items()}
        lines += [
            f"## Frequencies and modules ({m})",
            "",
            f"AMI(modules, frequencies) = {alignment['ami_active']:.3f} over the "
            f"{counts['active']:.0f} active features (an edge above ε); {alignment['ami']:.3f} over "
            f"all {counts['features']:.0f}, {alignment['ami_clean']:.3f} over the {counts['clean']:.0f} "
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
