"""All chains' outputs of a TransformerLens ``HookedTransformer`` in plain batched ops (issue 13's speed).

The general engine vectorises ``functional_call`` of the model over chains with ``torch.func.vmap``;
for a TransformerLens model of the plain kind (no normalisation, standard positional embeddings,
causal attention, ReLU/GELU MLPs: the bundled modular-addition transformer) this module writes the
forward for every chain at once instead: token and position embeddings gathered from the chains'
tables, Q, K and V as one ``baddbmm`` of the concatenated weights, attention over short contexts as
broadcast products (vmap runs them as batched matmuls of 4,096 tiny ``(3, 32)·(32, 3)`` products), the
output, MLP and unembedding as ``baddbmm`` with the bias fused (one step of the bundled modular-addition
transformer: 115–126 against 134–150 ms for vmap, ``benchmarks/llc.md``). Autograd then
differentiates it. The model's config is checked for every feature it does not implement, and the
engine is used only after it reproduced the per-chain loss at perturbed parameters
(:func:`degeneracy.llc.batched.chain_losses_agree`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from degeneracy.llc.batched import ChainForward

__all__ = ["transformer_chain_forward", "SHORT_CONTEXT"]

SHORT_CONTEXT = 8
"""Contexts up to this length take the element-wise attention; longer ones ``einsum`` (batched matmuls)."""

_UNSUPPORTED = {  # config field -> the value it must have (the plain transformer this module writes)
    "normalization_type": None,
    "positional_embedding_type": "standard",
    "attn_only": False,
    "gated_mlp": False,
    "n_key_value_heads": None,
    "attention_dir": "causal",
    "final_rms": False,
    "post_embedding_ln": False,
    "parallel_attn_mlp": False,
    "use_normalization_before_and_after": False,
    "use_qk_norm": False,
    "clip_qkv": None,
    "use_local_attn": False,
    "use_attn_result": False,
    "use_split_qkv_input": False,
    "use_hook_mlp_in": False,
    "use_attn_in": False,
}
_PARAM = re.compile(
    r"^(embed\.W_E|pos_embed\.W_pos|unembed\.(W_U|b_U)|"
    r"blocks\.\d+\.attn\.(W_Q|W_K|W_V|W_O|b_Q|b_K|b_V|b_O)|blocks\.\d+\.mlp\.(W_in|b_in|W_out|b_out))$"
)


def _supported(model: nn.Module) -> bool:
    if type(model).__name__ != "HookedTransformer" or not type(model).__module__.startswith(
        "transformer_lens"
    ):
        return False
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "act_fn", None) not in ("relu", "gelu"):
        return False
    for field, wanted in _UNSUPPORTED.items():
        if getattr(cfg, field, wanted) != wanted:
            return False
    for field in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if getattr(cfg, field, -1.0) > 0:
            return False
    attn_types = getattr(cfg, "attn_types", None)
    return attn_types is None or all(t == "global" for t in attn_types)


def transformer_chain_forward(model: nn.Module, sampled: list[str]) -> ChainForward | None:
    """``forward(views, tokens) -> logits (C, batch, pos, d_vocab_out)`` of a plain TransformerLens
    ``HookedTransformer`` (see the module docstring), or ``None`` for any other model, an unsupported
    config or parameters outside the embedding, attention, MLP and unembedding weights. Parameters not
    in ``sampled`` keep the model's values.

    >>> transformer_chain_forward(nn.Linear(2, 2), ["weight", "bias"]) is None
    True
    """
    if not _supported(model):
        return None
    named = dict(model.named_parameters())
    if any(_PARAM.match(n) is None for n in named) or not set(sampled) <= set(named):
        return None
    cfg: Any = model.cfg  # type: ignore[assignment]
    fixed = {n: p.detach() for n, p in named.items() if n not in sampled}
    scale = float(cfg.attn_scale) if getattr(cfg, "use_attn_scale", True) else 1.0
    act = torch.relu if cfg.act_fn == "relu" else F.gelu

    def forward(views: dict[str, Tensor], tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise TypeError("the transformer engine takes token ids (batch, pos)")
        chains = next(iter(views.values())).shape[0]

        def p(name: str) -> Tensor:
            value = views.get(name)
            return value if value is not None else fixed[name].expand(chains, *fixed[name].shape)

        batch, ctx = tokens.shape
        d_model, heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head
        resid = p("embed.W_E")[:, tokens] + p("pos_embed.W_pos")[:, :ctx].unsqueeze(1)
        x = resid.reshape(chains, batch * ctx, d_model)
        causal = torch.ones(ctx, ctx, dtype=torch.bool, device=tokens.device).tril()
        for layer in range(cfg.n_layers):
            pre = f"blocks.{layer}.attn."
            weights = [p(pre + f"W_{n}").permute(0, 2, 1, 3).reshape(chains, d_model, -1) for n in "QKV"]
            biases = [p(pre + f"b_{n}").reshape(chains, 1, -1) for n in "QKV"]
            qkv = torch.baddbmm(torch.cat(biases, 2), x, torch.cat(weights, 2))
            q, k, v = qkv.view(chains, batch, ctx, 3, heads, d_head).unbind(3)  # (C, B, pos, H, d_head)
            if ctx <= SHORT_CONTEXT:
                scores = (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1) / scale  # (C, B, q, k, H)
                scores = scores.masked_fill(~causal.view(1, 1, ctx, ctx, 1), float("-inf"))
                pattern = torch.softmax(scores, dim=3)
                z = (pattern.unsqueeze(-1) * v.unsqueeze(2)).sum(3)  # (C, B, q, H, d_head)
            else:
                scores = torch.einsum("cbqhd,cbkhd->cbhqk", q, k) / scale
                scores = scores.masked_fill(~causal, float("-inf"))
                z = torch.einsum("cbhqk,cbkhd->cbqhd", torch.softmax(scores, dim=-1), v)
            w_out = p(pre + "W_O").reshape(chains, heads * d_head, d_model)
            x = x + torch.baddbmm(p(pre + "b_O").unsqueeze(1), z.reshape(chains, batch * ctx, -1), w_out)
            mlp = f"blocks.{layer}.mlp."
            hidden = act(torch.baddbmm(p(mlp + "b_in").unsqueeze(1), x, p(mlp + "W_in")))
            x = x + torch.baddbmm(p(mlp + "b_out").unsqueeze(1), hidden, p(mlp + "W_out"))
        logits = torch.baddbmm(p("unembed.b_U").unsqueeze(1), x, p("unembed.W_U"))
        return logits.view(chains, batch, ctx, -1)

    return forward
