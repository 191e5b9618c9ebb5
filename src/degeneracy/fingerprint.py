"""Fingerprints that keep results from being mixed up: which model, which node layers and which data a
basis or graph was built on.

A fingerprint is a SHA-256 over bytes, computed streaming (no copy of a whole model or dataset):

- the model: the class of every submodule (by name), then every parameter and buffer (name, shape and
  values cast to float64, so a float32 model and its float64 copy agree);
- the node layers: their saved description (name, modules, positions, read);
- the data: a tensor, a dict of tensors, or a list/tuple of them (values in float64 when floating);
  data that can only be read once (a generator, a ``DataLoader``) gets ``None`` (not recorded).

:func:`degeneracy.interaction_basis` stores ``fingerprint(model, data, layers)`` in ``B.info``;
:func:`degeneracy.interaction_graph` and the ablations check the model against it with
:func:`check_model` (a :class:`ModelMismatchError` unless ``allow_other_model=True``; results without a
fingerprint, written by older versions, load and are used with a warning).

>>> import torch
>>> model = torch.nn.Linear(2, 1)
>>> model_fingerprint(model) == model_fingerprint(model.double())
True
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FINGERPRINT_FORMAT",
    "ModelMismatchError",
    "model_fingerprint",
    "data_fingerprint",
    "layers_fingerprint",
    "tensors_fingerprint",
    "fingerprint",
    "result_fingerprint",
    "check_model",
    "check_same_basis",
    "check_same_model",
    "recorded_fingerprint",
    "basis_fingerprint",
]

FINGERPRINT_FORMAT = 1
_CHUNK = 2**22  # elements hashed at a time


class ModelMismatchError(ValueError):
    """A result is used with another model (or basis) than the one it was built on.

    >>> issubclass(ModelMismatchError, ValueError)
    True
    """


def _update(digest: Any, name: str, t: Tensor) -> None:
    t = t.detach()
    digest.update(f"{name}|{tuple(t.shape)}|{'float' if t.is_floating_point() else t.dtype}|".encode())
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to("cpu")
        if part.is_complex():
            part = torch.view_as_real(part)
        part = part.to(torch.float64) if part.is_floating_point() else part.to(torch.int64)
        digest.update(part.contiguous().view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of a model's structure (submodule classes) and its parameters and buffers.

    >>> import torch
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> with torch.no_grad():
    ...     _ = b.weight.copy_(a.weight), b.bias.copy_(a.bias)
    >>> model_fingerprint(a) == model_fingerprint(b), model_fingerprint(a) == model_fingerprint(b.double())
    (True, True)
    >>> with torch.no_grad():
    ...     _ = b.bias.add_(1e-6)
    >>> model_fingerprint(a) == model_fingerprint(b)
    False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    digest = hashlib.sha256(b"degeneracy-model/1\n")
    for name, module in model.named_modules():
        digest.update(f"module|{name}|{type(module).__qualname__}\n".encode())
    for name, p in model.named_parameters():
        _update(digest, f"param|{name}", p)
    for name, b in model.named_buffers():
        _update(digest, f"buffer|{name}", b)
    return digest.hexdigest()


def tensors_fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 (hex) of named tensors (names, shapes and values; floating values in float64).

    >>> import torch
    >>> tensors_fingerprint({"a": torch.ones(2)}) == tensors_fingerprint({"a": torch.ones(2).double()})
    True
    """
    digest = hashlib.sha256(b"degeneracy-tensors/1\n")
    for name in sorted(tensors):
        _update(digest, name, tensors[name])
    return digest.hexdigest()


def data_fingerprint(data: Any) -> str | None:
    """SHA-256 (hex) of data given as a tensor, a dict of tensors or a list/tuple of those; ``None`` for
    data that can only be read once (an iterator, a ``DataLoader``) or holds other objects.

    >>> import torch
    >>> x = torch.arange(6).reshape(3, 2)
    >>> data_fingerprint(x) == data_fingerprint(x.clone()), data_fingerprint(x) == data_fingerprint(x[:2])
    (True, False)
    >>> data_fingerprint(iter([x])) is None
    True
    """
    digest = hashlib.sha256(b"degeneracy-data/1\n")

    def walk(value: Any, name: str) -> bool:
        if isinstance(value, Tensor):
            _update(digest, name, value)
            return True
        if isinstance(value, Mapping):
            return all(walk(value[k], f"{name}.{k}") for k in sorted(value, key=str))
        if isinstance(value, list | tuple):
            digest.update(f"{name}|seq{len(value)}|".encode())
            return all(walk(v, f"{name}[{i}]") for i, v in enumerate(value))
        return False

    return digest.hexdigest() if walk(data, "data") else None


def layers_fingerprint(layers: Sequence[Any]) -> str:
    """SHA-256 (hex) of node layers (:class:`~degeneracy.capture.NodeLayer` or their saved dicts).

    >>> layers_fingerprint([{"name": "h"}]) == layers_fingerprint([{"name": "h"}])
    True
    """
    dicts = [layer.to_dict() if hasattr(layer, "to_dict") else layer for layer in layers]
    text = json.dumps(dicts, sort_keys=True, default=str)
    return hashlib.sha256(b"degeneracy-layers/1\n" + text.encode()).hexdigest()


def fingerprint(model: nn.Module, data: Any, layers: Sequence[Any]) -> dict[str, Any]:
    """The fingerprint a basis or graph records in its ``info``: ``{"format", "model", "node_layers",
    "data"}`` (``data`` is ``None`` for data that can only be read once).

    >>> import torch
    >>> fp = fingerprint(torch.nn.Linear(2, 1), torch.zeros(4, 2), [{"name": "output"}])
    >>> sorted(fp), len(fp["model"])
    (['data', 'format', 'model', 'node_layers'], 64)
    """
    return {
        "format": FINGERPRINT_FORMAT,
        "model": model_fingerprint(model),
        "node_layers": layers_fingerprint(layers),
        "data": data_fingerprint(data),
    }


def result_fingerprint(model: nn.Module | None, data: Any, **extra: Any) -> dict[str, Any]:
    """The fingerprint every other result records (ablations, modules, the degeneracy report, LLC
    estimates; in ``info["fingerprint"]`` or ``config["fingerprint"]``): ``{"format", "model", "data"}``
    and ``extra`` (e.g. the ``basis`` it was computed in). ``model=None`` or a model fingerprint given as
    a string (copied from the result it derives from) avoid hashing the model again.

    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> fp = result_fingerprint(model, torch.zeros(4, 2))
    >>> sorted(fp), fp["model"] == model_fingerprint(model)
    (['data', 'format', 'model'], True)
    >>> result_fingerprint(None, iter([]))["data"] is None
    True
    """
    if model is None or isinstance(model, str):
        found = model
    else:
        found = model_fingerprint(model)
    return {"format": FINGERPRINT_FORMAT, "model": found, "data": data_fingerprint(data), **extra}


def _recorded(result: Any) -> Mapping[str, Any] | None:
    for where in ("info", "config"):
        place = getattr(result, where, None)
        found = place.get("fingerprint") if isinstance(place, Mapping) else None
        if isinstance(found, Mapping):
            return found
    return None


def recorded_fingerprint(result: Any) -> Mapping[str, Any] | None:
    """The fingerprint ``result`` records (in ``info`` or ``config``), or ``None`` (an older file).

    >>> import types
    >>> recorded_fingerprint(types.SimpleNamespace(config={"fingerprint": {"model": "ab"}}))
    {'model': 'ab'}
    >>> recorded_fingerprint(types.SimpleNamespace(info={})) is None
    True
    """
    return _recorded(result)


def check_same_model(
    first: Any, second: Any, *, what: str = "results", allow_other_model: bool = False
) -> None:
    """Check that two results (each with a recorded fingerprint) were computed on the same model (and,
    where both record one, in the same basis); a :class:`ModelMismatchError` when they were not
    (``allow_other_model=True``: a warning). Nothing is checked where either records nothing (older files).

    >>> import types
    >>> a = types.SimpleNamespace(info={"fingerprint": {"model": "aa"}})
    >>> b = types.SimpleNamespace(config={"fingerprint": {"model": "bb"}})
    >>> check_same_model(a, a)
    >>> try:
    ...     check_same_model(a, b, what="modules and their epsilon")
    ... except ModelMismatchError as err:
    ...     print(str(err)[:52])
    modules and their epsilon come from different models
    """
    one, two = _recorded(first) or {}, _recorded(second) or {}
    differ = [k for k in ("model", "basis") if one.get(k) and two.get(k) and one[k] != two[k]]
    if not differ:
        return
    key = differ[0]
    message = (
        f"{what} come from different {key}s (fingerprints {str(one[key])[:12]} and "
        f"{str(two[key])[:12]}): compute both on the same {key}, or pass allow_other_model=True"
    )
    if not allow_other_model:
        raise ModelMismatchError(message)
    warnings.warn(message + " (allowed)", UserWarning, stacklevel=3)


def check_model(
    result: Any, model: nn.Module, *, what: str = "basis", allow_other_model: bool = False
) -> None:
    """Check that ``result`` (a basis or graph, its fingerprint in ``result.info``) was built on ``model``.

    A result built on another model raises :class:`ModelMismatchError` (with ``allow_other_model=True``:
    a warning); one without a fingerprint (written by an older version, or assembled by hand) is used
    with a warning, since it cannot be checked.

    >>> import torch, types
    >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> basis = types.SimpleNamespace(layers=[], bases={}, info={"fingerprint": fingerprint(a, None, [])})
    >>> check_model(basis, a)  # the same model: nothing to say
    >>> try:
    ...     check_model(basis, b)
    ... except ModelMismatchError as err:
    ...     print(str(err)[:50])
    this basis was built on another model (fingerprint
    """
    if what == "basis" and not (hasattr(result, "layers") and hasattr(result, "bases")):
        raise TypeError(f"basis must be a Basis (interaction_basis, load_basis), got {type(result).__name__}")
    recorded = _recorded(result)
    if recorded is None or "model" not in recorded:
        warnings.warn(
            f"this {what} records no model fingerprint (saved by an older version or assembled by hand): "
            "cannot check that it was built on this model",
            UserWarning,
            stacklevel=3,
        )
        return
    found = model_fingerprint(model)
    if recorded["model"] == found:
        return
    message = (
        f"this {what} was built on another model (fingerprint {str(recorded['model'])[:12]}, this model "
        f"{found[:12]}): its parameters, buffers or structure differ. Rebuild the {what} on this model, "
        "or pass allow_other_model=True (CLI: --allow-other-model) to use it anyway"
    )
    if not allow_other_model:
        raise ModelMismatchError(message)
    allowed = message.split(". Rebuild")[0] + " (allowed by allow_other_model=True)"
    warnings.warn(allowed, UserWarning, stacklevel=3)


def check_same_basis(graph: Any, basis: Any, *, allow_other_model: bool = False) -> None:
    """Check that ``graph`` was built from ``basis`` (the basis tensors' fingerprint it recorded).

    >>> import types
    >>> check_same_basis(types.SimpleNamespace(info={}), None)  # nothing recorded: nothing checked
    """
    recorded = _recorded(graph)
    if recorded is None or "basis" not in recorded:
        return
    found = basis_fingerprint(basis)
    if recorded["basis"] != found and not allow_other_model:
        raise ModelMismatchError(
            "this graph was built from another basis (its basis fingerprint differs): rebuild the graph "
            "from this basis, or pass allow_other_model=True to use it anyway"
        )


def basis_fingerprint(basis: Any) -> str:
    """SHA-256 (hex) of a basis's matrices C (the graph records it to be checked against its basis).

    >>> import torch, types
    >>> b = types.SimpleNamespace(names=["h"], bases={"h": types.SimpleNamespace(C=torch.eye(2))})
    >>> len(basis_fingerprint(b))
    64
    """
    return tensors_fingerprint({name: basis.bases[name].C for name in basis.names})
