"""Closed-form edge kernels of the TransformerLens sections (no automatic differentiation).

A kernel ``kernel(inputs, f, scale, directions, C_out)`` returns the attributions
C_out J(f) [directions_j · scale_{s,j}] for every input direction j at once, shape
(batch, P_out, m, k), in float64: Jacobian-vector products along the rank-one tangents
δx_s = scale_{s,j} directions_j with the basis maps folded into the weights once
(see :class:`degeneracy.sections.SectionShortcut`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from degeneracy.adapters.transformer_lens import parts
from degeneracy.capture import NodeLayer
from degeneracy.jacobian import Kernel

__all__ = ["affine_kernel", "mlp_kernel", "attention_kernel"]


def affine_kernel(weight: Tensor | None, src: NodeLayer, dst: NodeLayer) -> Kernel:
    """y = f W + b at each target position: A_{t,i,j} = T_ij f̂_{t,j}, T = C_out Wᵀ directions.

    >>> from degeneracy.capture import NodeLayer
    >>> layer = NodeLayer("h", ("h",))
    >>> kernel = affine_kernel(None, layer, layer)  # the identity (a residual connection)
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> kernel(torch.zeros(1, 1), torch.ones(1, 1, 2), torch.ones(1, 1, 2), eye, eye).shape
    torch.Size([1, 1, 2, 2])
    """

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        idx = parts.select_positions(src, dst, parts.sequence_length(inputs))
        w = dirs if weight is None else weight.detach().to(torch.float64).T @ dirs  # (d_out, k)
        t = c_out @ w  # (m, k)
        return t[None, None] * scale[:, idx, None, :]

    return kernel


def mlp_kernel(mlp: Any, src: NodeLayer, dst: NodeLayer) -> Kernel:
    """y = f + relu(f W_in + b_in) W_out + b_out: A = (K + P diag(1[pre > 0]) Q) ⊙ f̂ per position,
    with K = C_out·directions, P = C_out W_outᵀ and Q = W_inᵀ·directions folded once.

    >>> from types import SimpleNamespace
    >>> from degeneracy.capture import NodeLayer
    >>> mlp = SimpleNamespace(W_in=torch.zeros(2, 3), b_in=torch.zeros(3), W_out=torch.zeros(3, 2))
    >>> layer = NodeLayer("h", ("h",))
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> ones = torch.ones(1, 1, 2)
    >>> a = mlp_kernel(mlp, layer, layer)(torch.zeros(1, 1), ones, ones, eye, eye)
    >>> a[0, 0].tolist()  # dead ReLUs: only the residual, A = I
    [[1.0, 0.0], [0.0, 1.0]]
    """

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        idx = parts.select_positions(src, dst, parts.sequence_length(inputs))
        w_in = mlp.W_in.detach().to(torch.float64)
        w_out = mlp.W_out.detach().to(torch.float64)
        ft = f[:, idx].to(torch.float64)
        gate = ((ft @ w_in + mlp.b_in.detach().to(torch.float64)) > 0).to(torch.float64)  # (b, t, h)
        p_fold = c_out @ w_out.T  # (m, h)
        k = dirs.shape[1]
        # columns padded to a multiple of 4: odd widths make these GEMMs ~25 % slower here
        padded = torch.zeros(dirs.shape[0], -(-k // 4) * 4, dtype=dirs.dtype, device=dirs.device)
        padded[:, :k] = dirs
        q_fold = w_in.T @ padded  # (h, k')
        b, t, h = gate.shape
        gate = gate.reshape(b * t, h)
        out = torch.empty(b * t, p_fold.shape[0], padded.shape[1], dtype=torch.float64, device=f.device)
        for s in range(0, b * t, 16):  # small blocks keep the gated Q in cache: ~1.5x faster GEMMs
            torch.matmul(p_fold, gate[s : s + 16, :, None] * q_fold, out=out[s : s + 16])  # Σ_h P D Q
        out += (c_out @ padded)[None]
        return out[..., :k].reshape(b, t, p_fold.shape[0], k).mul_(scale[:, idx, None, :])

    return kernel


def attention_kernel(attn: Any, positions: Any, direction: str) -> Kernel:
    """Closed-form JVPs of x_t + attn(x)_t along the rank-one tangents δx_s = f̂_{s,j} c_j.

    With aQ/aK/aV = directionsᵀ W_Q/K/V folded once, δq_t = f̂_{t,j} aQ_j, δk_s = f̂_{s,j} aK_j,
    δv_s = f̂_{s,j} aV_j; δscore, the softmax JVP δp = p (δscore − Σ p δscore) and
    δz = Σ_s δp v + p δv follow per feature j at the cost of a few small contractions, and the only
    large product is δz·(W_O C_outᵀ).

    >>> from types import SimpleNamespace
    >>> w = torch.ones(1, 2, 1, dtype=torch.float64)  # one head, d_model 2, d_head 1
    >>> b = torch.zeros(1, 1)
    >>> attn = SimpleNamespace(W_Q=w, W_K=w, W_V=w, W_O=w.transpose(1, 2), b_Q=b, b_K=b, b_V=b,
    ...                        b_O=torch.zeros(2), attn_scale=1.0)
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> f = torch.zeros(1, 2, 2, dtype=torch.float64)
    >>> scale = torch.ones(1, 2, 2, dtype=torch.float64)
    >>> attention_kernel(attn, -1, "causal")(None, f, scale, eye, eye).shape
    torch.Size([1, 1, 2, 2])
    """

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        qpos = parts.positions_of(positions, f.shape[1])
        w = parts.attention_parts(attn, f, qpos, direction)
        q, k, v, p = w["q"], w["k"], w["v"], w["p"]
        scale_attn = float(attn.attn_scale)
        a_q = torch.einsum("dj,hde->jhe", dirs, w["W_Q"])
        a_k = torch.einsum("dj,hde->jhe", dirs, w["W_K"])
        a_v = torch.einsum("dj,hde->jhe", dirs, w["W_V"])
        s_t = scale[:, qpos]  # (b, t, j)
        qk = torch.einsum("jhe,bshe->bjhs", a_q, k)  # aQ_j · k_s
        kq = torch.einsum("bthe,jhe->btjh", q, a_k)  # q_t · aK_j
        dscore = (
            s_t[:, :, :, None, None] * qk[:, None]
            + scale.permute(0, 2, 1)[:, None, :, None, :] * kq[..., None]
        ) / scale_attn  # (b, t, j, h, s)
        pb = p[:, :, None]  # (b, t, 1, h, s)
        dp = pb * (dscore - (pb * dscore).sum(-1, keepdim=True))
        ow = torch.einsum("hed,md->hem", w["W_O"], c_out)  # W_O then C_out: (h, e, m)
        vw = torch.einsum("bshe,hem->bhsm", v, ow)  # values already in output features
        gw = torch.einsum("jhe,hem->jhm", a_v, ow)  # δv directions in output features
        b, t, j, h, n_s = dp.shape
        out = (dp.reshape(b, t * j, h * n_s) @ vw.reshape(b, h * n_s, -1)).reshape(b, t, j, -1)
        pf = torch.einsum("bths,bsj->btjh", p, scale)  # Σ_s p_{t,h,s} f̂_{s,j}
        for head in range(h):  # (b, t, j, m) layout throughout, in place
            out.addcmul_(pf[..., head, None], gw[:, head])
        out.addcmul_(s_t[..., None], (c_out @ dirs).T)
        return out.transpose(-1, -2)

    return kernel
