"""Pieces shared by the TransformerLens closed forms: positions, and one attention computation.

A ``HookedTransformer`` attention layer is read through its weights ``W_Q, W_K, W_V`` (heads × d_model ×
d_head), ``W_O`` (heads × d_head × d_model), biases ``b_Q, b_K, b_V`` (heads × d_head), ``b_O`` and
``attn_scale``; anything with those attributes works (the examples use a ``SimpleNamespace``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.capture import NodeLayer

__all__ = ["positions_of", "sequence_length", "select_positions", "attention_parts"]


def positions_of(spec: Any, n: int) -> list[int]:
    if spec is None:
        return list(range(n))
    idx = [spec] if isinstance(spec, int) else list(spec)
    return [i % n for i in idx]


def sequence_length(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input", next(iter(inputs.values())))
    return int(inputs.shape[1])


def select_positions(src: NodeLayer, dst: NodeLayer, n: int) -> list[int]:
    have, want = positions_of(src.positions, n), positions_of(dst.positions, n)
    return [have.index(p) for p in want]


def attention_parts(attn: nn.Module, f: Tensor, qpos: list[int], direction: str) -> dict[str, Tensor]:
    """Weights (float64), queries at ``qpos``, keys, values and the attention pattern p (b, t, h, s)."""
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
