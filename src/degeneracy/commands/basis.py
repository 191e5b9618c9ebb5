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

from degeneracy.commands.config import BasisRunConfig, ModelSpec, check_methods, load_yaml, resolve_model
from degeneracy.commands.errors import ConfigArgument, ForceOption, OutOption, echo_err, user_errors
from degeneracy.commands.placement import place, run_device
from degeneracy.commands.resume import StageLog, run_stage

__all__ = ["basis_stage_config", "basis_stage", "build_bases", "basis_command"]

QUIET_OPTIONS = ("progress",)  # options that change how a build looks, not what it computes


def basis_stage_config(
    spec: ModelSpec, node_layers: list[Any], method: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    """The config that determines one basis: model spec, node layers, method and basis options.

    >>> cfg = basis_stage_config(ModelSpec(), ["fc1", "fc2"], "lib", {"center": True, "progress": False})
    >>> cfg["method"], cfg["node_layers"], cfg["options"]  # progress changes the look, not the basis
    ('lib', ['fc1', 'fc2'], {'center': True})
    """
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

    >>> import tempfile, torch
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    >>> x = torch.randn(16, 2, dtype=torch.float64)
    >>> spec = ModelSpec(name="mypackage.models:make")  # what resolves to model and x
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     args = (model, x, ["1", "output"], "pca", {}, Path(tmp))
    ...     basis = basis_stage(*args, spec=spec, progress=False, log=None)
    ...     again = basis_stage(*args, spec=spec, progress=False)  # loaded from tmp/bases/pca.safetensors
    [basis.pca] done before with the same config, skipping (--force redoes it)
    >>> basis.dims, again.dims == basis.dims
    ({'1': 3, 'output': 2}, True)
    """
    import degeneracy

    check_methods([method])
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
    A model of your own (``"package.module:function"``) needs ``node_layers``:

    >>> import sys, types, torch
    >>> toy = types.ModuleType("toy")  # stands in for a module of yours on the path
    >>> toy.make = lambda: (torch.nn.Linear(2, 1), torch.zeros(5, 2))
    >>> sys.modules["toy"] = toy
    >>> build_bases(BasisRunConfig(model=ModelSpec(name="toy:make")), Path("runs/basis"))
    Traceback (most recent call last):
    ...
    ValueError: node_layers must be given for a model that is not bundled
    >>> del sys.modules["toy"]
    """
    model, data, default_layers = resolve_model(cfg.model)
    model, data = place(model, data, run_device(cfg.device))
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
    config skips finished bases).

    >>> from typer.testing import CliRunner
    >>> from degeneracy.commands import app
    >>> result = CliRunner().invoke(app, ["basis", "missing.yaml"])
    >>> result.exit_code, result.output.strip()
    (2, 'error: missing.yaml: no such config file')
    """
    with user_errors():
        cfg = load_yaml(config, BasisRunConfig)
        _, summary = build_bases(cfg, out, force=force, log=echo_err)
    typer.echo(json.dumps(summary, indent=2))
