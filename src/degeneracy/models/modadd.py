"""The bundled modular-addition transformer (the companion paper's demo model).

A one-layer attention + MLP transformer (TransformerLens ``HookedTransformer``) that reads the three
tokens ``[a, b, =]`` (``=`` is token ``p``) and predicts ``(a + b) mod p`` at the last position.
The architecture is the one of "The Local Interaction Basis" (arXiv 2405.10928): p = 113, d_model 128,
4 heads of 32, d_mlp 512, ReLU, no LayerNorm. ``d_vocab_out`` is 114, as in the paper's published
checkpoint, so the reference checkpoint loads into :func:`modadd_config` unchanged; the extra logit
(the ``=`` token) is never a label.

The weights shipped in ``weights/modadd.safetensors`` were trained by ``scripts/train_modadd.py``;
its recipe, wall time and accuracies are in the JSON sidecar ``weights/modadd.json``.

Loss and accuracy are taken on the last position only (``logits[:, -1]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from degeneracy.models.shipped import WEIGHTS_DIR, load_shipped_transformer, read_sidecar, split_indices

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = [
    "MODADD_P",
    "modadd_config",
    "modadd_config_dict",
    "modadd_dataset",
    "modadd_all_inputs",
    "modadd_accuracy",
    "modadd_loss",
    "modadd_last_logits",
    "modadd_split_indices",
    "load_modadd",
    "load_modadd_metadata",
    "MODADD_WEIGHTS",
    "MODADD_METADATA",
]

MODADD_P = 113
MODADD_WEIGHTS = WEIGHTS_DIR / "modadd.safetensors"
MODADD_METADATA = WEIGHTS_DIR / "modadd.json"

_TL_MISSING = (
    "the modular-addition demo model needs transformer-lens; install it with "
    "`pip install degeneracy[tl]` (or `pip install transformer-lens==3.9.0`)"
)


def _import_transformer_lens() -> Any:
    """Import ``transformer_lens`` or raise an ``ImportError`` that says how to install it."""
    try:
        import transformer_lens
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(_TL_MISSING) from err
    return transformer_lens


def modadd_config_dict(p: int = MODADD_P) -> dict[str, Any]:
    """The keyword arguments of :func:`modadd_config` as a plain, JSON-serialisable dict.

    >>> modadd_config_dict(7)["d_vocab"], modadd_config_dict(7)["n_ctx"]
    (8, 3)
    """
    return {
        "n_layers": 1,
        "d_model": 128,
        "n_heads": 4,
        "d_head": 32,
        "d_mlp": 512,
        "act_fn": "relu",
        "normalization_type": None,
        "n_ctx": 3,
        "d_vocab": p + 1,
        "d_vocab_out": p + 1,
    }


def modadd_config(p: int = MODADD_P, seed: int | None = None, **overrides: Any) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` of the modular-addition transformer.

    Args:
        p: the modulus; the vocabulary is ``0..p-1`` plus the ``=`` token ``p``.
        seed: seed TransformerLens uses to initialise the weights (``None``: torch's global state).
        overrides: further ``HookedTransformerConfig`` fields, e.g. ``dtype`` or ``device``.

    >>> cfg = modadd_config(7, seed=0)
    >>> cfg.d_vocab_out, cfg.act_fn  # the outputs include the "=" token
    (8, 'relu')
    """
    tl = _import_transformer_lens()
    return tl.HookedTransformerConfig(**{**modadd_config_dict(p), "seed": seed, **overrides})


def modadd_all_inputs(p: int = MODADD_P) -> tuple[Tensor, Tensor]:
    """All ``p**2`` inputs ``[a, b, p]`` in row-major ``(a, b)`` order, and their labels.

    Returns:
        ``(inputs, labels)``: int64 tensors of shapes ``(p*p, 3)`` and ``(p*p,)``; row ``a * p + b``
        holds ``[a, b, p]`` and label ``(a + b) % p``.

    >>> inputs, labels = modadd_all_inputs(5)
    >>> inputs[7].tolist(), int(labels[7])
    ([1, 2, 5], 3)
    """
    values = torch.arange(p, dtype=torch.int64)
    a = values.repeat_interleave(p)
    b = values.repeat(p)
    equals = torch.full_like(a, p)
    inputs = torch.stack([a, b, equals], dim=1)
    labels = (a + b) % p
    return inputs, labels


def modadd_split_indices(p: int = MODADD_P, frac_train: float = 0.3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices (into :func:`modadd_all_inputs`) of the training and held-out pairs.

    All ``p**2`` pairs are shuffled by ``torch.randperm`` with a ``torch.Generator`` seeded by
    ``seed``; the first ``int(frac_train * p**2)`` are the training pairs, the rest the test pairs.

    >>> train, test = modadd_split_indices(5, frac_train=0.4)
    >>> len(train) + len(test), len(set(train.tolist()) & set(test.tolist()))
    (25, 0)
    """
    return split_indices(p * p, frac_train, seed)


def modadd_dataset(
    p: int = MODADD_P, frac_train: float = 0.3, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The train/test split of modular addition.

    Returns:
        ``(train_inputs, train_labels, test_inputs, test_labels)``; inputs are int64 ``(n, 3)`` rows
        ``[a, b, p]``, labels int64 ``(n,)`` holding ``(a + b) % p``. See :func:`modadd_split_indices`.

    >>> train_x, train_y, test_x, test_y = modadd_dataset(5, frac_train=0.4)
    >>> train_x.shape[1], len(train_x) + len(test_x)
    (3, 25)
    """
    inputs, labels = modadd_all_inputs(p)
    train_idx, test_idx = modadd_split_indices(p, frac_train, seed)
    return inputs[train_idx], labels[train_idx], inputs[test_idx], labels[test_idx]


def modadd_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the last-position logits ``(batch, pos, vocab_out)`` against ``labels``.

    >>> logits = torch.tensor([[[0.0, 0.0], [9.0, -9.0]]])  # (batch, pos, vocab_out)
    >>> round(float(modadd_loss(logits, torch.tensor([0]))), 6)
    0.0
    """
    return torch.nn.functional.cross_entropy(logits[:, -1].to(torch.float64), labels)


def modadd_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose last-position argmax equals the label.

    >>> modadd_accuracy(torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]), torch.tensor([0]))
    1.0
    """
    return float((logits[:, -1].argmax(dim=-1) == labels).float().mean())


def modadd_last_logits(model: HookedTransformer, inputs: Tensor) -> Tensor:
    """Last-position logits ``(batch, vocab_out)`` of a one-layer modular-addition model, computed directly.

    Equal (up to float rounding) to ``model(inputs)[:, -1]`` for the architecture of
    :func:`modadd_config`, but about three times cheaper: with a single layer the last-position logits
    depend only on the last query, so the MLP and unembedding run on one position instead of three,
    and no hooks are called. Training uses it; it differentiates through the model's parameters.

    >>> from transformer_lens import HookedTransformer
    >>> model = HookedTransformer(modadd_config(7, seed=0), move_to_device=False).double().eval()
    >>> inputs, _ = modadd_all_inputs(7)
    >>> torch.allclose(modadd_last_logits(model, inputs), model(inputs)[:, -1])
    True
    """
    cfg = model.cfg
    if cfg.n_layers != 1 or cfg.normalization_type is not None or cfg.act_fn != "relu":
        raise ValueError("modadd_last_logits handles one-layer ReLU models without LayerNorm only")
    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    resid = model.embed.W_E[inputs] + model.pos_embed.W_pos[: inputs.shape[1]]  # (n, pos, d)
    last = resid[:, -1]
    q = torch.einsum("nd,hde->nhe", last, attn.W_Q) + attn.b_Q  # (n, head, d_head)
    k = torch.einsum("npd,hde->nphe", resid, attn.W_K) + attn.b_K  # (n, pos, head, d_head)
    v = torch.einsum("npd,hde->nphe", resid, attn.W_V) + attn.b_V
    scores = torch.einsum("nhe,nphe->nhp", q, k) / attn.attn_scale  # the last query sees every key
    pattern = scores.softmax(dim=-1)
    z = torch.einsum("nhp,nphe->nhe", pattern, v)
    resid_mid = last + torch.einsum("nhe,hed->nd", z, attn.W_O) + attn.b_O
    hidden = torch.relu(resid_mid @ mlp.W_in + mlp.b_in)
    resid_post = resid_mid + hidden @ mlp.W_out + mlp.b_out
    return resid_post @ model.unembed.W_U + model.unembed.b_U


def load_modadd_metadata(path: str | Path = MODADD_METADATA) -> dict[str, Any]:
    """The JSON sidecar of the shipped weights: config, training recipe, seed, wall time, accuracies.

    >>> load_modadd_metadata()["config"]["n_layers"]
    1
    """
    return read_sidecar(path)


def load_modadd(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights: str | Path = MODADD_WEIGHTS,
) -> HookedTransformer:
    """The trained modular-addition ``HookedTransformer``, in eval mode.

    Args:
        dtype: parameter dtype of the returned model (weights are stored in float32).
        device: device of the returned model.
        weights: a safetensors file of the same architecture (default: the shipped one).

    >>> model = load_modadd()
    >>> model.cfg.d_vocab_out, model.training
    (114, False)
    """
    config = modadd_config(dtype=dtype, device=str(torch.device(device)))
    return load_shipped_transformer(config, weights, "scripts/train_modadd.py")
