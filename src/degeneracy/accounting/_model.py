"""Model plumbing for degeneracy accounting: outputs, functional calls, hooks and module names.

Everything here is private to :mod:`degeneracy.accounting`. The conventions:

* The *output* f(x) of a model is what :func:`degeneracy.data.model_output_tensor` reads from
  ``model(inputs)`` (or what a user-supplied ``forward(model, inputs)`` returns), optionally restricted
  to one sequence position (``position=-1`` for the last token). It is handled as a tensor
  ``(batch, rows)`` where ``rows`` flattens positions and features.
* Parameters are the model's ``named_parameters()`` (all of them, in that order); a flat parameter
  vector concatenates them in that order.
* Hooks are registered by :func:`hooks` and always removed, even when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.data import Batch, call_model, iter_batches, model_output_tensor

ForwardFn = Callable[[nn.Module, Any], Any]


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a ``KeyError`` listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if name not in modules:
        valid = ", ".join(repr(n) for n in modules if n)
        raise KeyError(f"model has no module named {name!r}; valid names: {valid}")
    return modules[name]


@contextmanager
def hooks(
    model: nn.Module,
    forward_hooks: Mapping[str, Callable[..., Any]] | None = None,
) -> Iterator[None]:
    """Register forward hooks ``{module name: hook(module, args, output)}`` for the ``with`` block.

    Names are checked against ``named_modules()`` before anything is registered; every handle is
    removed on exit, whatever happens inside the block.
    """
    forward_hooks = dict(forward_hooks or {})
    modules = {name: resolve_module(model, name) for name in forward_hooks}
    handles = []
    try:
        for name, hook in forward_hooks.items():
            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def select_output(output: Any, position: int | None) -> Tensor:
    """The output tensor of a model call, restricted to ``position`` when it has positions.

    ``position`` applies to outputs of shape ``(batch, pos, d)``; ``None`` keeps every position.
    """
    out = model_output_tensor(output)
    if position is not None:
        if out.dim() < 3:
            raise ValueError(
                f"position={position} needs a (batch, pos, d) output, but the model output has shape "
                f"{tuple(out.shape)}; leave position=None"
            )
        out = out[:, position]
    return out


def run_model(model: nn.Module, inputs: Any, *, forward: ForwardFn | None, position: int | None) -> Tensor:
    """``f(x)`` for a batch of inputs, as ``(batch, ...)`` (positions kept unless ``position`` is set)."""
    output = forward(model, inputs) if forward is not None else call_model(model, inputs)
    return select_output(output, position)


def materialize(data: Any, batch_size: int | None) -> list[Batch]:
    """All batches of ``data`` as a list (the accounting passes read the data several times)."""
    return list(iter_batches(data, batch_size))


def cast_inputs(inputs: Any, dtype: torch.dtype | None) -> Any:
    """Cast floating-point inputs to ``dtype`` (token ids and masks are left alone)."""
    if dtype is None:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping):
        return {k: cast_inputs(v, dtype) for k, v in inputs.items()}
    return inputs


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


@dataclass(frozen=True)
class ParamSpec:
    """The layout of the flat parameter vector: names, shapes and offsets (``named_parameters`` order)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def slice(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {
            n: flat[self.offsets[i] : self.offsets[i + 1]].view(self.shapes[i])
            for i, n in enumerate(self.names)
        }


def param_spec(model: nn.Module) -> ParamSpec:
    names, shapes, offsets = [], [], [0]
    for name, p in model.named_parameters():
        names.append(name)
        shapes.append(tuple(p.shape))
        offsets.append(offsets[-1] + p.numel())
    if not names:
        raise ValueError("the model has no parameters")
    return ParamSpec(tuple(names), tuple(shapes), tuple(offsets))


def parameters_and_buffers(
    model: nn.Module, dtype: torch.dtype | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached copies of the parameters (cast to ``dtype``) and the buffers (floating ones cast too)."""
    params = {
        n: p.detach().to(dtype) if dtype is not None else p.detach() for n, p in model.named_parameters()
    }
    buffers = {
        n: b.to(dtype) if (dtype is not None and b.is_floating_point()) else b
        for n, b in model.named_buffers()
    }
    return params, buffers


def reference_parameters(model: nn.Module, reference: Any) -> dict[str, Tensor]:
    """θ* as a dict of tensors from a model, a ``state_dict``-like mapping or ``named_parameters`` pairs."""
    if isinstance(reference, nn.Module):
        ref = dict(reference.named_parameters())
    elif isinstance(reference, Mapping):
        ref = dict(reference)
    elif isinstance(reference, Sequence):
        ref = dict(reference)
    else:
        raise TypeError(
            "reference must be a model, a dict of parameters or (name, tensor) pairs, "
            f"not {type(reference).__name__}"
        )
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in ref]
    if missing:
        raise KeyError(f"reference lacks parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {n: ref[n] for n in names}


class _Caller(nn.Module):
    """Wraps ``model`` so that :func:`torch.func.functional_call` can run a user ``forward`` on it."""

    def __init__(self, inner: nn.Module, forward: ForwardFn | None) -> None:
        super().__init__()
        self.inner = inner
        self._forward_fn = forward

    def forward(self, inputs: Any) -> Any:
        if self._forward_fn is not None:
            return self._forward_fn(self.inner, inputs)
        return call_model(self.inner, inputs)


def functional_output(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    inputs: Any,
    *,
    forward: ForwardFn | None,
    position: int | None,
) -> Tensor:
    """f(x) computed with ``model``'s parameters/buffers replaced by ``tensors`` (a name → tensor map)."""
    caller = _Caller(model, forward)
    prefixed = {f"inner.{k}": v for k, v in tensors.items()}
    output = torch.func.functional_call(caller, prefixed, (inputs,), strict=False)
    return select_output(output, position)


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread (restored afterwards).

    Small LAPACK calls gain nothing from threads, and on an oversubscribed machine a multi-threaded
    eigensolver on a 128 × 128 matrix can take seconds (threads spin at barriers while descheduled).
    """
    n = torch.get_num_threads()
    switch = enabled and n > 1
    if switch:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if switch:
            torch.set_num_threads(n)


def eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` (ascending), single-threaded for matrices up to 1024 × 1024."""
    with single_thread(matrix.shape[-1] <= 1024):
        values, vectors = torch.linalg.eigh(matrix)
    return values, vectors


def numerical_floor(largest: float, size: int, dtype: torch.dtype, *, operator: bool = False) -> float:
    """Numerical zero of a Hessian spectrum.

    Exact path (a float64 Gram of ``size`` square built from ``dtype`` Jacobians):
    λ_max · max(size·eps64, 100·size·eps(dtype)²). Operator path (``operator=True``: products computed in
    ``dtype``): λ_max · 100 · eps(dtype), the accuracy of a Hessian-vector product.
    """
    eps = float(torch.finfo(dtype).eps)
    if operator:
        return float(largest) * 100.0 * eps
    eps64 = float(torch.finfo(torch.float64).eps)
    return float(largest) * max(size, 1) * max(eps64, 100.0 * eps**2)
