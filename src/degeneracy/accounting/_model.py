"""Deprecated: the accounting's former model plumbing, kept only until its last importers move.

Where each piece now lives:

* :mod:`degeneracy.run`: ``ForwardFn``, ``select_output``, ``run_model``, ``functional_output``,
  ``parameters_and_buffers``, ``reference_parameters``, ``model_dtype``, ``cast_inputs`` (with the
  one dtype rule: ``explicit=``), ``ParamLayout`` (replaces ``ParamSpec``/``param_spec``:
  ``.numel`` for ``.size``);
* :mod:`degeneracy.linalg`: ``eigh_descending`` (descending order!) replaces ``eigh``,
  ``intra_op_threads`` replaces ``single_thread``;
* :func:`degeneracy.capture.forward`/``capture``: the one hook mechanism (``hooks`` is gone);
* :func:`degeneracy.accounting.gauss_newton.numerical_floor`;
* ``materialize(data, batch_size)`` is ``list(degeneracy.data.iter_batches(data, batch_size))``.

>>> model_dtype.__module__
'degeneracy.run'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.data import Batch, iter_batches
from degeneracy.linalg import intra_op_threads
from degeneracy.run import (
    ForwardFn,
    functional_output,
    model_dtype,
    parameters_and_buffers,
    reference_parameters,
    run_model,
    select_output,
)

__all__ = [
    "ForwardFn",
    "functional_output",
    "model_dtype",
    "parameters_and_buffers",
    "reference_parameters",
    "run_model",
    "select_output",
    "resolve_module",
    "materialize",
    "cast_inputs",
    "ParamSpec",
    "param_spec",
    "single_thread",
    "eigh",
]


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a ``KeyError`` listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if name not in modules:
        valid = ", ".join(repr(n) for n in modules if n)
        raise KeyError(f"model has no module named {name!r}; valid names: {valid}")
    return modules[name]


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


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread (restored afterwards)."""
    with intra_op_threads(1 if enabled else None):
        yield


def eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` (ascending), single-threaded for matrices up to 1024 × 1024."""
    with single_thread(matrix.shape[-1] <= 1024):
        values, vectors = torch.linalg.eigh(matrix)
    return values, vectors
