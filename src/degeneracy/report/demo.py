"""The demo: every stage of the library on the bundled models, collected into ``report.md``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from degeneracy.io import atomic_write_text

__all__ = ["run_demo", "markdown"]

Stage = Callable[[Path, str, bool, Callable[[], dict[str, Any]]], dict[str, Any]]


def _bases_section(out: Path) -> dict[str, Any]:
    from degeneracy.cli import BasisRunConfig, build_bases
    from degeneracy.data import num_examples
    from degeneracy.runconfig import resolve_model

    cfg = BasisRunConfig(methods=["lib", "pca"])
    n = num_examples(resolve_model(cfg.model)[1])
    model = f"modadd (bundled), its {n:,} training inputs, {cfg.model.dtype}, centred"
    return {"model": model, **build_bases(cfg, out)}


def _graph_section(out: Path) -> dict[str, Any]:
    from degeneracy.basis import load_basis
    from degeneracy.graph_cli import graph_demo_section
    from degeneracy.runconfig import ModelSpec, resolve_model

    model, data, _ = resolve_model(ModelSpec())
    lib = load_basis(out / "bases" / "lib.safetensors")
    pca = load_basis(out / "bases" / "pca.safetensors")
    return graph_demo_section(model, data, lib, pca, out)


def _degeneracy_section(out: Path) -> dict[str, Any]:
    from degeneracy.accounting.cli import degeneracy_demo_section
    from degeneracy.runconfig import ModelSpec, resolve_model

    model, data, _ = resolve_model(ModelSpec(name="digits_mlp", split="all"))
    return degeneracy_demo_section(model, data, out)


def _llc_section(out: Path) -> dict[str, Any]:
    from degeneracy.llc.cli import llc_demo_section
    from degeneracy.runconfig import ModelSpec, resolve_model

    model, data, _ = resolve_model(ModelSpec(name="digits_mlp", split="train"))
    return llc_demo_section(model, data, out)


SECTIONS: list[tuple[str, str, Callable[[Path], dict[str, Any]]]] = [
    ("bases", "Interaction bases (LIB vs PCA)", _bases_section),
    ("graph", "Interaction graph, ablations and modules", _graph_section),
    ("degeneracy", "Degeneracy accounting", _degeneracy_section),
    ("llc", "Effective parameter count", _llc_section),
]


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
    one table (its keys as columns), anything deeper under its own heading."""
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


def run_demo(out: Path, *, force: bool, stage: Stage) -> Path:
    """Run every section (skipping finished ones), then write ``out/report.md``."""
    out.mkdir(parents=True, exist_ok=True)
    results = {key: stage(out, key, force, lambda fn=fn: fn(out)) for key, _, fn in SECTIONS}
    lines = [
        "# degeneracy demo report",
        "",
        "Every number below was measured by this run; the same results as JSON are in `stages/`.",
        "",
    ]
    for key, title, _ in SECTIONS:
        lines += [f"## {title}", "", *markdown(results[key]), ""]
    figures = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() else []
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
