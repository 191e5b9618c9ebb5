"""The ``degeneracy`` command line: a thin layer that parses a config and calls the library.

Commands: ``demo`` (the whole pipeline on the bundled models, writing a report), ``basis``,
``graph``, ``degeneracy`` and ``llc`` (one stage each, from a YAML config). Stages write their results
atomically; a rerun of ``demo`` skips the stages that finished (``--force`` redoes them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from degeneracy.runconfig import ModelSpec, StrictModel, load_yaml

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


class BasisRunConfig(StrictModel):
    """``degeneracy basis CONFIG.yaml``: a model, its node layers and the basis options.

    ``methods`` lists the bases to build; ``options`` are keyword arguments of
    :func:`degeneracy.interaction_basis` (``center``, ``gram_threshold``, ``integration_rule``, ...).
    """

    model: ModelSpec = ModelSpec()
    node_layers: list[Any] | None = None
    methods: list[str] = ["lib", "pca"]
    options: dict[str, Any] = {}


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def build_bases(cfg: BasisRunConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Build and save every basis of ``cfg`` to ``out/bases/METHOD.safetensors``; plot the spectra."""
    import degeneracy
    from degeneracy.runconfig import resolve_model

    model, data, default_layers = resolve_model(cfg.model)
    layers = cfg.node_layers or default_layers
    if layers is None:
        raise ValueError("node_layers must be given for a model that is not bundled")
    summary: dict[str, Any] = {}
    bases = {}
    options = {"progress": progress, **cfg.options}
    for method in cfg.methods:
        basis = degeneracy.interaction_basis(model, data, layers, method=method, **options)
        basis.save(out / "bases" / f"{method}.safetensors")
        bases[method] = basis
        summary[method] = {"dims": basis.dims, "seconds": round(basis.info["timings"]["total"], 3)}
    from degeneracy.report.basis_plots import plot_spectra

    plot_spectra(bases, out / "figures" / "spectra.png")
    return summary


@app.command()
def basis(
    config: Path = typer.Argument(..., help="YAML config (see BasisRunConfig)"),
    out: Path = typer.Option(Path("runs/basis"), help="output directory"),
) -> None:
    """Build interaction bases from a config file."""
    try:
        cfg = load_yaml(config, BasisRunConfig)
        summary = build_bases(cfg, out)
    except (ValueError, FileNotFoundError, ImportError) as err:
        _fail(err)
    typer.echo(json.dumps(summary, indent=2))


# ------------------------------------------------------------------------------------------------ demo


def _stage(out: Path, name: str, force: bool, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a demo stage unless its result file exists; write the result atomically."""
    from degeneracy.io import atomic_write_text

    marker = out / "stages" / f"{name}.json"
    if marker.exists() and not force:
        typer.echo(f"[{name}] done before, skipping (use --force to redo)")
        return json.loads(marker.read_text())
    typer.echo(f"[{name}] running ...")
    start = time.perf_counter()
    result = run()
    result["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_text(marker, json.dumps(result, indent=2, default=str))
    typer.echo(f"[{name}] finished in {result['seconds']} s")
    return result


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-report"), help="output directory"),
    force: bool = typer.Option(False, help="redo stages that already finished"),
) -> None:
    """The whole pipeline on the bundled models: bases, interaction graph and modules, degeneracy
    accounting and the learning coefficient, written to OUT/report.md with figures."""
    from degeneracy.report.demo import run_demo

    try:
        path = run_demo(out, force=force, stage=_stage)
    except (ValueError, FileNotFoundError, ImportError) as err:
        _fail(err)
    typer.echo(f"report written to {path}")


def _register_stage_commands() -> None:
    """The stage commands live beside their stage."""
    from degeneracy.accounting.cli import degeneracy_command
    from degeneracy.graph_cli import graph_command
    from degeneracy.llc.cli import llc_command

    app.command("graph", help="Build an interaction graph, ablations and modules from a config file.")(
        graph_command
    )
    app.command("degeneracy", help="Degeneracy accounting (Hessian rank, free directions) from a config.")(
        degeneracy_command
    )
    app.command("llc", help="Learning coefficient / effective parameter count from a config file.")(
        llc_command
    )


_register_stage_commands()


if __name__ == "__main__":  # pragma: no cover
    app()
