"""Config files for the command line: which model, which data, which node layers.

Every stage's config (basis, graph, degeneracy, llc) embeds a :class:`ModelSpec`. Unknown fields are
rejected (``extra="forbid"``), so a typo in a YAML file is an error, not a silently ignored option.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "StrictModel",
    "ModelSpec",
    "load_yaml",
    "resolve_model",
    "MODADD_NODE_LAYERS",
    "DIGITS_NODE_LAYERS",
]

MODADD_NODE_LAYERS: list[Any] = [
    "blocks.0.hook_resid_pre",
    {"name": "resid_mid", "module": "blocks.0.hook_resid_mid", "positions": -1},
    {"name": "resid_post", "module": "blocks.0.hook_resid_post", "positions": -1},
    {"name": "logits", "module": "output", "positions": -1},
]
DIGITS_NODE_LAYERS: list[Any] = ["fc1", "fc2", "out", "output"]


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown fields and is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(StrictModel):
    """Which model and data to analyse.

    ``name`` is a bundled model (``"modadd"``, ``"digits_mlp"``) or ``"package.module:function"``
    returning ``(model, data)``. ``split`` picks the bundled data: ``"train"`` (default), ``"test"``
    or ``"all"``. ``limit`` keeps the first examples only.
    """

    name: str = "modadd"
    split: Literal["train", "test", "all"] = "train"
    limit: int | None = Field(default=None, gt=0)
    dtype: Literal["float32", "float64"] = "float64"


def load_yaml(path: str | Path, model: type[BaseModel]) -> Any:
    """Read and validate a YAML config; errors name the file and the offending fields."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid config\n{err}") from err


def resolve_model(spec: ModelSpec) -> tuple[Any, Any, list[Any] | None]:
    """Load ``(model, data, default_node_layers)`` for a :class:`ModelSpec` (model in eval mode, float64
    when asked). Data are inputs only (labels are attached by the bundled loaders' own helpers)."""
    import torch

    dtype = getattr(torch, spec.dtype)
    if spec.name == "modadd":
        from degeneracy.models import load_modadd, load_modadd_metadata, modadd_all_inputs, modadd_dataset

        model = load_modadd(dtype=dtype)
        if spec.split == "all":
            data, _ = modadd_all_inputs()
        else:
            data_meta = load_modadd_metadata()["data"]
            train, _, test, _ = modadd_dataset(frac_train=data_meta["frac_train"], seed=data_meta["seed"])
            data = train if spec.split == "train" else test
        layers: list[Any] | None = MODADD_NODE_LAYERS
    elif spec.name == "digits_mlp":
        from degeneracy.models import digits_all_inputs, digits_dataset, load_digits_mlp

        model = load_digits_mlp(dtype=dtype)
        if spec.split == "all":
            data, _ = digits_all_inputs(dtype=dtype)
        else:
            xtr, _, xte, _ = digits_dataset(dtype=dtype)
            data = xtr if spec.split == "train" else xte
        layers = DIGITS_NODE_LAYERS
    elif ":" in spec.name:
        module_name, func_name = spec.name.split(":", 1)
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot load model factory {spec.name!r}: {err}") from err
        model, data = func()
        model = model.to(dtype)
        layers = None
    else:
        raise ValueError(
            f"unknown model {spec.name!r}: use 'modadd', 'digits_mlp' or 'package.module:function'"
        )
    if spec.limit is not None:
        data = data[: spec.limit]
    return model.eval(), data, layers
