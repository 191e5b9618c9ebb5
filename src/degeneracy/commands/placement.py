"""Where a command runs: the ``device`` field of the basis, graph and degeneracy configs.

Without a ``device`` a command runs on ``cuda:LOCAL_RANK`` when ``torchrun`` started it and CUDA is
available (one GPU per process), and where the model is otherwise (:func:`run_device`); the command
moves its model and data there (:func:`place`) before any stage runs.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import AfterValidator

__all__ = ["check_device", "run_device", "place", "Device"]


def check_device(device: str | None) -> str | None:
    """The ``device`` field of a run config, checked to exist here (``None``: see :func:`run_device`).

    >>> check_device("cpu")
    'cpu'
    >>> check_device("gpu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'gpu': use one of ['cpu'...] (or none: the model's device)
    """
    from degeneracy.run import resolve_device

    resolve_device(device)
    return device


def run_device(device: str | None) -> Any:
    """Where a command runs: the config's ``device``; without one, ``cuda:LOCAL_RANK`` when ``torchrun``
    set ``LOCAL_RANK`` and CUDA is available, else ``None`` (the model's own device).

    >>> run_device("cpu")
    device(type='cpu')
    """
    import torch

    from degeneracy.run import resolve_device

    if device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return resolve_device(device)


def place(model: Any, data: Any, device: Any) -> tuple[Any, Any]:
    """``(model, data)`` moved to ``device`` (a ``torch.device`` or ``None``: left where they are): the
    model in place, the data's tensors (a tensor, a dict of tensors, or a tuple such as (inputs, labels)).

    >>> import torch
    >>> model, data = place(torch.nn.Linear(2, 1), {"x": torch.zeros(3, 2)}, torch.device("cpu"))
    >>> data["x"].device, next(model.parameters()).device
    (device(type='cpu'), device(type='cpu'))
    """
    import torch

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, tuple | list):
            return type(x)(move(v) for v in x)
        return x

    if device is None:
        return model, data
    return model.to(device), move(data)


Device = Annotated[str | None, AfterValidator(check_device)]
"""The ``device`` field of a run config: a device name checked by :func:`check_device`, or ``None``."""
