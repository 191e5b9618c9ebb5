"""Section shortcuts of a TransformerLens ``HookedTransformer`` between residual-stream hook points.

:func:`closed_form_sections` recognises the standard sections (attention, ReLU MLP, identity,
unembedding) between node layers that read ``blocks.{i}.hook_resid_{pre,mid,post}`` or ``"output"``
and returns, per adjacent pair, the section computed from f^l alone at the target's positions, and its
closed-form JVP, edge kernel and (for position-wise sections and attention without LayerNorm) Gram:
:mod:`.kernels` / :mod:`.grams` without LayerNorm, :mod:`.normed` with LayerNorm (or RMSNorm) and for
MLPs with any elementwise activation. The generic
:mod:`degeneracy.sections` wraps them as :class:`~degeneracy.sections.SectionShortcut` s and checks
each against the hooked model before use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from degeneracy.adapters.transformer_lens.grams import attention_gram, gated_gram
from degeneracy.adapters.transformer_lens.kernels import affine_kernel, attention_kernel, mlp_kernel
from degeneracy.adapters.transformer_lens.normed import (
    norm_of,
    normed_attention_kernel,
    normed_attention_tangent,
    normed_mlp_kernel,
    normed_mlp_tangent,
    normed_unembed_kernel,
    normed_unembed_tangent,
    positionwise_gram,
)
from degeneracy.adapters.transformer_lens.parts import (
    positions_of,
    select_positions,
    sequence_length,
)
from degeneracy.capture import NodeLayer, as_node_layers
from degeneracy.graph_result import Pair
from degeneracy.jacobian import SectionFn

__all__ = [
    "ClosedForm",
    "closed_form_sections",
    "elementwise_mlp",
    "first_gram",
    "positionwise_section",
    "attention_section",
    "affine_tangent",
    "mlp_tangent",
    "attention_tangent",
]


class ClosedForm(NamedTuple):
    """A section computed from f^src alone (``fn(inputs, f)``), and where known in closed form its JVP
    ``tangent(inputs, f, δf)``, edge ``kernel`` (:mod:`.kernels`) and ``gram`` (:mod:`.grams`).

    >>> form = ClosedForm(lambda inputs, f: 2 * f)
    >>> form.fn(None, torch.ones(1)).tolist(), form.kernel
    ([2.0], None)
    """

    fn: SectionFn
    kernel: Callable[..., Tensor] | None = None
    tangent: Callable[..., Tensor] | None = None
    gram: Callable[..., Tensor | None] | None = None


def positionwise_section(fn: Callable[[Tensor], Tensor], src: NodeLayer, dst: NodeLayer) -> SectionFn:
    """A position-wise section evaluated only at the target's positions (a subset of the source's).

    >>> from degeneracy.capture import NodeLayer
    >>> src, dst = NodeLayer("a", ("m",)), NodeLayer("b", ("m",), positions=-1)
    >>> short = positionwise_section(lambda x: 2 * x, src, dst)
    >>> short(torch.zeros(1, 3, dtype=torch.long), torch.arange(3.0).reshape(1, 3, 1)).flatten().tolist()
    [4.0]
    """

    def short(inputs: Any, x: Tensor) -> Tensor:
        n = sequence_length(inputs)
        have = positions_of(src.positions, n)
        want = positions_of(dst.positions, n)
        missing = [p for p in want if p not in have]
        if missing:
            raise ValueError(f"{dst.name} reads positions {missing} that {src.name} does not hold")
        idx = [have.index(p) for p in want]
        sel = x if idx == list(range(len(have))) else x[:, idx]
        return fn(sel)

    return short


def attention_section(block: Any, positions: Any, direction: str) -> SectionFn:
    """x ↦ (x + attn(ln1(x)))[:, positions] with queries at ``positions`` only.

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)  # one head, d_model 2, d_head 1
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> block = SimpleNamespace(attn=attn, ln1=None)
    >>> attention_section(block, -1, "causal")(None, torch.ones(1, 2, 2, dtype=torch.float64)).shape
    torch.Size([1, 1, 2])
    """
    attn = block.attn
    ln1 = getattr(block, "ln1", None)
    ln1 = nn.Identity() if ln1 is None else ln1

    def short(inputs: Any, x: Tensor) -> Tensor:
        n = x.shape[1]
        qpos = positions_of(positions, n)
        h = ln1(x)
        hq = h[:, qpos]
        q = torch.einsum("bqd,hde->bqhe", hq, attn.W_Q) + attn.b_Q
        k = torch.einsum("bkd,hde->bkhe", h, attn.W_K) + attn.b_K
        v = torch.einsum("bkd,hde->bkhe", h, attn.W_V) + attn.b_V
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / attn.attn_scale
        if direction == "causal":
            keys = torch.arange(n, device=x.device)
            allowed = keys[None, :] <= torch.tensor(qpos, device=x.device)[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        pattern = scores.softmax(dim=-1)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        out = torch.einsum("bqhe,hed->bqd", z, attn.W_O) + attn.b_O
        return x[:, qpos] + out

    return short


def affine_tangent(weight: Tensor | None, src: NodeLayer, dst: NodeLayer) -> Callable[..., Tensor]:
    """The JVP of y = f W + b (W the identity when ``weight`` is ``None``) at the target positions.

    >>> from degeneracy.capture import NodeLayer
    >>> layer = NodeLayer("h", ("h",))
    >>> tangent = affine_tangent(2 * torch.eye(2), layer, layer)
    >>> tangent(torch.zeros(1, 1), torch.zeros(1, 1, 2), torch.ones(1, 1, 2)).tolist()
    [[[2.0, 2.0]]]
    """

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        rt = r[:, select_positions(src, dst, sequence_length(inputs))].to(torch.float64)
        return rt if weight is None else rt @ weight.detach().to(torch.float64)

    return tangent


def mlp_tangent(mlp: Any, src: NodeLayer, dst: NodeLayer) -> Callable[..., Tensor]:
    """The JVP of y = f + relu(f W_in + b_in) W_out + b_out at the target positions.

    >>> from types import SimpleNamespace
    >>> from degeneracy.capture import NodeLayer
    >>> mlp = SimpleNamespace(W_in=torch.eye(2), b_in=torch.zeros(2), W_out=torch.eye(2))
    >>> layer = NodeLayer("h", ("h",))
    >>> f, r = torch.tensor([[[1.0, -1.0]]]), torch.ones(1, 1, 2)
    >>> mlp_tangent(mlp, layer, layer)(torch.zeros(1, 1), f, r).tolist()  # r + relu'(f) r
    [[[2.0, 1.0]]]
    """

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        idx = select_positions(src, dst, sequence_length(inputs))
        w_in = mlp.W_in.detach().to(torch.float64)
        ft, rt = f[:, idx].to(torch.float64), r[:, idx].to(torch.float64)
        gate = (ft @ w_in + mlp.b_in.detach().to(torch.float64)) > 0
        return rt + ((rt @ w_in) * gate) @ mlp.W_out.detach().to(torch.float64)

    return tangent


def attention_tangent(attn: Any, positions: Any, direction: str) -> Callable[..., Tensor]:
    """J(f)·δf of x_t + attn(x)_t for a general tangent δf (b, P, d), in closed form:
    :func:`normed_attention_tangent` without a norm (h = x, δh = δf).

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)  # one head, d_model 2, d_head 1
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> f = torch.zeros(1, 2, 2, dtype=torch.float64)
    >>> attention_tangent(attn, -1, "causal")(None, f, torch.ones(1, 2, 2)).tolist()
    [[[3.0, 3.0]]]
    """
    return normed_attention_tangent(attn, None, positions, direction)


def first_gram(*grams: Callable[..., Tensor | None]) -> Callable[..., Tensor | None]:
    """The first of ``grams`` that applies (returns a Gram rather than ``None``).

    >>> first_gram(lambda *a: None, lambda *a: torch.ones(1))().tolist()
    [1.0]
    """

    def gram(*args: Any) -> Tensor | None:
        for candidate in grams:
            got = candidate(*args)
            if got is not None:
                return got
        return None

    return gram


def elementwise_mlp(cfg: Any, block: Any) -> bool:
    """Whether a block's MLP is W_out σ(x W_in + b_in) + b_out with an elementwise σ (not gated, not
    SoLU's LayerNorm after the activation) and a normalisation with a closed form.

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(act_fn="gelu", normalization_type="LN")
    >>> elementwise_mlp(cfg, SimpleNamespace(mlp=SimpleNamespace(W_in=1, act_fn=abs)))
    True
    """
    act = getattr(cfg, "act_fn", None)
    mlp = getattr(block, "mlp", None)
    return (
        mlp is not None
        and hasattr(mlp, "W_in")
        and not hasattr(mlp, "W_gate")
        and callable(getattr(mlp, "act_fn", None))
        and isinstance(act, str)
        and not act.endswith("_ln")
        and getattr(cfg, "normalization_type", None) in NORMALISATIONS
    )


NORMALISATIONS = (None, "LN", "LNPre", "RMS", "RMSPre")  # those with closed forms (:mod:`.normed`)


def closed_form_sections(model: nn.Module, layers: Sequence[Any]) -> dict[Pair, ClosedForm]:
    """Section shortcuts for a TransformerLens ``HookedTransformer`` whose node layers are hook points.

    Recognised adjacent pairs (node layers reading one ``blocks.{i}.hook_resid_{pre,mid,post}`` module,
    or ``"output"``):

    * ``resid_pre`` (all positions) → ``resid_mid``: x + attention(ln1(x)), computed at the target's
      positions only (standard positional embeddings, causal or bidirectional attention, one key/value
      head per head);
    * ``resid_mid`` → ``resid_post``: x + mlp(ln2(x)), position-wise;
    * ``resid_post`` → next ``resid_pre``: the identity;
    * the last ``resid_post`` → ``output``: unembed(ln_final(x)).

    Each shortcut runs only the section itself at the positions the target reads (the hook-based
    section re-runs the model from its input on every position). :func:`interaction_graph` checks
    every shortcut against the model before using it. Pairs of other shapes are left out.

    >>> from types import SimpleNamespace
    >>> model = torch.nn.Module()
    >>> model.cfg = SimpleNamespace(normalization_type=None)
    >>> hooks = lambda: torch.nn.ModuleDict({"hook_resid_pre": torch.nn.Identity(),
    ...                                      "hook_resid_post": torch.nn.Identity()})
    >>> model.blocks = torch.nn.ModuleList([hooks(), hooks()])
    >>> list(closed_form_sections(model, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]))
    [('blocks.0.hook_resid_post', 'blocks.1.hook_resid_pre')]
    """
    cfg = getattr(model, "cfg", None)
    blocks = getattr(model, "blocks", None)
    if cfg is None or blocks is None:
        raise ValueError("transformer_lens_sections needs a TransformerLens HookedTransformer")
    nodes = as_node_layers(model, layers)
    out: dict[Pair, ClosedForm] = {}
    n_blocks = len(blocks)

    def where(node: NodeLayer) -> tuple[int, str] | None:
        if node.is_output:
            return (n_blocks, "output")
        if len(node.modules) != 1 or node.read != "input":
            return None
        parts = node.modules[0].split(".")
        if len(parts) == 3 and parts[0] == "blocks" and parts[2].startswith("hook_resid_"):
            return (int(parts[1]), parts[2].removeprefix("hook_resid_"))
        return None

    standard = (
        getattr(cfg, "positional_embedding_type", "standard") in ("standard", "shortformer")
        and getattr(cfg, "n_key_value_heads", None) is None
        and not getattr(cfg, "parallel_attn_mlp", False)
        and getattr(cfg, "attn_scores_soft_cap", -1.0) in (None, -1.0)
        and not getattr(cfg, "use_attention_sinks", False)
        and getattr(cfg, "clip_qkv", None) is None
    )
    normed = getattr(cfg, "normalization_type", None) in NORMALISATIONS
    for a, b in zip(nodes[:-1], nodes[1:], strict=True):
        wa, wb = where(a), where(b)
        if wa is None or wb is None:
            continue
        (ia, ka), (ib, kb) = wa, wb
        pair = (a.name, b.name)
        plain = getattr(cfg, "normalization_type", None) is None  # no LayerNorm: closed-form kernels
        if ia == ib and (ka, kb) == ("pre", "mid") and a.positions is None and standard:
            direction = getattr(cfg, "attention_dir", "causal")
            attn_fn = attention_section(blocks[ia], b.positions, direction)
            attn_tangent = attention_tangent(blocks[ia].attn, b.positions, direction) if plain else None
            if plain:
                out[pair] = ClosedForm(
                    attn_fn,
                    attention_kernel(blocks[ia].attn, b.positions, direction),
                    attn_tangent,
                    attention_gram(blocks[ia].attn, b.positions, direction, attn_fn, attn_tangent),
                )
            elif normed:  # LayerNorm: closed-form kernel, JVP (:mod:`.normed`) and Gram
                norm = norm_of(getattr(blocks[ia], "ln1", None))
                tangent = normed_attention_tangent(blocks[ia].attn, norm, b.positions, direction)
                out[pair] = ClosedForm(
                    attn_fn,
                    normed_attention_kernel(blocks[ia].attn, norm, b.positions, direction),
                    tangent,
                    attention_gram(blocks[ia].attn, b.positions, direction, attn_fn, tangent, norm),
                )
            else:
                out[pair] = ClosedForm(attn_fn)
        elif ia == ib and (ka, kb) == ("mid", "post") and not getattr(cfg, "attn_only", False):
            blk = blocks[ia]
            relu = plain and getattr(cfg, "act_fn", None) == "relu" and hasattr(blk.mlp, "W_in")
            mlp_fn = positionwise_section(lambda x, blk=blk: x + blk.mlp(blk.ln2(x)), a, b)
            if relu or not elementwise_mlp(cfg, blk):
                out[pair] = ClosedForm(
                    mlp_fn,
                    mlp_kernel(blk.mlp, a, b) if relu else None,
                    mlp_tangent(blk.mlp, a, b) if relu else None,
                    gated_gram(None, blk.mlp.b_out, blk.mlp, a, b) if relu else None,
                )
            else:  # LayerNorm and/or a smooth activation (:mod:`.normed`)
                norm = norm_of(getattr(blk, "ln2", None))
                kernel = normed_mlp_kernel(blk.mlp, norm, a, b)
                tangent = normed_mlp_tangent(blk.mlp, norm, a, b)
                out[pair] = ClosedForm(mlp_fn, kernel, tangent, positionwise_gram(mlp_fn, kernel, tangent))
        elif ib == ia + 1 and (ka, kb) == ("post", "pre") and ib < n_blocks:
            same = positionwise_section(lambda x: x, a, b)
            kernel, tangent = affine_kernel(None, a, b), affine_tangent(None, a, b)
            out[pair] = ClosedForm(
                same,
                kernel,
                tangent,
                first_gram(gated_gram(None, None, None, a, b), positionwise_gram(same, kernel, tangent)),
            )
        elif ia == n_blocks - 1 and ka == "post" and kb == "output":
            ln_final = getattr(model, "ln_final", None)
            ln_final = nn.Identity() if ln_final is None else ln_final
            unembed = model.unembed
            un_fn = positionwise_section(lambda x, ln=ln_final, un=unembed: un(ln(x)), a, b)
            if plain or not normed:
                out[pair] = ClosedForm(
                    un_fn,
                    *(
                        (
                            affine_kernel(unembed.W_U, a, b),
                            affine_tangent(unembed.W_U, a, b),
                            first_gram(
                                gated_gram(unembed.W_U, unembed.b_U, None, a, b),
                                positionwise_gram(
                                    un_fn, affine_kernel(unembed.W_U, a, b), affine_tangent(unembed.W_U, a, b)
                                ),
                            ),
                        )
                        if plain
                        else ()
                    ),
                )
            else:
                norm = norm_of(ln_final)
                kernel = normed_unembed_kernel(unembed.W_U, norm, a, b)
                tangent = normed_unembed_tangent(unembed.W_U, norm, a, b)
                out[pair] = ClosedForm(un_fn, kernel, tangent, positionwise_gram(un_fn, kernel, tangent))
    return out
