"""Behavioral losses on tensors (paper eq 6, footnote 3; METHOD §6).

The behavioral loss compares the outputs ``f_θ(x)`` of the sampled parameters with the outputs
``f_θ*(x)`` of the reference parameters θ* on the same inputs:

* ``"mse"``: L_B(θ|θ*) = E_x ‖f_θ(x) − f_θ*(x)‖², the squared norm **summed over the last (output
  feature) dimension** and **averaged over every other dimension** (examples, and positions for
  sequence outputs). L_B(θ*|θ*) = 0 and θ* is a minimum, whatever θ* is.
* ``"kl"``: L_B(θ|θ*) = E_x KL(softmax f_θ*(x) ‖ softmax f_θ(x)) for classifiers and language models,
  softmax over the last dimension, averaged over the other dimensions.

These are pure functions of the two output tensors; ``degeneracy.accounting`` has the model-level
behavioral loss, and both follow the convention above.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["BehavioralKind", "behavioral_mse", "behavioral_kl", "behavioral_loss_from_outputs"]

BehavioralKind = Literal["mse", "kl"]


def behavioral_mse(output: Float[Tensor, "*batch d_out"], reference: Float[Tensor, "*batch d_out"]) -> Tensor:
    """E ‖f_θ − f_θ*‖²: squared error summed over the last dimension, mean over the others (scalar).

    A 1-D output (one scalar per example) is treated as ``d_out = 1``.
    """
    if output.shape != reference.shape:
        raise ValueError(
            f"output shape {tuple(output.shape)} differs from reference {tuple(reference.shape)}"
        )
    diff = output - reference
    if diff.dim() <= 1:
        return diff.square().mean()
    return diff.square().sum(-1).mean()


def behavioral_kl(
    logits: Float[Tensor, "*batch d_out"], reference_logits: Float[Tensor, "*batch d_out"]
) -> Tensor:
    """E KL(softmax f_θ* ‖ softmax f_θ) over the last dimension, mean over the others (scalar)."""
    if logits.shape != reference_logits.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} differs from reference {tuple(reference_logits.shape)}"
        )
    ref_logp = torch.log_softmax(reference_logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


def behavioral_loss_from_outputs(output: Tensor, reference: Tensor, kind: BehavioralKind = "mse") -> Tensor:
    """Dispatch to :func:`behavioral_mse` (``kind="mse"``) or :func:`behavioral_kl` (``kind="kl"``)."""
    if kind == "mse":
        return behavioral_mse(output, reference)
    if kind == "kl":
        return behavioral_kl(output, reference)
    raise ValueError(f"unknown behavioral loss kind {kind!r}: use 'mse' or 'kl'")
