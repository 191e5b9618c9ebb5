"""The behavioral loss (paper eq 6, footnote 3; METHOD §6): one definition for the whole package.

L_B(θ | θ*, D) compares the outputs f_θ(x) with the outputs f_θ*(x) of the reference parameters on
the same inputs:

* ``kind="mse"`` (paper eq 6): L_B = 1/n Σ_x ‖f_θ(x) − f_θ*(x)‖²;
* ``kind="kl"`` (footnote 3, classifiers and language models):
  L_B = 1/n Σ_x Σ_pos KL(softmax f_θ*(x) ‖ softmax f_θ(x)), softmax over the last dimension.

**Position convention** (METHOD §6): for sequence outputs f(x) is the whole output, every analysed
position: the squared norm and the KL **sum over positions** (and features), and n counts input
sequences. In tensor terms: the first dimension of an output tensor indexes examples, every other
dimension is summed, and the result is averaged over examples. The Hessian of the accounting, the
LLC's loss and N_eff(ε) all use this one function, so their ε refer to the same loss.

Both vanish, with zero gradient, at θ = θ*, so the Hessian at θ* is the Gauss–Newton matrix
H = 1/n Σ_x J(x)ᵀ A(x)ᵀ A(x) J(x), J = ∂f/∂θ, where AᵀA is the Hessian of the per-example loss in the
output: 2·I for MSE (eq 6 carries no ½, so H = (2/n) Σ JᵀJ; paper eq 10 drops the 2), and
diag(p) − p pᵀ for KL per position (the Fisher information of the softmax, p = softmax f_θ*(x)).
:func:`whiten_outputs` applies A, so that every Hessian in this package is H = 1/n Σ_x J_zᵀ J_z, z = A f.

>>> import torch
>>> out, ref = torch.zeros(4, 3, 2), torch.ones(4, 3, 2)   # 4 sequences, 3 positions, 2 features
>>> behavioral_loss_from_outputs(out, ref, "mse").item()     # summed over positions and features
6.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from degeneracy.checks import explain_model_error
from degeneracy.data import MASK_KEY, eval_mode, iter_batches
from degeneracy.deprecation import renamed_arguments
from degeneracy.run import (
    ForwardFn,
    cast_inputs,
    functional_output,
    model_device,
    model_dtype,
    parameters_and_buffers,
    reference_parameters,
    run_model,
)

__all__ = [
    "LossKind",
    "KINDS",
    "check_kind",
    "per_example_behavioral",
    "without_padding",
    "behavioral_loss_from_outputs",
    "whiten_outputs",
    "behavioral_loss",
    "behavioral_loss_function",
    "BehavioralProblem",
]

LossKind = Literal["mse", "kl"]
KINDS: tuple[str, ...] = ("mse", "kl")


def check_kind(kind: str) -> None:
    """``ValueError`` unless ``kind`` names a behavioral loss.

    >>> check_kind("kl")
    """
    if kind not in KINDS:
        raise ValueError(f"unknown behavioral loss kind {kind!r}: use 'mse' or 'kl'")


def per_example_behavioral(
    output: Float[Tensor, " batch *out"], reference: Float[Tensor, " batch *out"], kind: LossKind = "mse"
) -> Float[Tensor, " batch"]:
    """The behavioral loss of each example: summed over every dimension but the first.

    Computed in the dtype of ``output`` (cast both to float64 first for float64 accumulation).

    >>> per_example_behavioral(torch.zeros(2, 3), torch.ones(2, 3)).tolist()
    [3.0, 3.0]
    """
    check_kind(kind)
    if output.shape != reference.shape:
        raise ValueError(
            f"output shape {tuple(output.shape)} differs from reference {tuple(reference.shape)}"
        )
    if kind == "mse":
        per = (output - reference).square()
    else:
        ref_logp = torch.log_softmax(reference, dim=-1)
        per = ref_logp.exp() * (ref_logp - torch.log_softmax(output, dim=-1))
    return per.reshape(output.shape[0], -1).sum(dim=1)


def without_padding(output: Tensor, inputs: Any, positions: int | None = None) -> Tensor:
    """``output`` with its padded positions (``attention_mask`` 0 in the batch ``inputs``) set to zero.

    Applied to f_θ(x) and f_θ*(x) alike, a padded position then adds nothing to the behavioral loss
    (MSE and KL), to its gradient or to its Hessian: a padded batch gives the loss of its sequences
    fed one at a time. ``output`` is ``(batch, pos, ...)`` with the input's positions, or with
    ``positions`` an int ``(batch, ...)`` read at that position (an example whose position there is
    padding adds nothing); any other output (pooled, no mask) is returned as it is.

    >>> inputs = {"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    >>> without_padding(torch.ones(2, 3, 1), inputs)[..., 0].tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    >>> without_padding(torch.ones(2, 4), inputs, positions=-1).tolist()
    [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    """
    mask = inputs.get(MASK_KEY) if isinstance(inputs, Mapping) else None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return output
    count = mask.shape[1]  # no data-dependent branch: this runs inside vmap over examples too
    if positions is None:
        if output.dim() < 3 or output.shape[1] != count:
            return output
        valid = mask != 0
    else:
        if not -count <= positions < count:
            return output
        valid = mask[:, positions] != 0
    valid = valid.to(device=output.device, dtype=output.dtype)
    return output * valid.reshape(*valid.shape, *([1] * (output.dim() - valid.dim())))


def behavioral_loss_from_outputs(
    output: Float[Tensor, " batch *out"], reference: Float[Tensor, " batch *out"], kind: LossKind = "mse"
) -> Float[Tensor, ""]:
    """L_B from the two output tensors: :func:`per_example_behavioral` averaged over examples.

    >>> behavioral_loss_from_outputs(torch.zeros(2, 3), torch.ones(2, 3)).item()
    3.0
    """
    return per_example_behavioral(output, reference, kind).mean()


def whiten_outputs(out: Tensor, ref: Tensor, kind: LossKind) -> Float[Tensor, "batch rows"]:
    """z = A f (batch, rows): the output map whose Jacobian Gram is the Hessian of L_B at θ*.

    ``ref`` is f_θ*(x) (only used for ``kind="kl"``, as p = softmax(ref), treated as a constant).
    MSE: A = √2·I. KL: A = diag(√p) − √p pᵀ per position, so AᵀA = diag(p) − p pᵀ (Σ p = 1).
    The map is linear in ``out``; positions and features are flattened into ``rows``.

    >>> whiten_outputs(torch.ones(2, 1), torch.ones(2, 1), "mse").squeeze(1).tolist()
    [1.4142135381698608, 1.4142135381698608]
    """
    check_kind(kind)
    if kind == "mse":
        return math.sqrt(2.0) * out.reshape(out.shape[0], -1)
    p = torch.softmax(ref.detach().to(torch.float64), dim=-1).to(out.dtype)
    sqrt_p = p.sqrt()
    z = sqrt_p * out - sqrt_p * (p * out).sum(dim=-1, keepdim=True)
    return z.reshape(out.shape[0], -1)


@renamed_arguments(position="positions")
def behavioral_loss(
    model: nn.Module,
    reference: nn.Module | dict[str, Tensor] | Any,
    data: Any,
    kind: LossKind = "mse",
    *,
    batch_size: int | None = None,
    positions: int | None = None,
    forward: ForwardFn | None = None,
) -> Float[Tensor, ""]:
    """L_B(θ | θ*, D) of paper eq 6 (``kind="mse"``) or its KL variant (``kind="kl"``), float64 scalar.

    Args:
        model: the network at parameters θ.
        reference: the original network θ*: a model of the same architecture, or its parameters (a
            dict such as ``state_dict()`` or ``dict(named_parameters())``), evaluated with ``model``'s
            architecture.
        data: inputs in any form :func:`degeneracy.data.iter_batches` reads.
        kind: ``"mse"`` or ``"kl"`` (module docstring: summed over positions and features).
        batch_size: split the data into batches of this size.
        positions: restrict a ``(batch, pos, d)`` output to one position (``-1``: last token);
            ``None`` keeps every position (summed, module docstring).
        forward: ``forward(model, inputs)`` replacing ``model(inputs)``.

    The result keeps the autograd graph of ``model``'s parameters (the reference is detached).

    >>> model = torch.nn.Linear(2, 1)
    >>> behavioral_loss(model, model, torch.ones(3, 2)).item()
    0.0
    """
    check_kind(kind)
    ref_params = None
    if not isinstance(reference, nn.Module):
        ref_params = reference_parameters(model, reference)
        _, buffers = parameters_and_buffers(model, None)
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    with eval_mode(model, reference):  # the functions, not dropout samples of them
        for batch in iter_batches(data, batch_size):
            out = run_model(model, batch.inputs, forward=forward, positions=positions)
            out = without_padding(out, batch.inputs, positions)
            with torch.no_grad():
                if ref_params is None:
                    ref = run_model(reference, batch.inputs, forward=forward, positions=positions)
                else:
                    tensors = {**ref_params, **buffers}
                    ref = functional_output(
                        model, tensors, batch.inputs, forward=forward, positions=positions
                    )
            ref = without_padding(ref, batch.inputs, positions)
            total = total + per_example_behavioral(out.double(), ref.detach().double(), kind).sum()
            n += batch.size
    return total / n


class BehavioralProblem:
    """The fixed parts of L_B(· | θ*, D): θ* (the model's parameters), the cast inputs and the reference
    outputs f_θ*(x), batch by batch. :func:`behavioral_loss_function` and the accounting's Hessian
    (:class:`degeneracy.accounting.BehavioralHessian`) are both built on it.

    Args:
        model: the network at θ*.
        data: the dataset D (anything :func:`degeneracy.data.iter_batches` reads).
        kind: ``"mse"`` or ``"kl"``.
        batch_size, positions, forward: as in :func:`behavioral_loss`.
        dtype: dtype of the computation: parameters, buffers and floating inputs are cast to it;
            ``None`` keeps the model's, and floating inputs must then be in that dtype
            (:func:`degeneracy.run.cast_inputs`).

    >>> problem = BehavioralProblem(torch.nn.Linear(2, 1).double(), torch.ones(3, 2, dtype=torch.float64))
    >>> problem.n, problem.loss(problem.params).item()
    (3, 0.0)
    """

    @renamed_arguments(position="positions")
    def __init__(
        self,
        model: nn.Module,
        data: Any,
        kind: LossKind = "mse",
        *,
        batch_size: int | None = None,
        positions: int | None = None,
        forward: ForwardFn | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_kind(kind)
        self.model, self.kind, self.positions, self.forward = model, kind, positions, forward
        self.dtype = dtype or model_dtype(model)
        self.params, self.buffers = parameters_and_buffers(model, self.dtype)
        batches = list(iter_batches(data, batch_size))
        device = model_device(model)  # inputs where the model is
        explicit = dtype is not None
        self.inputs = [cast_inputs(b.inputs, self.dtype, explicit=explicit, device=device) for b in batches]
        self.sizes = [b.size for b in batches]
        self.n = sum(self.sizes)
        with torch.no_grad():
            try:
                self.refs = [self.output(self.params, x) for x in self.inputs]
            except (RuntimeError, TypeError, IndexError) as err:  # the model does not take these inputs
                raise ValueError(explain_model_error(model, self.inputs[0], err)) from err

    def output(self, params: dict[str, Tensor], inputs: Any) -> Tensor:
        """f_θ(x) for parameters ``params`` (a name → tensor dict) on one batch of cast inputs."""
        output = functional_output(
            self.model, {**params, **self.buffers}, inputs, forward=self.forward, positions=self.positions
        )
        return without_padding(output, inputs, self.positions)

    def loss(self, theta: dict[str, Tensor]) -> Float[Tensor, ""]:
        """L_B(θ | θ*, D) in float64 (a pure function of ``theta``, for ``torch.func`` transforms)."""
        total = torch.zeros((), dtype=torch.float64)
        for x, ref in zip(self.inputs, self.refs, strict=True):
            total = (
                total + per_example_behavioral(self.output(theta, x).double(), ref.double(), self.kind).sum()
            )
        return total / self.n


def behavioral_loss_function(
    model: nn.Module,
    data: Any,
    kind: LossKind = "mse",
    *,
    dtype: torch.dtype | None = torch.float64,
    **options: Any,
) -> Callable[[dict[str, Tensor]], Tensor]:
    """θ ↦ L_B(θ | θ*, D) as a pure function of a parameter dict, with θ* = ``model``'s parameters.

    :meth:`BehavioralProblem.loss` of ``BehavioralProblem(model, data, kind, dtype=dtype, **options)``
    (``options``: ``batch_size``, ``positions``, ``forward``). Suitable for ``torch.func`` transforms
    (``torch.func.hessian`` checks the accounting's Hessian against it). Parameters, buffers and
    floating inputs are cast to ``dtype`` (``None``: keep the model's; floating inputs must match it).

    >>> model = torch.nn.Linear(2, 1)
    >>> loss = behavioral_loss_function(model, torch.ones(3, 2))
    >>> loss({n: p.double() for n, p in model.named_parameters()}).item()
    0.0
    """
    return BehavioralProblem(model, data, kind, dtype=dtype, **options).loss
