"""The data the graph command's ablations run on: the data the bases were built on, or another split of
the same model's data (the companion paper builds on ``train`` and ablates on ``test``), and what the
ablation stages add to their configs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from degeneracy.commands.config import AblationOptions, ModelSpec, resolve_model

__all__ = ["head", "bundled_labels", "ablation_data"]


def head(data: Any, limit: int | None) -> Any:
    """The first ``limit`` examples of a tensor or dict of tensors (all when ``limit`` is ``None``).

    >>> head([1, 2, 3], 2), head({"x": [1, 2, 3]}, 1), head([1, 2], None)
    ([1, 2], {'x': [1]}, [1, 2])
    """
    if limit is None or data is None:
        return data
    if isinstance(data, Mapping):
        return {k: v[:limit] for k, v in data.items()}
    return data[:limit]


def bundled_labels(spec: ModelSpec, data: Any) -> Any:
    """The labels of the bundled data ``spec`` names, for its inputs ``data`` (a tensor): the class for
    the digits, (a + b) mod p for modular addition; ``None`` for other models or data.

    >>> import torch
    >>> bundled_labels(ModelSpec(name="modadd"), torch.tensor([[3, 5, 7], [6, 6, 7]])).tolist()
    [1, 5]
    """
    import torch

    if not isinstance(data, torch.Tensor):
        return None
    if spec.name == "modadd":
        from degeneracy.fourier import modadd_labels

        return modadd_labels(data)
    if spec.name == "digits_mlp":
        from degeneracy.models import digits_all_inputs, digits_dataset

        if spec.split == "all":
            _, labels = digits_all_inputs()
        else:
            _, train, _, test = digits_dataset()
            labels = train if spec.split == "train" else test
        return labels[: data.shape[0]]
    return None


def ablation_data(
    opts: AblationOptions,
    spec: ModelSpec,
    data: Any,
    labels: Any,
    labels_for: Callable[[ModelSpec, Any], Any],
) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """``(inputs, labels, config, options)`` of the ablations: the first ``opts.limit`` examples of
    ``data`` or, with ``opts.split`` another than ``spec.split``, of that split of the model's data (its
    labels from ``labels_for(spec, inputs)`` unless the factory returns ``(inputs, labels)``);
    ``config`` is what the ablation stages add to their stage configs (only what differs from the
    defaults, so that older runs resume), ``options`` the keywords of the ablation functions.

    >>> opts = AblationOptions(limit=2, dtype="float64")
    >>> ablation_data(opts, ModelSpec(), [1, 2, 3], [0, 1, 1], lambda spec, x: None)
    ([1, 2], [0, 1], {'dtype': 'float64'}, {'dtype': 'float64'})
    """
    inputs, targets, config = head(data, opts.limit), head(labels, opts.limit), {}
    if opts.split is not None and opts.split != spec.split:
        other = spec.model_copy(update={"split": opts.split})
        _, source, _ = resolve_model(other)
        if isinstance(source, tuple | list) and len(source) == 2:  # a factory returning (inputs, labels)
            source, source_labels = source
        else:
            source_labels = labels_for(other, source)
        inputs, targets = head(source, opts.limit), head(source_labels, opts.limit)
        config["split"] = opts.split
    options = {k: getattr(opts, k) for k in ("dtype", "batch_size") if getattr(opts, k) is not None}
    config.update(options)
    if opts.scaling != "logarithmic":
        config["scaling"] = opts.scaling
    return inputs, targets, config, options
