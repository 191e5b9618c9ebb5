"""What the bundled models share: where their weights and JSON sidecars live, how a shipped weights file
and its sidecar are read, and the seeded train/test split of their data.

>>> train, test = split_indices(10, frac_train=0.3, seed=0)
>>> len(train), len(test), sorted(train.tolist() + test.tolist()) == list(range(10))
(3, 7, True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = ["WEIGHTS_DIR", "split_indices", "read_sidecar", "read_weights", "load_shipped_transformer"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""The folder of the shipped weights (safetensors) and their JSON sidecars."""


def split_indices(n: int, frac_train: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of the training and test examples of ``n``: a ``torch.randperm`` from a
    ``torch.Generator`` seeded by ``seed``; the first ``int(frac_train * n)`` train, the rest test.

    >>> train, test = split_indices(4, frac_train=0.5, seed=1)
    >>> len(train), len(set(train.tolist()) & set(test.tolist()))
    (2, 0)
    """
    if not 0.0 < frac_train < 1.0:
        raise ValueError(f"frac_train must lie strictly between 0 and 1, got {frac_train}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(frac_train * n)
    return order[:n_train], order[n_train:]


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a weights file (config, training recipe, seed, accuracies).

    >>> read_sidecar(WEIGHTS_DIR / "digits_mlp.json")["accuracy"] is not None
    True
    """
    return json.loads(Path(path).read_text())


def read_weights(path: str | Path, script: str) -> dict[str, Tensor]:
    """The state dict in the safetensors file ``path``; a missing file is a ``FileNotFoundError`` that
    names ``script``, the training script that writes it.

    >>> sorted(read_weights(WEIGHTS_DIR / "digits_mlp.safetensors", "scripts/train_digits.py"))[:2]
    ['fc1.bias', 'fc1.weight']
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}; train them with `python {script}`")
    return load_file(str(path))


def load_shipped_transformer(
    config: HookedTransformerConfig, weights: str | Path, script: str
) -> HookedTransformer:
    """A ``HookedTransformer`` of ``config`` holding the weights file ``weights`` (written by the training
    script ``script``), in eval mode. The buffers its constructor rebuilds (the causal mask and IGNORE)
    may be absent from the file; any other missing or unexpected key is a ``RuntimeError``.

    >>> from degeneracy.models.induction import induction_config
    >>> model = load_shipped_transformer(
    ...     induction_config(), WEIGHTS_DIR / "induction.safetensors", "scripts/train_induction.py"
    ... )
    >>> model.cfg.n_layers, model.training
    (2, False)
    """
    import transformer_lens as tl

    state = read_weights(weights, script)
    model = tl.HookedTransformer(config, move_to_device=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("attn.mask", "attn.IGNORE"))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model
