"""Bundled demo models, trained by the project's own scripts and shipped with the package.

* :func:`load_modadd`: the one-layer modular-addition transformer of the companion paper
  (TransformerLens ``HookedTransformer``; needs ``pip install degeneracy[tl]``), with
  :func:`modadd_dataset` / :func:`modadd_all_inputs` for its data.
* :func:`load_transformer_lens_checkpoint`: any TransformerLens ``.pt`` state dict (the companion
  paper's checkpoints), its config given, read from ``config.yaml`` beside it, or inferred.
* :func:`load_induction`: a two-layer GPT-2-style transformer with LayerNorm and GELU MLPs on repeated
  random sequences (TransformerLens; needs ``degeneracy[tl]``), with :func:`induction_dataset`.
* :func:`load_digits_mlp`: a 64-32-32-10 ReLU MLP on scikit-learn's 8x8 digits, with
  :func:`digits_dataset` / :func:`digits_all_inputs` (needs ``pip install degeneracy[digits]``).

Each weights file (safetensors) has a JSON sidecar with the config, training recipe and accuracies.
"""

from __future__ import annotations

from degeneracy.models import checkpoint, digits, induction, modadd
from degeneracy.models.checkpoint import *  # noqa: F403
from degeneracy.models.digits import *  # noqa: F403  (the names in digits.__all__)
from degeneracy.models.induction import *  # noqa: F403
from degeneracy.models.modadd import *  # noqa: F403

__all__ = [*digits.__all__, *modadd.__all__, *induction.__all__, *checkpoint.__all__]
