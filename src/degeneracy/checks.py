"""Checks of a model on its data before any long computation: a failure deep inside torch on the first
batch (integer inputs to a float model, inputs without a batch dimension, the wrong input width) or a
basis whose widths do not fit the model becomes one ``ValueError`` that names the problem and the fix.

:class:`degeneracy.run.ModelRun` runs :func:`check_model_accepts` on the first two examples of every
dataset given as a tensor or a dict of tensors; :func:`degeneracy.interaction_graph` and the ablations
run :func:`degeneracy.cuts.check_basis_fits`.

>>> import torch
>>> check_model_accepts(torch.nn.Linear(3, 2).double(), torch.zeros(5, 3, dtype=torch.float64))
>>> try:
...     check_model_accepts(torch.nn.Linear(3, 2).double(), torch.zeros(5, 4, dtype=torch.float64))
... except ValueError as err:
...     print(str(err)[:62])
inputs of shape (5, 4) do not fit the model: its first layer (
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.data import call_model, eval_mode

__all__ = [
    "check_model_accepts",
    "check_batches_alike",
    "check_module",
    "explain_model_error",
    "head",
]

PROBE_EXAMPLES = 2


def head(inputs: Tensor | Mapping[str, Any], n: int = PROBE_EXAMPLES) -> Tensor | Mapping[str, Any]:
    """The first ``n`` examples of a batch of inputs (a tensor or a dict of tensors).

    >>> head(torch.arange(10).reshape(5, 2)).tolist()
    [[0, 1], [2, 3]]
    """
    if isinstance(inputs, Mapping):
        return {k: v[:n] if isinstance(v, Tensor) and v.dim() else v for k, v in inputs.items()}
    return inputs[:n] if inputs.dim() else inputs


def _describe(inputs: Any) -> str:
    if isinstance(inputs, Mapping):
        parts = [f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in inputs.items() if isinstance(v, Tensor)]
        return "inputs {" + ", ".join(parts) + "}"
    return f"inputs of shape {tuple(inputs.shape)} and dtype {inputs.dtype}"


def _first_layer(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return f"{name or 'the model'} = Linear({module.in_features} -> {module.out_features})"
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return f"{name} = {type(module).__name__} with {module.in_channels} input channels"
        if isinstance(module, nn.Embedding):
            return None  # token model: integer inputs are right
    return None


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        return p.dtype
    return None


def explain_model_error(model: nn.Module, full: Any, err: Exception) -> str:
    """What a torch error raised by ``model`` on ``full`` (a batch of inputs) most likely means, and the
    fix: integer inputs to a float model, no batch dimension, the wrong width, or the error itself.

    >>> model = torch.nn.Linear(3, 2)
    >>> explain_model_error(model, torch.zeros(3), RuntimeError("shapes cannot be multiplied"))[:46]
    'inputs of shape (3,) and dtype torch.float32 h'
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    dtype = _model_dtype(model)
    first = _first_layer(model)
    tensors = list(full.values()) if isinstance(full, Mapping) else [full]
    tensors = [t for t in tensors if isinstance(t, Tensor)]
    integer = [t for t in tensors if not t.is_floating_point() and not t.is_complex()]
    if integer and dtype is not None and dtype.is_floating_point and ("dtype" in text or "Long" in text):
        return (
            f"integer {_describe(full)} to a model that computes in {dtype}: pass floating inputs, e.g. "
            f"x.to({dtype}) (integer inputs are token ids, for models that start with an embedding) "
            f"[torch: {text}]"
        )
    if not isinstance(full, Mapping) and full.dim() <= 1:
        return (
            f"{_describe(full)} have no batch dimension: the first dimension of the data counts the "
            f"examples; pass one example as x.unsqueeze(0) [torch: {text}]"
        )
    if first is not None and ("shape" in text or "size" in text or "mat1" in text):
        return (
            f"{_describe(full).split(' and dtype')[0]} do not fit the model: its first layer ({first}) "
            "expects another width; the data must be (examples, ...features) as the model takes them "
            f"[torch: {text}]"
        )
    return (
        f"the model fails on the first {PROBE_EXAMPLES} examples of the data ({_describe(full)}): {text}. "
        "Check that the data are what the model takes: a batch dimension first, the input width and "
        "dtype the model expects"
    )


def check_model_accepts(
    model: nn.Module, inputs: Tensor | Mapping[str, Any], *, full: Any = None
) -> None:
    """Run ``model`` (in eval mode, without gradients) on the first examples of ``inputs``; a
    ``ValueError`` naming the problem when it fails (:func:`explain_model_error`; ``full``, the whole
    data, is what the message describes, default ``inputs``); a ``TypeError`` when ``model`` is not a
    ``torch.nn.Module``.

    >>> try:
    ...     check_model_accepts(torch.nn.Linear(3, 2).double(), torch.zeros(5, 3, dtype=torch.long))
    ... except ValueError as err:
    ...     print(str(err)[:70])
    integer inputs of shape (5, 3) and dtype torch.int64 to a model that c
    """
    check_module(model)
    full = inputs if full is None else full
    if isinstance(full, Tensor) and full.dim() == 0:
        raise ValueError("the data is a single number (a 0-d tensor): pass a batch, (examples, ...)")
    try:
        with torch.no_grad(), eval_mode(model):  # no running statistics of batch norm are touched
            call_model(model, head(inputs))
    except (RuntimeError, TypeError, IndexError) as err:
        raise ValueError(explain_model_error(model, full, err)) from err


def _signature(inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return {k: _signature(v) for k, v in inputs.items()}
    if isinstance(inputs, Tensor):  # positions may vary: token ids (n, seq), activations (n, seq, ...)
        varies = inputs.dim() >= 3 or (inputs.dim() == 2 and not inputs.is_floating_point())
        return (inputs.dtype, inputs.dim(), tuple(inputs.shape[2 if varies else 1 :]))
    return type(inputs).__name__


def check_batches_alike(batches: Any) -> None:
    """A ``ValueError`` when the inputs of the batches (``Batch`` objects) differ in dtype, number of
    dimensions or shape past the positions (dim 1 of token ids and of (n, positions, ...) inputs may vary:
    sequences of different lengths): an
    ``(inputs, labels)`` pair given as data is read as two batches.

    >>> from degeneracy.data import iter_batches
    >>> x, labels = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    >>> check_batches_alike(iter_batches([x, x]))
    >>> try:
    ...     check_batches_alike(iter_batches((x, labels)))
    ... except ValueError as err:
    ...     print(str(err)[:54])
    batch 1 of the data has inputs of shape (4,) and dtype
    """
    first = None
    for i, batch in enumerate(batches):
        if first is None:
            first = batch.inputs
        elif _signature(batch.inputs) != _signature(first):
            raise ValueError(
                f"batch {i} of the data has {_describe(batch.inputs)}, batch 0 {_describe(first)}: every "
                "batch must hold the same kind of inputs (an (inputs, labels) pair given as data reads as "
                "two batches: pass the inputs alone, or a list of (inputs, labels) batches)"
            )


def check_module(model: Any) -> None:
    """A ``TypeError`` unless ``model`` is a ``torch.nn.Module``.

    >>> check_module(lambda x: x)
    Traceback (most recent call last):
    ...
    TypeError: model must be a torch.nn.Module (wrap a function in one), not function
    """
    if not isinstance(model, nn.Module):
        kind = type(model).__name__
        raise TypeError(f"model must be a torch.nn.Module (wrap a function in one), not {kind}")
