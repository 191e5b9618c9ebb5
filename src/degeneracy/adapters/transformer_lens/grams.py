"""Closed-form Grams Σ Jᵀ J of the basis Jacobians of TransformerLens sections (the un-normalised M
of METHOD §2.2), without forming any per-example Jacobian.

A gram function ``gram(inputs, x, R₊, C_out, rule, constant, max_elements)`` returns
Σ_x Σ_(t,i) Σ_s Jᵀ J for J = C_out ∂F/∂x R₊, or ``None`` where its closed form does not apply
(see :func:`degeneracy.sections.shortcut_gram`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.adapters.transformer_lens.normed import Norm, normalise, shared_directions
from degeneracy.adapters.transformer_lens.parts import (
    attention_parts,
    positions_of,
    select_positions,
    sequence_length,
)
from degeneracy.capture import NodeLayer
from degeneracy.jacobian import GramFn, GramQuery, gram_function

__all__ = ["structured_gram", "gated_gram", "attention_gram"]


def structured_gram(
    sigma: Tensor,
    fixed: Tensor,
    lmaps: Tensor,
    lam: Tensor,
    btil: Tensor,
    ell_extra: Tensor | None = None,
    btil_extra: Tensor | None = None,
) -> Tensor:
    """Σ_i J_iᵀ J_i for Jacobians J_i = Σ_c σ_ic F_c + Σ_(g,r) (O_g λ_igr) b̃_igrᵀ (+ extra ℓ b̃ᵀ terms),
    each m × k, without forming any J_i.

    With J̄_i = Σ_c σ_ic F_c and the rank-one part L_i B̃_iᵀ: Σ J̄ᵀJ̄ = Σ_cc' (σᵀσ)_cc' F_cᵀ F_c';
    Σ_i J̄_iᵀ L_i B̃_iᵀ = Σ_c F_cᵀ W_c with W_c = Σ_g O_g Σ_(i,r) σ_ic λ_igr b̃_igrᵀ (one GEMM per
    group, in the small λ space); Σ_i B̃_i (L_iᵀ L_i) B̃_iᵀ is one GEMM over all rank-one terms.

    ``sigma`` (N, C), ``fixed`` (C, m, k), ``lmaps`` (G, m, e), ``lam`` (N, G, R, e), ``btil``
    (N, G, R, k), ``ell_extra`` (N, R', m) and ``btil_extra`` (N, R', k); float64.

    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> z = torch.zeros
    >>> structured_gram(torch.ones(3, 1), eye[None], z(1, 2, 1), z(3, 1, 1, 1), z(3, 1, 1, 2)).tolist()
    [[3.0, 0.0], [0.0, 3.0]]
    """
    n, groups, _, e = lam.shape
    c, m, k = fixed.shape
    flat = fixed.reshape(c * m, k)
    total = flat.T @ torch.einsum("cd,dmk->cmk", sigma.T @ sigma, fixed).reshape(c * m, k)
    w = torch.zeros(c, m, k, dtype=fixed.dtype, device=fixed.device)
    for g in range(groups):
        weighted = (sigma[:, :, None, None] * lam[:, None, g]).permute(1, 3, 0, 2).reshape(c * e, -1)
        v = (weighted @ btil[:, g].reshape(-1, k)).reshape(c, e, k)
        w += torch.einsum("me,cek->cmk", lmaps[g], v)
    ell = torch.einsum("ngre,gme->ngrm", lam, lmaps).flatten(1, 2)  # (N, G·R, m)
    bt = btil.flatten(1, 2)
    if ell_extra is not None and btil_extra is not None and ell_extra.shape[1] > 0:
        weighted = (sigma[:, :, None, None] * ell_extra[:, None]).permute(1, 3, 0, 2).reshape(c * m, -1)
        w += (weighted @ btil_extra.reshape(-1, k)).reshape(c, m, k)
        ell, bt = torch.cat([ell, ell_extra], dim=1), torch.cat([bt, btil_extra], dim=1)
    cross = torch.einsum("cmk,cml->kl", fixed, w)
    lam_bt = (ell @ ell.transpose(1, 2)) @ bt  # (N, R, k): Λ_i B̃_iᵀ rows
    return total + cross + cross.T + bt.reshape(-1, k).T @ lam_bt.reshape(-1, k)


def gated_gram(
    weight: Tensor | None, bias: Tensor | None, mlp: nn.Module | None, src: NodeLayer, dst: NodeLayer
) -> GramFn:
    """Σ Jᵀ J in closed form for the position-wise y = f W + b (+ relu(f W_in + b_in) W_out).

    W is the identity when ``weight`` is ``None`` (a residual). The basis Jacobian at one position is
    K + P diag(g) Q with K = C_out W̃ R₊, P = C_out W_outᵀ, Q = W̃_inᵀ R₊ and g the ReLU gates (averaged
    over the rule's points), so Σ Jᵀ J = N KᵀK + Kᵀ P diag(Σg) Q + (…)ᵀ + Qᵀ [(PᵀP) ∘ (Gᵀ G)] Q with
    G the (N × hidden) matrix of gates: no per-example Jacobian is formed. With the constant
    coordinate the homogeneous extension is the bias-free map of the augmented [f; 1] (ReLU is
    positively homogeneous), W̃ and W̃_in carry the biases as an extra row; this needs one input
    position (else the constant's derivative couples positions and ``None`` is returned).

    >>> from degeneracy.capture import NodeLayer
    >>> from degeneracy.linalg import integration_rule
    >>> layer = NodeLayer("h", ("h",))
    >>> gram = gated_gram(None, None, None, layer, layer)  # the identity
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> rule = integration_rule("gradient")
    >>> gram(torch.zeros(4, 1), torch.ones(4, 1, 2), eye, eye, rule, False, 2**10).tolist()
    [[4.0, 0.0], [0.0, 4.0]]
    """

    @gram_function
    def gram(q: GramQuery) -> Tensor | None:
        x, rule, constant = q.x, q.rule, q.constant
        if constant and x.shape[1] != 1:
            return None
        f64 = torch.float64
        xt = x[:, select_positions(src, dst, sequence_length(q.inputs))].to(f64)
        d = q.width
        lin = torch.eye(d, dtype=f64, device=x.device) if weight is None else weight.detach().to(f64)
        d_out = lin.shape[1]
        jac = lin.T  # (d_out[+1]) × (d[+1]) linear part in column convention
        if constant:
            jac = torch.zeros(d_out + 1, d + 1, dtype=f64, device=x.device)
            jac[:d_out, :d] = lin.T
            if bias is not None:
                jac[:d_out, d] = bias.detach().to(f64)
            jac[d_out, d] = 1.0
        in64, out64 = q.maps64()
        k_lin = out64 @ jac @ in64  # (m, k)
        rows = xt.shape[0] * xt.shape[1]
        total = rows * (k_lin.T @ k_lin)
        if mlp is not None:
            w_in, b_in = mlp.W_in.detach().to(f64), mlp.b_in.detach().to(f64)
            w_aug = torch.cat([w_in, b_in[None]]) if constant else w_in
            p_fold = out64[:, :d_out] @ mlp.W_out.detach().to(f64).T  # (m, h)
            q_fold = w_aug.T @ in64  # (h, k)
            if constant:  # homogeneous: the gates at every α > 0 are those at α = 1
                gates = (xt @ w_aug > 0).to(f64)
            else:
                points = zip(rule.points, rule.weights, strict=True)
                gates = sum(w * ((a * xt) @ w_in + b_in > 0).to(f64) for a, w in points)
            g = gates.reshape(rows, -1)
            cross = k_lin.T @ (p_fold * g.sum(0)) @ q_fold
            total += cross + cross.T + q_fold.T @ ((p_fold.T @ p_fold) * (g.T @ g)) @ q_fold
        return total

    return gram


def attention_gram(
    attn: Any,
    positions: Any,
    direction: str,
    fn: Callable[[Any, Tensor], Tensor],
    tangent: Callable[..., Tensor] | None,
    norm: Norm | None = None,
) -> GramFn:
    """Σ Jᵀ J for x_t + attn(x)_t in closed form, through :func:`structured_gram`.

    For query t and input position s, in output features (C_out) and input directions (R₊):
    J_ts = δ_ts K + Σ_h p_hts O_h aV_hᵀ + [s = t] Σ_h Σ_s' vw_hs' (aQ_h c_hts' / σ)ᵀ
    + Σ_h p_hts (vw_hs − v̄w_ht) (aK_h q_ht / σ)ᵀ, with K = C_out R₊, O_h = C_out W_Oʰᵀ,
    aQ/aK/aV_h = R₊ᵀ W_Q/K/Vʰ, vw_hs = O_h v_hs, v̄w_ht = Σ_s p_hts vw_hs, c_hts = p_hts (k_hs − k̄_ht)
    and σ the attention scale: a few fixed matrices with scalar weights plus H (P + 1) rank-one terms
    (fewer off the query position), whatever the number of output features. With the constant
    coordinate, R₊'s constant column r₀ = [m₀; s₀] enters as the direction m₀ plus the rank-one term
    C_out [s₀/P (g(f) − J f); s₀/P] on that column (Euler's identity for the homogeneous extension).
    ``None`` (use the kernel) when the rank-one terms outnumber the directions.

    With a normalisation ``norm`` before the attention (:mod:`.normed`), x_s enters through
    h_s = norm(x_s) with ∂h_s/∂x_s R₊ = (1/σ_s)(G − u_s β_sᵀ), G = γ ⊙ Π R₊, u_s = γ ⊙ x̂_s and
    β_s = R₊ᵀ x̂_s / d: the terms above use G for R₊ and carry the factor 1/σ_s, and each (t, s) gains
    the rank-one term −(1/σ_s) C_out A_ts u_s β_sᵀ, A_ts u_s the attention's JVP along u_s at s.

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)  # one head, d_model 2, d_head 1
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> from degeneracy.linalg import integration_rule
    >>> eye = torch.eye(4, dtype=torch.float64)[:, :4]
    >>> gram = attention_gram(attn, -1, "causal", lambda inputs, f: f, None)
    >>> x = torch.zeros(1, 2, 2, dtype=torch.float64)
    >>> gram(None, x, torch.eye(2, 4, dtype=torch.float64), torch.eye(2, dtype=torch.float64),
    ...      integration_rule("gradient"), False, 2**10).shape
    torch.Size([4, 4])
    """

    @gram_function
    def gram(q: GramQuery) -> Tensor | None:
        inputs, x, rule, constant, max_elements = q.inputs, q.x, q.rule, q.constant, q.max_elements
        f64 = torch.float64
        n_pos = x.shape[1]
        qpos = positions_of(positions, n_pos)
        d = q.width
        in64, out64 = q.maps64()
        k = in64.shape[1]
        if q.mixes_constant():
            return None
        heads = attn.W_Q.shape[0]
        if (norm is None and heads * (n_pos + 1) > k) or (constant and tangent is None):
            return None
        dirs, c_f = in64[:d], out64[:, :d]
        w = {name: getattr(attn, name).detach().to(f64) for name in ("W_Q", "W_K", "W_V", "W_O")}
        g_dirs = shared_directions(norm, dirs)  # G = γ ⊙ Π R₊ (R₊ itself without a norm)
        a_q = torch.einsum("dj,hde->hje", g_dirs, w["W_Q"])
        a_k = torch.einsum("dj,hde->hje", g_dirs, w["W_K"])
        a_v = torch.einsum("dj,hde->hje", g_dirs, w["W_V"])
        ow = torch.einsum("hed,md->hem", w["W_O"], c_f)  # (h, e, m)
        fixed = torch.cat([(c_f @ dirs)[None], torch.einsum("hje,hem->hmj", a_v, ow)])  # (1 + H, m, k)
        scale_attn = float(attn.attn_scale)
        points = [(1.0, 1.0)] if constant else list(zip(rule.points, rule.weights, strict=True))
        f = x[..., :d].to(f64)
        b, t, m = f.shape[0], len(qpos), c_f.shape[0]
        sigma = torch.zeros(b, t, n_pos, 1 + heads, dtype=f64, device=x.device)
        for i, q in enumerate(qpos):
            sigma[:, i, q, 0] = 1.0
        lam_q, lam_k, bt_q, bt_k, ell_u, bt_u = [], [], [], [], [], []
        for alpha, weight in points:
            h_in, xhat, inv = normalise(norm, alpha * f)  # inv (b, s, 1): 1/σ_s (1 without a norm)
            part = attention_parts(attn, h_in, qpos, direction)
            p, q_, k_, v_ = part["p"], part["q"], part["k"], part["v"]  # p (b, t, h, s); q, k, v (b, ·, h, e)
            sigma[..., 1:] += weight * p.permute(0, 1, 3, 2) * inv[:, None]
            vbar = torch.einsum("bths,bshe->bthe", p, v_)
            kbar = torch.einsum("bths,bshe->bthe", p, k_)
            cq = p[..., None] * (k_.permute(0, 2, 1, 3)[:, None] - kbar[:, :, :, None])  # (b, t, h, s', e)
            inv_t = inv[:, qpos, :, None, None]  # the query enters at s = t
            lam_q.append(weight * inv_t * v_.permute(0, 2, 1, 3)[:, None].expand(b, t, -1, -1, -1))
            bt_q.append(torch.einsum("bthse,hje->bthsj", cq, a_q) / scale_attn)
            key = p.permute(0, 1, 3, 2)[..., None] * (v_[:, None] - vbar[:, :, None])  # (b, t, s, h, e)
            lam_k.append(weight * inv[:, None, :, :, None, None] * key[:, :, :, :, None])
            bt_k.append((torch.einsum("bthe,hje->bthj", q_, a_k) / scale_attn)[:, :, None, :, None])
            if norm is not None:  # −(1/σ_s) C_out A_ts u_s β_sᵀ, one rank-one term per (t, s)
                u = xhat if norm.weight is None else xhat * norm.weight  # u_s = γ ⊙ x̂_s
                uq, uk, uv = (torch.einsum("bsd,hde->bshe", u, w[f"W_{n}"]) for n in "QKV")
                vw = torch.einsum("bshe,hem->bhsm", v_, ow)
                ell = torch.einsum("bths,bshm->btsm", p, torch.einsum("bshe,hem->bshm", uv, ow))
                qdot = torch.einsum("bthse,bthe->bths", cq, uq[:, qpos]) / scale_attn  # c_hts'·uQ_ht
                query = torch.einsum("bths,bhsm->btm", qdot, vw)
                ell[:, torch.arange(t), torch.tensor(qpos)] += query
                kdot = torch.einsum("bthe,bshe->bths", q_, uk) / scale_attn
                vbw = torch.einsum("bths,bhsm->bhtm", p, vw)
                ell += torch.einsum("bths,bhsm->btsm", p * kdot, vw) - torch.einsum(
                    "bths,bhtm->btsm", p * kdot, vbw
                )
                ell_u.append(-weight * inv[:, None] * ell)  # (b, t, s, m)
                bt_u.append((xhat @ dirs / d)[:, None].expand(b, t, -1, -1))  # β_s: (b, t, s, k)
        lam_k_all = torch.cat(lam_k, dim=4)  # (b, t, s, h, R_k, e)
        bt_k_all = torch.cat(bt_k, dim=4).expand(b, t, n_pos, heads, -1, k)
        lam_q_all, bt_q_all = torch.cat(lam_q, dim=3), torch.cat(bt_q, dim=3)  # (b, t, h, R_q, ·)
        ell_x = btil_x = None
        if constant:  # the constant column's Euler term, one rank-one per (x, t) on column 0
            s0 = float(in64[d, 0])
            euler = fn(inputs, f).to(f64) - tangent(inputs, f, f).to(f64)  # g(f) − J f at the queries
            extra = (s0 / n_pos) * (euler @ c_f.T + out64[:, d])  # (b, t, m)
            unit = torch.zeros(k, dtype=f64, device=x.device)
            unit[0] = 1.0
            ell_x = extra[:, :, None, None].expand(b, t, n_pos, 1, m)
            btil_x = unit.expand(b, t, n_pos, 1, k)
        if ell_u:  # the normalisation's rank-one terms join the extra ones
            lu, bu = torch.stack(ell_u, dim=3), torch.stack(bt_u, dim=3)  # (b, t, s, R_u, ·)
            if ell_x is None:
                ell_x, btil_x = lu, bu
            else:
                ell_x, btil_x = torch.cat([ell_x, lu], dim=3), torch.cat([btil_x, bu], dim=3)
        lmaps = ow.transpose(1, 2)  # O_h = C_out W_Oʰᵀ: (h, m, e)
        diag = torch.zeros(t, n_pos, dtype=torch.bool, device=x.device)
        diag[torch.arange(t), torch.tensor(qpos)] = True
        total = torch.zeros(k, k, dtype=f64, device=x.device)
        # the largest block is one (m × k) fixed-part Jacobian per triple in structured_gram's chunks;
        # these per-example rank-one factors are ~(P + 2)·H·k numbers per (query, position)
        chunk = max(1, 16 * max_elements // max(1, t * n_pos * heads * (n_pos + 2) * k))
        for b0 in range(0, b, chunk):
            sl = slice(b0, b0 + chunk)
            extras = (None, None) if ell_x is None else (ell_x[sl], btil_x[sl])
            off = ~diag
            if bool(off.any()):
                total += structured_gram(
                    sigma[sl][:, off].flatten(0, 1),
                    fixed,
                    lmaps,
                    lam_k_all[sl][:, off].flatten(0, 1),
                    bt_k_all[sl][:, off].flatten(0, 1),
                    *(None if z is None else z[:, off].flatten(0, 1) for z in extras),
                )
            ti, si = diag.nonzero(as_tuple=True)
            total += structured_gram(
                sigma[sl][:, ti, si].flatten(0, 1),
                fixed,
                lmaps,
                torch.cat([lam_q_all[sl], lam_k_all[sl][:, ti, si]], dim=3).flatten(0, 1),
                torch.cat([bt_q_all[sl], bt_k_all[sl][:, ti, si]], dim=3).flatten(0, 1),
                *(None if z is None else z[:, ti, si].flatten(0, 1) for z in extras),
            )
        return total

    return gram
