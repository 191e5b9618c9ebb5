"""The learning coefficient and the effective parameter count N_eff(ε) = 2 λ(ε) (paper eq 8–9, METHOD §7).

* :func:`estimate_llc` — λ̂ of an ``nn.Module`` by vectorised SGLD, on the behavioral loss by default;
* :func:`sample_sgld` — the same sampler on a loss of a parameter tensor (model-free problems);
* :func:`llc_curve` / :func:`effective_parameter_count` — λ(ε) and N_eff(ε) over loss scales ε;
* :func:`volume_llc` — λ(ε) from the volume of {L < ε} by nested (subset) sampling, few parameters;
* :mod:`degeneracy.llc.theory` — closed forms (monomials, Aoyagi's reduced-rank regression and deep
  linear networks) that the estimators are checked against.
"""

from __future__ import annotations

from degeneracy.llc.curve import (
    EffectiveParameterCount,
    LLCCurve,
    StepSizeCalibration,
    behavioral_loss_fn,
    calibrate_step_size,
    effective_parameter_count,
    llc_curve,
    sgld_llc_curve,
)
from degeneracy.llc.estimate import LLCWarning, auto_step_size, estimate_llc, sample_sgld
from degeneracy.llc.losses import behavioral_kl, behavioral_loss_from_outputs, behavioral_mse
from degeneracy.llc.result import LLCResult
from degeneracy.llc.sgld import SGLDConfig
from degeneracy.llc.volume import VolumeResult, volume_llc

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
