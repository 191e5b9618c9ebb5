"""λ(ε) and N_eff(ε) = 2 λ(ε) over loss scales (paper eq 8–9, METHOD §7), and step-size calibration.

At inverse temperature nβ the SGLD estimate is a smoothed λ(ε) at the loss scale
ε = λ̂ / nβ = E[L] − L(θ*), so a sweep over nβ traces the curve (:func:`llc_curve`), and
:func:`effective_parameter_count` picks nβ for each requested ε by the fixed point nβ ← λ̂(nβ) / ε.
Along the sweep the estimates must satisfy dλ̂/d log nβ = λ̂ − λ̂_var (exact at equilibrium for
full-batch losses); the curve reports both sides. For models with few parameters the direct volume
estimator (:func:`degeneracy.llc.volume.volume_llc`) gives λ(ε) without SGLD (``method="volume"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from degeneracy.behavioral import behavioral_loss_from_outputs, without_padding
from degeneracy.data import eval_mode
from degeneracy.deprecation import renamed_fields
from degeneracy.display import html_summary, text_summary
from degeneracy.fingerprint import result_fingerprint
from degeneracy.llc.estimate import LLCWarning, estimate_llc, sample_sgld
from degeneracy.llc.model_loss import loss_kind, materialize, reference_outputs, select_parameters
from degeneracy.llc.record import NOT_SAVED, TensorRecord
from degeneracy.llc.result import EffectiveCount, LLCResult, checked_against
from degeneracy.llc.volume import volume_llc
from degeneracy.run import ParamLayout, functional_output, model_device, model_dtype

__all__ = [
    "LLCCurve",
    "EffectiveParameterCount",
    "StepSizeCalibration",
    "llc_curve",
    "sgld_llc_curve",
    "effective_parameter_count",
    "calibrate_step_size",
    "behavioral_loss_fn",
    "load_llc_curve",
    "load_effective_parameter_count",
]

StepSize = float | Literal["auto"] | Callable[[float], float]


def _step_for(step_size: StepSize, nbeta: float) -> float | Literal["auto"]:
    if callable(step_size):
        return float(step_size(nbeta))
    return step_size


def _central_slope(x: Tensor, y: Tensor) -> Tensor:
    """dy/dx by central differences (one-sided at the ends); NaN with fewer than two points."""
    k = x.numel()
    if k < 2:
        return torch.full_like(y, math.nan)
    out = torch.empty_like(y)
    out[1:-1] = (y[2:] - y[:-2]) / (x[2:] - x[:-2])
    out[0] = (y[1] - y[0]) / (x[1] - x[0])
    out[-1] = (y[-1] - y[-2]) / (x[-1] - x[-2])
    return out


@dataclass(frozen=True)
class LLCCurve(EffectiveCount, TensorRecord):
    """λ̂ over a sweep of inverse temperatures, with the loss scale each one probes.

    Attributes:
        nbetas: the inverse temperatures nβ (ascending).
        epsilons: ε = λ̂ / nβ (descending with nβ).
        llc, llc_std: λ̂ and its spread over chains.
        llc_var: the variance estimator λ̂_var = (nβ)² Var(L).
        slope: dλ̂ / d log nβ by finite differences along the sweep.
        results: the estimate at each nβ.

    >>> import os, tempfile
    >>> quadratic = lambda w, _: w.square().sum()   # λ = 1/2 at every scale
    >>> curve = sgld_llc_curve(quadratic, torch.zeros(1, dtype=torch.float64), nbetas=[10.0, 100.0],
    ...                        num_chains=2, num_draws=20, warn=False)
    >>> curve.nbetas.tolist(), curve.n_eff.shape
    ([10.0, 100.0], torch.Size([2]))
    >>> path = curve.save(os.path.join(tempfile.mkdtemp(), "curve.safetensors"))
    >>> torch.equal(load_llc_curve(path).llc, curve.llc)
    True
    """

    KIND: ClassVar[str] = "degeneracy.LLCCurve"
    REQUIRED: ClassVar[tuple[str, ...]] = ("nbetas", "llc")

    nbetas: Float[Tensor, " points"]
    epsilons: Float[Tensor, " points"]
    llc: Float[Tensor, " points"]
    llc_std: Float[Tensor, " points"]
    llc_var: Float[Tensor, " points"]
    slope: Float[Tensor, " points"]
    results: tuple[LLCResult, ...] = field(default=(), metadata=NOT_SAVED)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def consistency_residual(self) -> Tensor:
        """dλ̂/d log nβ − (λ̂ − λ̂_var): zero at equilibrium (full-batch losses); large values flag
        unconverged chains or minibatch noise in λ̂_var."""
        return self.slope - (self.llc - self.llc_var)

    def _display(self) -> tuple[str, list[tuple[str, Any]], list[str], list[list[Any]]]:
        headers = ["nβ", "ε = λ̂/nβ", "λ̂", "λ̂ std", "N_eff = 2λ̂"]
        columns = [self.nbetas, self.epsilons, self.llc, self.llc_std, self.n_eff]
        rows = [list(r) for r in zip(*(c.tolist() for c in columns), strict=True)]
        return f"LLCCurve: {len(rows)} inverse temperatures", [], headers, rows

    def __repr__(self) -> str:
        """One row per inverse temperature: nβ, ε, λ̂, its spread and N_eff (not the results).

        >>> points = [torch.tensor([10.0], dtype=torch.float64) for _ in range(6)]
        >>> print(LLCCurve(*points))
        LLCCurve: 1 inverse temperatures
          nβ  ε = λ̂/nβ  λ̂  λ̂ std  N_eff = 2λ̂
          10         10  10      10           20
        """
        return text_summary(*self._display())

    def _repr_html_(self) -> str:
        return html_summary(*self._display())


def load_llc_curve(
    path: str | Path, model: nn.Module | None = None, *, allow_other_model: bool = False
) -> LLCCurve:
    """An :class:`LLCCurve` saved with :meth:`LLCCurve.save` (the file's kind is checked); with ``model``,
    checked to have been made on it, as by :func:`~degeneracy.llc.result.load_llc`. See
    :class:`LLCCurve` for an example.

    >>> import os, tempfile
    >>> curve = LLCCurve(*(torch.ones(2, dtype=torch.float64) for _ in range(6)))
    >>> path = curve.save(os.path.join(tempfile.mkdtemp(), "curve.safetensors"))
    >>> load_llc_curve(path).llc.tolist()
    [1.0, 1.0]
    """
    return checked_against(LLCCurve.load(path), model, "LLC curve", allow_other_model)


def _curve_from_results(
    nbetas: Sequence[float], results: list[LLCResult], config: dict[str, Any]
) -> LLCCurve:
    order = sorted(range(len(nbetas)), key=lambda i: nbetas[i])
    nb = torch.tensor([float(nbetas[i]) for i in order], dtype=torch.float64)
    res = tuple(results[i] for i in order)
    llc = torch.tensor([r.mean for r in res], dtype=torch.float64)
    return LLCCurve(
        nbetas=nb,
        epsilons=llc / nb,
        llc=llc,
        llc_std=torch.tensor([r.std for r in res], dtype=torch.float64),
        llc_var=torch.tensor([r.variance_estimate for r in res], dtype=torch.float64),
        slope=_central_slope(nb.log(), llc),
        results=res,
        config=config,
    )


def llc_curve(
    model: nn.Module,
    data: Any,
    *,
    nbetas: Sequence[float],
    step_size: StepSize = "auto",
    **kwargs: Any,
) -> LLCCurve:
    """λ̂(nβ) of ``model`` for each nβ in ``nbetas`` (:func:`~degeneracy.llc.estimate.estimate_llc`
    with ``kwargs``); ``step_size`` may be a float, ``"auto"`` (per nβ) or a function of nβ.

    >>> model = torch.nn.Linear(1, 1, bias=False).double()
    >>> x = torch.linspace(-1, 1, 20, dtype=torch.float64).unsqueeze(1)
    >>> curve = llc_curve(model, x, nbetas=[20.0, 40.0], num_chains=2, num_draws=20, num_burnin=5, warn=False)
    >>> curve.epsilons.shape
    torch.Size([2])
    """
    if not nbetas:
        raise ValueError("nbetas is empty")
    results = [
        estimate_llc(model, data, nbeta=float(nb), step_size=_step_for(step_size, float(nb)), **kwargs)
        for nb in nbetas
    ]
    config = {"kind": "sgld", **_jsonable(kwargs), "fingerprint": _fingerprint_of(results, model, data)}
    return _curve_from_results(list(nbetas), results, config)


def _fingerprint_of(results: Sequence[LLCResult], model: nn.Module, data: Any) -> dict[str, Any]:
    """The model + data fingerprint the estimates recorded (computed again only if they hold none)."""
    found = results[0].config.get("fingerprint") if results else None
    return dict(found) if isinstance(found, dict) else result_fingerprint(model, data)


def sgld_llc_curve(
    loss_fn: Callable[[Any, Any], Tensor],
    init_params: Tensor | dict[str, Tensor],
    data: Sequence[Any] | None = None,
    *,
    nbetas: Sequence[float],
    step_size: StepSize = "auto",
    **kwargs: Any,
) -> LLCCurve:
    """:func:`llc_curve` for a functional loss (:func:`~degeneracy.llc.estimate.sample_sgld`); see
    :class:`LLCCurve` for an example.

    >>> curve = sgld_llc_curve(lambda w, _: w.square().sum(), torch.zeros(1, dtype=torch.float64),
    ...                        nbetas=[10.0, 20.0], num_chains=2, num_draws=10, warn=False)
    >>> len(curve.results)
    2
    """
    if not nbetas:
        raise ValueError("nbetas is empty")
    results = [
        sample_sgld(
            loss_fn, init_params, data, nbeta=float(nb), step_size=_step_for(step_size, float(nb)), **kwargs
        )
        for nb in nbetas
    ]
    return _curve_from_results(list(nbetas), results, {"kind": "sgld", **_jsonable(kwargs)})


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if isinstance(v, str | int | float | bool | type(None))}


@renamed_fields(num_params="num_parameters")
@dataclass(frozen=True)
class EffectiveParameterCount(TensorRecord):
    """N_eff(ε) = 2 λ(ε) at requested loss scales.

    Attributes:
        epsilons: the requested ε.
        achieved_epsilons: the scale each estimate actually probes (SGLD: λ̂ / nβ; volume: ε).
        n_eff, n_eff_std: N_eff and its error bar (spread over chains, or over repeats for the
            volume method).
        nbetas: the inverse temperatures used (NaN for the volume method).
        method: ``"sgld"`` or ``"volume"``.
        num_parameters: P, the number of parameters counted (``num_params`` is its former, deprecated
            name, as an attribute and a constructor keyword; files saved under it load).
        results: the final SGLD estimate per ε (empty for the volume method).

    >>> import os, tempfile
    >>> model = torch.nn.Linear(1, 1, bias=False).double()
    >>> x = torch.linspace(-1, 1, 20, dtype=torch.float64).unsqueeze(1)
    >>> options = {"num_points": 60, "num_repeats": 1, "num_mcmc_steps": 2}
    >>> count = effective_parameter_count(model, x, [1e-3], method="volume", volume_kwargs=options)
    >>> count.method, count.num_parameters
    ('volume', 1)
    >>> path = count.save(os.path.join(tempfile.mkdtemp(), "n_eff.safetensors"))
    >>> torch.equal(load_effective_parameter_count(path).n_eff, count.n_eff)
    True
    """

    KIND: ClassVar[str] = "degeneracy.EffectiveParameterCount"
    REQUIRED: ClassVar[tuple[str, ...]] = ("n_eff",)

    epsilons: Float[Tensor, " points"]
    achieved_epsilons: Float[Tensor, " points"]
    n_eff: Float[Tensor, " points"]
    n_eff_std: Float[Tensor, " points"]
    nbetas: Float[Tensor, " points"]
    method: str
    num_parameters: int
    results: tuple[LLCResult, ...] = field(default=(), metadata=NOT_SAVED)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def llc(self) -> Tensor:
        """λ(ε) = N_eff(ε) / 2."""
        return self.n_eff / 2.0

    def _display(self) -> tuple[str, list[tuple[str, Any]], list[str], list[list[Any]]]:
        headers = ["ε requested", "ε achieved", "N_eff", "N_eff std", "nβ"]
        columns = [self.epsilons, self.achieved_epsilons, self.n_eff, self.n_eff_std, self.nbetas]
        rows = [list(r) for r in zip(*(c.tolist() for c in columns), strict=True)]
        facts: list[tuple[str, Any]] = [("method", self.method), ("parameters P", self.num_parameters)]
        return "EffectiveParameterCount: N_eff(ε) = 2 λ(ε)", facts, headers, rows

    def __repr__(self) -> str:
        """The method, P and one row per ε (requested and achieved), N_eff and its error bar.

        >>> ones = [torch.ones(1, dtype=torch.float64) for _ in range(5)]
        >>> print(EffectiveParameterCount(*ones, method="sgld", num_parameters=3))
        EffectiveParameterCount: N_eff(ε) = 2 λ(ε)
          method: sgld
          parameters P: 3
          ε requested  ε achieved  N_eff  N_eff std  nβ
                    1           1      1          1   1
        """
        return text_summary(*self._display())

    def _repr_html_(self) -> str:
        return html_summary(*self._display())


def load_effective_parameter_count(
    path: str | Path, model: nn.Module | None = None, *, allow_other_model: bool = False
) -> EffectiveParameterCount:
    """An :class:`EffectiveParameterCount` saved with :meth:`EffectiveParameterCount.save` (the file's
    kind is checked); with ``model``, checked to have been made on it, as by
    :func:`~degeneracy.llc.result.load_llc`. See :class:`EffectiveParameterCount` for an example.

    >>> import os, tempfile
    >>> ones = [torch.ones(1, dtype=torch.float64) for _ in range(5)]
    >>> count = EffectiveParameterCount(*ones, method="sgld", num_parameters=3)
    >>> path = count.save(os.path.join(tempfile.mkdtemp(), "n_eff.safetensors"))
    >>> load_effective_parameter_count(path).llc.tolist()
    [0.5]
    """
    count = EffectiveParameterCount.load(path)
    return checked_against(count, model, "effective parameter count", allow_other_model)


def behavioral_loss_fn(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "behavioral",
    params: Sequence[str] | Callable[[str], bool] | None = None,
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The full-batch behavioral loss as a function of the flat parameter vector, and θ* (flat).

    Returns ``(loss_fn, center)`` with ``loss_fn(theta: (P,)) -> scalar``, for
    :func:`~degeneracy.llc.volume.volume_llc` or :func:`~degeneracy.llc.estimate.sample_sgld`. The loss
    is :func:`degeneracy.behavioral.behavioral_loss_from_outputs` (summed over positions, METHOD §6).

    >>> model = torch.nn.Linear(2, 1).double()
    >>> loss_fn, center = behavioral_loss_fn(model, torch.ones(4, 2, dtype=torch.float64))
    >>> center.shape, loss_fn(center).item()
    (torch.Size([3]), 0.0)
    """
    kind = loss_kind(loss)
    chosen = select_parameters(model, params)
    layout = ParamLayout.of(chosen)
    center = layout.flatten(chosen).detach()
    examples = materialize(data, model_device(model), model_dtype(model))
    if examples.pooled is None:
        raise ValueError("behavioral_loss_fn needs data that fit in one batch of tensors")
    inputs = examples.pooled.inputs
    with eval_mode(model):
        reference = without_padding(reference_outputs(model, examples.pooled), inputs)

    def loss_fn(theta: Tensor) -> Tensor:
        with eval_mode(model):  # called later, whatever the model's mode then
            output = without_padding(functional_output(model, layout.unflatten(theta), inputs), inputs)
        return behavioral_loss_from_outputs(output, reference, kind)

    return loss_fn, center


def effective_parameter_count(
    model: nn.Module,
    data: Any,
    epsilons: Sequence[float],
    *,
    method: Literal["sgld", "volume"] = "sgld",
    max_iter: int = 3,
    tolerance: float = 0.25,
    llc_guess: float | None = None,
    step_size: StepSize = "auto",
    radius: float = 1.0,
    volume_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> EffectiveParameterCount:
    """N_eff(ε) = 2 λ(ε) of ``model`` on the behavioral loss at each loss scale ε (paper eq 9).

    ``method="sgld"``: for each ε (largest first) nβ is found by the fixed point nβ ← λ̂ / ε, starting
    from ``llc_guess`` (default: P/4, then the previous ε's λ̂), until the probed scale λ̂ / nβ is
    within a factor ``1 + tolerance`` of ε or ``max_iter`` estimates were made; the probed scale is
    reported as ``achieved_epsilons``. ``kwargs`` go to :func:`~degeneracy.llc.estimate.estimate_llc`.

    ``method="volume"``: the direct volume estimator on the box θ* + [−radius, radius]^P (few parameters
    only), with ``volume_kwargs`` for :func:`~degeneracy.llc.volume.volume_llc`.

    See :class:`EffectiveParameterCount` for an example.

    >>> model = torch.nn.Linear(1, 1, bias=False).double()
    >>> x = torch.linspace(-1, 1, 20, dtype=torch.float64).unsqueeze(1)
    >>> kw = dict(num_chains=2, num_draws=20, max_iter=1, warn=False)
    >>> count = effective_parameter_count(model, x, [1e-2], **kw)
    >>> count.method, count.n_eff.shape
    ('sgld', torch.Size([1]))
    """
    targets = torch.as_tensor([float(e) for e in epsilons], dtype=torch.float64)
    if targets.numel() == 0 or (targets <= 0).any():
        raise ValueError("epsilons must be a non-empty list of positive loss scales")
    if method == "volume":
        loss_fn, center = behavioral_loss_fn(
            model, data, loss=kwargs.pop("loss", "behavioral"), params=kwargs.pop("params", None)
        )
        if kwargs:
            raise ValueError(f"method='volume' does not take {sorted(kwargs)}; use volume_kwargs")
        vol = volume_llc(loss_fn, center, epsilons=targets, radius=radius, **(volume_kwargs or {}))
        order = torch.argsort(torch.argsort(targets))  # volume_llc sorts ascending
        return EffectiveParameterCount(
            epsilons=targets,
            achieved_epsilons=targets.clone(),
            n_eff=vol.n_eff[order],
            n_eff_std=vol.n_eff_std[order],
            nbetas=torch.full_like(targets, math.nan),
            method="volume",
            num_parameters=center.numel(),
            config={"radius": radius, **vol.config, "fingerprint": result_fingerprint(model, data)},
        )
    if method != "sgld":
        raise ValueError(f"unknown method {method!r}: use 'sgld' or 'volume'")
    num_parameters = ParamLayout.of(select_parameters(model, kwargs.get("params"))).numel
    guess = float(llc_guess) if llc_guess is not None else num_parameters / 4.0
    order = sorted(range(targets.numel()), key=lambda i: -float(targets[i]))
    final: dict[int, tuple[float, LLCResult]] = {}
    for i in order:
        eps = float(targets[i])
        nbeta = guess / eps
        result = None
        for _ in range(max(1, max_iter)):
            result = estimate_llc(model, data, nbeta=nbeta, step_size=_step_for(step_size, nbeta), **kwargs)
            if not (math.isfinite(result.mean) and result.mean > 0):
                warnings.warn(
                    f"N_eff at ε = {eps:.3g}: λ̂ = {result.mean:.3g} at nβ = {nbeta:.3g} is not positive; "
                    "no fixed point nβ = λ̂ / ε",
                    LLCWarning,
                    stacklevel=2,
                )
                break
            if abs(math.log(result.epsilon / eps)) <= math.log1p(tolerance):
                break
            nbeta = result.mean / eps
        assert result is not None
        final[i] = (nbeta, result)
        if math.isfinite(result.mean) and result.mean > 0:
            guess = result.mean
    results = tuple(final[i][1] for i in range(targets.numel()))
    return EffectiveParameterCount(
        epsilons=targets,
        achieved_epsilons=torch.tensor([r.epsilon for r in results], dtype=torch.float64),
        n_eff=torch.tensor([r.n_eff for r in results], dtype=torch.float64),
        n_eff_std=torch.tensor([r.n_eff_std for r in results], dtype=torch.float64),
        nbetas=torch.tensor([final[i][0] for i in range(targets.numel())], dtype=torch.float64),
        method="sgld",
        num_parameters=num_parameters,
        results=results,
        config={
            "max_iter": max_iter,
            "tolerance": tolerance,
            **_jsonable(kwargs),
            "fingerprint": _fingerprint_of(results, model, data),
        },
    )


@dataclass(frozen=True)
class StepSizeCalibration:
    """A step-size sweep: per step size the estimate and its health, and the recommended step size
    (the largest one whose estimate is healthy and agrees with the smallest step size's).

    See :func:`calibrate_step_size` for an example.

    >>> StepSizeCalibration((1e-3,), (), 1e-3, ("ok",)).recommended
    0.001
    """

    step_sizes: tuple[float, ...]
    results: tuple[LLCResult, ...]
    recommended: float | None
    reasons: tuple[str, ...]

    def table(self) -> list[dict[str, Any]]:
        """One row per step size: λ̂, its spread, excluded chains, warnings and the verdict."""
        return [
            {
                "step_size": s,
                "llc": r.mean,
                "llc_std": r.std,
                "excluded_chains": len(r.excluded_chains),
                "warnings": len(r.warnings),
                "verdict": why,
            }
            for s, r, why in zip(self.step_sizes, self.results, self.reasons, strict=True)
        ]


def calibrate_step_size(
    target: nn.Module | Callable[[float], LLCResult],
    data: Any = None,
    *,
    step_sizes: Sequence[float],
    tolerance: float = 0.05,
    **kwargs: Any,
) -> StepSizeCalibration:
    """Run short estimates at each step size and recommend one.

    Args:
        target: a model (then ``estimate_llc(target, data, step_size=η, **kwargs)`` is run), or any
            ``run(step_size) -> LLCResult``.
        step_sizes: the candidates.
        tolerance: relative agreement required with the smallest step size's estimate (on top of two
            combined standard errors).

    A step size is rejected when chains were excluded, the run warned about instability or
    stationarity, or its λ̂ differs from the smallest step size's by more than the tolerance.

    >>> from degeneracy.llc import sample_sgld
    >>> def run(eta):
    ...     return sample_sgld(lambda w, _: w.square().sum(), torch.zeros(1, dtype=torch.float64),
    ...                        nbeta=100.0, step_size=eta, num_chains=2, num_draws=30, warn=False)
    >>> calibration = calibrate_step_size(run, step_sizes=[1e-3, 1.0])
    >>> calibration.reasons[1] != "ok"   # η = 1 is far beyond the stability limit 4 / (nβ · 2)
    True
    """
    steps = sorted(float(s) for s in step_sizes)
    if not steps:
        raise ValueError("step_sizes is empty")
    if isinstance(target, nn.Module):
        model = target

        def run(step: float) -> LLCResult:
            return estimate_llc(model, data, step_size=step, **kwargs)

    else:
        run = target
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCWarning)
        results = [run(s) for s in steps]
    reference = results[0]
    reasons: list[str] = []
    for r in results:
        if r.excluded_chains:
            reasons.append(f"{len(r.excluded_chains)} chain(s) excluded")
        elif any(("step size" in w) or ("stationary" in w) for w in r.warnings):
            reasons.append("unstable or not stationary")
        else:
            se = math.hypot(r.stderr if math.isfinite(r.stderr) else 0.0, reference.stderr or 0.0)
            gap = abs(r.mean - reference.mean)
            if gap > 2 * se + tolerance * abs(reference.mean):
                reasons.append(f"λ̂ differs from the smallest step size's by {gap:.3g}")
            else:
                reasons.append("ok")
    ok = [s for s, why in zip(steps, reasons, strict=True) if why == "ok"]
    return StepSizeCalibration(tuple(steps), tuple(results), max(ok) if ok else None, tuple(reasons))
