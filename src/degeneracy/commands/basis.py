"""``degeneracy basis CONFIG.yaml``: interaction bases from a config file, one resumable stage per method.

Each basis goes to ``OUT/bases/METHOD.safetensors`` with its stage record in
``OUT/stages/basis.METHOD.json``; a rerun with the same config (model, node layers, method, options)
loads the basis instead of building it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer

from degeneracy.commands.config import BasisRunConfig, ModelSpec, check_methods, load_yaml, resolve_model
from degeneracy.commands.errors import (
    ConfigArgument,
    ForceOption,
    OutOption,
    echo_err,
    exit_if_invalid,
    user_errors,
)
from degeneracy.commands.placement import place, run_device
from degeneracy.commands.resume import StageLog, run_stage
from degeneracy.commands.user_data import split_labels
from degeneracy.io import json_text

__all__ = [
    "basis_stage_config", "run_fingerprint", "preflight", "basis_stage", "build_bases", "basis_command"
]

QUIET_OPTIONS = ("progress",)  # options that change how a build looks, not what it computes


def basis_stage_config(
    spec: ModelSpec,
    node_layers: list[Any],
    method: str,
    options: Mapping[str, Any],
    fingerprint: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config that determines one basis: model spec, node layers, method and basis options, and
    the fingerprint of the model and data (:func:`run_fingerprint`), so that a rerun on a model whose
    weights changed under the same name recomputes instead of reusing a basis of the old model.

    >>> cfg = basis_stage_config(ModelSpec(), ["fc1", "fc2"], "lib", {"center": True, "progress": False})
    >>> cfg["method"], cfg["node_layers"], cfg["options"]  # progress changes the look, not the basis
    ('lib', ['fc1', 'fc2'], {'center': True})
    """
    config = {
        "model": spec.model_dump(),
        "node_layers": list(node_layers),
        "method": method,
        "options": {k: v for k, v in options.items() if k not in QUIET_OPTIONS},
    }
    if fingerprint is not None:
        config["fingerprint"] = dict(fingerprint)
    return config


def run_fingerprint(model: Any, data: Any) -> dict[str, Any]:
    """The fingerprints (:mod:`degeneracy.fingerprint`) of the model and the data of a run.

    >>> import torch
    >>> fp = run_fingerprint(torch.nn.Linear(2, 1), torch.zeros(3, 2))
    >>> sorted(fp), len(fp["model"])
    (['data', 'model'], 64)
    """
    from degeneracy.fingerprint import data_fingerprint, model_fingerprint

    return {"model": model_fingerprint(model), "data": data_fingerprint(data)}


def preflight(model: Any, data: Any, node_layers: list[Any] | None) -> None:
    """Checks of a run before its first stage: the node layers exist in the model, and the model takes
    the data (:func:`degeneracy.checks.check_model_accepts` on the first examples).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh())
    >>> preflight(model, torch.zeros(3, 2), ["1", "output"])
    >>> preflight(model, torch.zeros(3, 2), ["fc9"])
    Traceback (most recent call last):
    ...
    ValueError: unknown node layer module(s) ['fc9']. Valid names: 'output', '0', '1'
    """
    from torch import Tensor

    from degeneracy.capture import as_node_layers
    from degeneracy.checks import check_model_accepts, check_module

    check_module(model)
    if node_layers:
        as_node_layers(model, node_layers)
    if isinstance(data, Tensor | Mapping):
        check_model_accepts(model, data)
    elif isinstance(data, list | tuple) and data:
        from degeneracy.checks import check_batches_alike
        from degeneracy.data import iter_batches

        check_batches_alike(iter_batches(data))


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
    fingerprint: Mapping[str, Any] | None = None,
) -> Any:
    """Build (or, with the same config, load) the ``method`` basis into ``out/bases/METHOD.safetensors``.

    ``spec`` names the model in the stage config; ``model`` and ``data`` must be the ones it resolves to
    (their fingerprint, :func:`run_fingerprint`, is part of the stage config; pass it when known).

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
        basis_stage_config(
            spec, node_layers, method, options, fingerprint or run_fingerprint(model, data)
        ),
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
    data, _ = split_labels(data)  # a factory's (inputs, labels): the bases take the inputs
    model, data = place(model, data, run_device(cfg.device))
    layers = cfg.node_layers or default_layers
    if layers is None:
        raise ValueError("node_layers must be given for a model that is not bundled")
    preflight(model, data, layers)
    fingerprint = run_fingerprint(model, data)
    bases = {
        method: basis_stage(
            model, data, layers, method, cfg.options, out, spec=cfg.model, progress=progress, force=force,
            log=log, fingerprint=fingerprint,
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
    typer.echo(json_text(summary, indent=2))
    exit_if_invalid(summary, "basis")  # a stage without a valid result: exit code 1
