"""The learning coefficient and the effective parameter count N_eff(ε) = 2 λ(ε) (paper eq 8–9, METHOD §7).

* :func:`estimate_llc` — λ̂ of an ``nn.Module`` by vectorised SGLD (or RMSprop-SGLD, MALA) on
  ``loss(model, batch)`` with the batch as the data yield it, ``"cross_entropy"``/``"mse"`` (labels from
  the batch) or the behavioral loss (the default); ``result.summary()`` shows its diagnostics;
* :func:`sample_sgld` — the same sampler on a loss of a parameter tensor (model-free problems);
* :func:`llc_curve` / :func:`effective_parameter_count` — λ(ε) and N_eff(ε) over loss scales ε;
* :func:`volume_llc` — λ(ε) from the volume of {L < ε} by nested (subset) sampling, few parameters;
* results save with ``.save(path)`` and load with :func:`load_llc`, :func:`load_llc_curve`,
  :func:`load_effective_parameter_count`, :func:`load_volume` (the file's kind is checked);
* the loss is :mod:`degeneracy.behavioral`'s (summed over positions, METHOD §6), the same function as
  the Hessian accounting's, so their ε are the same scale;
* :mod:`degeneracy.llc.theory` — closed forms (monomials, Aoyagi's reduced-rank regression and deep
  linear networks) that the estimators are checked against.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import Tensor

from degeneracy.behavioral import LossKind, behavioral_loss_from_outputs
from degeneracy.llc.curve import (
    EffectiveParameterCount,
    LLCCurve,
    StepSizeCalibration,
    behavioral_loss_fn,
    calibrate_step_size,
    effective_parameter_count,
    llc_curve,
    load_effective_parameter_count,
    load_llc_curve,
    sgld_llc_curve,
)
from degeneracy.llc.estimate import LLCWarning, auto_step_size, estimate_llc, sample_sgld
from degeneracy.llc.result import LLCResult, load_llc
from degeneracy.llc.sgld import SGLDConfig
from degeneracy.llc.volume import VolumeResult, load_volume, volume_llc

__all__ = [
    "estimate_llc",
    "sample_sgld",
    "effective_parameter_count",
    "llc_curve",
    "sgld_llc_curve",
    "calibrate_step_size",
    "behavioral_loss_fn",
    "volume_llc",
    "auto_step_size",
    "load_llc",
    "load_llc_curve",
    "load_effective_parameter_count",
    "load_volume",
    "LLCResult",
    "LLCCurve",
    "EffectiveParameterCount",
    "StepSizeCalibration",
    "VolumeResult",
    "SGLDConfig",
    "LLCWarning",
    "behavioral_mse",
    "behavioral_kl",
    "behavioral_loss_from_outputs",
]


def _deprecated_behavioral(kind: LossKind, example: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The deprecated ``behavioral_<kind>(output, reference)``: it warns, then returns
    ``degeneracy.behavioral.behavioral_loss_from_outputs(output, reference, kind)``."""
    name = f"behavioral_{kind}"
    replacement = f'degeneracy.behavioral.behavioral_loss_from_outputs(output, reference, "{kind}")'

    def loss(output: Tensor, reference: Tensor) -> Tensor:
        message = f"degeneracy.llc.{name} is deprecated; use {replacement}"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return behavioral_loss_from_outputs(output, reference, kind)

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = f"""Deprecated: ``{replacement}``.

    Sums over every dimension after the first (positions included, METHOD §6), mean over examples.

    >>> import torch
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     round({name}(torch.zeros(2, 3), torch.ones(2, 3)).item(), 6)
    {example}
    """
    return loss


behavioral_mse = _deprecated_behavioral("mse", 3.0)
behavioral_kl = _deprecated_behavioral("kl", 0.0)
