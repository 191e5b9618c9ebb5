"""``degeneracy demo``: every stage of the library on the bundled models, collected into ``report.md``.

Each section (bases, graph, degeneracy, llc) is a resumable stage
(:func:`degeneracy.commands.resume.run_stage`) whose config is everything that determines it; a rerun
skips the sections whose config is unchanged, ``--force`` redoes them. The report itself is rendered
by :func:`degeneracy.report.markdown.markdown` from the sections' results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from degeneracy.commands.config import MODADD_NODE_LAYERS, BasisRunConfig, ModelSpec, resolve_model
from degeneracy.commands.errors import ForceOption, OutOption, echo_err, user_errors
from degeneracy.commands.resume import StageLog, run_stage
from degeneracy.io import atomic_write_text

__all__ = ["SECTIONS", "run_demo", "demo_command"]

BASES = BasisRunConfig(methods=["lib", "pca"])  # modadd (bundled), training inputs, float64, centred
DIGITS_ALL = ModelSpec(name="digits_mlp", split="all")
DIGITS_TRAIN = ModelSpec(name="digits_mlp", split="train")


def _bases(out: Path, force: bool) -> dict[str, Any]:
    from degeneracy.commands.basis import build_bases
    from degeneracy.data import num_examples

    start = time.perf_counter()
    n = num_examples(resolve_model(BASES.model)[1])
    model = f"modadd (bundled), its {n:,} training inputs, {BASES.model.dtype}, centred"
    _, summary = build_bases(BASES, out, progress=False, force=force, log=None)
    return {"model": model, **summary, "seconds": round(time.perf_counter() - start, 2)}


def _graph_config() -> Any:
    from degeneracy.commands.graph import demo_graph_config

    return demo_graph_config(basis=BASES.options)


def _graph(out: Path, force: bool) -> dict[str, Any]:
    from degeneracy.commands.basis import build_bases
    from degeneracy.commands.graph import graph_demo_section

    model, data, _ = resolve_model(BASES.model)
    bases, _ = build_bases(BASES, out, progress=False, log=None)  # finished by the bases section: loaded
    layers = BASES.node_layers or MODADD_NODE_LAYERS
    return graph_demo_section(model, data, bases, out, cfg=_graph_config(), node_layers=layers, force=force)


def _degeneracy(out: Path, force: bool) -> dict[str, Any]:
    from degeneracy.commands.degeneracy import degeneracy_demo_section

    model, data, _ = resolve_model(DIGITS_ALL)
    return degeneracy_demo_section(model, data, out, force=force)


def _llc(out: Path, force: bool) -> dict[str, Any]:
    from degeneracy.commands.llc import llc_demo_section

    model, data, _ = resolve_model(DIGITS_TRAIN)
    return llc_demo_section(model, data, out)


Section = tuple[str, str, Callable[[], dict[str, Any]], Callable[[Path, bool], dict[str, Any]]]

SECTIONS: list[Section] = [
    ("bases", "Interaction bases (LIB vs PCA)", lambda: {"bases": BASES.model_dump()}, _bases),
    (
        "graph",
        "Interaction graph, ablations and modules",
        lambda: {"bases": BASES.model_dump(), "graph": _graph_config().model_dump()},
        _graph,
    ),
    ("degeneracy", "Degeneracy accounting", lambda: {"model": DIGITS_ALL.model_dump()}, _degeneracy),
    ("llc", "Effective parameter count", lambda: {"model": DIGITS_TRAIN.model_dump()}, _llc),
]
"""``(key, title, config, run)`` of each section: ``config()`` is the section's stage config."""


def run_demo(out: Path, *, force: bool = False, log: StageLog | None = print) -> Path:
    """Run every section (skipping those finished with the same config), then write ``out/report.md``
    and ``out/report.html`` (:func:`degeneracy.report.html.write_html_report`).

    A rerun of a finished demo only rewrites the report (here the sections' records are stand-ins):

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     for key, _, config, _ in SECTIONS:
    ...         _ = run_stage(tmp, key, config(), lambda: {"seconds": 1.0}, log=None)
    ...     report = run_demo(Path(tmp), log=None).read_text()
    >>> for line in report.splitlines():
    ...     if line.startswith("## "):
    ...         print(line)
    ## Interaction bases (LIB vs PCA)
    ## Interaction graph, ablations and modules
    ## Degeneracy accounting
    ## Effective parameter count
    """
    from degeneracy.report.html import write_html_report
    from degeneracy.report.markdown import markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        key: run_stage(out, key, config(), lambda run=run: run(out, force), force=force, log=log)
        for key, _, config, run in SECTIONS
    }
    lines = [
        "# degeneracy demo report",
        "",
        "Every number below was measured by this run; the same results as JSON are in `stages/`.",
        "",
    ]
    for key, title, _, _ in SECTIONS:
        lines += [f"## {title}", "", *markdown(results[key]), ""]
    figures = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() else []
    if figures:
        lines += ["## Figures", ""] + [f"![{f.stem}](figures/{f.name})" for f in figures]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    write_html_report(out)  # out/report.html: the same results, self-contained and interactive
    return path


def demo_command(out: OutOption = Path("demo-report"), force: ForceOption = False) -> None:
    """The whole pipeline on the bundled models: bases, interaction graph and modules, degeneracy
    accounting and the learning coefficient, written to OUT/report.md with figures and to the
    self-contained OUT/report.html (interactive interaction graph).

    >>> import inspect
    >>> {name: p.default for name, p in inspect.signature(demo_command).parameters.items()}
    {'out': PosixPath('demo-report'), 'force': False}
    """
    with user_errors():
        path = run_demo(out, force=force, log=echo_err)
    typer.echo(f"report written to {path} and {path.with_suffix('.html')}")
