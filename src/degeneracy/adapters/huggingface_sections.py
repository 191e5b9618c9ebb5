"""Closed-form sections of Hugging Face GPT-2 blocks (pre-LayerNorm, GELU MLP, causal attention).

A ``GPT2Block`` computes m = x + attn(ln_1(x)), y = m + mlp(ln_2(m)). Its residual stream is a cut only
between blocks (the block adds the residual from a local variable, so the input of ``ln_2`` is not a
cut), so node layers read the *inputs* of ``transformer.h.{i}`` and ``transformer.ln_f`` and each
section is a whole block. :func:`gpt2_closed_forms` gives it in closed form: the JVP and edge kernel of
the attention (:mod:`degeneracy.adapters.huggingface_kernels`, with the fused ``Conv1D`` weights
read per head by :func:`gpt2_attention_weights`) followed by the LayerNorm-GELU MLP's Jacobian at
each position; the Gram is structured (:mod:`degeneracy.adapters.huggingface_grams`; it declines
padded batches, which then take the kernel).
Padded batches: the padded keys are masked as the model masks them (the batch's ``attention_mask``).
``sections="auto"`` picks them (:func:`degeneracy.sections.auto_sections`), or pass them as
``sections=`` (:func:`degeneracy.sections.gpt2_sections`); every shortcut is checked against the
model on the first batch, and an explicit one that differs raises.

>>> gpt2_closed_forms(torch.nn.Linear(2, 2), ["weight"])
Traceback (most recent call last):
...
ValueError: gpt2_closed_forms needs a Hugging Face GPT-2 model (GPT2Model or GPT2LMHeadModel)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.adapters.huggingface_grams import bert_gram, gpt2_gram
from degeneracy.adapters.huggingface_kernels import (
    attend,
    attention_tangent,
    bert_layer_kernel,
    gpt2_block_kernel,
    key_mask,
)
from degeneracy.adapters.transformer_lens.normed import Norm, activation_slope, norm_tangent, normalise
from degeneracy.adapters.transformer_lens.parts import positions_of
from degeneracy.adapters.transformer_lens.sections import ClosedForm
from degeneracy.capture import NodeLayer, as_node_layers
from degeneracy.graph_result import Pair

__all__ = [
    "huggingface_family",
    "gpt2_attention_weights",
    "hf_layer_norm",
    "gpt2_block",
    "gpt2_closed_forms",
    "bert_attention_weights",
    "bert_layer",
    "bert_closed_forms",
]


def huggingface_family(model: nn.Module) -> str | None:
    """``"bert"`` for a Hugging Face ``BertModel`` (or a model holding one as ``.bert``), ``"gpt2"`` for a
    ``GPT2Model`` (or one held as ``.transformer``), else ``None``: the models whose blocks have closed
    forms here (:func:`bert_closed_forms`, :func:`gpt2_closed_forms`).

    >>> huggingface_family(torch.nn.Linear(2, 2)) is None
    True
    """
    if type(getattr(model, "bert", model)).__name__ == "BertModel":
        return "bert"
    if type(getattr(model, "transformer", model)).__name__ == "GPT2Model":
        return "gpt2"
    return None


def hf_layer_norm(module: nn.LayerNorm) -> Norm:
    """The :class:`~degeneracy.adapters.transformer_lens.normed.Norm` of a ``torch.nn.LayerNorm``.

    >>> hf_layer_norm(torch.nn.LayerNorm(3)).eps
    1e-05
    """
    f64 = torch.float64
    weight = None if module.weight is None else module.weight.detach().to(f64)
    bias = None if module.bias is None else module.bias.detach().to(f64)
    return Norm(True, weight, bias, float(module.eps))


def _head_weights(
    qkv: Sequence[tuple[Tensor, Tensor]], w_o: Tensor, b_o: Tensor | None, attn_scale: float
) -> SimpleNamespace:
    """Attention weights named as the TransformerLens closed forms read them: ``qkv`` the per-head
    (weight heads × d × d_head, bias heads × d_head) of the queries, keys and values, in that order;
    ``w_o`` heads × d_head × d."""
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = qkv
    return SimpleNamespace(
        W_Q=w_q, W_K=w_k, W_V=w_v, W_O=w_o, b_Q=b_q, b_K=b_k, b_V=b_v, b_O=b_o, attn_scale=attn_scale
    )


def gpt2_attention_weights(attn: Any) -> SimpleNamespace:
    """Per-head W_Q, W_K, W_V (heads × d × d_head), W_O (heads × d_head × d), biases and scale of a
    ``GPT2Attention``, as the TransformerLens closed forms read them (views of its parameters).

    >>> from transformers import GPT2Config
    >>> from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    >>> w = gpt2_attention_weights(GPT2Attention(GPT2Config(n_embd=8, n_head=2), layer_idx=0))
    >>> tuple(w.W_Q.shape), tuple(w.W_O.shape), w.attn_scale
    ((2, 8, 4), (2, 4, 8), 2.0)
    """
    d, heads = attn.embed_dim, attn.num_heads
    e = d // heads
    weight, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: y = x W + b, W (d, 3d)

    def per_head(i: int) -> tuple[Any, Any]:
        w = weight[:, i * d : (i + 1) * d].reshape(d, heads, e).permute(1, 0, 2)
        return w, bias[i * d : (i + 1) * d].reshape(heads, e)

    scale = math.sqrt(e) if attn.scale_attn_weights else 1.0
    qkv = [per_head(i) for i in range(3)]
    return _head_weights(qkv, attn.c_proj.weight.reshape(heads, e, d), attn.c_proj.bias, scale)


def gpt2_block(block: Any, positions: Any) -> ClosedForm:
    """The section x ↦ block(x) at ``positions`` of a ``GPT2Block``, its JVP and its edge kernel.

    The kernel (:func:`degeneracy.adapters.huggingface_kernels.gpt2_block_kernel`) applies the
    per-position map C_out (I + W_outᵀ diag(σ'(pre)) W_inᵀ J_ln2(m)) to the attention's columns δm.

    >>> from transformers import GPT2Config
    >>> from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    >>> block = GPT2Block(GPT2Config(n_embd=8, n_head=2), layer_idx=0).double()
    >>> form = gpt2_block(block, None)
    >>> form.fn(None, torch.randn(1, 3, 8, dtype=torch.float64)).shape
    torch.Size([1, 3, 8])
    """
    attn = gpt2_attention_weights(block.attn)
    ln1, ln2 = hf_layer_norm(block.ln_1), hf_layer_norm(block.ln_2)
    attn_tangent = attention_tangent(attn, ln1, positions, causal=True)
    mlp = block.mlp
    f64 = torch.float64
    weights = SimpleNamespace(
        w_in=mlp.c_fc.weight, b_in=mlp.c_fc.bias, w_out=mlp.c_proj.weight, b_out=mlp.c_proj.bias, act=mlp.act
    )
    kernel = gpt2_block_kernel(attn, ln1, ln2, weights, positions)

    def attn_fn(inputs: Any, x: Tensor) -> Tensor:  # x + attn(ln_1(x)) at the queries, padded keys masked
        qpos = positions_of(positions, x.shape[1])
        return x[:, qpos] + attend(attn, block.ln_1(x), qpos, True, key_mask(inputs))["out"]

    def fn(inputs: Any, x: Tensor) -> Tensor:
        m = attn_fn(inputs, x)
        return m + mlp(block.ln_2(m))

    def mlp_parts(inputs: Any, f: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = attn_fn(inputs, f).to(f64)  # in the model's dtype: block.ln_1 is one of its modules
        h, xhat, inv = normalise(ln2, m)
        pre = h @ mlp.c_fc.weight.detach().to(f64) + mlp.c_fc.bias.detach().to(f64)
        return m, xhat, inv, activation_slope(mlp.act, pre)

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        dm = attn_tangent(inputs, f, r)
        _, xhat, inv, slope = mlp_parts(inputs, f)
        dh = norm_tangent(ln2, xhat, inv, dm)
        w_in, w_out = mlp.c_fc.weight.detach().to(f64), mlp.c_proj.weight.detach().to(f64)
        return dm + (slope * (dh @ w_in)) @ w_out

    return ClosedForm(fn, kernel, tangent, gpt2_gram(attn, ln1, ln2, mlp, positions))


def gpt2_closed_forms(model: nn.Module, layers: Sequence[Any]) -> dict[Pair, ClosedForm]:
    """Closed-form sections between adjacent node layers of a Hugging Face GPT-2 model.

    Recognised pairs: node layers reading the *inputs* of ``h.{i}`` (all positions) and ``h.{i+1}``
    or, after the last block, ``ln_f`` (any positions): the block in closed form (:func:`gpt2_block`);
    module names with or without the ``transformer.`` prefix of ``GPT2LMHeadModel``. Other pairs, and
    models with ``scale_attn_by_inverse_layer_idx`` or ``reorder_and_upcast_attn``, are left out.

    >>> from transformers import GPT2Config, GPT2Model
    >>> model = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=4, vocab_size=5))
    >>> list(gpt2_closed_forms(model, ["h.0", "ln_f"]))
    [('h.0', 'ln_f')]
    """
    base = getattr(model, "transformer", model)
    if type(base).__name__ != "GPT2Model":
        raise ValueError("gpt2_closed_forms needs a Hugging Face GPT-2 model (GPT2Model or GPT2LMHeadModel)")
    cfg, blocks = base.config, base.h
    if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn:
        return {}
    prefix = "transformer." if base is not model else ""

    def index(node: NodeLayer) -> int | None:
        if len(node.modules) != 1 or node.read != "input" or not node.modules[0].startswith(prefix):
            return None
        parts = node.modules[0][len(prefix) :].split(".")
        if parts == ["ln_f"]:
            return len(blocks)
        return int(parts[1]) if len(parts) == 2 and parts[0] == "h" else None

    nodes = as_node_layers(model, layers)
    out: dict[Pair, ClosedForm] = {}
    for a, b in zip(nodes[:-1], nodes[1:], strict=True):
        ia, ib = index(a), index(b)
        if ia is not None and ib == ia + 1 and a.positions is None:
            out[(a.name, b.name)] = gpt2_block(blocks[ia], b.positions)
    return out


def bert_attention_weights(attention: Any) -> SimpleNamespace:
    """Per-head W_Q, W_K, W_V, W_O, biases and scale of a ``BertAttention`` (``nn.Linear``: y = x Wᵀ + b).

    >>> from transformers import BertConfig
    >>> from transformers.models.bert.modeling_bert import BertAttention
    >>> w = bert_attention_weights(BertAttention(BertConfig(hidden_size=8, num_attention_heads=2)))
    >>> tuple(w.W_K.shape), w.attn_scale
    ((2, 8, 4), 2.0)
    """
    own, out = attention.self, attention.output.dense
    heads = own.num_attention_heads
    e = own.attention_head_size
    d = out.weight.shape[0]

    def per_head(linear: nn.Linear) -> tuple[Any, Any]:
        return linear.weight.T.reshape(d, heads, e).permute(1, 0, 2), linear.bias.reshape(heads, e)

    qkv = [per_head(linear) for linear in (own.query, own.key, own.value)]
    return _head_weights(qkv, out.weight.T.reshape(heads, e, d), out.bias, math.sqrt(e))


def bert_layer(layer: Any, positions: Any) -> ClosedForm:
    """x ↦ ``BertLayer``(x) at ``positions`` (post-LayerNorm: z = LN₁(x + attn(x)),
    y = LN₂(z + W₂ σ(W₁ z + b₁) + b₂), bidirectional attention, padded keys masked), its JVP and edge
    kernel (:func:`degeneracy.adapters.huggingface_kernels.bert_layer_kernel`).

    >>> from transformers import BertConfig
    >>> from transformers.models.bert.modeling_bert import BertLayer
    >>> layer = BertLayer(BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16)).double()
    >>> bert_layer(layer.eval(), -1).fn(None, torch.randn(1, 3, 8, dtype=torch.float64)).shape
    torch.Size([1, 1, 8])
    """
    attn = bert_attention_weights(layer.attention)
    ln1, ln2 = hf_layer_norm(layer.attention.output.LayerNorm), hf_layer_norm(layer.output.LayerNorm)
    attn_tangent = attention_tangent(attn, None, positions, causal=False)
    inner, outer = layer.intermediate, layer.output.dense
    weights = SimpleNamespace(
        w_in=inner.dense.weight, b_in=inner.dense.bias, w_out=outer.weight, b_out=outer.bias,
        act=inner.intermediate_act_fn,
    )  # fmt: skip
    kernel = bert_layer_kernel(attn, ln1, ln2, weights, positions)
    f64 = torch.float64

    def attn_fn(inputs: Any, x: Tensor) -> Tensor:  # x + attn(x) at the queries, padded keys masked
        qpos = positions_of(positions, x.shape[1])
        return x[:, qpos] + attend(attn, x, qpos, False, key_mask(inputs))["out"]

    def fn(inputs: Any, x: Tensor) -> Tensor:
        z = layer.attention.output.LayerNorm(attn_fn(inputs, x))
        return layer.output.LayerNorm(outer(inner(z)) + z)

    def parts(inputs: Any, f: Tensor) -> tuple[Tensor, ...]:
        _, xhat1, inv1 = normalise(ln1, attn_fn(inputs, f.to(f64)))
        z = _apply(ln1, xhat1)
        w_in, w_out = inner.dense.weight.detach().to(f64).T, outer.weight.detach().to(f64).T
        pre = z @ w_in + inner.dense.bias.detach().to(f64)
        slope = activation_slope(inner.intermediate_act_fn, pre)
        w = z + inner.intermediate_act_fn(pre) @ w_out + outer.bias.detach().to(f64)
        _, xhat2, inv2 = normalise(ln2, w)
        return xhat1, inv1, slope, xhat2, inv2, w_in, w_out

    def after_attention(p: tuple[Tensor, ...], dz_pre: Tensor) -> Tensor:  # (b, t, ·, d) rows
        xhat1, inv1, slope, xhat2, inv2, w_in, w_out = (q[:, :, None] if q.dim() == 3 else q for q in p)
        dz = norm_tangent(ln1, xhat1, inv1, dz_pre)
        dw = dz + (slope * (dz @ w_in)) @ w_out
        return norm_tangent(ln2, xhat2, inv2, dw)

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        dz_pre = attn_tangent(inputs, f, r)[:, :, None]  # (b, t, 1, d)
        return after_attention(parts(inputs, f), dz_pre)[:, :, 0]

    return ClosedForm(fn, kernel, tangent, bert_gram(attn, ln1, ln2, inner, outer, positions))


def bert_closed_forms(model: nn.Module, layers: Sequence[Any]) -> dict[Pair, ClosedForm]:
    """Closed-form sections between adjacent node layers of a Hugging Face BERT encoder.

    Recognised pairs: the input of ``encoder.layer.{i}`` (all positions) and the input of
    ``encoder.layer.{i+1}`` or the output (``read: output``) of ``encoder.layer.{i}`` (any positions):
    the layer in closed form (:func:`bert_layer`); module names with or without the ``bert.`` prefix of
    the task models. Padded batches: padded keys are masked as in the model. Decoder configurations
    (``is_decoder``, ``add_cross_attention``) are left out.

    >>> from transformers import BertConfig, BertModel
    >>> cfg = BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8)
    >>> out = {"name": "out", "module": "encoder.layer.0", "read": "output"}
    >>> list(bert_closed_forms(BertModel(cfg), ["encoder.layer.0", out]))
    [('encoder.layer.0', 'out')]
    """
    base = getattr(model, "bert", model)
    if type(base).__name__ != "BertModel":
        raise ValueError("bert_closed_forms needs a Hugging Face BERT model (BertModel or a Bert*For* model)")
    if getattr(base.config, "is_decoder", False) or getattr(base.config, "add_cross_attention", False):
        return {}  # causal or cross-attention layers: not these closed forms
    prefix = "bert." if base is not model else ""
    stack = base.encoder.layer

    def index(node: NodeLayer) -> tuple[int, str] | None:
        if len(node.modules) != 1 or not node.modules[0].startswith(prefix):
            return None
        parts = node.modules[0][len(prefix) :].split(".")
        if len(parts) == 3 and parts[:2] == ["encoder", "layer"]:
            return int(parts[2]), node.read
        return None

    nodes = as_node_layers(model, layers)
    out: dict[Pair, ClosedForm] = {}
    for a, b in zip(nodes[:-1], nodes[1:], strict=True):
        wa, wb = index(a), index(b)
        if wa is None or wb is None or wa[1] != "input" or a.positions is not None:
            continue
        if wb == (wa[0] + 1, "input") or wb == (wa[0], "output"):
            out[(a.name, b.name)] = bert_layer(stack[wa[0]], b.positions)
    return out


def _apply(norm: Norm, xhat: Tensor) -> Tensor:
    out = xhat if norm.weight is None else xhat * norm.weight
    return out if norm.bias is None else out + norm.bias
