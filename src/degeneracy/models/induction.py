"""The bundled induction transformer: a small language model with LayerNorm and a known mechanism.

A two-layer GPT-2-style TransformerLens ``HookedTransformer`` (pre-LayerNorm, GELU MLPs, causal
attention, learned positional embeddings) trained on *repeated random sequences*: a ``BOS`` token, then
``L`` distinct random tokens, then the same ``L`` tokens again. The first half is unpredictable; every
token of the second half is predictable by copying: the classic task that two-layer models solve with
an *induction circuit* (a previous-token head in layer 0 composing with an induction head in layer 1;
Olsson et al. 2022), which gives the model a structure that is known in advance.

The weights shipped in ``weights/induction.safetensors`` were trained by
``scripts/train_induction.py``; its recipe, wall time and accuracies are in ``weights/induction.json``.
Loss and accuracy are taken on the predictable positions only (:func:`induction_targets`).

>>> tokens = induction_dataset(2, seed=0)
>>> tokens.shape, bool((tokens[:, 1:9] == tokens[:, 9:]).all())
(torch.Size([2, 17]), True)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from degeneracy.models.shipped import WEIGHTS_DIR, load_shipped_transformer, read_sidecar

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = [
    "INDUCTION_VOCAB",
    "INDUCTION_HALF",
    "induction_config",
    "induction_config_dict",
    "induction_dataset",
    "induction_targets",
    "induction_loss",
    "induction_accuracy",
    "load_induction",
    "load_induction_metadata",
    "INDUCTION_WEIGHTS",
    "INDUCTION_METADATA",
]

INDUCTION_VOCAB = 24  # ordinary tokens 0..23; BOS is token 24
INDUCTION_HALF = 8  # L: the sequence is [BOS, x_1..x_L, x_1..x_L], n_ctx = 2L + 1
INDUCTION_WEIGHTS = WEIGHTS_DIR / "induction.safetensors"
INDUCTION_METADATA = WEIGHTS_DIR / "induction.json"

_TL_MISSING = (
    "the induction demo model needs transformer-lens; install it with "
    "`pip install degeneracy[tl]` (or `pip install transformer-lens==3.9.0`)"
)


def induction_config_dict(vocab: int = INDUCTION_VOCAB, half: int = INDUCTION_HALF) -> dict[str, Any]:
    """The keyword arguments of :func:`induction_config` as a plain, JSON-serialisable dict.

    >>> d = induction_config_dict()
    >>> d["normalization_type"], d["n_ctx"], d["d_vocab"], d["d_vocab_out"]
    ('LN', 17, 25, 24)
    """
    return {
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "d_head": 16,
        "d_mlp": 256,
        "act_fn": "gelu",
        "normalization_type": "LN",
        "attention_dir": "causal",
        "n_ctx": 2 * half + 1,
        "d_vocab": vocab + 1,
        "d_vocab_out": vocab,
    }


def induction_config(seed: int | None = None, **overrides: Any) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` of the induction transformer (``overrides``: further fields,
    e.g. ``dtype``).

    >>> cfg = induction_config(seed=0)
    >>> cfg.n_layers, cfg.normalization_type, cfg.act_fn
    (2, 'LN', 'gelu')
    """
    try:
        import transformer_lens as tl
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_TL_MISSING) from err
    return tl.HookedTransformerConfig(**{**induction_config_dict(), "seed": seed, **overrides})


def induction_dataset(n: int, seed: int, vocab: int = INDUCTION_VOCAB, half: int = INDUCTION_HALF) -> Tensor:
    """``n`` sequences ``[BOS, x_1..x_L, x_1..x_L]`` (int64, ``(n, 2L + 1)``): the x_i are ``L`` distinct
    tokens drawn uniformly (a random permutation's first ``L``) by a ``torch.Generator`` seeded ``seed``.

    >>> induction_dataset(1, seed=3, vocab=5, half=2)[0, 0].item()  # BOS = vocab
    5
    """
    gen = torch.Generator().manual_seed(seed)
    first = torch.rand(n, vocab, generator=gen).argsort(dim=1)[:, :half]
    bos = torch.full((n, 1), vocab, dtype=torch.int64)
    return torch.cat([bos, first, first], dim=1)


def induction_targets(tokens: Tensor) -> tuple[slice, Tensor]:
    """The predictable positions (``L`` to ``2L − 1``: the last first-half token, which announces x_1,
    and the second half but its end) and their next tokens, ``(slice, (n, L))``.

    >>> sl, target = induction_targets(induction_dataset(1, seed=0, vocab=5, half=2))
    >>> sl, target.shape
    (slice(2, 4, None), torch.Size([1, 2]))
    """
    half = (tokens.shape[1] - 1) // 2
    return slice(half, 2 * half), tokens[:, half + 1 :]


def induction_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean cross-entropy over the predictable positions of ``logits`` ``(n, pos, vocab)``.

    >>> tokens = induction_dataset(2, seed=0)
    >>> logits = 50.0 * torch.nn.functional.one_hot(tokens[:, 1:].roll(0), 25)[..., :24].float()
    >>> logits = torch.cat([logits, logits[:, :1]], dim=1)  # 17 positions
    >>> round(float(induction_loss(logits, tokens)), 6)
    0.0
    """
    sl, target = induction_targets(tokens)
    pred = logits[:, sl].to(torch.float64)
    return torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))


def induction_accuracy(logits: Tensor, tokens: Tensor) -> float:
    """Fraction of the predictable positions whose argmax is the next token.

    >>> tokens = induction_dataset(4, seed=0)
    >>> induction_accuracy(torch.zeros(4, 17, 24), tokens) < 0.5
    True
    """
    sl, target = induction_targets(tokens)
    return float((logits[:, sl].argmax(dim=-1) == target).float().mean())


def load_induction_metadata(path: str | Path = INDUCTION_METADATA) -> dict[str, Any]:
    """The JSON sidecar of the shipped weights: config, recipe, seed, wall time, accuracies.

    >>> load_induction_metadata()["config"]["normalization_type"]
    'LN'
    """
    return read_sidecar(path)


def load_induction(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights: str | Path = INDUCTION_WEIGHTS,
) -> HookedTransformer:
    """The trained induction ``HookedTransformer``, in eval mode (weights are stored in float32).

    >>> model = load_induction(dtype=torch.float64)
    >>> model.cfg.normalization_type, model.training, next(model.parameters()).dtype
    ('LN', False, torch.float64)
    """
    config = induction_config(dtype=dtype, device=str(torch.device(device)))
    return load_shipped_transformer(config, weights, "scripts/train_induction.py")
