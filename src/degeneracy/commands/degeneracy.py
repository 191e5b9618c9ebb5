"""``degeneracy degeneracy CONFIG.yaml``: degeneracy accounting from a config file, and the demo's section.

``degeneracy degeneracy CONFIG.yaml --out DIR`` reads a
:class:`~degeneracy.commands.config.DegeneracyRunConfig`, runs
:func:`~degeneracy.accounting.degeneracy_report` (with the Hessian spectrum) and, for chains of
linear layers, the Section 4 construction, and writes into ``DIR``:

* ``degeneracy_report.json`` — the report (sources, counts, Hessian rank and nullity at ε);
* ``hessian_spectrum.json`` — the eigenvalues (all of them, or the top k with the SLQ density);
* ``sparsified.json`` — the Section 4 accounting (when the model allows it);
* ``figures/degeneracy_hessian_spectrum.png`` and ``figures/degeneracy_sources.png``;
* ``stages/degeneracy.json`` — the stage record: a rerun with the same config skips the work.

Example config (every field optional; unknown fields are errors)::

    model: {name: digits_mlp, split: all, dtype: float64}
    epsilon: 0.0
    hessian: exact
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import typer
from torch import nn

from degeneracy.commands.basis import run_fingerprint
from degeneracy.commands.config import DegeneracyRunConfig, load_run
from degeneracy.commands.errors import (
    ConfigArgument,
    ForceOption,
    OutOption,
    echo_err,
    exit_if_invalid,
    user_errors,
)
from degeneracy.commands.resume import StageLog, run_stage
from degeneracy.commands.user_data import split_labels
from degeneracy.distributed import writes_enabled
from degeneracy.io import atomic_write_text, json_text

__all__ = ["degeneracy_command", "degeneracy_demo_section", "demo_degeneracy_config", "run_degeneracy"]


def _hessian_forward(model: nn.Module, position: int | None) -> Any:
    """The cheaper last-token forward for one-layer transformers read at the last position."""
    from degeneracy.adapters.transformer_lens.forward import (
        last_position_logits,
        supports_last_position_logits,
    )

    if position == -1 and supports_last_position_logits(model):
        return last_position_logits
    return None


def run_degeneracy(
    cfg: DegeneracyRunConfig,
    model: nn.Module,
    data: Any,
    out: Path,
    *,
    hessian_forward: Any = None,
    title: str | None = None,
    force: bool = False,
    log: StageLog | None = print,
) -> dict[str, Any]:
    """Run the report (and the Section 4 construction), write the files, return a JSON-able summary.

    One resumable stage (``out/stages/degeneracy.json``): a rerun with the same ``cfg`` (whose
    ``model`` names ``model`` and ``data``) returns the stored summary, unless ``force`` or one of the
    files it lists is gone. ``hessian_forward`` replaces the model call for the Hessian only (it must
    return the outputs at the position the report reads); by default one-layer transformers read at
    the last token use :func:`degeneracy.adapters.transformer_lens.forward.last_position_logits`.
    Inputs must have the model's dtype (the config's ``model.dtype`` says which):

    >>> import tempfile
    >>> model, x = nn.Linear(2, 1), torch.zeros(4, 2, dtype=torch.float64)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     run_degeneracy(DegeneracyRunConfig(), model, x, Path(tmp), log=None)
    Traceback (most recent call last):
    ...
    ValueError: input tensor has dtype torch.float64 but the model computes in torch.float32: ...
    """
    out = Path(out)
    config = {
        **cfg.model_dump(exclude={"device"}),  # where it runs does not change the result
        "hessian_forward": None if hessian_forward is None else _qualname(hessian_forward),
        "title": title,
        "fingerprint": run_fingerprint(model, data),  # another model under the same name recomputes
    }

    def load(summary: dict[str, Any]) -> dict[str, Any]:
        missing = [f for f in summary.get("files", {}).values() if not Path(f).exists()]
        if missing:
            raise FileNotFoundError(f"missing {missing}")
        return summary

    return run_stage(
        out,
        "degeneracy",
        config,
        lambda: _compute(cfg, model, data, out, hessian_forward=hessian_forward, title=title),
        load=load,
        force=force,
        log=log,
    )


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _compute(
    cfg: DegeneracyRunConfig,
    model: nn.Module,
    data: Any,
    out: Path,
    *,
    hessian_forward: Any,
    title: str | None,
) -> dict[str, Any]:
    from degeneracy.accounting import degeneracy_report, hessian_spectrum, sparsify
    from degeneracy.accounting.construction import SparsifiedModel
    from degeneracy.adapters.transformer_lens import is_hooked_transformer
    from degeneracy.report.accounting_plots import plot_hessian_spectrum, plot_sources

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    position: int | None
    if cfg.positions == "auto":
        position = -1 if is_hooked_transformer(model) else None
    else:
        position = cfg.positions
    hessian = None if cfg.hessian == "none" else cfg.hessian
    if hessian == "auto":  # exact up to 6,000 parameters (hessian_spectrum's own rule, by N alone)
        hessian = "exact" if sum(p.numel() for p in model.parameters()) <= 6000 else "lanczos"
    hessian_position = position
    if hessian_forward is None:
        hessian_forward = _hessian_forward(model, position)
        if hessian_forward is not None:
            hessian_position = None  # the last-token forward already returns (batch, vocab)
    if cfg.hessian_dtype == "auto":
        hessian_dtype = torch.float32 if hessian == "lanczos" else None
    else:
        hessian_dtype = getattr(torch, cfg.hessian_dtype)
    options: dict[str, Any] = {
        "dtype": hessian_dtype,
        "k": cfg.hessian_k,
        "block_size": cfg.hessian_block_size,
        "max_iter": cfg.hessian_max_products,
        "tol": cfg.hessian_tol,
        "num_trace_probes": cfg.num_trace_probes,
        "num_rank_probes": cfg.num_rank_probes,
        "num_rank_steps": cfg.num_rank_steps,
    }
    report = degeneracy_report(
        model,
        data,
        epsilon=cfg.epsilon,
        relative=cfg.relative,
        kind=cfg.kind,
        positions=position,
        batch_size=cfg.batch_size,
        jacobians=cfg.jacobians,
        jacobian_projections=cfg.jacobian_projections,
        hessian=None,
        union_max_parameters=cfg.union_max_parameters,
        seed=cfg.seed,
    )
    spectrum = None
    if hessian is not None:
        spectrum = hessian_spectrum(
            model,
            data,
            kind=cfg.kind,
            method=hessian,  # type: ignore[arg-type]
            positions=hessian_position,
            forward=hessian_forward,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            **{"progress": True, **options},  # a bar in a terminal, quiet otherwise
        )
        report.attach_hessian(spectrum)
    report.config["model"] = cfg.model.model_dump()
    report_path = report.save(out / "degeneracy_report.json")
    files = {"report": str(report_path)}
    summary: dict[str, Any] = {
        "num_parameters": report.num_parameters,
        "epsilon": report.epsilon,
        "relative": report.relative,
        "kind": report.kind,
        "num_examples": report.num_examples,
        "counts": {f"{r.layer} · {r.source}": r.count for r in report.rows if r.count},
        "total_counted": report.total,
        "distinct_free_directions": report.union,
    }
    figures = out / "figures"
    if spectrum is not None:
        files["spectrum"] = str(spectrum.save(out / "hessian_spectrum.json"))
        eps_lines = sorted({*cfg.plot_epsilons, *([cfg.epsilon] if cfg.epsilon > 0 else [])})
        files["spectrum_plot"] = str(
            plot_hessian_spectrum(
                spectrum, figures / "degeneracy_hessian_spectrum.png", epsilons=eps_lines, title=title
            )
        )
        summary.update(
            hessian_method=spectrum.method,
            hessian_rank=report.hessian_rank,
            hessian_nullity=report.hessian_nullity,
            hessian_rank_stderr=report.hessian_stderr,
            hessian_top_eigenvalues=[float(v) for v in spectrum.eigenvalues[:5]],
            hessian_seconds=round(spectrum.timings.get("total", 0.0), 3),
        )
    files["sources_plot"] = str(plot_sources(report, figures / "degeneracy_sources.png"))
    if cfg.sparsify and not is_hooked_transformer(model):
        try:
            result: SparsifiedModel = sparsify(model, data, epsilon=0.0, batch_size=cfg.batch_size)
        except (ValueError, NotImplementedError) as err:
            summary["section4"] = {"skipped": str(err)}
        else:
            section4 = result.to_dict()
            atomic_write_text(out / "sparsified.json", json_text(section4, indent=2))
            files["section4"] = str(out / "sparsified.json")
            summary["section4"] = {k: v for k, v in section4.items() if k != "layers"}
    summary["files"] = files
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    summary["table"] = str(report)
    return summary


def degeneracy_command(
    config: ConfigArgument, out: OutOption = Path("runs/degeneracy"), force: ForceOption = False
) -> None:
    """Degeneracy accounting from a config file (a :class:`DegeneracyRunConfig`): sources of free
    directions, Hessian spectrum and rank at ε, and the Section 4 construction; results in OUT (a rerun
    with the same config skips).

    >>> import tempfile
    >>> from typer.testing import CliRunner
    >>> from degeneracy.commands import app
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     config = Path(tmp) / "deg.yaml"
    ...     _ = config.write_text("{hessian: lanczos, hessian_k: 9, hessian_max_products: 4}")
    ...     result = CliRunner().invoke(app, ["degeneracy", str(config), "--out", tmp])
    >>> result.exit_code, "hessian_max_products must be at least hessian_k" in result.output
    (2, True)
    """
    with user_errors():
        cfg, model, data, _ = load_run(config, DegeneracyRunConfig)
        data, _ = split_labels(data)  # a factory's (inputs, labels): the accounting takes the inputs
        summary = dict(run_degeneracy(cfg, model, data, out, force=force, log=echo_err))
    table = summary.pop("table")
    typer.echo(table)
    typer.echo(json_text({k: v for k, v in summary.items() if k != "counts"}, indent=2, default=str))
    exit_if_invalid(summary, "degeneracy")  # a stage without a valid result: exit code 1


def demo_degeneracy_config(model: nn.Module) -> DegeneracyRunConfig:
    """The demo's degeneracy config for ``model``: the Hessian path by size (``"auto"``), or, for a
    TransformerLens model, Lanczos with projected Jacobian Grams in batches of 1,024.

    >>> demo_degeneracy_config(nn.Linear(3, 1)).hessian
    'auto'
    """
    from degeneracy.adapters.transformer_lens import is_hooked_transformer

    if is_hooked_transformer(model):
        return DegeneracyRunConfig(hessian="lanczos", jacobian_projections=8, rank_probes=0, batch_size=1024)
    return DegeneracyRunConfig(hessian="auto")


def degeneracy_demo_section(
    model: nn.Module, data: Any, out_dir: Path, *, force: bool = False
) -> dict[str, Any]:
    """The demo's degeneracy section: the report at ε = 0 with the exact Hessian spectrum, the Section 4
    construction, figures in ``out_dir/figures`` and JSON in ``out_dir/degeneracy``.

    Made for the bundled digits MLP on its 1,797 inputs (float64), where it takes a few seconds; a
    TransformerLens model gets the Lanczos path at its last position. Its config
    (:func:`demo_degeneracy_config`) for an MLP:

    >>> cfg = demo_degeneracy_config(nn.Linear(64, 10))
    >>> cfg.epsilon, cfg.hessian, cfg.positions, cfg.sparsify  # "auto": exact up to 6,000 parameters
    (0.0, 'auto', 'auto', True)
    """
    from degeneracy.adapters.transformer_lens import is_hooked_transformer

    out_dir = Path(out_dir)
    cfg = demo_degeneracy_config(model)
    model = model.to(torch.float64) if not is_hooked_transformer(model) else model
    if isinstance(data, torch.Tensor) and data.is_floating_point():
        data = data.to(torch.float64)
    folder = out_dir / "degeneracy"
    summary = dict(run_degeneracy(cfg, model, data, folder, title=None, force=force, log=None))
    summary["files"] = dict(summary["files"])
    # figures of the demo live in out_dir/figures
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for key in ("spectrum_plot", "sources_plot"):
        path = summary["files"].get(key)
        if path:
            target = figures / Path(path).name
            if writes_enabled():  # rank 0 under torchrun
                target.write_bytes(Path(path).read_bytes())
            summary["files"][key] = str(target)
    summary.pop("table", None)
    return summary
