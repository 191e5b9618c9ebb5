"""Fast closed-form pieces of Hugging Face BERT layers and GPT-2 blocks, with padding masks.

The edge kernel of a block pushes k input directions at all P positions through it. Pushing the
(P·k) × d attention output through the MLP costs two (P·k) × d × d_mlp products; instead
:func:`bert_layer_kernel` and :func:`gpt2_block_kernel` form, once per query t, the output map
Q_t = C_out ∂y_t/∂m_t (m × d: a shared matrix plus a per-t product through the MLP and rank-one
LayerNorm corrections) and apply it to the attention's columns, which :func:`attention_columns`
computes in head space (the value products are d_head wide, not d). All products run in the
activations' dtype (the model's: float32 for a float32 model, float64 for float64) and the result is
returned in float64, where the callers accumulate.

Padding: a batch's ``attention_mask`` (:func:`degeneracy.data.input_mask`) masks the padded keys in
every softmax, exactly as the model does; the padded query positions' values are left to the callers,
which exclude them from every statistic. The kernels say so (``kernel.masks_padding``), so that edges
use them on padded batches too (:func:`degeneracy.attributions.kernel_attributions` with masks).

>>> key_mask({"input_ids": torch.ones(1, 2), "attention_mask": torch.tensor([[1, 0]])}).tolist()
[[True, False]]
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from degeneracy.adapters.transformer_lens.normed import (
    Norm,
    activation_slope,
    attention_jvp,
    norm_tangent,
    normalise,
)
from degeneracy.adapters.transformer_lens.parts import positions_of
from degeneracy.data import input_mask, slice_inputs
from degeneracy.jacobian import Kernel

__all__ = [
    "key_mask",
    "attend",
    "attention_tangent",
    "attention_columns",
    "bert_layer_kernel",
    "gpt2_block_kernel",
]


def key_mask(inputs: Any) -> Tensor | None:
    """The valid key positions (batch, P) of a batch's ``inputs`` (its ``attention_mask``), or ``None``.

    >>> key_mask(torch.zeros(2, 3)) is None
    True
    """
    return input_mask(inputs)


def _weights(attn: SimpleNamespace, dt: torch.dtype) -> dict[str, Tensor]:
    names = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
    return {n: getattr(attn, n).detach().to(dt) for n in names}


def attend(
    attn: SimpleNamespace, h: Tensor, qpos: list[int], causal: bool, keys: Tensor | None
) -> dict[str, Tensor]:
    """Queries at ``qpos`` (b, T, heads, d_head), keys, values (b, P, heads, d_head), the pattern p
    (b, heads, T, P) and the attention output (b, T, d, with b_O) of the normalised input ``h``, in h's
    dtype; ``keys`` (b, P) bools masks the padded keys (as the model's additive mask: the dtype's
    minimum), ``causal`` the later ones. ``attn`` holds per-head weights as
    :func:`degeneracy.adapters.huggingface_sections.bert_attention_weights` gives them.

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)  # one head, d_model 2, d_head 1
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> h = torch.zeros(1, 2, 2, dtype=torch.float64)
    >>> attend(attn, h, [0, 1], False, torch.tensor([[True, False]]))["p"].flatten().tolist()
    [1.0, 0.0, 1.0, 0.0]
    """
    w = _weights(attn, h.dtype)
    n = h.shape[1]
    q = torch.einsum("btd,dhe->bthe", h[:, qpos], w["W_Q"].permute(1, 0, 2)) + w["b_Q"]
    k = torch.einsum("bsd,dhe->bshe", h, w["W_K"].permute(1, 0, 2)) + w["b_K"]
    v = torch.einsum("bsd,dhe->bshe", h, w["W_V"].permute(1, 0, 2)) + w["b_V"]
    scores = torch.einsum("bthe,bshe->bhts", q, k) / float(attn.attn_scale)
    allowed = torch.ones(h.shape[0], 1, len(qpos), n, dtype=torch.bool, device=h.device)
    if causal:
        later = torch.arange(n, device=h.device)[None, :] > torch.tensor(qpos, device=h.device)[:, None]
        allowed = allowed & ~later
    if keys is not None:
        allowed = allowed & keys.to(h.device)[:, None, None, :]
    p = scores.masked_fill(~allowed, torch.finfo(h.dtype).min).softmax(dim=-1)
    z = torch.einsum("bhts,bshe->bthe", p, v)
    out = torch.einsum("bthe,hed->btd", z, w["W_O"]) + w["b_O"]
    return {**w, "q": q, "k": k, "v": v, "p": p, "out": out}


def attention_tangent(
    attn: SimpleNamespace, norm: Norm | None, positions: Any, causal: bool
) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """J(f)·δf of x_t + attn(norm(x))_t at ``positions`` (float64; padded keys masked by the batch's
    ``attention_mask``).

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> f = torch.zeros(1, 2, 2, dtype=torch.float64)
    >>> attention_tangent(attn, None, -1, True)(None, f, torch.ones(1, 2, 2)).tolist()
    [[[3.0, 3.0]]]
    """

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        qpos = positions_of(positions, f.shape[1])
        h, xhat, inv = normalise(norm, f)
        dh = norm_tangent(norm, xhat, inv, r)
        a = attend(attn, h, qpos, causal, key_mask(inputs))
        a = {**a, "p": a["p"].transpose(1, 2)}  # attention_jvp reads the pattern as (b, t, h, s)
        return attention_jvp(a, dh, r, qpos, float(attn.attn_scale))

    return tangent


def attention_columns(
    a: dict[str, Tensor],
    norm: Norm | None,
    xhat: Tensor | None,
    inv: Tensor | None,
    scale: Tensor,
    dirs: Tensor,
    qpos: list[int],
    attn_scale: float,
) -> Tensor:
    """δm_t = δx_t + ∂attn(norm(x))_t for δx_s = scale_{s,j} dirs_j, every j at once: (b, T, k, d).

    ``a`` is :func:`attend` of norm(x) (whose x̂ and 1/σ are ``xhat``, ``inv``), all in one dtype. With
    δh_s = w_sj G_j − w₂_sj u_s (:mod:`degeneracy.adapters.transformer_lens.normed`) the query, key and
    value tangents are shared folds Gᵀ W plus per-position u W; the pattern's and values' tangents stay
    in head space (d_head wide), and W_O is applied once to the (T·k) × d result.

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> f = torch.zeros(1, 2, 2, dtype=torch.float64)
    >>> a = attend(attn, f, [1], True, None)
    >>> ones = torch.ones(1, 2, 1, dtype=torch.float64)
    >>> attention_columns(a, None, f, ones, ones, torch.ones(2, 1, dtype=torch.float64), [1], 1.0).tolist()
    [[[[3.0, 3.0]]]]
    """
    dt = a["q"].dtype
    n_b, n_s = scale.shape[:2]
    if norm is None or xhat is None or inv is None:
        w, w2, u = scale, None, None
        g = dirs
    else:
        w = scale * inv.to(dt)
        w2 = w * (xhat.to(dt) @ dirs) / dirs.shape[0]
        u = xhat.to(dt) if norm.weight is None else xhat.to(dt) * norm.weight.to(dt)
        g = dirs - dirs.mean(0, keepdim=True) if norm.centre else dirs
        g = g if norm.weight is None else g * norm.weight.to(dt)[:, None]
    q, k, v, p = a["q"], a["k"], a["v"], a["p"]  # q (b,T,h,e), k, v (b,P,h,e), p (b,h,T,P)
    fold = {n: torch.einsum("dj,hde->hje", g, a[f"W_{n}"]) for n in "QKV"}  # (h, k, e)
    wt = w[:, qpos]  # (b, T, k)
    qk = torch.einsum("hje,bshe->bhjs", fold["Q"], k) / attn_scale  # (b, h, k, P)
    kq = torch.einsum("bthe,hje->bhtj", q, fold["K"]) / attn_scale  # (b, h, T, k)
    pf = p @ w[:, None]  # (b, h, T, k): Σ_s p_ts w_sj
    # dscore_tjs = w_tj qk_js + w_sj kq_tj (− the u terms), and its p-weighted mean over s in closed form
    dscore = wt[:, None, :, :, None] * qk[:, :, None]  # (b, h, T, k, P)
    dscore.addcmul_(w.transpose(1, 2)[:, None, None], kq[..., None])
    mean = wt[:, None] * (p @ qk.transpose(-1, -2)) + kq * pf
    if u is not None:
        assert w2 is not None
        uw = {n: torch.einsum("bsd,hde->bshe", u, a[f"W_{n}"]) for n in "QKV"}
        uqk = torch.einsum("bthe,bshe->bhts", uw["Q"][:, qpos], k) / attn_scale  # (b, h, T, P)
        quk = torch.einsum("bthe,bshe->bhts", q, uw["K"]) / attn_scale
        w2t = w2[:, qpos][:, None]  # (b, 1, T, k)
        dscore.addcmul_(w2t[..., None], uqk[:, :, :, None], value=-1.0)
        dscore.addcmul_(w2.transpose(1, 2)[:, None, None], quk[:, :, :, None], value=-1.0)
        mean = mean - w2t * (p * uqk).sum(-1, keepdim=True) - (p * quk) @ w2[:, None]
    dp = dscore.sub_(mean[..., None]).mul_(p[:, :, :, None])
    n_h, n_t, n_k = dp.shape[1], dp.shape[2], dp.shape[3]
    dz = (dp.reshape(n_b, n_h, n_t * n_k, n_s) @ v.permute(0, 2, 1, 3)).reshape(n_b, n_h, n_t, n_k, -1)
    dz = dz + pf[..., None] * fold["V"][None, :, None]
    if u is not None:
        assert w2 is not None
        wu = w2[:, None, :, :, None] * uw["V"].permute(0, 2, 1, 3)[:, :, :, None]  # (b, h, P, k, e)
        dz = dz - (p @ wu.reshape(n_b, n_h, n_s, -1)).reshape(dz.shape)
    dz = dz.permute(0, 2, 3, 1, 4).reshape(n_b, n_t, n_k, -1)  # (b, T, k, h·e)
    w_o = a["W_O"].reshape(-1, a["W_O"].shape[-1])
    return (dz @ w_o).addcmul_(scale[:, qpos, :, None], dirs.T)


def bert_layer_kernel(
    attn: SimpleNamespace, ln1: Norm, ln2: Norm, mlp: SimpleNamespace, positions: Any
) -> Kernel:
    """The edge kernel of a post-LayerNorm BERT layer: z = LN₁(x + attn(x)),
    y = LN₂(z + W₂ σ(W₁ z + b₁) + b₂).

    Q_t = C_out J_LN₂,t (I + W₂ diag(σ'_t) W₁) J_LN₁,t with C_out J_LN₂,t = (1/σ₂) (S − a_t x̂₂ᵀ/d) (S = C_out
    diag(γ₂) Π shared, a_t = C_out diag(γ₂) x̂₂): the one per-query product through the MLP is
    (C_out J_LN₂,t W₂) diag(σ'_t) W₁ (m × d_mlp × d). ``mlp`` holds W₁ (``w_in``, d_mlp × d), b₁, W₂
    (``w_out``, d × d_mlp), b₂ and σ (``act``) as ``nn.Linear`` stores them. Returns (b, T, m, k) float64.

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> mlp = SimpleNamespace(w_in=torch.eye(2), b_in=torch.zeros(2), w_out=torch.eye(2),
    ...                       b_out=torch.zeros(2), act=torch.relu)
    >>> ln = Norm(True, None, None, 1e-5)
    >>> eye, f = torch.eye(2, dtype=torch.float64), torch.randn(1, 3, 2, dtype=torch.float64)
    >>> bert_layer_kernel(attn, ln, ln, mlp, None)(None, f, torch.ones(1, 3, 2), eye, eye).shape
    torch.Size([1, 3, 2, 2])
    """

    def forward(inputs: Any, f: Tensor, qpos: list[int]) -> tuple[dict[str, Tensor], SimpleNamespace]:
        dt = f.dtype
        a = attend(attn, f, qpos, False, key_mask(inputs))
        w_in, b_in, w_out, b_out = (
            getattr(mlp, n).detach().to(dt) for n in ("w_in", "b_in", "w_out", "b_out")
        )
        z, xhat1, inv1 = _normalise(ln1, f[:, qpos] + a["out"])
        pre = z @ w_in.T + b_in
        slope = activation_slope(mlp.act, pre)
        _, xhat2, inv2 = _normalise(ln2, z + mlp.act(pre) @ w_out.T + b_out)
        state = SimpleNamespace(xhat1=xhat1, inv1=inv1, slope=slope, xhat2=xhat2, inv2=inv2, w_in=w_in)
        state.w_out = w_out
        return a, state

    def output_map(s: SimpleNamespace, c_out: Tensor) -> Tensor:
        dt, d = c_out.dtype, c_out.shape[1]
        cg = c_out if ln2.weight is None else c_out * ln2.weight.to(dt)
        shared = cg - cg.mean(1, keepdim=True)  # C_out diag(γ₂) Π (m, d)
        a_t = s.xhat2 @ cg.T / d  # (b, T, m)
        gain = s.inv2 * s.slope  # (b, T, d_mlp): 1/σ₂ σ'
        n_b, n_t, hidden = gain.shape
        gate = (shared @ s.w_out)[None] * gain.reshape(-1, 1, hidden)  # (b·T, m, d_mlp)
        full = (gate @ s.w_in).reshape(n_b, n_t, -1, d)  # shared part of C_out J_LN₂ W₂ σ' W₁
        full.add_(s.inv2[..., None] * shared)  # (b, T, m, d)
        rank_one = (s.xhat2 @ s.w_out * gain) @ s.w_in + s.inv2 * s.xhat2  # (b, T, d)
        full.addcmul_(a_t[..., None], rank_one[:, :, None, :], value=-1.0)  # C_out J_LN₂ J_MLP
        return _norm_from_right(ln1, full, s.xhat1, s.inv1)

    return _block_kernel(forward, output_map, None, positions, float(attn.attn_scale))


def gpt2_block_kernel(
    attn: SimpleNamespace, ln1: Norm, ln2: Norm, mlp: SimpleNamespace, positions: Any
) -> Kernel:
    """The edge kernel of a pre-LayerNorm GPT-2 block, m = x + attn(LN₁(x)), y = m + σ(LN₂(m) W_fc) W_proj.

    Q_t = C_out + (C_out W_projᵀ) diag(σ'_t) W_fcᵀ J_LN₂,t: one per-query (m × d_mlp × d) product.
    ``mlp`` holds ``w_in`` (d × d_mlp), ``b_in``, ``w_out`` (d_mlp × d), ``b_out`` and ``act`` as
    ``Conv1D`` stores them; causal attention. Returns (b, T, m, k) float64.

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> mlp = SimpleNamespace(w_in=torch.eye(2), b_in=torch.zeros(2), w_out=torch.eye(2),
    ...                       b_out=torch.zeros(2), act=torch.relu)
    >>> ln = Norm(True, None, None, 1e-5)
    >>> eye, f = torch.eye(2, dtype=torch.float64), torch.randn(1, 3, 2, dtype=torch.float64)
    >>> gpt2_block_kernel(attn, ln, ln, mlp, -1)(None, f, torch.ones(1, 3, 2), eye, eye).shape
    torch.Size([1, 1, 2, 2])
    """

    def forward(inputs: Any, f: Tensor, qpos: list[int]) -> tuple[dict[str, Tensor], SimpleNamespace]:
        dt = f.dtype
        h, xhat, inv = _normalise(ln1, f)
        a = attend(attn, h, qpos, True, key_mask(inputs))
        w_in, b_in = mlp.w_in.detach().to(dt), mlp.b_in.detach().to(dt)
        m = f[:, qpos] + a["out"]
        h2, xhat2, inv2 = _normalise(ln2, m)
        slope = activation_slope(mlp.act, h2 @ w_in + b_in)
        state = SimpleNamespace(xhat=xhat, inv=inv, xhat2=xhat2, inv2=inv2, slope=slope, w_in=w_in)
        return a, state

    def output_map(s: SimpleNamespace, c_out: Tensor) -> Tensor:
        fold = c_out @ mlp.w_out.detach().to(c_out.dtype).T  # (m, d_mlp)
        gate = fold[None, None] * s.slope[:, :, None, :]  # (b, T, m, d_mlp)
        through = _norm_from_right(ln2, gate @ s.w_in.T, s.xhat2, s.inv2)  # (b, T, m, d)
        return through + c_out

    return _block_kernel(forward, output_map, ln1, positions, float(attn.attn_scale))


def _normalise(norm: Norm, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """norm(x), x̂ and 1/σ in x's dtype."""
    xc = x - x.mean(-1, keepdim=True) if norm.centre else x
    inv = (xc.square().mean(-1, keepdim=True) + norm.eps).rsqrt()
    xhat = xc * inv
    h = xhat if norm.weight is None else xhat * norm.weight.to(x.dtype)
    return (h if norm.bias is None else h + norm.bias.to(x.dtype)), xhat, inv


def _norm_from_right(norm: Norm, rows: Tensor, xhat: Tensor, inv: Tensor) -> Tensor:
    """rows · J_norm,t for rows (b, T, m, d): (1/σ) ((rows γ) Π − (rows (γ ⊙ x̂)) x̂ᵀ/d)."""
    d = rows.shape[-1]
    g = rows * norm.weight.to(rows.dtype) if norm.weight is not None else rows.clone()
    if norm.centre:
        g.sub_(g.mean(-1, keepdim=True))
    r = g @ xhat[..., None] / d  # (b, T, m, 1): x̂ is centred, so (g Π)·x̂ = g·x̂
    g.addcmul_(r, xhat[:, :, None, :], value=-1.0)
    return g.mul_(inv[..., None])


def _block_kernel(
    forward: Callable[..., tuple[dict[str, Tensor], Any]],
    output_map: Callable[[Any, Tensor], Tensor],
    norm: Norm | None,
    positions: Any,
    attn_scale: float,
) -> Kernel:
    """Q_t δm_t per query, in blocks of examples, in f's dtype, returned in float64 (b, T, m, k)."""

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        dt = f.dtype
        qpos = positions_of(positions, f.shape[1])
        n_t, m = len(qpos), c_out.shape[0]
        per = max(1, 2**24 // max(1, n_t * m * 4 * f.shape[-1]))  # examples per block (~one T·m·d_mlp)
        outs = []
        for b0 in range(0, f.shape[0], per):
            sl = slice(b0, b0 + per)
            sub = None if inputs is None else slice_inputs(inputs, sl)
            a, state = forward(sub, f[sl], qpos)
            xhat, inv = (getattr(state, "xhat", None), getattr(state, "inv", None))
            dm = attention_columns(a, norm, xhat, inv, scale[sl].to(dt), dirs.to(dt), qpos, attn_scale)
            q_map = output_map(state, c_out.to(dt))  # (b, T, m, d)
            outs.append((q_map @ dm.transpose(-1, -2)).to(torch.float64))
        return torch.cat(outs)

    kernel.masks_padding = True  # type: ignore[attr-defined]  # padded keys masked: padded batches may use it
    return kernel
