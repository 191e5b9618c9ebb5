"""``degeneracy llc CONFIG.yaml``: the learning coefficient and N_eff(ε) of a model, from a config file.

A config names the model and data (:class:`degeneracy.commands.config.ModelSpec`), the loss and the sampler
settings, and optionally a sweep over nβ (λ(ε) curve) and loss scales ε for N_eff(ε)::

    model: {name: digits_mlp, split: train, dtype: float32}
    loss: behavioral            # or kl; cross_entropy / mse: the training loss on the data's labels
    positions: all              # "last": only the last position of sequence outputs
    sampler: {nbeta: 200, localization: 100, step_size: auto, num_chains: 4, num_draws: 400,
              num_burnin: 200, batch_size: 256, seed: 0}
    nbetas: [20, 200, 2000]     # optional: λ̂ over inverse temperatures
    epsilons: [1e-2, 1e-3]      # optional: N_eff at these loss scales

Each stage (``llc``, ``llc_curve``, ``n_eff``) writes its result atomically to OUT (``llc.safetensors``,
``llc_curve.safetensors``, ``n_eff.safetensors``; ``summary.json`` and figures on every run) and its
config to ``OUT/stages/``; a rerun with the same config skips it
(:func:`degeneracy.commands.resume.run_stage`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from torch import Tensor, nn

from degeneracy.commands.ablation_data import bundled_labels
from degeneracy.commands.basis import run_fingerprint
from degeneracy.commands.config import LLCRunConfig, ModelSpec, load_run
from degeneracy.commands.errors import ConfigArgument, ForceOption, OutOption, echo_err, user_errors
from degeneracy.commands.options import volume_options
from degeneracy.commands.resume import StageLog, run_stage
from degeneracy.data import call_model, model_output_tensor
from degeneracy.distributed import barrier
from degeneracy.fingerprint import check_model
from degeneracy.io import atomic_write_text, json_text
from degeneracy.llc.curve import EffectiveParameterCount, LLCCurve, effective_parameter_count, llc_curve
from degeneracy.llc.distributed import is_main_process, process_group
from degeneracy.llc.estimate import estimate_llc
from degeneracy.llc.model_loss import select_parameters
from degeneracy.llc.record import finite_json
from degeneracy.llc.result import LLCResult
from degeneracy.run import ParamLayout

__all__ = [
    "run_llc",
    "llc_command",
    "llc_demo_section",
    "demo_llc_sweep",
    "LastPosition",
    "NoValidResult",
    "labelled_data",
]


class LastPosition(nn.Module):
    """``model``'s output tensor at the last position: ``(batch, pos, d) -> (batch, d)``.

    >>> import torch
    >>> LastPosition(nn.Linear(4, 2))(torch.zeros(3, 5, 4)).shape
    torch.Size([3, 2])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Tensor:
        out = model_output_tensor(call_model(self.model, inputs))
        if out.dim() < 3:
            raise ValueError(f"positions='last' needs (batch, pos, d) outputs, got shape {tuple(out.shape)}")
        return out[:, -1]


def labelled_data(spec: ModelSpec, data: Any) -> Any:
    """``(inputs, labels)`` for the ``cross_entropy``/``mse`` losses: ``data`` itself when it carries
    labels (a tuple/list, a dict with ``"labels"``), else the labels of the bundled data ``spec`` names
    (digits: the class; modular addition: (a + b) mod p, at the last position), else a ``ValueError``.

    >>> import torch
    >>> x, y = labelled_data(ModelSpec(name="digits_mlp", split="test", limit=5), torch.zeros(5, 64))
    >>> y.shape, y.dtype
    (torch.Size([5]), torch.int64)
    """
    if isinstance(data, tuple | list) or (isinstance(data, dict) and "labels" in data):
        return data
    labels = bundled_labels(spec, data)
    if labels is None:
        raise ValueError(
            f"loss: cross_entropy / mse need labels, and the data of model {spec.name!r} carry none: make "
            "the factory return (model, (inputs, labels)), or use loss: behavioral / kl"
        )
    return (data, labels)


def _broadcast(message: str | None) -> str:
    """Rank 0's ``message``, on every rank."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _stage(
    out: Path, name: str, config: dict[str, Any], compute: Callable[[], Any], relative: str, kind: Any,
    model: nn.Module | None = None, **options: Any,
) -> Any:
    """One resumable stage whose result is the file ``out/relative`` of type ``kind`` (``.save``/
    ``.load``), :func:`degeneracy.commands.resume.run_stage`; a stored result that records another
    ``model`` than this one is recomputed. Under ``torch.distributed`` rank 0 decides
    (run or skip), writes and logs; the other ranks join the computation (their chains) or read rank 0's
    file, so every rank returns the same result and only rank 0 writes."""

    def save(result: Any) -> dict[str, str]:
        result.save(out / relative)
        return {"file": relative}

    def load(record: dict[str, Any]) -> Any:
        result = kind.load(out / record["file"])
        if model is not None:  # made on another model (a file put there by hand): recomputed, saying why
            check_model(result, model, what=f"stored {name} result")
        return result

    rank, world = process_group()
    if world == 1:
        return run_stage(out, name, config, compute, save=save, load=load, **options)
    if rank == 0:
        started: list[bool] = []

        def run() -> Any:
            _broadcast("compute")
            started.append(True)
            return compute()

        result = run_stage(out, name, config, run, save=save, load=load, **options)
        if not started:
            _broadcast("skip")
        return result
    barrier()  # rank 0's run_stage starts with one (every rank reads the records alike)
    if _broadcast(None) == "compute":
        return compute()
    return kind.load(out / relative)


class NoValidResult(RuntimeError):
    """A stage finished without a valid estimate (every chain diverged): the command exits 1.

    >>> str(NoValidResult("llc: no valid estimate"))
    'llc: no valid estimate'
    """


def _invalid_stages(
    result: LLCResult, curve: LLCCurve | None, n_eff: EffectiveParameterCount | None
) -> list[str]:
    """What produced no valid estimate, one line per stage."""
    problems = []
    if not math.isfinite(result.mean):
        reasons = "; ".join(f"chain {c}: {why}" for c, why in sorted(result.excluded_chains.items()))
        problems.append(f"llc: no valid estimate, every chain was excluded ({reasons or 'non-finite'})")
    if curve is not None and not bool(curve.llc.isfinite().any()):
        problems.append("llc_curve: no valid estimate at any nβ (every chain excluded at each)")
    if n_eff is not None and not bool(n_eff.n_eff.isfinite().any()):
        problems.append("n_eff: no valid N_eff at any ε")
    return problems


def run_llc(
    cfg: LLCRunConfig,
    model: nn.Module,
    data: Any,
    out: Path,
    *,
    force: bool = False,
    log: StageLog | None = print,
) -> dict[str, Any]:
    """Run every stage of ``cfg`` on ``model`` and ``data``; write results and figures to ``out``.

    Stages ``llc`` (the single estimate), ``llc_curve`` (``nbetas``) and ``n_eff`` (``epsilons``) are
    resumable: a rerun skips each one whose config (``cfg.model`` naming ``model``/``data``, the loss,
    the sampler and the stage's own fields) is unchanged, unless ``force``.

    >>> import tempfile, torch
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    >>> x = torch.randn(16, 2, dtype=torch.float64)
    >>> cfg = LLCRunConfig.model_validate({"sampler": {"num_chains": 1, "num_draws": 10, "num_burnin": 0,
    ...     "step_size": 1e-4}, "plots": False, "progress": False})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     summary = run_llc(cfg, model, x, Path(tmp), log=None)
    ...     again = run_llc(cfg, model, x, Path(tmp))
    [llc] done before with the same config, skipping (--force redoes it)
    >>> summary["estimate"]["num_parameters"], again["estimate"]["llc"] == summary["estimate"]["llc"]
    (13, True)
    """
    out = Path(out)
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(model, data)  # in every stage config: another model recomputes
    dtype = next(model.parameters()).dtype
    if isinstance(data, Tensor) and data.is_floating_point() and data.dtype != dtype:
        data = data.to(dtype)  # float inputs follow the model's dtype (ModelSpec.dtype)
    if cfg.loss in ("cross_entropy", "mse"):
        data = labelled_data(cfg.model, data)
    if cfg.positions == "last":
        model = LastPosition(model)
    params = (
        None if cfg.params is None else [f"model.{p}" if cfg.positions == "last" else p for p in cfg.params]
    )
    volume = None
    if cfg.epsilons and cfg.method == "volume":  # known options, and few enough parameters: checked now
        count = ParamLayout.of(select_parameters(model, params)).numel
        volume = volume_options(cfg.volume_options, count)
    sampler = cfg.sampler.model_dump()
    common = {"loss": cfg.loss, "params": params, "progress": cfg.progress and main, **sampler}
    sweep = {k: v for k, v in common.items() if k not in ("nbeta", "step_size")}
    base = cfg.model_dump(include={"model", "loss", "positions", "params", "sampler"})
    base["fingerprint"] = fingerprint
    stage = {"force": force, "log": log if main else None, "model": model}
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}

    result = _stage(
        out, "llc", base, lambda: estimate_llc(model, data, **common), "llc.safetensors", LLCResult, **stage
    )
    summary["estimate"] = _result_summary(result)

    curve = None
    if cfg.nbetas:
        curve = _stage(
            out,
            "llc_curve",
            {**base, "nbetas": cfg.nbetas},
            lambda: llc_curve(model, data, nbetas=cfg.nbetas, step_size=cfg.sampler.step_size, **sweep),
            "llc_curve.safetensors",
            LLCCurve,
            **stage,
        )
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
        epsilons = list(cfg.epsilons)

        def compute_n_eff() -> EffectiveParameterCount:
            if cfg.method == "volume":
                return effective_parameter_count(
                    model,
                    data,
                    epsilons,
                    method="volume",
                    loss=cfg.loss,
                    params=params,
                    volume_kwargs=volume,
                )
            return effective_parameter_count(model, data, epsilons, step_size=cfg.sampler.step_size, **sweep)

        n_eff_config = {**base, "epsilons": epsilons, "method": cfg.method}
        if cfg.method == "volume":  # the sampler plays no part
            n_eff_config = {k: v for k, v in n_eff_config.items() if k != "sampler"}
            n_eff_config["volume_options"] = cfg.volume_options
        n_eff = _stage(
            out, "n_eff", n_eff_config, compute_n_eff, "n_eff.safetensors", EffectiveParameterCount, **stage
        )
        summary["n_eff"] = {
            "epsilons": n_eff.epsilons.tolist(),
            "achieved_epsilons": n_eff.achieved_epsilons.tolist(),
            "n_eff": n_eff.n_eff.tolist(),
            "n_eff_std": n_eff.n_eff_std.tolist(),
            "method": n_eff.method,
        }

    if cfg.plots and main:
        summary["figures"] = _plots(result, curve, n_eff, out / "figures")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    problems = _invalid_stages(result, curve, n_eff)
    if problems:
        summary["errors"] = problems
    summary = finite_json(summary)  # JSON null, never a bare NaN token
    if main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str, allow_nan=False))
    if problems:
        raise NoValidResult("; ".join(problems))
    return summary


def _result_summary(result: LLCResult) -> dict[str, Any]:
    return {
        "llc": result.mean,
        "llc_std": result.std,
        "n_eff": result.n_eff,
        "n_eff_std": result.n_eff_std,
        "epsilon": result.epsilon,
        "nbeta": result.nbeta,
        "num_parameters": result.num_parameters,
        "step_size": result.config.get("step_size"),
        "engine": result.config.get("engine"),
        "mcse": result.mcse,
        "ess": result.ess,
        "rhat": result.rhat,
        "drift": result.drift[0],
        "drift_stderr": result.drift[1],
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
        title = f"effective parameter count (N = {result.num_parameters} parameters)"
        plt.close(plot_llc_curve(curves, files["n_eff"], title=title))
    return files


def llc_command(
    config: ConfigArgument, out: OutOption = Path("runs/llc"), force: ForceOption = False
) -> None:
    """The learning coefficient λ̂ and N_eff(ε) = 2 λ(ε) of a model from a config file (an
    :class:`LLCRunConfig`); results in OUT (a rerun with the same config skips the finished stages).
    Exits 1 when a stage produced no valid estimate (every chain diverged; JSON has null there), 2 on a
    bad config. Under torchrun the chains are split over the processes; only rank 0 writes.

    >>> from typer.testing import CliRunner
    >>> from degeneracy.commands import app
    >>> result = CliRunner().invoke(app, ["llc", "--help"])
    >>> result.exit_code, "Config fields (LLCRunConfig" in result.output, "--force" in result.output
    (0, True, True)
    """
    with user_errors():
        cfg, model, data, _ = load_run(config, LLCRunConfig)
        try:
            summary = run_llc(cfg, model, data, out, force=force, log=echo_err)
        except NoValidResult as failed:
            typer.secho(
                f"error: {failed}. The results and summary.json (nulls for the missing numbers) are in "
                f"{out}; lower sampler.step_size (or use step_size: auto) and rerun with --force",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(code=1) from failed
    if is_main_process():
        typer.echo(json.dumps(summary, indent=2, default=str, allow_nan=False))


def demo_llc_sweep(num_examples: int | None) -> tuple[list[float], dict[str, Any]]:
    """``(nbetas, settings)`` of the demo's λ(ε) sweep on ``num_examples`` inputs: nβ = (n / log n) ×
    (0.01, 0.1, 0.3) (n / log n taken as 100 when n is unknown) and the SGLD settings.

    >>> nbetas, settings = demo_llc_sweep(1000)
    >>> [round(b, 2) for b in nbetas], settings["localization"], settings["num_chains"]
    ([1.45, 14.48, 43.43], 10000.0, 4)
    """
    n = num_examples
    base = n / math.log(n) if n and n > 1 else 100.0
    nbetas = [base * f for f in (0.01, 0.1, 0.3)]
    settings = dict(num_chains=4, num_draws=500, num_burnin=500, batch_size=256, localization=1e4, seed=0)
    return nbetas, settings


def llc_demo_section(model: nn.Module, data: Any, out_dir: Path) -> dict[str, Any]:
    """The demo's λ(ε) section: a sweep of nβ = (n / log n) × (0.01, 0.1, 0.3) on ``model`` (behavioral
    loss), the N_eff(ε) and trace figures in ``out_dir/figures``, JSON in ``out_dir/llc``.

    SGLD needs about 10 (nβ h_max + γ) / γ steps to equilibrate the directions it counts (h_max the top
    Hessian eigenvalue); the localization γ = 10⁴ keeps that under ~1,000 steps on the bundled digits
    MLP, so the section takes a few seconds and its chains are stationary. At this γ a direction of
    curvature h counts once nβ h ≳ γ: N_eff(ε) grows as ε shrinks. Its sweep (:func:`demo_llc_sweep`)
    on the 1,437 training inputs of the digits MLP:

    >>> [round(b, 1) for b in demo_llc_sweep(1437)[0]]
    [2.0, 19.8, 59.3]
    """
    out_dir = Path(out_dir)
    nbetas, settings = demo_llc_sweep(int(data.shape[0]) if isinstance(data, Tensor) else None)
    t0 = time.perf_counter()
    curve = llc_curve(model, data, nbetas=nbetas, warn=False, **settings)
    folder = out_dir / "llc"
    curve.save(folder / "llc_curve.safetensors")
    last = curve.results[-1]
    last.save(folder / "llc.safetensors")
    figures = _plots(last, curve, None, out_dir / "figures")
    summary = {
        "num_parameters": last.num_parameters,
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
    atomic_write_text(folder / "summary.json", json_text(summary, indent=2))  # null, never a NaN token
    return summary
