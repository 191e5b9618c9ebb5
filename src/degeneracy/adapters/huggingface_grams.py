"""Structured closed-form Jacobian Grams of Hugging Face BERT layers and GPT-2 blocks, without any
per-example Jacobian (:func:`bert_gram`, :func:`gpt2_gram`; GPT-2's differences are in its docstring).

A ``BertLayer`` (post-LayerNorm) maps x to y_t = LN₂(w_t), w_t = z_t + W_o σ(W_i z_t + b_i) + b_o,
z_t = LN₁(x_t + attn(x)_t). Its Jacobian at query t and input position s (column convention) is
J_ts = B_t (δ_ts I + A_ts), B_t = J_LN₂,t (I + W_o diag(σ'_t) W_i) J_LN₁,t a per-query d × d map and
A_ts the attention's Jacobian, per head h a_hts W_Oʰ [W_Vʰ + (v_hs − v̄_ht) w_htᵀ] (+ at s = t the query
term W_Oʰ N_ht W_Qʰ / √e, N_ht = Σ_r a_htr (v_hr − v̄_ht) k_hrᵀ), w_ht = W_Kʰ q_ht / √e.

With D_t = C_out B_t (m × d, one batched GEMM over the queries through the MLP's hidden width, the
LayerNorm Jacobians folded in as rank-one corrections), U_t = D_t W_O and G_t = U_tᵀ U_t, the Gram of
the basis Jacobians E_ts = D_t (δ_ts + A_ts) R₊ over every pair (t, s) is, for s ≠ t,
Σ Y_tsᵀ Y_ts with Y_ts = Σ_h a_hts U_tʰ (V_h + u_hts ω_thᵀ) (V = W_V R₊, u = v − v̄, ω = R₊ᵀ w):
Vᵀ [Σ_t G_t ∘ (S_t ⊗ 1)] V (S_t = Σ_s a_ts a_tsᵀ over heads), the cross term Vᵀ Σ_t Γ_t Ω_tᵀ and
Σ_t Ω_t Z_t Ω_tᵀ (H × H weights Z from u and G_t), plus E_tt formed explicitly at s = t. That is
O(P d³) per example (about nine d³ GEMMs per query), against O(P² d³) for the Jacobian itself.

With the constant coordinate (centred LIB), R₊'s constant column r₀ = [m₀; s₀] is the direction m₀
plus, at every (t, s), the rank-one term ℓ_t = s₀/P (C_out (g(f) − J f)_t + c_const) on column 0
(Euler's identity for the homogeneous extension); its cross terms Σ_s E_tsᵀ ℓ_t are one closed-form
vector-Jacobian product per query (the key term drops out: Σ_s a_hts (v_hs − v̄_ht) = 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from degeneracy.adapters.transformer_lens.normed import Norm, activation_slope, normalise, shared_directions
from degeneracy.adapters.transformer_lens.parts import attention_parts, positions_of
from degeneracy.jacobian import GramFn, GramQuery, gram_function

__all__ = ["bert_gram", "gpt2_gram"]


def bert_gram(
    attn: Any, ln1: Norm, ln2: Norm, intermediate: nn.Module, output: nn.Linear, positions: Any
) -> GramFn:
    """Σ_x Σ_(t,i) Σ_s Jᵀ J of the basis Jacobians J = C_out ∂F/∂x_s R₊ of a ``BertLayer`` (module
    docstring), F the layer at the output ``positions`` (``None``: all), as a Gram function
    (:data:`degeneracy.jacobian.GramFn`).

    ``attn`` holds the per-head weights
    (:func:`degeneracy.adapters.huggingface_sections.bert_attention_weights`), ``ln1``/``ln2`` the
    attention's and the output's LayerNorms, ``intermediate`` the ``BertIntermediate`` (``dense`` and
    ``intermediate_act_fn``) and ``output`` the ``BertOutput.dense``. Returns ``None``
    (the caller falls back) for padded batches (an ``attention_mask`` with zeros), a constant direction
    mixed into the other columns of R₊, or an integration rule with more than one point off the
    homogeneous (centred) case. With float32 activations (a float32 model) the per-query maps are
    float32 GEMMs, the precision of the model's own Jacobians; every Gram product is float64.

    >>> from transformers import BertConfig
    >>> from transformers.models.bert.modeling_bert import BertLayer
    >>> from degeneracy.adapters.huggingface_sections import bert_layer
    >>> from degeneracy.linalg import integration_rule
    >>> cfg = BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16)
    >>> layer = BertLayer(cfg).double().eval()
    >>> gram = bert_layer(layer, None).gram
    >>> x, eye = torch.randn(2, 3, 8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)
    >>> gram(None, x, eye, eye, integration_rule("gradient"), False, 2**16).shape
    torch.Size([8, 8])
    """

    def weights(c_f: Tensor, dirs: Tensor, cdt: torch.dtype) -> dict:
        return _weights(attn, intermediate, output, (ln1, ln2), c_f, dirs, cdt)

    def chunk(w: dict, f: Tensor, *rest: Any) -> Tensor:
        return _chunk(attn, ln1, ln2, intermediate, w, f, *rest)

    return _gram(positions, weights, chunk)


def _padded(inputs: Any) -> bool:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask is not None and bool((mask == 0).any())


def _weights(
    attn: Any, inter: nn.Module, out: nn.Linear, lns: tuple, c_f: Tensor, dirs: Tensor, cdt: torch.dtype
) -> dict:
    """The float64 weights and the folds shared by every example: V = W_V R̃, W_Q R̃, W_K R̃ per head,
    C₂ = C_out diag(γ₂) and C₂ Π W_o (m × hidden); the folds of the per-query maps also in ``cdt``."""
    f64 = torch.float64
    w = {name: getattr(attn, name).detach().to(f64) for name in ("W_Q", "W_K", "W_V", "W_O")}
    heads, _, e = w["W_V"].shape
    w["V"] = torch.einsum("hde,dk->hek", w["W_V"], dirs).reshape(heads * e, -1)
    w["VQ"] = torch.einsum("hde,dk->hek", w["W_Q"], dirs)
    w["KR"] = torch.einsum("hde,dk->hek", w["W_K"], dirs)
    w["WOcat"] = w["W_O"].reshape(heads * e, -1).T  # (d, H·e)
    w["W_i"] = inter.dense.weight.detach().to(f64)  # (hidden, d)
    w["b_i"] = inter.dense.bias.detach().to(f64)
    w["W_o"] = out.weight.detach().to(f64)  # (d, hidden)
    w["b_o"] = out.bias.detach().to(f64)
    ln1, ln2 = lns
    c2 = c_f if ln2.weight is None else c_f * ln2.weight
    w["C2"] = c2
    w["C2Pi"] = c2 - c2.mean(1, keepdim=True) if ln2.centre else c2
    w["S"] = w["C2Pi"] @ w["W_o"]  # (m, hidden)
    w["Ct"], w["Wi_t"] = _right_norm(ln1, w["C2Pi"]), _right_norm(ln1, w["W_i"])
    w["dirs"] = dirs
    w["cdt"] = cdt
    for name in ("S", "Ct", "Wi_t", "WOcat", "dirs"):  # the factors' GEMMs run in the activations' precision
        w[f"{name}_c"] = w[name].to(cdt)
    return w


def _right_norm(norm: Norm, rows: Tensor) -> Tensor:
    """rows · diag(γ) Π (Π the centring, for a LayerNorm)."""
    r = rows if norm.weight is None else rows * norm.weight
    return r - r.mean(-1, keepdim=True) if norm.centre else r


class _QueryMaps:
    """D_t = C_out B_t for every query row n, kept as D_t = s_t (F_t − c_t ṽ_tᵀ − g_t x̂₁,tᵀ/d) with
    F_t = C̃ + (S ∘ σ'_t) W̃_i (S = C₂ Π W_o, C̃ = C₂ Π diag(γ₁) Π, W̃_i = W_i diag(γ₁) Π): the MLP's
    hidden width in one GEMM per block of queries, both LayerNorm Jacobians as rank-one corrections
    applied to the products (never to D_t itself)."""

    def __init__(self, ln1: Norm, ln2: Norm, w: dict, slope: Tensor, xhat1, inv1, xhat2, inv2) -> None:
        n, d = xhat1.shape
        s_fold, w_i, cdt = w["S_c"], w["Wi_t_c"], w["cdt"]
        f64 = torch.float64
        m = s_fold.shape[0]
        self.c = torch.einsum("md,nd->nm", w["C2"], xhat2)  # C₂ x̂₂_t
        xi = (xhat2 @ w["W_o"]) * slope  # (n, hidden): x̂₂ᵀ W_o diag(σ')
        self.v = _right_norm(ln1, xhat2) / d + (xi @ w["Wi_t"]) / d  # ṽ_t
        f = torch.empty(n, m, d, dtype=cdt, device=slope.device)
        slope_c = slope.to(cdt)
        step = max(1, 2**22 // max(1, m * w_i.shape[0]))
        for i in range(0, n, step):
            sl = slice(i, i + step)
            scaled = s_fold[None] * slope_c[sl, None, :]
            f[sl] = torch.baddbmm(w["Ct_c"], scaled, w_i.expand(len(scaled), -1, -1))
        self.f, self.xhat, self.d = f, xhat1, d
        self.s = (inv1 * inv2)[:, 0]  # (n,)
        fx = torch.einsum("nmd,nd->nm", f, xhat1.to(cdt)).to(f64)
        self.g = fx - self.c * (self.v * xhat1).sum(-1, keepdim=True)

    def times(self, y: Tensor) -> Tensor:
        """D_t Y for a shared Y (d × c, in the factors' dtype): (n, m, c) in that dtype."""
        cdt = self.f.dtype
        fy = self.f @ y
        left = torch.stack([self.c, self.g], dim=-1).to(cdt)  # (n, m, 2)
        y64 = y.to(torch.float64)
        right = torch.stack([self.v @ y64, (self.xhat @ y64) / self.d], dim=1).to(cdt)  # (n, 2, c)
        return torch.baddbmm(fy, left, right, alpha=-1.0) * self.s[:, None, None].to(cdt)

    def apply(self, v: Tensor) -> Tensor:
        """D_t v_t for v (n, d): (n, m)."""
        fv = torch.einsum("nmd,nd->nm", self.f, v.to(self.f.dtype)).to(torch.float64)
        corr = self.c * (self.v * v).sum(-1, keepdim=True)
        corr = corr + self.g * (self.xhat * v).sum(-1, keepdim=True) / self.d
        return (fv - corr) * self.s[:, None]

    def apply_t(self, ell: Tensor) -> Tensor:
        """D_tᵀ ℓ_t for ℓ (n, m): (n, d)."""
        fl = torch.einsum("nmd,nm->nd", self.f, ell.to(self.f.dtype)).to(torch.float64)
        corr = self.v * (self.c * ell).sum(-1, keepdim=True)
        corr = corr + self.xhat * (self.g * ell).sum(-1, keepdim=True) / self.d
        return (fl - corr) * self.s[:, None]


def _chunk(attn, ln1, ln2, inter, w, f, qpos, side, in64, out64, constant) -> Tensor:
    """This block of examples' part of the Gram: E_tt and Σ_(s≠t) Y_tsᵀ Y_ts's per-query factors
    (accumulated in ``side``), and with the constant the column-0 terms."""
    f64 = torch.float64
    b, n_pos, d = f.shape
    t = len(qpos)
    sc = float(attn.attn_scale)
    part = attention_parts(attn, f, qpos, "bidirectional")
    p, q_, k_, v_ = part["p"], part["q"], part["k"], part["v"]  # p (b, t, h, s); q (b, t, h, e)
    heads, e = v_.shape[2], v_.shape[3]
    b_o = attn.b_O.detach().to(f64) if attn.b_O is not None else 0.0
    vbar = torch.einsum("bths,bshe->bthe", p, v_)
    zpre = f[:, qpos] + torch.einsum("bthe,hed->btd", vbar, w["W_O"]) + b_o
    _, xhat1, inv1 = normalise(ln1, zpre)
    z = _affine(ln1, xhat1)
    pre = z @ w["W_i"].T + w["b_i"]
    slope = activation_slope(inter.intermediate_act_fn, pre)
    y, xhat2, inv2 = normalise(ln2, z + inter.intermediate_act_fn(pre) @ w["W_o"].T + w["b_o"])

    def flat(z_: Tensor) -> Tensor:
        return z_.reshape(b * t, *z_.shape[2:])

    dmap = _QueryMaps(ln1, ln2, w, flat(slope), flat(xhat1), flat(inv1), flat(xhat2), flat(inv2))
    he = heads * e
    umap = dmap.times(w["WOcat_c"])  # U_t = D_t W_O
    u_all = v_.permute(0, 2, 1, 3)[:, None] - vbar[:, :, :, None]  # (b, t, h, s, e): v_hs − v̄_ht
    rows = torch.arange(t, device=f.device)
    cols = torch.tensor(qpos, device=f.device)
    pm = p.clone()
    pm[:, rows, :, cols] = 0.0  # s ≠ t
    omega = torch.einsum("bthe,hek->bthk", q_, w["KR"]) / sc  # ω_th = R̃ᵀ W_Kʰ q_ht / √e
    n_mat = torch.einsum("bthr,bthre,brhf->bthef", p, u_all, k_)  # N_ht
    u64 = umap.to(f64)
    uu = u64.transpose(1, 2) @ u64  # G_t = U_tᵀ U_t
    g5 = uu.reshape(b * t, heads, e, heads, e)
    pmf = flat(pm)
    s_mat = torch.einsum("nhs,ngs->nhg", pmf, pmf)
    side["A1"] = side["A1"] + torch.einsum("nhegf,nhg->hegf", g5, s_mat).reshape(heads * e, heads * e)
    pu = pmf[..., None] * flat(u_all)  # (n, h, s, e)
    zvec = torch.einsum("nhs,ngsf->nhgf", pmf, pu)
    gam = torch.einsum("nhegf,nhgf->nheg", g5, zvec).reshape(b * t, heads * e, heads)
    om = flat(omega)
    side["A2"] = side["A2"] + torch.einsum("nxg,ngk->xk", gam, om)
    z_w = torch.einsum("nhsgf,ngsf->nhg", torch.einsum("nhse,nhegf->nhsgf", pu, g5), pu)
    total = om.flatten(0, 1).T @ (z_w @ om).flatten(0, 1)
    # s = t: E_tt = D_t R̃ + U_t inner_t
    p_tt = p[:, rows, :, cols].permute(1, 0, 2)  # (b, t, h)
    u_tt = u_all[:, rows, :, cols].permute(1, 0, 2, 3)  # (b, t, h, e)
    key = u_tt[..., None] * omega[:, :, :, None]  # (b, t, h, e, k)
    inner = p_tt[..., None, None] * (w["V"].reshape(heads, e, -1)[None, None] + key)
    inner = inner + torch.einsum("bthef,hfk->bthek", n_mat, w["VQ"]) / sc
    inner = flat(inner).reshape(b * t, he, -1).to(umap.dtype)
    e_tt = torch.baddbmm(dmap.times(w["dirs_c"]), umap, inner).to(f64)  # E_tt = D_t R̃ + U_t inner_t
    ef = e_tt.reshape(-1, e_tt.shape[-1])
    total += ef.T @ ef
    if constant:  # column 0: ℓ_t = s₀/P (C_out (g − J f)_t + c_const) at every (t, s)
        s0 = float(in64[d, 0])
        jf = f[:, qpos] + _attention_jvp(w, part, f, qpos, sc)  # (δ + A) f at the queries
        c_e = y @ out64[:, :d].T - dmap.apply(flat(jf)).reshape(b, t, -1)
        ell = (s0 / n_pos) * (c_e + out64[:, d])  # (b, t, m)
        lam = dmap.apply_t(flat(ell))  # λ_t = D_tᵀ ℓ_t
        mu = torch.einsum("hed,nd->nhe", w["W_O"], lam)
        back = lam + torch.einsum("hde,nhe->nd", w["W_V"], mu)
        back = back + torch.einsum("hde,nhfe,nhf->nd", w["W_Q"], flat(n_mat), mu) / sc
        side["col"] = side["col"] + back.sum(0) @ w["dirs"]
        side["c00"] = side["c00"] + n_pos * float(ell.square().sum())
    return total


def _attention_jvp(w: dict, part: dict, f: Tensor, qpos: list[int], sc: float) -> Tensor:
    """attn(x)'s JVP at the queries along δx = ``f`` (b, t, d)."""
    p, q_, k_, v_ = part["p"], part["q"], part["k"], part["v"]
    dq = torch.einsum("btd,hde->bthe", f[:, qpos], w["W_Q"])
    dk = torch.einsum("bsd,hde->bshe", f, w["W_K"])
    dv = torch.einsum("bsd,hde->bshe", f, w["W_V"])
    ds = (torch.einsum("bthe,bshe->bths", dq, k_) + torch.einsum("bthe,bshe->bths", q_, dk)) / sc
    dp = p * (ds - (p * ds).sum(-1, keepdim=True))
    dz = torch.einsum("bths,bshe->bthe", p, dv) + torch.einsum("bths,bshe->bthe", dp, v_)
    return torch.einsum("bthe,hed->btd", dz, w["W_O"])


def _affine(norm: Norm, xhat: Tensor) -> Tensor:
    out = xhat if norm.weight is None else xhat * norm.weight
    return out if norm.bias is None else out + norm.bias


def gpt2_gram(attn: Any, ln1: Norm, ln2: Norm, mlp: nn.Module, positions: Any) -> GramFn:
    """Σ_x Σ_(t,i) Σ_s Jᵀ J of the basis Jacobians of a ``GPT2Block`` (pre-LayerNorm, causal) at the
    output ``positions``, as a Gram function, like :func:`bert_gram`.

    J_ts = B_t (δ_ts + A_ts L_s) with B_t = I + W_o diag(σ'_t) W_i J_LN₂,t and L_s = J_LN₁,s at the
    key position: L_s R̃ = (1/σ_s)(G − u_s β_sᵀ) (G = γ₁ ⊙ Π R̃, u_s = γ₁ ⊙ x̂_s, β_s = R̃ᵀ x̂_s / d), so
    the BERT terms hold with a_hts/σ_s for a_hts and G for R̃, plus one rank-one term
    −(1/σ_s) C_out B_t A_ts u_s β_sᵀ per (t, s), whose products go through G_t = U_tᵀ U_t. The constant
    column's cross terms are one vector-Jacobian product per batch (``torch.func``, float64).
    ``attn`` from :func:`degeneracy.adapters.huggingface_sections.gpt2_attention_weights`, ``mlp`` the
    block's ``GPT2MLP``. ``None`` where :func:`bert_gram` gives ``None``.

    >>> from transformers import GPT2Config
    >>> from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    >>> from degeneracy.adapters.huggingface_sections import gpt2_block
    >>> from degeneracy.linalg import integration_rule
    >>> block = GPT2Block(GPT2Config(n_embd=8, n_head=2), layer_idx=0).double().eval()
    >>> gram = gpt2_block(block, None).gram
    >>> x, eye = torch.randn(2, 3, 8, dtype=torch.float64), torch.eye(8, dtype=torch.float64)
    >>> gram(None, x, eye, eye, integration_rule("gradient"), False, 2**16).shape
    torch.Size([8, 8])
    """

    def weights(c_f: Tensor, dirs: Tensor, cdt: torch.dtype) -> dict:
        return _gpt2_weights(attn, mlp, (ln1, ln2), c_f, dirs, cdt)

    def chunk(w: dict, f: Tensor, *rest: Any) -> Tensor:
        return _gpt2_chunk(attn, ln1, ln2, mlp, w, f, *rest)

    return _gram(positions, weights, chunk)


def _gram(positions: Any, weights: Callable[..., dict], chunk: Callable[..., Tensor]) -> GramFn:
    """The Gram function shared by :func:`bert_gram` and :func:`gpt2_gram`: ``weights(C_f, R̃, dtype)``
    folds the block's weights once, ``chunk(w, f, qpos, side, R₊, C_out, constant)`` adds a chunk of
    examples (and its terms common to all chunks into ``side``)."""

    @gram_function
    def gram(q: GramQuery) -> Tensor | None:
        if q.mixes_constant() or _padded(q.inputs):
            return None
        constant = q.constant
        if constant:
            alpha, weight = 1.0, 1.0  # homogeneous: the Jacobian is the same at every α > 0
        elif len(q.rule.points) == 1:
            alpha, weight = q.rule.points[0], q.rule.weights[0]
        else:
            return None
        f64 = torch.float64
        x = q.x
        in64, out64 = q.maps64()
        d = q.width
        c_f = out64[:, : out64.shape[1] - int(constant)]
        if c_f.shape[1] != d:
            return None
        dirs = in64[:d]  # R̃: with the constant, column 0 is m₀
        k = dirs.shape[1]
        qpos = positions_of(positions, x.shape[1])
        w = weights(c_f, dirs, torch.float32 if x.dtype == torch.float32 else f64)
        total = torch.zeros(k, k, dtype=f64, device=x.device)
        side = {"A1": 0.0, "A2": 0.0, "col": torch.zeros(k, dtype=f64, device=x.device), "c00": 0.0}
        per = max(1, 8 * q.max_elements // max(1, len(qpos) * c_f.shape[0] * d))
        for b0 in range(0, x.shape[0], per):
            f = alpha * x[b0 : b0 + per, :, :d].to(f64)
            total += chunk(w, f, qpos, side, in64, out64, constant)
        v = w["V"]
        total += v.T @ side["A1"] @ v
        cross = v.T @ side["A2"]
        total += cross + cross.T
        if constant:
            total[0] += side["col"]
            total[:, 0] += side["col"]
            total[0, 0] += side["c00"]
        return weight**2 * total

    return gram


def _gpt2_weights(attn: Any, mlp: nn.Module, lns: tuple, c_f: Tensor, dirs: Tensor, cdt: torch.dtype) -> dict:
    f64 = torch.float64
    ln1, ln2 = lns
    w = {name: getattr(attn, name).detach().to(f64) for name in ("W_Q", "W_K", "W_V", "W_O")}
    heads, _, e = w["W_V"].shape
    g = shared_directions(ln1, dirs)  # G = γ₁ ⊙ Π R̃
    w["V"] = torch.einsum("hde,dk->hek", w["W_V"], g).reshape(heads * e, -1)
    w["VQ"] = torch.einsum("hde,dk->hek", w["W_Q"], g)
    w["KR"] = torch.einsum("hde,dk->hek", w["W_K"], g)
    w["WOcat"] = w["W_O"].reshape(heads * e, -1).T
    w["W_in"] = mlp.c_fc.weight.detach().to(f64)  # (d, hidden): h W_in
    w["b_in"] = mlp.c_fc.bias.detach().to(f64)
    w["W_out"] = mlp.c_proj.weight.detach().to(f64)  # (hidden, d)
    w["b_out"] = mlp.c_proj.bias.detach().to(f64)
    w["S"] = c_f @ w["W_out"].T  # C_out W_o (m × hidden)
    w["Wi_t"] = _right_norm(ln2, w["W_in"].T)  # W_i diag(γ₂) Π (hidden × d)
    w["dirs"], w["cdt"], w["C"] = dirs, cdt, c_f
    for name in ("S", "Wi_t", "WOcat", "dirs"):
        w[f"{name}_c"] = w[name].to(cdt)
    w["CY"] = {name: (c_f @ w[name]).to(cdt) for name in ("WOcat", "dirs")}
    return w


def _gpt2_forward(attn: Any, ln1: Norm, ln2: Norm, mlp: nn.Module, w: dict, f: Tensor, qpos: list[int]):
    """The block at the queries in float64, with its parts: (y, attention parts, x̂₁, 1/σ₁, x̂₂, 1/σ₂, σ')."""
    h_in, xhat1, inv1 = normalise(ln1, f)
    part = attention_parts(attn, h_in, qpos, "causal")
    b_o = attn.b_O.detach().to(torch.float64) if attn.b_O is not None else 0.0
    vbar = torch.einsum("bths,bshe->bthe", part["p"], part["v"])
    mres = f[:, qpos] + torch.einsum("bthe,hed->btd", vbar, w["W_O"]) + b_o
    h2, xhat2, inv2 = normalise(ln2, mres)
    pre = h2 @ w["W_in"] + w["b_in"]
    y = mres + mlp.act(pre) @ w["W_out"] + w["b_out"]
    return y, part, vbar, xhat1, inv1, xhat2, inv2, pre


def _gpt2_chunk(attn, ln1, ln2, mlp, w, f, qpos, side, in64, out64, constant) -> Tensor:
    """This block of examples' part of a GPT-2 block's Gram (see :func:`gpt2_gram`)."""
    f64 = torch.float64
    b, n_pos, d = f.shape
    t = len(qpos)
    sc = float(attn.attn_scale)
    y, part, vbar, xhat1, inv1, xhat2, inv2, pre = _gpt2_forward(attn, ln1, ln2, mlp, w, f, qpos)
    p, q_, k_, v_ = part["p"], part["q"], part["k"], part["v"]
    heads, e = v_.shape[2], v_.shape[3]
    he = heads * e
    slope = activation_slope(mlp.act, pre)

    def flat(z_: Tensor) -> Tensor:
        return z_.reshape(b * t, *z_.shape[2:])

    # D_t Y = C Y + (1/σ₂)(F_t Y − (F_t x̂₂)(x̂₂ᵀ Y)/d), F_t = (S ∘ σ'_t) W̃_i
    cdt = w["cdt"]
    fmat = (w["S_c"][None] * flat(slope).to(cdt)[:, None, :]) @ w["Wi_t_c"]  # (n, m, d)
    x2 = flat(xhat2).to(cdt)
    fx = torch.einsum("nmd,nd->nm", fmat, x2)
    s2 = flat(inv2).to(cdt)[:, :, None]

    def times(name: str) -> Tensor:
        y_ = w[f"{name}_c"]
        return w["CY"][name][None] + s2 * (fmat @ y_ - fx[:, :, None] * (x2 @ y_)[:, None, :] / d)

    umap = times("WOcat")
    u64 = umap.to(f64)
    uu = u64.transpose(1, 2) @ u64  # G_t
    g5 = uu.reshape(b * t, heads, e, heads, e)
    u_all = v_.permute(0, 2, 1, 3)[:, None] - vbar[:, :, :, None]  # (b, t, h, s, e)
    rows = torch.arange(t, device=f.device)
    cols = torch.tensor(qpos, device=f.device)
    p0 = p.clone()
    p0[:, rows, :, cols] = 0.0  # s ≠ t
    pm = p0 * inv1[:, None, None, :, 0]  # a_hts / σ_s
    omega = torch.einsum("bthe,hek->bthk", q_, w["KR"]) / sc  # Gᵀ w_ht
    n_mat = torch.einsum("bthr,bthre,brhf->bthef", p, u_all, k_)
    pmf = flat(pm)
    s_mat = torch.einsum("nhs,ngs->nhg", pmf, pmf)
    side["A1"] = side["A1"] + torch.einsum("nhegf,nhg->hegf", g5, s_mat).reshape(he, he)
    pu = pmf[..., None] * flat(u_all)
    zvec = torch.einsum("nhs,ngsf->nhgf", pmf, pu)
    gam = torch.einsum("nhegf,nhgf->nheg", g5, zvec).reshape(b * t, he, heads)
    om = flat(omega)
    side["A2"] = side["A2"] + torch.einsum("nxg,ngk->xk", gam, om)
    z_w = torch.einsum("nhsgf,ngsf->nhg", torch.einsum("nhse,nhegf->nhsgf", pu, g5), pu)
    total = om.flatten(0, 1).T @ (z_w @ om).flatten(0, 1)
    # the normalisation's rank-one terms ℓ_ts β_sᵀ, ℓ_ts = −(1/σ_s) U_t z_ts (s ≠ t)
    uvec = xhat1 if ln1.weight is None else xhat1 * ln1.weight  # u_s
    beta = xhat1 @ w["dirs"] / d  # (b, s, k)
    uv, uk, uq = (torch.einsum("bsd,hde->bshe", uvec, w[f"W_{n}"]) for n in "VKQ")
    kw = torch.einsum("bthe,bshe->bths", q_, uk) / sc  # w_ht · u_s
    zz = p0[..., None] * (uv.permute(0, 2, 1, 3)[:, None] + u_all * kw[..., None])  # (b, t, h, s, e)
    zt = flat(zz).permute(0, 1, 3, 2).reshape(b * t, he, n_pos)  # (n, H·e, s)
    gz = uu @ zt
    inv_s = inv1[:, None, :, 0].expand(b, t, n_pos).reshape(b * t, n_pos)  # (n, s)
    nu = -inv_s[:, None, :] * gz  # U_tᵀ ℓ_ts
    betaf = beta[:, None].expand(b, t, n_pos, -1).reshape(b * t, n_pos, -1)
    pnu = pmf.repeat_interleave(e, dim=1) * nu  # (n, H·e, s)
    side["A2"] = side["A2"] + torch.einsum("nxs,nsk->xk", pnu, betaf)
    mm_ = pmf * (flat(u_all) * nu.reshape(b * t, heads, e, n_pos).transpose(2, 3)).sum(-1)  # (n, h, s)
    c2 = torch.einsum("nhk,nhs,nsl->kl", om, mm_, betaf)
    total += c2 + c2.T
    ell2 = inv_s.square() * (zt * gz).sum(1)  # |ℓ_ts|²
    total += torch.einsum("ns,nsk,nsl->kl", ell2, betaf, betaf)
    # s = t: E_tt = D_t R̃ + (1/σ_t) U_t (inner_t − z'_t β_tᵀ)
    p_tt = p[:, rows, :, cols].permute(1, 0, 2)
    u_tt = u_all[:, rows, :, cols].permute(1, 0, 2, 3)
    inner = p_tt[..., None, None] * (
        w["V"].reshape(heads, e, -1)[None, None] + u_tt[..., None] * omega[:, :, :, None]
    )
    inner = inner + torch.einsum("bthef,hfk->bthek", n_mat, w["VQ"]) / sc
    kw_tt = kw[:, rows, :, cols].permute(1, 0, 2)
    z_tt = p_tt[..., None] * (uv[:, qpos] + u_tt * kw_tt[..., None])
    z_tt = z_tt + torch.einsum("bthef,bthf->bthe", n_mat, uq[:, qpos]) / sc
    inner = inner - z_tt[..., None] * beta[:, qpos][:, :, None, None, :]
    inner = (inv1[:, qpos, :, None, None] * inner).reshape(b * t, he, -1).to(umap.dtype)
    e_tt = torch.baddbmm(times("dirs"), umap, inner).to(f64)
    ef = e_tt.reshape(-1, e_tt.shape[-1])
    total += ef.T @ ef
    if constant:  # column 0: ℓ_t = s₀/P (C_out (g − J f)_t + c_const); Σ_s J_tsᵀ by one VJP
        s0 = float(in64[d, 0])

        def block(z: Tensor) -> Tensor:
            return _gpt2_forward(attn, ln1, ln2, mlp, w, z, qpos)[0]

        jf = jvp(block, (f,), (f,))[1]
        ell = (s0 / n_pos) * ((y - jf) @ w["C"].T + out64[:, d])  # (b, t, m)
        back = vjp(block, f)[1](ell @ w["C"])[0]  # (b, s, d)
        side["col"] = side["col"] + back.sum((0, 1)) @ w["dirs"]
        side["c00"] = side["c00"] + n_pos * float(ell.square().sum())
    return total
