"""One convention for "data" across the package.

``data`` may be

* a tensor of inputs (first dimension = examples), split into batches of ``batch_size``;
* a ``dict`` of tensors (Hugging Face style keyword inputs, e.g. ``input_ids`` and
  ``attention_mask``), split along the first dimension;
* any iterable of batches (a ``torch.utils.data.DataLoader`` for instance), where each batch is a
  tensor of inputs, a dict of keyword inputs, or a tuple/list whose first element is the inputs
  (labels and anything else after it are ignored by the statistics, but kept for losses).

:func:`iter_batches` turns any of these into a stream of :class:`Batch` objects and
:func:`call_model` runs a model on one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batch", "iter_batches", "call_model", "num_examples"]


@dataclass(frozen=True)
class Batch:
    """A batch of model inputs plus whatever came with them (labels, ...)."""

    inputs: Tensor | Mapping[str, Tensor]
    extras: tuple[Any, ...] = ()

    @property
    def size(self) -> int:
        if isinstance(self.inputs, Mapping):
            return int(next(iter(self.inputs.values())).shape[0])
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        if isinstance(self.inputs, Mapping):
            inputs = {k: v.to(device) for k, v in self.inputs.items()}
        else:
            inputs = self.inputs.to(device)
        extras = tuple(e.to(device) if isinstance(e, Tensor) else e for e in self.extras)
        return Batch(inputs, extras)


def _as_batch(item: Any) -> Batch:
    if isinstance(item, Batch):
        return item
    if isinstance(item, Tensor | Mapping):
        return Batch(item)
    if isinstance(item, tuple | list) and len(item) > 0:
        return Batch(item[0], tuple(item[1:]))
    raise TypeError(
        f"cannot read a batch of type {type(item).__name__}: expected a tensor, a dict of tensors, "
        "or a tuple/list whose first element is the inputs"
    )


def _slice_extra(extra: Any, start: int, size: int, n: int) -> Any:
    """The part of a batch's extra (labels, ...) that goes with examples [start, start + size)."""
    if isinstance(extra, Tensor) and extra.dim() > 0 and extra.shape[0] == n:
        return extra[start : start + size]
    if isinstance(extra, Mapping):
        return {k: _slice_extra(v, start, size, n) for k, v in extra.items()}
    if isinstance(extra, list | tuple) and len(extra) == n:
        return type(extra)(extra[start : start + size])
    return extra  # per-batch metadata (not one entry per example) goes with every part


def _split(inputs: Tensor | Mapping[str, Tensor], batch_size: int) -> Iterator[Batch]:
    if isinstance(inputs, Mapping):
        n = int(next(iter(inputs.values())).shape[0])
        for start in range(0, n, batch_size):
            yield Batch({k: v[start : start + batch_size] for k, v in inputs.items()})
    else:
        for start in range(0, inputs.shape[0], batch_size):
            yield Batch(inputs[start : start + batch_size])


def iter_batches(data: Any, batch_size: int | None = None) -> Iterator[Batch]:
    """Yield :class:`Batch` objects from any supported ``data``; raise ``ValueError`` if empty."""
    if isinstance(data, Tensor | Mapping):
        if isinstance(data, Mapping) and len(data) == 0:
            raise ValueError("data is an empty dict: no inputs to read")
        n = num_examples(data)
        if n == 0:
            raise ValueError("data is empty: it holds 0 examples")
        yield from _split(data, batch_size or n)
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"data of type {type(data).__name__} is neither a tensor, a dict nor an iterable")
    seen = False
    for item in data:
        batch = _as_batch(item)
        if batch.size == 0:
            continue
        seen = True
        if batch_size is None or batch.size <= batch_size:
            yield batch
        else:
            for start, sub in zip(
                range(0, batch.size, batch_size), _split(batch.inputs, batch_size), strict=True
            ):
                yield Batch(
                    sub.inputs, tuple(_slice_extra(e, start, batch_size, batch.size) for e in batch.extras)
                )
    if not seen:
        raise ValueError("data is empty: the iterable yielded no examples")


def num_examples(data: Any) -> int | None:
    """Number of examples if it can be known without iterating, else ``None``."""
    if isinstance(data, Tensor):
        return int(data.shape[0]) if data.dim() > 0 else 0
    if isinstance(data, Mapping):
        return int(next(iter(data.values())).shape[0]) if data else 0
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return None


def call_model(model: nn.Module, inputs: Tensor | Mapping[str, Tensor]) -> Any:
    """Run ``model`` on a batch's inputs (keyword call for dicts)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def model_output_tensor(output: Any) -> Tensor:
    """The tensor a model "outputs": the tensor itself, ``.logits`` or ``.last_hidden_state``,
    or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find an output tensor in a model output of type {type(output).__name__}")
