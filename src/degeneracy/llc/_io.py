"""Atomic save/load of tensors plus JSON metadata in one safetensors file (no pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_META_KEY = "degeneracy.json"


def save_tensors_json(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` (JSON, stored in the safetensors header) to ``path`` atomically:
    a temporary file in the same folder is written, then moved over ``path`` with ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(payload, str(tmp), metadata={_META_KEY: json.dumps(meta, allow_nan=True)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_tensors_json(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read what :func:`save_tensors_json` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if _META_KEY not in header:
            raise ValueError(f"{path} was not written by degeneracy (no {_META_KEY!r} in its header)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return tensors, json.loads(header[_META_KEY])


def as_float64_cpu(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)
