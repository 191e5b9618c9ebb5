"""λ(ε) from the volume of the low-loss set, for models with few parameters (paper eq 8, METHOD §7).

V(ε) = vol{θ ∈ box : L(θ) − L(θ*) < ε} with the box θ* + [−R, R]^d, and λ(ε) = ε d/dε log V(ε).

Monte Carlo with nested levels ("subset simulation", a batched form of nested sampling): N points
are drawn uniformly in the box; at each level the threshold t_{k+1} is the ``keep_fraction`` quantile
of the current losses, the volume fraction shrinks by the exact fraction of points below it, and the
population is refilled by copying survivors and moving each copy with hit-and-run slice sampling
(shrinkage, Neal 2003) restricted to {L < t_{k+1}} ∩ box, which leaves the uniform distribution on that
set invariant. At a level whose points are uniform on {L < t_k}, V(ε) for ε ≤ t_k is V_k times the
fraction of points with L < ε. λ(ε) is the slope of log V between ε/h and ε·h (``slope_window`` = h²).

The slope at finite ε includes log corrections: with V ∝ ε^λ (log 1/ε)^{m−1} (multiplicity m),
λ(ε) = λ − (m − 1)/log(1/ε) + …; :attr:`VolumeResult.fit` fits λ and m on the small-ε end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import vmap

from degeneracy.deprecation import renamed_arguments
from degeneracy.llc.record import TensorRecord
from degeneracy.llc.result import EffectiveCount
from degeneracy.llc.sgld import seed_from

__all__ = ["VolumeResult", "volume_llc", "load_volume", "MAX_VOLUME_PARAMS"]

MAX_VOLUME_PARAMS = 12
"""Above this many parameters the volume estimator refuses to run (its cost and variance grow fast
with dimension); use the SGLD estimator instead."""


@dataclass(frozen=True)
class VolumeResult(EffectiveCount, TensorRecord):
    """V(ε) and λ(ε) from :func:`volume_llc`.

    Attributes:
        epsilons: the loss scales ε (ascending).
        log_volume: log V(ε), mean over repeats (``-inf`` where no point fell below ε).
        log_volume_std: standard deviation of log V over repeats.
        llc: λ(ε), mean over repeats of the log-log slope between ε/h and ε·h.
        llc_std: its standard deviation over repeats.
        fit: ``{"llc", "llc_std", "multiplicity", "multiplicity_std", "eps_min", "eps_max"}``: λ and m
            from least squares of log V = λ log ε + (m − 1) log log(1/ε) + c over ε in
            [eps_min, eps_max], per repeat, then mean and standard deviation over repeats.
        levels: per repeat, the thresholds t_k and log V_k of the nested levels.
        config: the settings.

    >>> VolumeResult(*(torch.ones(1) for _ in range(5)), fit={}).n_eff.tolist()
    [2.0]
    """

    KIND: ClassVar[str] = "degeneracy.VolumeResult"
    REQUIRED: ClassVar[tuple[str, ...]] = ("epsilons", "llc")

    epsilons: Float[Tensor, " points"]
    log_volume: Float[Tensor, " points"]
    log_volume_std: Float[Tensor, " points"]
    llc: Float[Tensor, " points"]
    llc_std: Float[Tensor, " points"]
    fit: dict[str, float]
    levels: list[dict[str, list[float]]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def load_volume(path: str | Path) -> VolumeResult:
    """A :class:`VolumeResult` saved with its ``save(path)`` (the file's kind is checked).

    >>> import os, tempfile
    >>> r = volume_llc(lambda t: t.square().sum(), torch.zeros(1, dtype=torch.float64),
    ...                epsilons=[1e-3], num_points=50, num_repeats=1, num_mcmc_steps=2)
    >>> back = load_volume(r.save(os.path.join(tempfile.mkdtemp(), "volume.safetensors")))
    >>> torch.equal(back.llc, r.llc), back.levels == r.levels, back.fit["eps_min"]
    (True, True, 0.001)
    """
    return VolumeResult.load(path)


def _chord(x: Tensor, u: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """[a, b] such that x + t u stays in the box lo ≤ · ≤ hi for t in [a, b] (a ≤ 0 ≤ b)."""
    safe = torch.where(u == 0, torch.ones_like(u), u)
    t1, t2 = (lo - x) / safe, (hi - x) / safe
    low = torch.where(u == 0, torch.full_like(u, -math.inf), torch.minimum(t1, t2))
    high = torch.where(u == 0, torch.full_like(u, math.inf), torch.maximum(t1, t2))
    return low.amax(dim=1).clamp_max(0.0), high.amin(dim=1).clamp_min(0.0)


def _slice_moves(
    loss: Callable[[Tensor], Tensor],
    x: Tensor,
    lx: Tensor,
    threshold: Tensor,
    lo: Tensor,
    hi: Tensor,
    steps: int,
    generator: torch.Generator,
    max_shrink: int = 50,
) -> tuple[Tensor, Tensor]:
    """``steps`` hit-and-run slice-sampling moves of every point ``x[i]``, uniform on
    {L < threshold[i]} ∩ box (each point has its own threshold).

    Directions alternate between a random coordinate axis and a random unit vector. A point that
    found no acceptable position after ``max_shrink`` shrinkages stays where it is (valid, as the
    shrinkage interval always contains the current point)."""
    n, d = x.shape
    for step in range(steps):
        if step % 2 == 0:
            axis = torch.randint(d, (n,), generator=generator, device=x.device)
            u = torch.nn.functional.one_hot(axis, d).to(x.dtype)
        else:
            u = torch.randn(n, d, generator=generator, dtype=x.dtype, device=x.device)
            u = u / u.norm(dim=1, keepdim=True)
        a, b = _chord(x, u, lo, hi)
        pending = torch.arange(n, device=x.device)
        for _ in range(max_shrink):
            if pending.numel() == 0:
                break
            t = a[pending] + (b[pending] - a[pending]) * torch.rand(
                pending.numel(), generator=generator, dtype=x.dtype, device=x.device
            )
            y = x[pending] + t.unsqueeze(1) * u[pending]
            ly = loss(y)
            ok = ly < threshold[pending]
            accepted = pending[ok]
            x[accepted] = y[ok]
            lx[accepted] = ly[ok]
            rejected = ~ok
            rej_idx, t_rej = pending[rejected], t[rejected]
            a[rej_idx] = torch.where(t_rej < 0, t_rej, a[rej_idx])
            b[rej_idx] = torch.where(t_rej >= 0, t_rej, b[rej_idx])
            pending = rej_idx
    return x, lx


@dataclass(frozen=True)
class _Level:
    """One nested level of every repeat: thresholds t_k (R,), log V_k (R,), losses (R, N) of points
    uniform on {L < t_k}."""

    thresholds: Tensor
    log_volumes: Tensor
    losses: Tensor


def _nested_levels(
    loss: Callable[[Tensor], Tensor],
    center: Tensor,
    radius: float,
    eps_min: float,
    num_points: int,
    num_repeats: int,
    keep_fraction: float,
    num_mcmc_steps: int,
    max_levels: int,
    generator: torch.Generator,
) -> list[_Level]:
    """Nested levels of ``num_repeats`` independent populations run side by side; level 0 is the box."""
    d, reps, n = center.numel(), num_repeats, num_points
    lo, hi = center - radius, center + radius
    x = lo + (hi - lo) * torch.rand(
        reps * n, d, generator=generator, dtype=center.dtype, device=center.device
    )
    lx = loss(x)
    log_v = torch.full((reps,), d * math.log(2.0 * radius), dtype=torch.float64)
    levels = [
        _Level(torch.full((reps,), math.inf, dtype=torch.float64), log_v.clone(), lx.view(reps, n).clone())
    ]
    for _ in range(max_levels):
        per_rep = lx.view(reps, n)
        threshold = torch.quantile(per_rep.to(torch.float64), keep_fraction, dim=1)
        below = per_rep < threshold.to(lx.dtype).unsqueeze(1)
        count = below.sum(dim=1)
        if bool((count == 0).any()) or bool((threshold <= 0).all()):
            break
        log_v = log_v + torch.log(count.to(torch.float64) / n)
        # refill each population with copies of its survivors (the `count` lowest losses)
        order = torch.argsort(per_rep, dim=1)
        pick = (torch.rand(reps, n, generator=generator, device=x.device) * count.unsqueeze(1)).long()
        rows = (
            torch.gather(order, 1, pick.clamp_max(n - 1))
            + torch.arange(reps, device=x.device).unsqueeze(1) * n
        )
        x, lx = x[rows.reshape(-1)].clone(), lx[rows.reshape(-1)].clone()
        point_threshold = threshold.to(lx.dtype).repeat_interleave(n)
        x, lx = _slice_moves(loss, x, lx, point_threshold, lo, hi, num_mcmc_steps, generator)
        levels.append(_Level(threshold, log_v.clone(), lx.view(reps, n).clone()))
        if bool((threshold < eps_min).all()):
            break
    return levels


def _log_volume_at(levels: list[_Level], epsilon: float) -> Tensor:
    """log V(ε) per repeat, from the deepest level whose threshold is above ε."""
    reps = levels[0].thresholds.numel()
    out = torch.full((reps,), math.nan, dtype=torch.float64)
    for level in levels:
        use = level.thresholds > epsilon
        frac = (level.losses < epsilon).to(torch.float64).mean(dim=1)
        value = level.log_volumes + frac.log()  # -inf where no point is below ε
        out = torch.where(use, value, out)
    return out


@renamed_arguments(mcmc_steps="num_mcmc_steps")
def volume_llc(
    loss_fn: Callable[[Tensor], Tensor],
    center: Tensor,
    *,
    epsilons: Sequence[float] | Tensor | None = None,
    radius: float = 1.0,
    num_points: int = 2000,
    keep_fraction: float = 0.2,
    num_mcmc_steps: int = 20,
    slope_window: float = 10.0,
    num_repeats: int = 4,
    max_levels: int = 200,
    fit_range: tuple[float, float] | None = None,
    batched: bool = False,
    seed: int = 0,
) -> VolumeResult:
    """Estimate V(ε) and λ(ε) = ε d/dε log V(ε) of ``loss_fn`` around ``center`` = θ*.

    Args:
        loss_fn: L(θ) of a flat parameter vector ``(d,)`` (vectorised over points with ``vmap``), or of
            a batch of points ``(n, d) -> (n,)`` when ``batched=True``. The volume is of
            {L(θ) − L(θ*) < ε}.
        center: θ*, a flat tensor of at most :data:`MAX_VOLUME_PARAMS` parameters.
        epsilons: scales ε at which to report (default: 25 log-spaced from 1e-8 to 1e-1 times the
            median excess loss in the box).
        radius: half-width R of the box θ* + [−R, R]^d (λ(ε) does not depend on it at small ε).
        num_points: points per level N.
        keep_fraction: fraction of points kept per level (the volume shrinks by about this per level).
        num_mcmc_steps: slice-sampling moves per point per level.
        slope_window: λ(ε) is the slope of log V between ε / sqrt(window) and ε · sqrt(window).
        num_repeats: independent runs (different seeds) for the error bars.
        max_levels: cap on the number of levels.
        fit_range: (ε_min, ε_max) of the fit of λ and the multiplicity (default: the eight decades
            above the smallest ε; a narrow range makes log ε and log log(1/ε) nearly collinear).
        batched: whether ``loss_fn`` already takes a batch of points.
        seed: seeds everything.

    ``mcmc_steps=`` is the deprecated name of ``num_mcmc_steps``.

    >>> r = volume_llc(lambda t: t.square().sum(), torch.zeros(2, dtype=torch.float64),
    ...                epsilons=[1e-4, 1e-2], num_points=150, num_repeats=2, num_mcmc_steps=3)
    >>> bool((r.llc - 1.0).abs().max() < 0.3)   # a regular quadratic in 2 parameters: λ = d/2 = 1
    True
    """
    center = center.detach().reshape(-1)
    d = center.numel()
    if d > MAX_VOLUME_PARAMS:
        raise ValueError(
            f"the volume estimator handles at most {MAX_VOLUME_PARAMS} parameters (got {d}); "
            "use estimate_llc / effective_parameter_count (SGLD) instead"
        )
    if not 0.0 < keep_fraction < 1.0:
        raise ValueError(f"keep_fraction must lie in (0, 1), got {keep_fraction}")
    if radius <= 0 or slope_window <= 1.0:
        raise ValueError("radius must be > 0 and slope_window > 1")
    single = loss_fn if batched else vmap(loss_fn)
    with torch.no_grad():
        base = float(single(center.unsqueeze(0))[0])

        def excess(points: Tensor) -> Tensor:
            return single(points) - base

        if epsilons is None:
            probe = torch.rand(
                512, d, generator=torch.Generator().manual_seed(seed_from(seed, 1)), dtype=center.dtype
            )
            median = float(excess(center + radius * (2 * probe.to(center.device) - 1)).median())
            eps = torch.logspace(math.log10(median) - 8, math.log10(median) - 1, 25, dtype=torch.float64)
        else:
            eps = torch.as_tensor(epsilons, dtype=torch.float64).sort().values
        if (eps <= 0).any():
            raise ValueError("epsilons must be positive")
        half = math.sqrt(slope_window)
        eps_min = float(eps.min()) / half
        generator = torch.Generator(device=center.device).manual_seed(seed_from(seed, 0x70E))
        levels = _nested_levels(
            excess,
            center,
            radius,
            eps_min,
            num_points,
            num_repeats,
            keep_fraction,
            num_mcmc_steps,
            max_levels,
            generator,
        )
        level_records = [
            {
                "thresholds": [float(lv.thresholds[r]) for lv in levels[1:]],
                "log_volumes": [float(lv.log_volumes[r]) for lv in levels[1:]],
            }
            for r in range(num_repeats)
        ]
        log_vols_t = torch.stack([_log_volume_at(levels, float(e)) for e in eps], dim=1)  # (R, K)
        lo_v = torch.stack([_log_volume_at(levels, float(e) / half) for e in eps], dim=1)
        hi_v = torch.stack([_log_volume_at(levels, float(e) * half) for e in eps], dim=1)
        slopes_t = (hi_v - lo_v) / (2.0 * math.log(half))
    std = (lambda t: t.std(dim=0)) if num_repeats > 1 else (lambda t: torch.full_like(t[0], math.nan))
    log_volume = log_vols_t.mean(dim=0)
    fits = [_fit_multiplicity(eps, lv, fit_range) for lv in log_vols_t]
    fit = dict(fits[0])
    for key in ("llc", "multiplicity"):
        values = torch.tensor([f[key] for f in fits], dtype=torch.float64)
        fit[key] = float(values.mean())
        fit[f"{key}_std"] = float(values.std()) if num_repeats > 1 else math.nan
    config = {
        "radius": radius,
        "num_points": num_points,
        "keep_fraction": keep_fraction,
        "num_mcmc_steps": num_mcmc_steps,
        "slope_window": slope_window,
        "num_repeats": num_repeats,
        "seed": seed,
        "num_parameters": d,
        "loss_at_center": base,
    }
    return VolumeResult(
        epsilons=eps,
        log_volume=log_volume,
        log_volume_std=std(log_vols_t),
        llc=slopes_t.mean(dim=0),
        llc_std=std(slopes_t),
        fit=fit,
        levels=level_records,
        config=config,
    )


def _fit_multiplicity(
    eps: Tensor, log_volume: Tensor, fit_range: tuple[float, float] | None
) -> dict[str, float]:
    """Least squares of log V = λ log ε + (m − 1) log log(1/ε) + c on ε in ``fit_range`` (ε < 1)."""
    if fit_range is None:
        lo = float(eps.min())
        fit_range = (lo, min(lo * 1e8, float(eps.max())))
    mask = (eps >= fit_range[0]) & (eps <= fit_range[1]) & (eps < 1.0) & torch.isfinite(log_volume)
    out = {"llc": math.nan, "multiplicity": math.nan, "eps_min": fit_range[0], "eps_max": fit_range[1]}
    if int(mask.sum()) < 4:
        return out
    e, v = eps[mask], log_volume[mask]
    design = torch.stack([e.log(), (-e.log()).log(), torch.ones_like(e)], dim=1)
    coef = torch.linalg.lstsq(design, v.unsqueeze(1)).solution.squeeze(1)
    out["llc"], out["multiplicity"] = float(coef[0]), float(coef[1]) + 1.0
    return out
