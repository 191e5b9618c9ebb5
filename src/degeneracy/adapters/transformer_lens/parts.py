"""Pieces shared by the TransformerLens closed forms: positions, and one attention computation.

A ``HookedTransformer`` attention layer is read through its weights ``W_Q, W_K, W_V`` (heads × d_model ×
d_head), ``W_O`` (heads × d_head × d_model), biases ``b_Q, b_K, b_V`` (heads × d_head), ``b_O`` and
``attn_scale``; anything with those attributes works (typed ``Any``: the examples use a ``SimpleNamespace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from degeneracy.capture import NodeLayer

__all__ = ["positions_of", "sequence_length", "select_positions", "attention_parts"]


def positions_of(spec: Any, n: int) -> list[int]:
    """The positions a node layer reads (``None``: all, an index or a tuple) as indices into 0..n-1.

    >>> positions_of(-1, 3), positions_of(None, 3)
    ([2], [0, 1, 2])
    """
    if spec is None:
        return list(range(n))
    idx = [spec] if isinstance(spec, int) else list(spec)
    return [i % n for i in idx]


def sequence_length(inputs: Any) -> int:
    """The number of positions of a batch's inputs (a tensor, or a dict's ``"input"`` or first tensor).

    >>> sequence_length({"input": torch.zeros(2, 5, dtype=torch.long)})
    5
    """
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input", next(iter(inputs.values())))
    return int(inputs.shape[1])


def select_positions(src: NodeLayer, dst: NodeLayer, n: int) -> list[int]:
    """Where the positions ``dst`` reads sit among those ``src`` holds, for sequences of length ``n``.

    >>> select_positions(NodeLayer("a", ("m",)), NodeLayer("b", ("m",), positions=-1), 3)
    [2]
    """
    have, want = positions_of(src.positions, n), positions_of(dst.positions, n)
    return [have.index(p) for p in want]


def attention_parts(attn: Any, f: Tensor, qpos: list[int], direction: str) -> dict[str, Tensor]:
    """Weights (float64), queries at ``qpos``, keys, values and the attention pattern p (b, t, h, s).

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)  # one head, d_model 2, d_head 1
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> attention_parts(attn, torch.zeros(1, 2, 2), [1], "causal")["p"].flatten().tolist()
    [0.5, 0.5]
    """
    n = f.shape[1]
    x = f.to(torch.float64)
    w = {name: getattr(attn, name).detach().to(torch.float64) for name in ("W_Q", "W_K", "W_V", "W_O")}
    bias = {name: getattr(attn, name).detach().to(torch.float64) for name in ("b_Q", "b_K", "b_V")}
    q = torch.einsum("btd,hde->bthe", x[:, qpos], w["W_Q"]) + bias["b_Q"]
    k = torch.einsum("bsd,hde->bshe", x, w["W_K"]) + bias["b_K"]
    v = torch.einsum("bsd,hde->bshe", x, w["W_V"]) + bias["b_V"]
    scores = torch.einsum("bthe,bshe->bths", q, k) / float(attn.attn_scale)
    if direction == "causal":
        allowed = torch.arange(n, device=x.device)[None, :] <= torch.tensor(qpos, device=x.device)[:, None]
        scores = scores.masked_fill(~allowed[None, :, None, :], float("-inf"))
    return {**w, "q": q, "k": k, "v": v, "p": scores.softmax(dim=-1)}
