"""``degeneracy llc CONFIG.yaml``: the learning coefficient and N_eff(ε) of a model, from a config file.

A config names the model and data (:class:`degeneracy.runconfig.ModelSpec`), the loss and the sampler
settings, and optionally a sweep over nβ (λ(ε) curve) and loss scales ε for N_eff(ε)::

    model: {name: digits_mlp, split: train, dtype: float32}
    loss: behavioral            # or kl
    positions: all              # "last": only the last position of sequence outputs
    sampler: {nbeta: 200, localization: 100, step_size: auto, num_chains: 4, num_draws: 400,
              num_burnin: 200, batch_size: 256, seed: 0}
    nbetas: [20, 200, 2000]     # optional: λ̂ over inverse temperatures
    epsilons: [1e-2, 1e-3]      # optional: N_eff at these loss scales

Each stage writes its result atomically to OUT (``llc.safetensors``, ``llc_curve.safetensors``,
``n_eff.safetensors``, ``summary.json``, figures) and a rerun with the same config skips it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import typer
from pydantic import Field
from torch import Tensor, nn

from degeneracy.data import call_model, model_output_tensor
from degeneracy.io import atomic_write_text
from degeneracy.llc.curve import EffectiveParameterCount, LLCCurve, effective_parameter_count, llc_curve
from degeneracy.llc.estimate import estimate_llc
from degeneracy.llc.result import LLCResult
from degeneracy.runconfig import ModelSpec, StrictModel, load_yaml, resolve_model

__all__ = ["LLCSamplerConfig", "LLCRunConfig", "run_llc", "llc_command", "llc_demo_section", "LastPosition"]


class LLCSamplerConfig(StrictModel):
    """SGLD settings (see :func:`degeneracy.llc.estimate_llc`). ``nbeta: null`` means n / log n."""

    nbeta: float | None = Field(default=None, gt=0)
    localization: float = Field(default=100.0, ge=0)
    step_size: float | Literal["auto"] = "auto"
    num_chains: int = Field(default=4, ge=1)
    num_draws: int = Field(default=200, ge=1)
    num_burnin: int = Field(default=100, ge=0)
    thinning: int = Field(default=1, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    seed: int = 0
    engine: Literal["auto", "vmap", "batched"] = "auto"


class LLCRunConfig(StrictModel):
    """``degeneracy llc CONFIG.yaml``.

    Attributes:
        model: which model and data.
        loss: ``"behavioral"`` (mean squared output difference) or ``"kl"`` (classifiers).
        positions: ``"last"`` keeps only the last position of ``(batch, pos, d)`` outputs (e.g. the
            answer position of the modular-addition transformer).
        params: names of the parameters to sample (default: all).
        sampler: SGLD settings of the single estimate (and defaults of the sweeps).
        nbetas: optional sweep of inverse temperatures (the λ(ε) curve).
        epsilons: optional loss scales for N_eff(ε) (nβ found per ε, or the volume method).
        method: ``"sgld"`` or ``"volume"`` for ``epsilons`` (volume: at most 12 parameters).
        volume_options: keyword arguments of :func:`degeneracy.llc.volume_llc` (``num_points``, ...).
        plots: write figures (needs matplotlib).
        progress: show progress bars.
    """

    model: ModelSpec = ModelSpec(name="digits_mlp", dtype="float32")
    loss: Literal["behavioral", "kl"] = "behavioral"
    positions: Literal["all", "last"] = "all"
    params: list[str] | None = None
    sampler: LLCSamplerConfig = LLCSamplerConfig()
    nbetas: list[float] | None = Field(default=None, min_length=1)
    epsilons: list[float] | None = Field(default=None, min_length=1)
    method: Literal["sgld", "volume"] = "sgld"
    volume_options: dict[str, Any] = {}
    plots: bool = True
    progress: bool = True


class LastPosition(nn.Module):
    """``model``'s output tensor at the last position: ``(batch, pos, d) -> (batch, d)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Tensor:
        out = model_output_tensor(call_model(self.model, inputs))
        if out.dim() < 3:
            raise ValueError(f"positions='last' needs (batch, pos, d) outputs, got shape {tuple(out.shape)}")
        return out[:, -1]


def _cached(path: Path, kind: type, stamp: dict[str, Any]) -> Any | None:
    """The result at ``path`` if it exists and was made with the same ``stamp`` (config), else None."""
    if not path.exists():
        return None
    try:
        result = kind.load(path)
    except (ValueError, KeyError, OSError):
        return None
    return result if result.config.get("run_stamp") == stamp else None


def _stamped(result: Any, stamp: dict[str, Any]) -> Any:
    """A copy of ``result`` whose config records the run config it was made with."""
    return dataclasses.replace(result, config={**result.config, "run_stamp": stamp})


def run_llc(cfg: LLCRunConfig, model: nn.Module, data: Any, out: Path) -> dict[str, Any]:
    """Run every stage of ``cfg`` on ``model`` and ``data``; write results and figures to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    if isinstance(data, Tensor) and data.is_floating_point() and data.dtype != dtype:
        data = data.to(dtype)  # float inputs follow the model's dtype (ModelSpec.dtype)
    if cfg.positions == "last":
        model = LastPosition(model)
    params = (
        None if cfg.params is None else [f"model.{p}" if cfg.positions == "last" else p for p in cfg.params]
    )
    sampler = cfg.sampler.model_dump()
    common = {"loss": cfg.loss, "params": params, "progress": cfg.progress, **sampler}
    stamp = json.loads(cfg.model_dump_json(exclude={"plots", "progress"}))
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}

    path = out / "llc.safetensors"
    result = _cached(path, LLCResult, stamp)
    if result is None:
        result = _stamped(estimate_llc(model, data, **common), stamp)
        result.save(path)
    summary["estimate"] = _result_summary(result)

    curve = None
    if cfg.nbetas:
        path = out / "llc_curve.safetensors"
        curve = _cached(path, LLCCurve, stamp)
        if curve is None:
            sweep = {k: v for k, v in common.items() if k not in ("nbeta", "step_size")}
            curve = _stamped(
                llc_curve(model, data, nbetas=cfg.nbetas, step_size=cfg.sampler.step_size, **sweep), stamp
            )
            curve.save(path)
        summary["curve"] = {
            "nbetas": curve.nbetas.tolist(),
            "epsilons": curve.epsilons.tolist(),
            "llc": curve.llc.tolist(),
            "llc_std": curve.llc_std.tolist(),
            "n_eff": curve.n_eff.tolist(),
            "consistency_residual": curve.consistency_residual.tolist(),
        }

    n_eff = None
    if cfg.epsilons:
        path = out / "n_eff.safetensors"
        n_eff = _cached(path, EffectiveParameterCount, stamp)
        if n_eff is None:
            if cfg.method == "volume":
                n_eff = effective_parameter_count(
                    model,
                    data,
                    cfg.epsilons,
                    method="volume",
                    loss=cfg.loss,
                    params=params,
                    volume_kwargs=cfg.volume_options,
                )
            else:
                search = {k: v for k, v in common.items() if k not in ("nbeta", "step_size")}
                n_eff = effective_parameter_count(
                    model, data, cfg.epsilons, step_size=cfg.sampler.step_size, **search
                )
            n_eff = _stamped(n_eff, stamp)
            n_eff.save(path)
        summary["n_eff"] = {
            "epsilons": n_eff.epsilons.tolist(),
            "achieved_epsilons": n_eff.achieved_epsilons.tolist(),
            "n_eff": n_eff.n_eff.tolist(),
            "n_eff_std": n_eff.n_eff_std.tolist(),
            "method": n_eff.method,
        }

    if cfg.plots:
        summary["figures"] = _plots(result, curve, n_eff, out / "figures")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def _result_summary(result: LLCResult) -> dict[str, Any]:
    return {
        "llc": result.mean,
        "llc_std": result.std,
        "n_eff": result.n_eff,
        "n_eff_std": result.n_eff_std,
        "epsilon": result.epsilon,
        "nbeta": result.nbeta,
        "num_params": result.num_params,
        "step_size": result.config.get("step_size"),
        "engine": result.config.get("engine"),
        "excluded_chains": {str(k): v for k, v in result.excluded_chains.items()},
        "warnings": list(result.warnings),
        "draws_per_second": result.draws_per_second,
    }


def _plots(
    result: LLCResult, curve: LLCCurve | None, n_eff: EffectiveParameterCount | None, folder: Path
) -> dict[str, str]:
    try:
        from degeneracy.report.llc_plots import plot_llc_curve, plot_loss_traces
    except ImportError:  # pragma: no cover - matplotlib missing
        return {}
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return {}
    files = {"traces": str(folder / "llc_traces.png")}
    plt.close(plot_loss_traces(result, files["traces"]))
    curves: dict[str, Any] = {}
    if curve is not None:
        curves["SGLD sweep over nβ"] = curve
    if n_eff is not None:
        curves[f"N_eff at requested ε ({n_eff.method})"] = n_eff
    if curves:
        files["n_eff"] = str(folder / "llc_n_eff.png")
        title = f"effective parameter count (N = {result.num_params} parameters)"
        plt.close(plot_llc_curve(curves, files["n_eff"], title=title))
    return files


def llc_command(
    config: Path = typer.Argument(..., help="YAML config (see LLCRunConfig)"),
    out: Path = typer.Option(Path("runs/llc"), help="output directory"),
) -> None:
    """The learning coefficient λ̂ and N_eff(ε) = 2 λ(ε) of a model from a config file; results in OUT."""
    try:
        cfg = load_yaml(config, LLCRunConfig)
        model, data, _ = resolve_model(cfg.model)
        summary = run_llc(cfg, model, data, out)
    except (ValueError, FileNotFoundError, ImportError, KeyError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from err
    typer.echo(json.dumps(summary, indent=2, default=str))


def llc_demo_section(model: nn.Module, data: Any, out_dir: Path) -> dict[str, Any]:
    """The demo's λ(ε) section: a sweep of nβ = (n / log n) × (0.01, 0.1, 0.3) on ``model`` (behavioral
    loss), the N_eff(ε) and trace figures in ``out_dir/figures``, JSON in ``out_dir/llc``.

    SGLD needs about 10 (nβ h_max + γ) / γ steps to equilibrate the directions it counts (h_max the top
    Hessian eigenvalue); the localization γ = 10⁴ keeps that under ~1,000 steps on the bundled digits
    MLP, so the section takes a few seconds and its chains are stationary. At this γ a direction of
    curvature h counts once nβ h ≳ γ: N_eff(ε) grows as ε shrinks."""
    out_dir = Path(out_dir)
    n = int(data.shape[0]) if isinstance(data, Tensor) else None
    base = n / math.log(n) if n and n > 1 else 100.0
    nbetas = [base * f for f in (0.01, 0.1, 0.3)]
    settings = dict(num_chains=4, num_draws=500, num_burnin=500, batch_size=256, localization=1e4, seed=0)
    t0 = time.perf_counter()
    curve = llc_curve(model, data, nbetas=nbetas, warn=False, **settings)
    folder = out_dir / "llc"
    curve.save(folder / "llc_curve.safetensors")
    last = curve.results[-1]
    last.save(folder / "llc.safetensors")
    figures = _plots(last, curve, None, out_dir / "figures")
    summary = {
        "model_params": last.num_params,
        "settings": {**settings, "step_size": "auto (0.1 / (nβ h_max + γ))", "loss": "behavioral (MSE)"},
        "nbetas": [round(float(v), 4) for v in curve.nbetas],
        "epsilons": [float(f"{v:.4g}") for v in curve.epsilons],
        "llc": [round(float(v), 3) for v in curve.llc],
        "llc_std": [round(float(v), 3) for v in curve.llc_std],
        "n_eff": [round(float(v), 2) for v in curve.n_eff],
        "warnings": sorted({w.split(":")[0] for r in curve.results for w in r.warnings}),
        "figures": figures,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2))
    return summary
