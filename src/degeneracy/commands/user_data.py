"""The data of a model of your own on the command line (``model.name: package.module:function``): the
factory found on the Python path or in the current directory, its data cast to the run's dtype and cut
to ``model.limit`` (an ``(inputs, labels)`` pair as a pair), and checked before any stage (the model a
module, the data a kind the library reads, finite, batches in the run's dtype, labels the ablation
metrics can score, limits that cut examples; integer module names of the config read as strings)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator

__all__ = [
    "factory", "cast_data", "check_data", "limit_data", "split_labels", "batches_carry_labels",
    "check_limits", "check_labels", "module_names", "NodeLayers", "check_model",
]


def _is_pair(data: Any) -> bool:
    """Whether ``data`` is an ``(inputs, labels)`` pair of tensors (or dicts of tensors)."""
    from torch import Tensor

    pair = isinstance(data, tuple | list) and len(data) == 2
    return pair and all(isinstance(d, Tensor | Mapping) for d in data)


def factory(name: str) -> Callable[..., Any]:
    """The function ``"package.module:function"`` names. The module is imported from the Python path and
    the current directory (as ``python -m degeneracy`` does), so a ``mymodel.py`` beside the config works
    when the command runs from its folder.

    >>> factory("degeneracy.models:load_digits_mlp").__name__
    'load_digits_mlp'
    >>> factory("no_such_module_here:make")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: cannot load model factory 'no_such_module_here:make': No module named ...
    """
    import os
    import sys

    module_name, func_name = name.split(":", 1)
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)  # last: a module of the current directory never shadows an installed one
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"cannot load model factory {name!r}: {err} (the module is looked up on PYTHONPATH and in the "
            f"current directory {here}; name it as 'package.module:function')"
        ) from err


def cast_data(data: Any, dtype: Any) -> Any:
    """``data`` with its floating tensors cast to ``dtype``: a tensor, a dict of tensors (integer token
    ids and masks stay as they are) or an ``(inputs, labels)`` pair of them; anything else (a
    ``DataLoader``) as it is.

    >>> import torch
    >>> x, y = cast_data((torch.zeros(2, 3), torch.tensor([0, 1])), torch.float64)
    >>> x.dtype, y.dtype
    (torch.float64, torch.int64)
    """
    from torch import Tensor

    if isinstance(data, Tensor):
        return data.to(dtype) if data.is_floating_point() else data
    if isinstance(data, Mapping):
        return {k: cast_data(v, dtype) if isinstance(v, Tensor) else v for k, v in data.items()}
    if _is_pair(data):
        return type(data)(cast_data(d, dtype) for d in data)
    return data


def limit_data(data: Any, limit: int) -> Any:
    """The first ``limit`` examples of ``data``: a tensor, a dict of tensors, or an ``(inputs, labels)``
    pair (both cut, not the pair); a ``ValueError`` for data that cannot be cut (a ``DataLoader``).

    >>> import torch
    >>> x, y = limit_data((torch.zeros(5, 3), torch.arange(5)), 2)
    >>> tuple(x.shape), y.tolist()
    ((2, 3), [0, 1])
    """
    from torch import Tensor

    if isinstance(data, Tensor):
        return data[:limit]
    if isinstance(data, Mapping):
        return {k: v[:limit] if isinstance(v, Tensor) and v.dim() else v for k, v in data.items()}
    if _is_pair(data):
        return type(data)(limit_data(d, limit) for d in data)
    raise ValueError(
        f"model.limit cuts data given as a tensor, a dict of tensors or an (inputs, labels) pair, not a "
        f"{type(data).__name__}: drop limit, or make the factory return fewer examples"
    )



def split_labels(data: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of data that carry labels (a factory returning ``(model, (inputs, labels))``),
    else ``(data, None)``: the basis, graph and degeneracy commands take the inputs alone.

    >>> import torch
    >>> x, y = split_labels((torch.zeros(4, 3), torch.arange(4)))
    >>> tuple(x.shape), y.tolist(), split_labels(torch.zeros(2))[1]
    ((4, 3), [0, 1, 2, 3], None)
    """
    if isinstance(data, tuple | list) and len(data) == 2:
        return data[0], data[1]
    return data, None


def _named_tensors(data: Any) -> dict[str, Any]:
    """The tensors of a tensor, a dict or an ``(inputs, labels)`` pair, by where they are."""
    from torch import Tensor

    if isinstance(data, Tensor):
        return {"data": data}
    parts = dict(zip(("inputs", "labels"), data, strict=True)) if _is_pair(data) else {"data": data}
    found = {}
    for where, part in parts.items():
        if isinstance(part, Tensor):
            found[where] = part
        elif isinstance(part, Mapping):
            found |= {f"{where}[{k!r}]": v for k, v in part.items() if isinstance(v, Tensor)}
    return found


def check_data(data: Any, dtype: Any, name: str) -> Any:
    """``data`` of the factory ``name`` once checked (after :func:`cast_data`): no numpy arrays (a
    ``ValueError`` saying to return tensors), no NaN or inf in its tensors, and batches of a loader (or
    list of batches) whose floating inputs are in ``dtype``, the run's ``model.dtype`` (the first batch
    is read; a one-pass generator is not), else a ``ValueError`` naming the config field to set.

    >>> import numpy as np, torch
    >>> check_data(np.zeros((3, 2)), torch.float64, "mymodel:make")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: model factory 'mymodel:make' returned data of type ndarray: return torch tensors ...
    >>> batches = [torch.zeros(2, 3), torch.zeros(2, 3)]
    >>> check_data(batches, torch.float32, "mymodel:make") is batches
    True
    >>> try:
    ...     check_data((torch.tensor([[0.0, float("nan")]]), torch.zeros(1)), torch.float32, "my:make")
    ... except ValueError as err:
    ...     print(str(err)[:72])
    the inputs of model factory 'my:make' hold NaN or inf (first at index (0
    """
    import torch
    from torch import Tensor

    from degeneracy.data import iter_batches

    parts = list(data) if isinstance(data, tuple | list) and len(data) == 2 else [data]
    for part in parts:
        if hasattr(part, "__array__") and not isinstance(part, Tensor):
            raise ValueError(
                f"model factory {name!r} returned data of type {type(part).__name__}: return torch tensors "
                "(torch.from_numpy(x)), a dict of them, (inputs, labels) or a DataLoader"
            )
    for where, t in _named_tensors(data).items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            first = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
            raise ValueError(
                f"the {where} of model factory {name!r} hold NaN or inf (first at index {first}): every "
                "stage would fail or give NaN; clean the data"
            )
    if isinstance(data, Tensor | Mapping) or _is_pair(data):
        return data
    kinds = "a tensor, a dict of tensors, (inputs, labels), or batches of them (a DataLoader, a list)"
    if not isinstance(data, Iterable):
        raise ValueError(
            f"model factory {name!r} returned data of type {type(data).__name__}: return {kinds}"
        )
    if iter(data) is data:  # a one-pass generator: not read here
        return data
    first = next(iter(data), None)
    if not (isinstance(first, Tensor | Mapping) or (isinstance(first, tuple | list) and first
                                                     and isinstance(first[0], Tensor | Mapping))):
        raise ValueError(
            f"model factory {name!r} returned a {type(data).__name__} of {type(first).__name__}: return "
            + kinds
        )
    inputs = next(iter_batches(data)).inputs
    found = {v.dtype for v in (inputs.values() if isinstance(inputs, Mapping) else [inputs])
             if isinstance(v, Tensor) and v.is_floating_point()}
    if found - {dtype}:
        got = ", ".join(sorted(str(d).removeprefix("torch.") for d in found))
        want = str(dtype).removeprefix("torch.")
        raise ValueError(
            f"the batches of model factory {name!r} hold {got} inputs, and the run computes in {want} "
            f"(model.dtype): set model.dtype: {got} in the config, or make the batches {want} "
            "(a tensor, dict or (inputs, labels) pair is cast for you; batches are not)"
        )
    return data


def batches_carry_labels(data: Any) -> bool:
    """Whether ``data`` are batches (a ``DataLoader``, a list) of ``(inputs, labels, ...)``: the
    ablations then read the labels from the batches. A tensor, a dict or a one-pass generator: ``False``.

    >>> import torch
    >>> x, y = torch.zeros(4, 2), torch.arange(4)
    >>> batches_carry_labels([(x, y), (x, y)]), batches_carry_labels([x, x]), batches_carry_labels(x)
    (True, False, False)
    """
    from torch import Tensor

    from degeneracy.data import iter_batches

    if data is None or isinstance(data, Tensor | Mapping) or iter(data) is data:
        return False
    extras = next(iter_batches(data)).extras
    return bool(extras) and isinstance(extras[0], Tensor)


def check_limits(data: Any, **limits: int | None) -> None:
    """A ``ValueError`` when a limit of the config (``edge_limit``, ``ablation.limit``) is set and
    ``data`` are batches (a ``DataLoader``, a list of batches): they cut examples of a tensor or a dict
    of tensors, and would cut a list of batches by batches.

    >>> import torch
    >>> check_limits(torch.zeros(5, 2), edge_limit=3)
    >>> check_limits([torch.zeros(5, 2)] * 4, edge_limit=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: edge_limit cuts data given as a tensor or a dict of tensors, not batches (a list): ...
    """
    from torch import Tensor

    if isinstance(data, Tensor | Mapping):
        return
    for field, limit in limits.items():
        if limit is not None:
            raise ValueError(
                f"{field} cuts data given as a tensor or a dict of tensors, not batches "
                f"(a {type(data).__name__}): drop it, or make the factory return fewer examples"
            )


def check_labels(data: Any, labels: Any, metrics: str) -> None:
    """A ``ValueError`` before any stage runs when the ablations' ``metrics`` cannot score these labels
    (``labels``, or those the batches of ``data`` carry): floating-point labels (regression targets)
    with ``classification``, the default.

    >>> import torch
    >>> check_labels(torch.zeros(4, 2), torch.arange(4), "classification")
    >>> check_labels(torch.zeros(4, 2), torch.randn(4), "classification")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ablation.metrics is classification (the default), but the labels are float32 numbers ...
    """
    from torch import Tensor

    from degeneracy.data import iter_batches

    if labels is None and batches_carry_labels(data):
        labels = next(iter_batches(data)).extras[0]
    if metrics == "classification" and isinstance(labels, Tensor) and labels.is_floating_point():
        raise ValueError(
            f"ablation.metrics is classification (the default), but the labels are "
            f"{str(labels.dtype).removeprefix('torch.')} numbers (regression targets?): set "
            "ablation: {metrics: mse} to score the output against them, or give integer class labels"
        )


def module_names(layers: list[Any] | None) -> list[Any] | None:
    """Node layers of a config with integer module names as strings: YAML reads the layers of an
    ``nn.Sequential`` written ``[0, 2, output]`` as integers, and module names are strings.

    >>> module_names([0, "output", {"name": "h", "module": 2}, {"modules": [1, 3]}])
    ['0', 'output', {'name': 'h', 'module': '2'}, {'modules': ['1', '3']}]
    """

    def name(value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def one(layer: Any) -> Any:
        if isinstance(layer, dict):
            fixed = dict(layer)
            if "module" in fixed:
                fixed["module"] = name(fixed["module"])
            if isinstance(fixed.get("modules"), list):
                fixed["modules"] = [name(m) for m in fixed["modules"]]
            elif "modules" in fixed:
                fixed["modules"] = name(fixed["modules"])
            return fixed
        return name(layer)

    return None if layers is None else [one(layer) for layer in layers]


NodeLayers = Annotated[list[Any] | None, AfterValidator(module_names)]
"""The ``node_layers`` field of the basis and graph configs (integer module names read as strings)."""


def check_model(model: Any, name: str) -> Any:
    """The model a factory returned, if it is a ``torch.nn.Module`` instance; else a ``ValueError``.

    >>> import torch
    >>> check_model(torch.zeros(2), "mymodel:make")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: model factory 'mymodel:make' must return (model, data) with model a ..., got a Tensor first
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        kind = f"a {type(model).__name__}"
        kind = f"the class {model.__name__} (not an instance)" if isinstance(model, type) else kind
        raise ValueError(
            f"model factory {name!r} must return (model, data) with model a torch.nn.Module, got {kind} first"
        )
    return model
