"""Bundled demo models, trained by the project's own scripts and shipped with the package.

* :func:`load_modadd`: the one-layer modular-addition transformer of the companion paper
  (TransformerLens ``HookedTransformer``; needs ``pip install degeneracy[tl]``), with
  :func:`modadd_dataset` / :func:`modadd_all_inputs` for its data.
* :func:`load_digits_mlp`: a 64-32-32-10 ReLU MLP on scikit-learn's 8x8 digits, with
  :func:`digits_dataset` / :func:`digits_all_inputs` (needs ``pip install degeneracy[digits]``).

Each weights file (safetensors) has a JSON sidecar with the config, training recipe and accuracies.
"""

from __future__ import annotations

from degeneracy.models.digits import (
    DigitsMLP,
    digits_all_inputs,
    digits_dataset,
    digits_split_indices,
    load_digits_mlp,
    load_digits_mlp_metadata,
)
from degeneracy.models.modadd import (
    load_modadd,
    load_modadd_metadata,
    modadd_accuracy,
    modadd_all_inputs,
    modadd_config,
    modadd_config_dict,
    modadd_dataset,
    modadd_last_logits,
    modadd_loss,
    modadd_split_indices,
)

__all__ = [
    "DigitsMLP",
    "digits_all_inputs",
    "digits_dataset",
    "digits_split_indices",
    "load_digits_mlp",
    "load_digits_mlp_metadata",
    "load_modadd",
    "load_modadd_metadata",
    "modadd_accuracy",
    "modadd_all_inputs",
    "modadd_config",
    "modadd_config_dict",
    "modadd_dataset",
    "modadd_last_logits",
    "modadd_loss",
    "modadd_split_indices",
]
