"""How the learning-coefficient results save and load: one safetensors file per result, the dataclass's
tensor fields as tensors and its other fields as JSON metadata, the file's kind checked on load (see
:class:`TensorRecord` for an example).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from torch import Tensor

from degeneracy.io import load_tensors, save_tensors

__all__ = ["TensorRecord", "NOT_SAVED", "finite_json"]

R = TypeVar("R", bound="TensorRecord")

NOT_SAVED = {"saved": False}
"""Field metadata (``field(..., metadata=NOT_SAVED)``) of a field that is not written (nested results);
it keeps its default on load."""


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``: standard JSON (``null``), never a
    bare ``NaN`` token. A float field read back from ``null`` is NaN.

    >>> finite_json({"mean": float("nan"), "config": {"x": [1.0, float("inf")]}})
    {'mean': None, 'config': {'x': [1.0, None]}}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(finite_json(v) for v in value)
    return value


def _from_json(hint: Any, value: Any) -> Any:
    """``value`` read from JSON, as the field annotated ``hint`` holds it: JSON has no tuples and its
    keys are strings, so a tuple comes back from a list and a ``dict[int, ...]`` gets int keys; a float
    (also inside a typed dict or list) written as ``null`` (NaN) or as a bare ``NaN`` (older files) is
    NaN."""
    if hint is float and value is None:
        return math.nan
    if hint in (float, int):
        return hint(value)
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple:
        return tuple(value)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        key = int if args[0] is int else (lambda k: k)
        return {key(k): _from_json(args[1], v) for k, v in value.items()}
    if origin is list and len(args) == 1 and isinstance(value, list):
        return [_from_json(args[0], v) for v in value]
    return value


class TensorRecord:
    """Base of a frozen dataclass saved as one safetensors file (:func:`degeneracy.io.save_tensors`).

    A subclass sets ``KIND`` (the file's kind, checked on load) and ``REQUIRED`` (the tensors a file
    must hold), and ``RENAMED`` (``{former name: field}``) when a field was renamed: files written under
    the former name load into the field. Fields holding tensors are saved as tensors, every other field
    as JSON metadata (after ``"kind"``, in field order; NaN/inf floats as ``null``, read back as NaN),
    except those with ``metadata=NOT_SAVED``.

    >>> import tempfile, torch
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Example(TensorRecord):
    ...     KIND = "example"
    ...     values: Tensor
    ...     note: str = ""
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Example(torch.ones(2), "hi").save(Path(folder) / "x.safetensors")
    ...     Example.load(path)
    Example(values=tensor([1., 1.], dtype=torch.float64), note='hi')
    """

    KIND: ClassVar[str]
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    RENAMED: ClassVar[dict[str, str]] = {}

    def save(self, path: str | Path) -> Path:
        """Write to one safetensors file (tensors, the rest as JSON in its header); atomic."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"kind": self.KIND}
        for f in fields(self):  # type: ignore[arg-type]
            if f.metadata.get("saved", True):
                value = getattr(self, f.name)
                if isinstance(value, Tensor):
                    tensors[f.name] = value
                else:
                    meta[f.name] = finite_json(value)
        save_tensors(path, tensors, meta)
        return Path(path)

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a file written by :meth:`save` (its kind and required tensors are checked; metadata
        under a former field name of ``RENAMED`` goes to the field)."""
        tensors, meta = load_tensors(path, kind=cls.KIND, required=cls.REQUIRED)
        meta = {cls.RENAMED.get(k, k): v for k, v in meta.items()}
        hints = get_type_hints(cls)
        values = {
            f.name: _from_json(hints[f.name], meta[f.name])
            for f in fields(cls)  # type: ignore[arg-type]
            if f.name in meta and f.name not in tensors
        }
        return cls(**tensors, **values)
