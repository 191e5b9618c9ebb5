"""``degeneracy basis CONFIG.yaml``: interaction bases from a config file, one resumable stage per method.

Each basis goes to ``OUT/bases/METHOD.safetensors`` with its stage record in
``OUT/stages/basis.METHOD.json``; a rerun with the same config (model, node layers, method, options)
loads the basis instead of building it again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from degeneracy.commands.config import BASIS_METHODS, BasisRunConfig, ModelSpec, load_yaml, resolve_model
from degeneracy.commands.errors import ConfigArgument, ForceOption, OutOption, echo_err, user_errors
from degeneracy.commands.resume import StageLog, run_stage

__all__ = ["basis_stage_config", "basis_stage", "build_bases", "basis_command"]

QUIET_OPTIONS = ("progress",)  # options that change how a build looks, not what it computes


def basis_stage_config(
    spec: ModelSpec, node_layers: list[Any], method: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The config that determines one basis: model spec, node layers, method and basis options."""
    return {
        "model": spec.model_dump(),
        "node_layers": list(node_layers),
        "method": method,
        "options": {k: v for k, v in options.items() if k not in QUIET_OPTIONS},
    }


def basis_stage(
    model: Any,
    data: Any,
    node_layers: list[Any],
    method: str,
    options: Mapping[str, Any],
    out: Path,
    *,
    spec: ModelSpec,
    progress: bool = True,
    force: bool = False,
    log: StageLog | None = print,
) -> Any:
    """Build (or, with the same config, load) the ``method`` basis into ``out/bases/METHOD.safetensors``.

    ``spec`` names the model in the stage config; ``model`` and ``data`` must be the ones it resolves to.
    """
    import degeneracy

    if method not in BASIS_METHODS:
        raise ValueError(f"unknown basis method {method!r}; choose from {BASIS_METHODS}")
    out = Path(out)
    relative = f"bases/{method}.safetensors"

    def build() -> Any:
        kwargs = {"progress": progress, **options}
        return degeneracy.interaction_basis(model, data, node_layers, method=method, **kwargs)

    def save(basis: Any) -> dict[str, Any]:
        basis.save(out / relative)
        return {"file": relative, "dims": basis.dims, "seconds": basis.info["timings"]["total"]}

    return run_stage(
        out,
        f"basis.{method}",
        basis_stage_config(spec, node_layers, method, options),
        build,
        save=save,
        load=lambda record: degeneracy.load_basis(out / record["file"]),
        force=force,
        log=log,
    )


def build_bases(
    cfg: BasisRunConfig,
    out: Path,
    *,
    progress: bool = True,
    force: bool = False,
    log: StageLog | None = print,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build (or load, when finished with the same config) every basis of ``cfg`` under ``out/bases``
    and plot their spectra to ``out/figures/spectra.png``.

    Returns ``(bases, summary)``: the bases by method and a JSON-able summary (dims, build seconds).
    """
    model, data, default_layers = resolve_model(cfg.model)
    layers = cfg.node_layers or default_layers
    if layers is None:
        raise ValueError("node_layers must be given for a model that is not bundled")
    bases = {
        method: basis_stage(
            model, data, layers, method, cfg.options, out, spec=cfg.model, progress=progress, force=force,
            log=log,
        )
        for method in cfg.methods
    }
    summary = {
        m: {"dims": b.dims, "seconds": round(b.info["timings"]["total"], 3)} for m, b in bases.items()
    }
    from degeneracy.report.basis_plots import plot_spectra

    plot_spectra(bases, Path(out) / "figures" / "spectra.png")
    return bases, summary


def basis_command(
    config: ConfigArgument, out: OutOption = Path("runs/basis"), force: ForceOption = False
) -> None:
    """Build interaction bases from a config file (a :class:`BasisRunConfig`; a rerun with the same
    config skips finished bases)."""
    with user_errors():
        cfg = load_yaml(config, BasisRunConfig)
        _, summary = build_bases(cfg, out, force=force, log=echo_err)
    typer.echo(json.dumps(summary, indent=2))
