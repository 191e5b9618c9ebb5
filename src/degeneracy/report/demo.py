"""The demo: every stage of the library on the bundled models, collected into ``report.md``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from degeneracy.io import atomic_write_text

__all__ = ["run_demo"]

Stage = Callable[[Path, str, bool, Callable[[], dict[str, Any]]], dict[str, Any]]


def _bases_section(out: Path) -> dict[str, Any]:
    from degeneracy.cli import BasisRunConfig, build_bases

    cfg = BasisRunConfig(methods=["lib", "pca"])
    return {"model": "modadd (bundled), 3,830 training inputs, float64, centred", **build_bases(cfg, out)}


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


def run_demo(out: Path, *, force: bool, stage: Stage) -> Path:
    """Run every section (skipping finished ones), then write ``out/report.md``."""
    out.mkdir(parents=True, exist_ok=True)
    results = {key: stage(out, key, force, lambda fn=fn: fn(out)) for key, _, fn in SECTIONS}
    lines = ["# degeneracy demo report", ""]
    for key, title, _ in SECTIONS:
        lines += [f"## {title}", "", "```json", json.dumps(results[key], indent=2, default=str), "```", ""]
    figures = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() else []
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
