"""The behavioral loss (paper eq 6) and the output-space curvature of its Hessian.

Paper eq 6:  L_B(θ | θ*, D) = 1/n Σ_x ‖f_θ(x) − f_θ*(x)‖²   (``kind="mse"``).

For classifiers and language models (paper footnote 3) the KL variant is
L_B(θ | θ*, D) = 1/n Σ_x Σ_pos KL(softmax f_θ*(x) ‖ softmax f_θ(x))   (``kind="kl"``),
with the softmax over the last output dimension and the sum over sequence positions (if any).

Both vanish, with zero gradient, at θ = θ*, so the Hessian at θ* is the Gauss–Newton matrix
H = 1/n Σ_x J(x)ᵀ A(x)ᵀ A(x) J(x), J = ∂f/∂θ, where AᵀA is the Hessian of the per-example loss in
the output: 2·I for MSE (eq 6 carries no ½, so H = (2/n) Σ JᵀJ; paper eq 10 drops the 2), and
diag(p) − p pᵀ for KL (the Fisher information of the softmax, p = softmax f_θ*(x)).
:func:`whiten_outputs` applies A, so that every Hessian in this package is
H = 1/n Σ_x J_z(x)ᵀ J_z(x) with z = A f.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from degeneracy.accounting._model import (
    ForwardFn,
    cast_inputs,
    functional_output,
    materialize,
    parameters_and_buffers,
    reference_parameters,
    run_model,
)

__all__ = ["behavioral_loss", "behavioral_loss_function", "whiten_outputs", "LossKind"]

LossKind = Literal["mse", "kl"]


def _check_kind(kind: str) -> None:
    if kind not in ("mse", "kl"):
        raise ValueError(f"kind must be 'mse' or 'kl', got {kind!r}")


def _per_example_loss(out: Tensor, ref: Tensor, kind: str) -> Tensor:
    """Per-example behavioral loss (batch,), in float64."""
    out64, ref64 = out.to(torch.float64), ref.to(torch.float64)
    if kind == "mse":
        return (out64 - ref64).pow(2).reshape(out.shape[0], -1).sum(dim=1)
    log_p = torch.log_softmax(ref64, dim=-1)
    log_q = torch.log_softmax(out64, dim=-1)
    return (log_p.exp() * (log_p - log_q)).reshape(out.shape[0], -1).sum(dim=1)


def whiten_outputs(out: Tensor, ref: Tensor, kind: LossKind) -> Tensor:
    """z = A f (batch, rows): the output map whose Jacobian Gram is the Hessian of L_B at θ*.

    ``ref`` is f_θ*(x) (only used for ``kind="kl"``, as p = softmax(ref), treated as a constant).
    MSE: A = √2·I. KL: A = diag(√p) − √p pᵀ per position, so AᵀA = diag(p) − p pᵀ (Σ p = 1).
    The map is linear in ``out``; positions and features are flattened into ``rows``.
    """
    _check_kind(kind)
    if kind == "mse":
        return math.sqrt(2.0) * out.reshape(out.shape[0], -1)
    p = torch.softmax(ref.detach().to(torch.float64), dim=-1).to(out.dtype)
    sqrt_p = p.sqrt()
    z = sqrt_p * out - sqrt_p * (p * out).sum(dim=-1, keepdim=True)
    return z.reshape(out.shape[0], -1)


def behavioral_loss(
    model: nn.Module,
    reference: nn.Module | dict[str, Tensor] | Any,
    data: Any,
    kind: LossKind = "mse",
    *,
    batch_size: int | None = None,
    position: int | None = None,
    forward: ForwardFn | None = None,
) -> Tensor:
    """L_B(θ | θ*, D) of paper eq 6 (``kind="mse"``) or its KL variant (``kind="kl"``), float64 scalar.

    Args:
        model: the network at parameters θ.
        reference: the original network θ* — a model of the same architecture, or its parameters (a
            dict such as ``state_dict()`` or ``dict(named_parameters())``), evaluated with ``model``'s
            architecture.
        data: inputs in any form :func:`degeneracy.data.iter_batches` reads.
        kind: ``"mse"``: 1/n Σ_x ‖f_θ(x) − f_θ*(x)‖² (squared norm over positions and features);
            ``"kl"``: 1/n Σ_x Σ_pos KL(softmax f_θ* ‖ softmax f_θ), softmax over the last dimension.
        batch_size: split the data into batches of this size.
        position: restrict a ``(batch, pos, d)`` output to one position (``-1``: last token).
        forward: ``forward(model, inputs)`` replacing ``model(inputs)`` (e.g. a cheaper last-position
            forward); it must read the parameters from ``model``.

    The result keeps the autograd graph of ``model``'s parameters (the reference is detached).
    """
    _check_kind(kind)
    batches = materialize(data, batch_size)
    ref_params = None
    if not isinstance(reference, nn.Module):
        ref_params = reference_parameters(model, reference)
        _, buffers = parameters_and_buffers(model, None)
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    for batch in batches:
        out = run_model(model, batch.inputs, forward=forward, position=position)
        with torch.no_grad():
            if ref_params is None:
                ref = run_model(reference, batch.inputs, forward=forward, position=position)
            else:
                tensors = {**ref_params, **buffers}
                ref = functional_output(model, tensors, batch.inputs, forward=forward, position=position)
        total = total + _per_example_loss(out, ref.detach(), kind).sum()
        n += batch.size
    return total / n


def behavioral_loss_function(
    model: nn.Module,
    data: Any,
    kind: LossKind = "mse",
    *,
    batch_size: int | None = None,
    position: int | None = None,
    forward: ForwardFn | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> Callable[[dict[str, Tensor]], Tensor]:
    """θ ↦ L_B(θ | θ*, D) as a pure function of a parameter dict, with θ* = ``model``'s parameters.

    Suitable for ``torch.func`` transforms (``torch.func.hessian`` checks the Hessian of this module).
    Parameters, buffers and floating inputs are cast to ``dtype`` (``None``: keep the model's).
    """
    _check_kind(kind)
    batches = materialize(data, batch_size)
    params, buffers = parameters_and_buffers(model, dtype)
    inputs = [cast_inputs(b.inputs, dtype) for b in batches]
    with torch.no_grad():
        refs = [
            functional_output(model, {**params, **buffers}, x, forward=forward, position=position)
            for x in inputs
        ]
    n = sum(b.size for b in batches)

    def loss(theta: dict[str, Tensor]) -> Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for x, ref in zip(inputs, refs, strict=True):
            out = functional_output(model, {**theta, **buffers}, x, forward=forward, position=position)
            total = total + _per_example_loss(out, ref, kind).sum()
        return total / n

    return loss
