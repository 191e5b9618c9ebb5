"""A cheaper forward for Hessian-vector products of one-layer transformers read at the last token.

:func:`last_position_logits` equals ``model(tokens)[:, -1]`` for a one-layer TransformerLens
``HookedTransformer`` without LayerNorm and with standard positional embeddings (checked by the
tests), and differentiates through the same parameters. It saves work twice:

* only the last query, its MLP and its unembedding are computed (a single layer read at the last
  token needs nothing else);
* keys, values and the query are taken from per-token tables, (W_E W_K)[token] + W_pos W_K + b_K,
  instead of multiplying every position's residual by W_K: an embedding followed by a linear map is
  a lookup of their product, and the table has d_vocab rows instead of batch × positions.

Pass it as ``forward=`` to :func:`degeneracy.accounting.hessian_spectrum` (it bypasses the hook
points, so the statistics of :func:`degeneracy.accounting.degeneracy_report` cannot use it).

>>> import torch
>>> supports_last_position_logits(torch.nn.Linear(2, 2))
False
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from degeneracy.adapters.transformer_lens import is_hooked_transformer

__all__ = ["last_position_logits", "supports_last_position_logits"]


def supports_last_position_logits(model: nn.Module) -> bool:
    """Whether :func:`last_position_logits` applies to ``model``: a one-layer ``HookedTransformer``
    without LayerNorm, with standard positional embeddings, causal attention and a relu/gelu MLP.

    >>> import torch
    >>> supports_last_position_logits(torch.nn.Sequential())
    False
    """
    if not is_hooked_transformer(model):
        return False
    cfg = model.cfg
    return (
        cfg.n_layers == 1
        and cfg.normalization_type is None
        and getattr(cfg, "positional_embedding_type", "standard") == "standard"
        and cfg.act_fn in ("relu", "gelu", None)
        and not getattr(cfg, "use_attn_result", False)
        and getattr(cfg, "attention_dir", "causal") == "causal"
    )


def _heads_matrix(weight: Tensor) -> Tensor:
    """(head, d_model, d_head) → (d_model, head·d_head)."""
    h, d, e = weight.shape
    return weight.permute(1, 0, 2).reshape(d, h * e)


def last_position_logits(model: nn.Module, tokens: Tensor) -> Tensor:
    """Logits at the last position, ``(batch, d_vocab_out)``, of a one-layer ``HookedTransformer``.

    Equals ``model(tokens)[:, -1]`` (see the module docstring) and differentiates through the same
    parameters.

    Anything else is refused (``tests/test_hessian.py`` checks the equality on a HookedTransformer):

    >>> last_position_logits(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: last_position_logits needs a one-layer HookedTransformer ...
    """
    if not supports_last_position_logits(model):
        raise ValueError(
            "last_position_logits needs a one-layer HookedTransformer without LayerNorm, with standard "
            "positional embeddings and a relu/gelu MLP (or attention only)"
        )
    cfg = model.cfg
    n, positions = tokens.shape
    heads, d_head = cfg.n_heads, cfg.d_head
    attn = model.blocks[0].attn
    w_e, w_pos = model.embed.W_E, model.pos_embed.W_pos[:positions]
    w_q, w_k, w_v = _heads_matrix(attn.W_Q), _heads_matrix(attn.W_K), _heads_matrix(attn.W_V)
    b_q, b_k, b_v = attn.b_Q.reshape(-1), attn.b_K.reshape(-1), attn.b_V.reshape(-1)
    last = tokens[:, -1]
    # keys and values: per-token tables plus per-position rows
    k = (w_e @ w_k)[tokens] + (w_pos @ w_k + b_k)  # (n, pos, head·d_head)
    v = (w_e @ w_v)[tokens] + (w_pos @ w_v + b_v)
    q = (w_e @ w_q)[last] + (w_pos[-1] @ w_q + b_q)  # (n, head·d_head)
    q = q.view(n, heads, d_head)
    scores = torch.einsum("nhe,nphe->nhp", q, k.view(n, positions, heads, d_head)) / attn.attn_scale
    pattern = torch.softmax(scores, dim=-1)  # the last query attends to every position (causal)
    z = torch.einsum("nhp,nphe->nhe", pattern, v.view(n, positions, heads, d_head)).reshape(n, heads * d_head)
    resid = w_e[last] + w_pos[-1] + z @ attn.W_O.reshape(heads * d_head, -1) + attn.b_O
    if not cfg.attn_only:
        mlp = model.blocks[0].mlp
        pre = resid @ mlp.W_in + mlp.b_in
        hidden = torch.relu(pre) if cfg.act_fn == "relu" else torch.nn.functional.gelu(pre)
        resid = resid + hidden @ mlp.W_out + mlp.b_out
    return resid @ model.unembed.W_U + model.unembed.b_U
