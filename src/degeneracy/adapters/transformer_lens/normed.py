"""Closed-form Jacobians of TransformerLens sections with LayerNorm and any elementwise MLP activation.

A TransformerLens normalisation h = γ ⊙ (x − μ)/σ + β (``LayerNorm``; ``LayerNormPre`` without γ, β;
``RMSNorm`` / ``RMSNormPre`` without the centring, σ² = mean(x²) + ε) has, at each position, the
Jacobian ∂h/∂x = (γ/σ) ⊙ (Π − x̂ x̂ᵀ/d) with x̂ = Π x/σ and Π the centring projection (the identity
for RMS). A rank-one tangent δx = a·c (a scalar a, a direction c) therefore becomes
δh = a/σ · (G c − (x̂·c)/d · u) with the shared G c = γ ⊙ Π c and the per-position u = γ ⊙ x̂: one shared
part scaled per position and one rank-one correction. The kernels below fold both through the
attention, MLP and unembedding weights once (as :mod:`.kernels` does without normalisation), so
attributions C_out J [directions_j · scale_{s,j}] and basis-Jacobian Grams need no automatic
differentiation of the model. MLP activations are any elementwise function (ReLU, GELU, SiLU, …):
their derivative σ'(pre) is one elementwise evaluation.

>>> LayerNorm = type("LayerNorm", (), {"w": torch.ones(3), "b": torch.zeros(3), "eps": 1e-5})
>>> norm_of(LayerNorm()).centre, norm_of(None) is None
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp

from degeneracy.adapters.transformer_lens import parts
from degeneracy.capture import NodeLayer
from degeneracy.data import slice_inputs
from degeneracy.jacobian import GramFn, GramQuery, Kernel, gram_function

__all__ = [
    "Norm",
    "norm_of",
    "normalise",
    "norm_tangent",
    "activation_slope",
    "shared_directions",
    "normed_attention_kernel",
    "normed_attention_tangent",
    "attention_jvp",
    "normed_mlp_kernel",
    "normed_mlp_tangent",
    "normed_unembed_kernel",
    "normed_unembed_tangent",
    "positionwise_gram",
]

NORMS = {"LayerNorm": True, "LayerNormPre": True, "RMSNorm": False, "RMSNormPre": False}


@dataclass(frozen=True)
class Norm:
    """A TransformerLens normalisation: ``centre`` (LayerNorm) or not (RMSNorm), its γ and β (``None``
    for the ``Pre`` variants, whose weights are folded into the next layer) and ε.

    >>> Norm(True, None, None, 1e-5).centre
    True
    """

    centre: bool
    weight: Tensor | None
    bias: Tensor | None
    eps: float


def norm_of(module: Any) -> Norm | None:
    """The :class:`Norm` of a TransformerLens normalisation module (found by class name), ``None`` for
    none (``None`` or an identity); anything else raises ``ValueError``.

    >>> norm_of(torch.nn.Identity()) is None
    True
    """
    if module is None or isinstance(module, torch.nn.Identity):
        return None
    name = type(module).__name__
    if name not in NORMS:
        raise ValueError(f"no closed form for the normalisation {name}")
    weight = getattr(module, "w", None)
    bias = getattr(module, "b", None)
    f64 = torch.float64
    return Norm(
        NORMS[name],
        None if weight is None else weight.detach().to(f64),
        None if bias is None else bias.detach().to(f64),
        float(module.eps),
    )


def normalise(norm: Norm | None, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h = norm(x), x̂ and 1/σ (shape (…, 1)) in float64; without a norm h = x, x̂ = 0 and 1/σ = 1.

    >>> h, xhat, inv = normalise(Norm(True, None, None, 0.0), torch.tensor([[1.0, 3.0]]))
    >>> h.tolist(), inv.tolist()
    ([[-1.0, 1.0]], [[1.0]])
    """
    x = x.to(torch.float64)
    if norm is None:
        return x, torch.zeros_like(x), torch.ones_like(x[..., :1])
    xc = x - x.mean(-1, keepdim=True) if norm.centre else x
    inv = (xc.square().mean(-1, keepdim=True) + norm.eps).rsqrt()
    xhat = xc * inv
    h = xhat if norm.weight is None else xhat * norm.weight
    if norm.bias is not None:
        h = h + norm.bias
    return h, xhat, inv


def norm_tangent(norm: Norm | None, xhat: Tensor, inv: Tensor, r: Tensor) -> Tensor:
    """δh = (γ/σ) ⊙ (Π δx − x̂ (x̂·δx)/d) for tangents ``r`` (…, d) at the normalised ``xhat``.

    >>> norm = Norm(True, None, None, 0.0)
    >>> h, xhat, inv = normalise(norm, torch.tensor([[1.0, 3.0]]))
    >>> norm_tangent(norm, xhat, inv, torch.tensor([[1.0, 1.0]])).tolist()  # a shift: no change
    [[0.0, 0.0]]
    """
    r = r.to(torch.float64)
    if norm is None:
        return r
    rc = r - r.mean(-1, keepdim=True) if norm.centre else r
    out = inv * (rc - xhat * (xhat * r).sum(-1, keepdim=True) / r.shape[-1])
    return out if norm.weight is None else out * norm.weight


def shared_directions(norm: Norm | None, dirs: Tensor) -> Tensor:
    """G = γ ⊙ Π directions (d × k): the part of ∂h/∂x · directions shared by every position.

    >>> shared_directions(Norm(True, None, None, 0.0), torch.tensor([[1.0], [3.0]])).tolist()
    [[-1.0], [1.0]]
    """
    g = dirs - dirs.mean(0, keepdim=True) if norm is not None and norm.centre else dirs
    return g if norm is None or norm.weight is None else g * norm.weight[:, None]


def _weights(norm: Norm | None, xhat: Tensor, inv: Tensor, scale: Tensor, dirs: Tensor) -> tuple:
    """Per (example, position, direction): the weight w of the shared G and w₂ of u = γ ⊙ x̂ in
    δh = w G − w₂ u, and u itself."""
    w = scale * inv  # (b, s, k)
    if norm is None:
        return w, None, None
    beta = xhat @ dirs / dirs.shape[0]  # (b, s, k)
    u = xhat if norm.weight is None else xhat * norm.weight
    return w, w * beta, u


def activation_slope(act: Callable[[Tensor], Tensor], pre: Tensor) -> Tensor:
    """σ'(pre) of an elementwise activation, elementwise (one forward-mode evaluation).

    >>> activation_slope(torch.relu, torch.tensor([-1.0, 2.0])).tolist()
    [0.0, 1.0]
    """
    return jvp(act, (pre,), (torch.ones_like(pre),))[1]


def normed_attention_kernel(attn: Any, norm: Norm | None, positions: Any, direction: str) -> Kernel:
    """Closed-form JVPs of x_t + attn(norm(x))_t along δx_s = scale_{s,j} directions_j (all j at once).

    With δh_s = w_sj G_j − w₂_sj u_s (module docstring), every product with W_Q, W_K, W_V is a shared
    fold Gᵀ W plus a per-position u W; the score, softmax and value JVPs follow as in
    :func:`degeneracy.adapters.transformer_lens.kernels.attention_kernel`. Returns (b, P_out, m, k).

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)  # one head, d_model 2, d_head 1
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> eye, f = torch.eye(2, dtype=torch.float64), torch.randn(1, 2, 2, dtype=torch.float64)
    >>> kernel = normed_attention_kernel(attn, Norm(True, None, None, 1e-5), -1, "causal")
    >>> kernel(None, f, torch.ones(1, 2, 2, dtype=torch.float64), eye, eye).shape
    torch.Size([1, 1, 2, 2])
    """

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        qpos = parts.positions_of(positions, f.shape[1])
        h, xhat, inv = normalise(norm, f)
        a = parts.attention_parts(attn, h, qpos, direction)
        q, k, v, p = a["q"], a["k"], a["v"], a["p"]  # q (b,t,h,e), k, v (b,s,h,e), p (b,t,h,s)
        sa = float(attn.attn_scale)
        w, w2, u = _weights(norm, xhat, inv, scale.to(torch.float64), dirs)
        g = shared_directions(norm, dirs)
        fold = {n: torch.einsum("dj,hde->jhe", g, a[f"W_{n}"]) for n in "QKV"}
        ow = torch.einsum("hed,md->hem", a["W_O"], c_out)  # (h, e, m)
        vw = torch.einsum("bshe,hem->bhsm", v, ow)
        w_t = w[:, qpos]  # (b, t, j)
        qk = torch.einsum("jhe,bshe->bjhs", fold["Q"], k)
        kq = torch.einsum("bthe,jhe->btjh", q, fold["K"])
        wt = w.permute(0, 2, 1)[:, None, :, None, :]  # (b, 1, j, 1, s)
        dscore = w_t[:, :, :, None, None] * qk[:, None] + wt * kq[..., None]
        if u is not None:
            uw = {n: torch.einsum("bsd,hde->bshe", u, a[f"W_{n}"]) for n in "QKV"}
            uqk = torch.einsum("bthe,bshe->bths", uw["Q"][:, qpos], k)
            quk = torch.einsum("bthe,bshe->bths", q, uw["K"])
            w2_t = w2[:, qpos]
            dscore = dscore - w2_t[:, :, :, None, None] * uqk[:, :, None]
            dscore = dscore - w2.permute(0, 2, 1)[:, None, :, None, :] * quk[:, :, None]
        dscore = dscore / sa  # (b, t, j, h, s)
        pb = p[:, :, None]
        dp = pb * (dscore - (pb * dscore).sum(-1, keepdim=True))
        b, t, j, n_h, n_s = dp.shape
        out = (dp.reshape(b, t * j, n_h * n_s) @ vw.reshape(b, n_h * n_s, -1)).reshape(b, t, j, -1)
        gw = torch.einsum("jhe,hem->jhm", fold["V"], ow)
        pf = torch.einsum("bths,bsj->btjh", p, w)
        for head in range(n_h):
            out.addcmul_(pf[..., head, None], gw[:, head])
        if u is not None:
            uvw = torch.einsum("bshe,hem->bshm", uw["V"], ow)  # (b, s, h, m)
            for head in range(n_h):  # Σ_s p_ths w₂_sj (u_s W_V W_O C_outᵀ)
                term = w2[..., None] * uvw[:, :, None, head]  # (b, s, j, m)
                out -= (p[:, :, head] @ term.reshape(b, n_s, -1)).reshape(b, t, j, -1)
        out.addcmul_(scale.to(torch.float64)[:, qpos, :, None], (c_out @ dirs).T)
        return out.transpose(-1, -2)

    return kernel


def normed_attention_tangent(attn: Any, norm: Norm | None, positions: Any, direction: str) -> Callable:
    """J(f)·δf of x_t + attn(norm(x))_t for a general tangent δf (b, P, d), in closed form.

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> f = torch.zeros(1, 2, 2, dtype=torch.float64)
    >>> normed_attention_tangent(attn, None, -1, "causal")(None, f, torch.ones(1, 2, 2)).tolist()
    [[[3.0, 3.0]]]
    """

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        qpos = parts.positions_of(positions, f.shape[1])
        h, xhat, inv = normalise(norm, f)
        dh = norm_tangent(norm, xhat, inv, r)
        a = parts.attention_parts(attn, h, qpos, direction)
        return attention_jvp(a, dh, r, qpos, float(attn.attn_scale))

    return tangent


def attention_jvp(a: dict[str, Tensor], dh: Tensor, r: Tensor, qpos: list[int], scale: float) -> Tensor:
    """r_t + the attention's JVP at the queries ``qpos`` along δh = ``dh`` (its input's tangent), from the
    attention's weights and activations ``a`` (W_Q/K/V/O; q (b, t, h, e), k, v (b, s, h, e), the pattern
    p (b, t, h, s)); ``scale`` divides the scores.

    >>> f64 = torch.float64
    >>> w, zero = torch.ones(1, 2, 1, dtype=f64), torch.zeros(1, 2, 1, 1, dtype=f64)
    >>> a = {"W_Q": w, "W_K": w, "W_V": w, "W_O": w.transpose(1, 2), "q": zero[:, :1], "k": zero, "v": zero,
    ...      "p": torch.full((1, 1, 1, 2), 0.5, dtype=f64)}
    >>> ones = torch.ones(1, 2, 2, dtype=f64)
    >>> attention_jvp(a, ones, ones, [1], 1.0).tolist()  # r + W_O Σ_s p_s W_V δh_s
    [[[3.0, 3.0]]]
    """
    dq = torch.einsum("btd,hde->bthe", dh[:, qpos], a["W_Q"])
    dk = torch.einsum("bsd,hde->bshe", dh, a["W_K"])
    dv = torch.einsum("bsd,hde->bshe", dh, a["W_V"])
    p = a["p"]
    ds = (torch.einsum("bthe,bshe->bths", dq, a["k"]) + torch.einsum("bthe,bshe->bths", a["q"], dk)) / scale
    dp = p * (ds - (p * ds).sum(-1, keepdim=True))
    dz = torch.einsum("bths,bshe->bthe", dp, a["v"]) + torch.einsum("bths,bshe->bthe", p, dv)
    return r[:, qpos].to(torch.float64) + torch.einsum("bthe,hed->btd", dz, a["W_O"])


def _mlp_parts(mlp: Any, norm: Norm | None, ft: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x̂, 1/σ, σ'(pre) and W_in (float64) at the positions ``ft``."""
    h, xhat, inv = normalise(norm, ft)
    w_in = mlp.W_in.detach().to(torch.float64)
    pre = h @ w_in + mlp.b_in.detach().to(torch.float64)
    return xhat, inv, activation_slope(mlp.act_fn, pre), w_in


def normed_mlp_kernel(mlp: Any, norm: Norm | None, src: NodeLayer, dst: NodeLayer) -> Kernel:
    """y = x + σ(norm(x) W_in + b_in) W_out + b_out, position-wise, for any elementwise σ:
    A_t = K + P diag(σ'(pre_t)) (w_t GᵀW_in − w₂_t u_t W_in)ᵀ with P = C_out W_outᵀ, (b, P_out, m, k).

    >>> from types import SimpleNamespace
    >>> from degeneracy.capture import NodeLayer
    >>> mlp = SimpleNamespace(W_in=torch.zeros(2, 3), b_in=torch.zeros(3), W_out=torch.zeros(3, 2),
    ...                       act_fn=torch.nn.functional.gelu)
    >>> layer, eye = NodeLayer("h", ("h",)), torch.eye(2, dtype=torch.float64)
    >>> ones = torch.ones(1, 1, 2, dtype=torch.float64)
    >>> normed_mlp_kernel(mlp, None, layer, layer)(None, ones, ones, eye, eye)[0, 0].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        idx = _targets(src, dst, inputs, f)
        ft, st = f[:, idx], scale[:, idx].to(torch.float64)
        xhat, inv, slope, w_in = _mlp_parts(mlp, norm, ft)
        w, w2, u = _weights(norm, xhat, inv, st, dirs)
        p_fold = c_out @ mlp.W_out.detach().to(torch.float64).T  # (m, hidden)
        q_fold = w_in.T @ shared_directions(norm, dirs)  # (hidden, k)
        b, t, hidden = slope.shape
        gated = (p_fold[None] * slope.reshape(b * t, 1, hidden)) @ q_fold  # (b·t, m, k)
        out = gated.reshape(b, t, -1, dirs.shape[1]) * w[:, :, None, :]
        if u is not None:
            ucol = torch.einsum("mh,bth->btm", p_fold, slope * (u @ w_in))
            out -= ucol[..., None] * w2[:, :, None, :]
        return out + (c_out @ dirs)[None, None] * st[:, :, None, :]

    return kernel


def normed_mlp_tangent(mlp: Any, norm: Norm | None, src: NodeLayer, dst: NodeLayer) -> Callable:
    """J(f)·δf of x + σ(norm(x) W_in + b_in) W_out + b_out at the target positions.

    >>> from types import SimpleNamespace
    >>> from degeneracy.capture import NodeLayer
    >>> mlp = SimpleNamespace(W_in=torch.eye(2), b_in=torch.zeros(2), W_out=torch.eye(2), act_fn=torch.relu)
    >>> layer = NodeLayer("h", ("h",))
    >>> f, r = torch.tensor([[[1.0, -1.0]]]), torch.ones(1, 1, 2)
    >>> normed_mlp_tangent(mlp, None, layer, layer)(None, f, r).tolist()  # r + relu'(f) r
    [[[2.0, 1.0]]]
    """

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        idx = _targets(src, dst, inputs, f)
        ft, rt = f[:, idx], r[:, idx].to(torch.float64)
        xhat, inv, slope, w_in = _mlp_parts(mlp, norm, ft)
        dh = norm_tangent(norm, xhat, inv, rt)
        return rt + (slope * (dh @ w_in)) @ mlp.W_out.detach().to(torch.float64)

    return tangent


def normed_unembed_kernel(w_u: Tensor, norm: Norm | None, src: NodeLayer, dst: NodeLayer) -> Kernel:
    """y = norm(x) W_U + b_U, position-wise: A_t = w_t (C_out W_Uᵀ G) − w₂_t (C_out W_Uᵀ u_t).

    >>> from degeneracy.capture import NodeLayer
    >>> layer, eye = NodeLayer("h", ("h",)), torch.eye(2, dtype=torch.float64)
    >>> ones = torch.ones(1, 1, 2, dtype=torch.float64)
    >>> normed_unembed_kernel(2 * eye, None, layer, layer)(None, ones, ones, eye, eye)[0, 0].tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    """

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        idx = _targets(src, dst, inputs, f)
        _, xhat, inv = normalise(norm, f[:, idx])
        w, w2, u = _weights(norm, xhat, inv, scale[:, idx].to(torch.float64), dirs)
        p_fold = c_out @ w_u.detach().to(torch.float64).T  # (m, d)
        out = (p_fold @ shared_directions(norm, dirs))[None, None] * w[:, :, None, :]
        if u is not None:
            out -= (u @ p_fold.T)[..., None] * w2[:, :, None, :]
        return out

    return kernel


def normed_unembed_tangent(w_u: Tensor, norm: Norm | None, src: NodeLayer, dst: NodeLayer) -> Callable:
    """J(f)·δf of norm(x) W_U + b_U at the target positions.

    >>> from degeneracy.capture import NodeLayer
    >>> layer = NodeLayer("h", ("h",))
    >>> ones = torch.ones(1, 1, 2)
    >>> normed_unembed_tangent(torch.eye(2), None, layer, layer)(None, ones, ones).tolist()
    [[[1.0, 1.0]]]
    """

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        idx = _targets(src, dst, inputs, f)
        _, xhat, inv = normalise(norm, f[:, idx])
        return norm_tangent(norm, xhat, inv, r[:, idx]) @ w_u.detach().to(torch.float64)

    return tangent


def positionwise_gram(fn: Callable, kernel: Kernel, tangent: Callable) -> GramFn:
    """Σ Jᵀ J of a position-wise section from its kernel, one Jacobian per (example, target position).

    A position-wise J_ts is zero for s ≠ t, so the kernel with ``scale = 1`` everywhere returns every
    A_t = C_out J_tt R₊ at once. With the constant coordinate (homogeneous extension, c̄ the mean over
    the P input positions) J_ts = δ_ts A_t + v_t e₀ᵀ with v_t = s₀/P · C_out [g(f)_t − J_tt f_t; 1], so
    Σ_ts J_tsᵀ J_ts = Σ_t A_tᵀ A_t + Σ_t (A_tᵀ v_t e₀ᵀ + e₀ v_tᵀ A_t) + P Σ_t |v_t|² e₀ e₀ᵀ. ``None`` where
    R₊ mixes the constant into other columns.

    >>> from degeneracy.capture import NodeLayer
    >>> from degeneracy.linalg import integration_rule
    >>> layer, eye = NodeLayer("h", ("h",)), torch.eye(2, dtype=torch.float64)
    >>> kernel = normed_unembed_kernel(eye, None, layer, layer)
    >>> tangent = normed_unembed_tangent(eye, None, layer, layer)
    >>> gram = positionwise_gram(lambda inputs, f: f, kernel, tangent)
    >>> x = torch.ones(3, 1, 2, dtype=torch.float64)
    >>> gram(None, x, eye, eye, integration_rule("gradient"), False, 2**10).tolist()
    [[3.0, 0.0], [0.0, 3.0]]
    """

    @gram_function
    def gram(q: GramQuery) -> Tensor | None:
        if q.mixes_constant():
            return None
        f64 = torch.float64
        in64, out64 = q.maps64()
        d, k = q.width, in64.shape[1]
        d_out = out64.shape[1] - int(q.constant)
        dirs, c_f = in64[:d], out64[:, :d_out]
        n_pos = q.x.shape[1]
        chunk = max(1, 8 * q.max_elements // max(1, n_pos * max(out64.shape[0], d) * k))
        total = torch.zeros(k, k, dtype=f64, device=q.x.device)
        points = [(1.0, 1.0)] if q.constant else list(zip(q.rule.points, q.rule.weights, strict=True))
        for b0 in range(0, q.x.shape[0], chunk):
            sl = slice(b0, b0 + chunk)
            sub = None if q.inputs is None else slice_inputs(q.inputs, sl)
            f = q.x[sl, :, :d]
            ones = torch.ones(f.shape[0], n_pos, k, dtype=f64, device=f.device)
            jac = sum(w * kernel(sub, alpha * f, ones, dirs, c_f) for alpha, w in points)  # (b, T, m, k)
            flat = jac.reshape(-1, k)
            total += flat.T @ flat
            if q.constant:
                s0 = float(in64[d, 0])
                euler = fn(sub, f).to(f64) - tangent(sub, f, f).to(f64)  # (b, T, d_out)
                v = (s0 / n_pos) * (euler @ c_f.T + out64[:, d_out])  # (b, T, m)
                cross = torch.einsum("btmk,btm->k", jac, v)
                total[0] += cross
                total[:, 0] += cross
                total[0, 0] += n_pos * float(v.square().sum())
        return total

    return gram


def _targets(src: NodeLayer, dst: NodeLayer, inputs: Any, f: Tensor) -> list[int]:
    """Where the target's positions sit among the source's (the sequence length from ``inputs``)."""
    n = f.shape[1] if inputs is None else parts.sequence_length(inputs)
    return parts.select_positions(src, dst, n)
