"""The data of a model of your own on the command line (``model.name: package.module:function``): the
factory found on the Python path or in the current directory, its data cast to the run's dtype and cut
to ``model.limit`` (an ``(inputs, labels)`` pair as a pair)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["factory", "cast_data", "limit_data", "split_labels"]


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
