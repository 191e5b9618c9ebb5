"""Hugging Face ``transformers`` models, as users load them (no import of ``transformers`` here).

Nothing in the methods needs this module: a ``PreTrainedModel`` is a ``torch.nn.Module`` whose
batches are dicts of keyword inputs (``input_ids``, ``attention_mask``, ...). What the package does
for them lives in the run layer, generically:

* the output to analyse is chosen by :func:`degeneracy.run.select_output` (a ``ModelOutput`` is a
  dict: ``logits`` if present, else ``last_hidden_state``, else the first tensor; a node layer
  ``{"modules": "output", "output": "pooler_output"}`` names another);
* an ``attention_mask`` marks padded positions, which every statistic leaves out
  (:func:`degeneracy.data.input_mask`), and travels as a side input (:mod:`degeneracy.cuts`);
* the default attention (SDPA) has no forward-mode derivative: ``jacobian_mode="auto"`` then uses
  reverse mode (:func:`degeneracy.jacobian.forward_mode_unsupported`).

This module adds the conveniences: :func:`is_hugging_face`, :func:`attention_implementation`,
:func:`encode` (a tokenizer's padded batch as a plain dict of tensors) and :func:`eager_attention`
(the fast path for Jacobians: SDPA's backward has no vmap batching rule, eager attention's has).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["is_hugging_face", "attention_implementation", "encode", "eager_attention", "with_eager_attention"]


def is_hugging_face(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` ``PreTrainedModel`` (by its class hierarchy).

    >>> is_hugging_face(nn.Linear(2, 2))
    False
    """
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
        for cls in type(model).__mro__
    )


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation a Hugging Face model runs (``"sdpa"``, ``"eager"``, ...), or
    ``None`` for other models. With ``"sdpa"`` the Jacobians are computed in reverse mode.

    >>> attention_implementation(nn.Linear(2, 2)) is None
    True
    """
    config = getattr(model, "config", None)
    if not is_hugging_face(model) or config is None:
        return None
    return getattr(config, "_attn_implementation", None)


def encode(
    tokenizer: Callable[..., Mapping[str, Any]],
    texts: Sequence[str],
    *,
    max_length: int | None = None,
) -> dict[str, Tensor]:
    """``texts`` tokenised into one padded batch (right padding, truncated to ``max_length``), as a
    plain dict of tensors: ``input_ids``, ``attention_mask`` (1 for tokens, 0 for padding) and what
    else the tokenizer returns. Any ``data`` argument of the package takes it, as it takes the
    tokenizer's own ``BatchEncoding``.

    >>> import torch
    >>> fake = lambda texts, **kw: {"input_ids": torch.tensor([[5, 6], [7, 0]]),
    ...                             "attention_mask": torch.tensor([[1, 1], [1, 0]]), "note": "x"}
    >>> sorted(encode(fake, ["a b", "c"]))
    ['attention_mask', 'input_ids']
    """
    options: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
    if max_length is not None:
        options.update(truncation=True, max_length=max_length)
    batch = tokenizer(list(texts), **options)
    return {k: v for k, v in batch.items() if isinstance(v, Tensor)}


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[list[str]]:
    """Run the Hugging Face models inside ``model`` with eager attention for the duration of the block.

    SDPA and eager attention compute the same function (softmax(QKᵀ/√d + mask) V, the same masks),
    but SDPA's CPU backward has no vmap batching rule, so vmapped Jacobian products fall back to a
    slow per-example loop (and it has no forward mode). Every ``PreTrainedModel`` in ``model`` whose
    config says ``"sdpa"`` is switched to ``"eager"`` (read at each forward, masks included) and
    switched back on exit; other implementations (flash, flex) and other models are left alone.
    Yields the names of the modules switched.

    Any other attention runs plain too: ``torch.nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``
    without their fused inference fast path, and ``F.scaled_dot_product_attention`` on its math
    backend (the same function in differentiable operations: the fused kernels have no forward mode
    and no double backward, which the Hessians, Jacobians and the LLC's curvature check need).

    >>> with eager_attention(nn.Linear(2, 2)) as switched:
    ...     switched
    []
    """
    changed: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if not is_hugging_face(module) or config is None or id(config) in seen:
            continue
        seen.add(id(config))
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = "eager"
            changed.append((name, config))
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield [name for name, _ in changed]
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for _, config in changed:
            config._attn_implementation = "sdpa"


Fn = TypeVar("Fn", bound=Callable[..., Any])


def with_eager_attention(fn: Fn) -> Fn:
    """Decorate a function of ``(model, ...)`` to run inside :func:`eager_attention` of ``model``.

    For the stages that differentiate twice or vmap over the model (Hessians, Jacobian Grams, SGLD):
    SDPA has no double backward, no forward mode, and its mask construction has data-dependent
    control flow that ``vmap`` rejects on padded batches.

    >>> @with_eager_attention
    ... def switched(model):
    ...     return attention_implementation(model)
    >>> switched(nn.Linear(2, 2)) is None
    True
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with eager_attention(args[0] if args else kwargs["model"]):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
