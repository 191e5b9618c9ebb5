"""Where the linear maps, MLP neurons and attention heads of a TransformerLens ``HookedTransformer`` sit.

The degeneracy accounting (paper §3) needs, for every affine map p = W f + b of the model, the node
layers at which f and p are read and the flat positions of W and b in the parameter vector; for every
ReLU MLP its pre-activation; for every attention layer its pattern, value and z hook points. This module
reads them from the model's config (the accounting turns the plain descriptions into its own sites):

* embeddings: W_E and W_pos as one map on one-hot [token; position] (standard positional embeddings);
* attention: W_Q, W_K, W_V (read at the residual stream, or at the parameter-free normalisation) and
  W_O (read at ``hook_z``), heads concatenated;
* MLPs: W_in (read at the residual stream) and W_out (read at ``hook_post``), and a ReLU neuron layer
  read at ``hook_pre`` when ``act_fn == "relu"``;
* the unembedding W_U.

>>> layer = AttentionLayer("blocks.0.attn", hook_output("blocks.0.attn.hook_pattern"),
...     hook_output("blocks.0.attn.hook_v"), hook_output("blocks.0.attn.hook_z"), 2, 4, "blocks.0.attn.")
>>> layer.n_heads * layer.d_head
8
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.capture import NodeLayer
from degeneracy.run import ParamLayout

__all__ = [
    "AttentionLayer",
    "TransformerLayout",
    "describe_hooked_transformer",
    "hook_output",
    "one_hot_tokens_and_positions",
    "pattern_by_query",
]


def hook_output(module: str) -> NodeLayer:
    """The node layer reading the output of ``module`` (a hook point), named ``"<module>@output"``.

    >>> hook_output("blocks.0.hook_resid_pre").read
    'output'
    """
    return NodeLayer(f"{module}@output", (module,), read="output")


@dataclass
class AttentionLayer:
    """A TransformerLens attention layer (paper §3.2, "Attention"): its hook points and head sizes.

    >>> AttentionLayer("a", hook_output("p"), hook_output("v"), hook_output("z"), 3, 2, "a.").d_head
    2
    """

    name: str
    pattern_point: NodeLayer
    value_point: NodeLayer
    z_point: NodeLayer
    n_heads: int
    d_head: int
    prefix: str  # e.g. "blocks.0.attn."


@dataclass
class TransformerLayout:
    """Plain descriptions of the affine maps, neuron layers and attention layers of a transformer.

    ``linear_maps`` hold the keyword arguments of an accounting site (``name``, ``input_point``,
    ``output_point``, ``d_in``, ``d_out``, ``weight_index``, ``bias_index``, ``input_transform``);
    ``neuron_layers`` those of a neuron layer, with ``in_site`` / ``out_site`` as map names.

    >>> TransformerLayout().notes
    []
    """

    linear_maps: list[dict[str, Any]] = field(default_factory=list)
    neuron_layers: list[dict[str, Any]] = field(default_factory=list)
    attention_layers: list[AttentionLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def one_hot_tokens_and_positions(d_vocab: int, n_ctx: int) -> Callable[[Tensor], Tensor]:
    """The input of the embedding as one map: tokens (as captured, ``(batch, 1, pos)``) ↦ one-hot
    [token; position] of shape ``(batch, pos, d_vocab + n_ctx)``, float64.

    >>> one_hot_tokens_and_positions(3, 2)(torch.tensor([[[2, 0]]])).tolist()
    [[[0.0, 0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0]]]
    """

    def transform(tokens: Tensor) -> Tensor:
        tokens = tokens.reshape(tokens.shape[0], -1)
        batch, pos = tokens.shape
        tok = torch.nn.functional.one_hot(tokens.long(), d_vocab)
        positions = torch.nn.functional.one_hot(torch.arange(pos, device=tokens.device), n_ctx)
        return torch.cat([tok, positions.expand(batch, pos, n_ctx)], dim=-1).to(torch.float64)

    return transform


def pattern_by_query(pattern: Tensor) -> Tensor:
    """Attention patterns as captured, ``(batch, head, query·key)``, ↦ ``(batch, query, head·key)``, so
    that positions are queries (query and key positions coincide in a forward pass).

    >>> pattern_by_query(torch.arange(8.0).reshape(1, 2, 4)).tolist()
    [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]
    """
    b, h, qk = pattern.shape
    q = math.isqrt(qk)
    return pattern.reshape(b, h, q, q).permute(0, 2, 1, 3).reshape(b, q, h * q)


def describe_hooked_transformer(model: nn.Module, layout: ParamLayout | None = None) -> TransformerLayout:
    """Sites, ReLU MLP neuron layers and attention layers of a ``HookedTransformer``, from its config.

    Covers standard positional embeddings, attention with or without parameter-free normalisation
    (LayerNorm weights, if any, are not covered), ReLU MLPs (other activations: no neuron layer).
    Weight indices refer to ``layout`` (default: all of ``model.named_parameters()``).

    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=5, n_ctx=3,
    ...                               act_fn="relu", normalization_type=None, seed=0)
    >>> layout = describe_hooked_transformer(HookedTransformer(cfg, move_to_device=False))
    >>> [site["name"] for site in layout.linear_maps]  # doctest: +NORMALIZE_WHITESPACE
    ['embed', 'blocks.0.attn.W_Q', 'blocks.0.attn.W_K', 'blocks.0.attn.W_V', 'blocks.0.attn.W_O',
     'blocks.0.mlp.W_in', 'blocks.0.mlp.W_out', 'unembed']
    >>> [n["name"] for n in layout.neuron_layers], [a.name for a in layout.attention_layers]
    (['blocks.0.mlp.hook_pre'], ['blocks.0.attn'])
    >>> layout.linear_maps[0]["weight_index"].shape  # embed: d_model × (d_vocab + n_ctx), W_E and W_pos
    torch.Size([8, 8])
    """
    cfg = model.cfg
    layout = layout or ParamLayout.of_model(model)
    out = TransformerLayout()
    names = set(layout.names)
    norm = cfg.normalization_type
    if norm in ("LN", "RMS"):
        out.notes.append(f"normalisation {norm!r}: its weights are not covered by the sites")
    d_model, n_heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head

    def idx(name: str) -> Tensor:
        sl = layout.slice(name)
        return torch.arange(sl.start, sl.stop).view(layout.shapes[layout.names.index(name)])

    def opt(name: str) -> Tensor | None:
        return idx(name) if name in names else None

    def resid(i: int, which: str) -> NodeLayer:
        if norm is None:
            return hook_output(f"blocks.{i}.hook_resid_{'pre' if which == 'attn' else 'mid'}")
        return hook_output(f"blocks.{i}.ln{1 if which == 'attn' else 2}.hook_normalized")

    def linear(
        name: str,
        f: NodeLayer,
        p: NodeLayer,
        d_in: int,
        d_out: int,
        w: Tensor,
        b: Tensor | None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Any]:
        site = {
            "name": name,
            "input_point": f,
            "output_point": p,
            "d_in": d_in,
            "d_out": d_out,
            "weight_index": w,
            "bias_index": b,
            "input_transform": transform,
        }
        out.linear_maps.append(site)
        return site

    positional = getattr(cfg, "positional_embedding_type", "standard")
    if "embed.W_E" in names and positional == "standard" and "pos_embed.W_pos" in names:
        w_index = torch.cat([idx("embed.W_E").T, idx("pos_embed.W_pos").T], dim=1)  # (d_model, vocab + n_ctx)
        linear(
            "embed",
            NodeLayer("embed@input", ("embed",), read="input"),
            hook_output("blocks.0.hook_resid_pre"),
            cfg.d_vocab + cfg.n_ctx,
            d_model,
            w_index,
            None,
            one_hot_tokens_and_positions(cfg.d_vocab, cfg.n_ctx),
        )
    else:
        out.notes.append("embeddings: only standard positional embeddings are covered")

    for i in range(cfg.n_layers):
        a = f"blocks.{i}.attn."
        for letter in ("Q", "K", "V"):
            w = idx(f"{a}W_{letter}")  # (h, d_model, d_head)
            b = opt(f"{a}b_{letter}")
            linear(
                f"{a}W_{letter}",
                resid(i, "attn"),
                hook_output(f"{a}hook_{letter.lower()}"),
                d_model,
                n_heads * d_head,
                w.permute(0, 2, 1).reshape(n_heads * d_head, d_model),
                None if b is None else b.reshape(-1),
            )
        w_o = idx(f"{a}W_O")  # (h, d_head, d_model)
        linear(
            f"{a}W_O",
            hook_output(f"{a}hook_z"),
            hook_output(f"blocks.{i}.hook_attn_out"),
            n_heads * d_head,
            d_model,
            w_o.permute(2, 0, 1).reshape(d_model, n_heads * d_head),
            opt(f"{a}b_O"),
        )
        out.attention_layers.append(
            AttentionLayer(
                f"blocks.{i}.attn",
                hook_output(f"{a}hook_pattern"),
                hook_output(f"{a}hook_v"),
                hook_output(f"{a}hook_z"),
                n_heads,
                d_head,
                a,
            )
        )
        if cfg.attn_only:
            continue
        m = f"blocks.{i}.mlp."
        if f"{m}W_in" not in names:
            out.notes.append(f"blocks.{i}.mlp: not a standard MLP; not analysed")
            continue
        site_in = linear(
            f"{m}W_in",
            resid(i, "mlp"),
            hook_output(f"{m}hook_pre"),
            d_model,
            cfg.d_mlp,
            idx(f"{m}W_in").T,
            opt(f"{m}b_in"),
        )
        site_out = linear(
            f"{m}W_out",
            hook_output(f"{m}hook_post"),
            hook_output(f"blocks.{i}.hook_mlp_out"),
            cfg.d_mlp,
            d_model,
            idx(f"{m}W_out").T,
            opt(f"{m}b_out"),
        )
        if cfg.act_fn == "relu":
            out.neuron_layers.append(
                {
                    "name": f"{m}hook_pre",
                    "pre_point": hook_output(f"{m}hook_pre"),
                    "activation": "relu",
                    "width": cfg.d_mlp,
                    "negative_slope": 0.0,
                    "in_site": site_in["name"],
                    "out_site": site_out["name"],
                }
            )
        else:
            out.notes.append(
                f"blocks.{i}.mlp: activation {cfg.act_fn!r} is not piecewise linear; no synchronisation"
            )
    if "unembed.W_U" in names:
        linear(
            "unembed",
            hook_output("unembed.hook_in"),
            hook_output("unembed.hook_out"),
            d_model,
            cfg.d_vocab_out,
            idx("unembed.W_U").T,
            opt("unembed.b_U"),
        )
    return out
