"""Section shortcuts: f^{l+1} computed from f^l without re-running the model from its input.

A *section* maps the activations of one node layer to the next (:func:`degeneracy.capture.section`
does it for any model by substituting f^l through forward hooks and re-running the model). For
TransformerLens models :func:`transformer_lens_sections` recognises the standard sections between
residual-stream hook points (attention, MLP, identity, unembedding) and computes them from f^l alone,
at the target positions only. A :class:`SectionShortcut` may also carry closed-form Jacobian-vector
products: a ``tangent`` for a general direction and a ``kernel`` for the rank-one tangents that bases
and edges need, with the basis maps folded into the weights once (no automatic differentiation).

Bases (:func:`degeneracy.interaction_basis`) and edges (:func:`degeneracy.interaction_graph`) take
``sections="auto"`` (these shortcuts for a ``HookedTransformer``, none otherwise), ``None`` (always
the hook-based section) or an explicit mapping ``{(layer_in, layer_out): fn}``. Every shortcut is
checked against the hook-based section on the first batch, at the data and off it
(:func:`check_shortcut`): an explicit shortcut that differs raises, an automatic one is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import jvp

from degeneracy.capture import NodeLayer, section
from degeneracy.linalg import IntegrationRule

__all__ = [
    "SectionFn",
    "SectionShortcut",
    "Sections",
    "transformer_lens_sections",
    "resolve_sections",
    "shortcut_gram",
    "check_shortcut",
    "extended",
    "slice_inputs",
]

Pair = tuple[str, str]


SectionFn = Callable[[Any, Tensor], Tensor]


def extended(short: SectionFn, inputs: Any, constant: bool) -> Callable[[Tensor], Tensor]:
    """``short(inputs, ·)`` as a function of (augmented, with ``constant``) activations, exactly like
    :func:`degeneracy.capture.section` (the homogeneous extension F([f; c]) = [c̄ g(f/c̄); c̄])."""
    if not constant:
        return lambda x: short(inputs, x)

    def fn(x: Tensor) -> Tensor:
        c = x[..., -1:].mean(dim=1, keepdim=True)
        out = short(inputs, x[..., :-1] / c)
        return torch.cat([out * c, c.expand(out.shape[0], out.shape[1], 1)], dim=-1)

    return fn


def check_shortcut(
    ctx: Any, inputs: Any, acts: Mapping[str, Tensor], pair: Pair, short: SectionFn, constant: bool
) -> None:
    """A section shortcut must agree with the hook-based section at the data and off it."""
    src, dst = pair
    few = slice(0, 64)  # a slice of the first batch is enough to tell two functions apart
    inputs = slice_inputs(inputs, few)
    x = acts[src][few]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    scale = x.abs().amax(dim=(0, 1), keepdim=True)
    if constant:
        noise[..., -1] = 0.0
    for probe in (x, x + 0.1 * scale * noise):
        want = section(ctx.model, inputs, ctx.layers, src, dst, constant=constant, widths=ctx.widths)(probe)
        got = extended(short, inputs, constant)(probe)
        if got.shape != want.shape:
            raise ValueError(
                f"the section shortcut for {src} -> {dst} returns shape {tuple(got.shape)}, "
                f"the model gives {tuple(want.shape)}"
            )
        _agree(got, want, f"the section shortcut for {src} -> {dst}")
    tangent = getattr(short, "tangent", None)
    if tangent is not None:  # the closed-form Jacobians assume the model is what its weights say
        f = x[..., :-1] if constant else x
        r = noise[..., : f.shape[-1]]
        raw = section(ctx.model, inputs, ctx.layers, src, dst, constant=False, widths=ctx.widths)
        want = jvp(raw, (f,), (r,))[1]
        _agree(tangent(inputs, f, r).to(want.dtype), want, f"the closed-form Jacobian for {src} -> {dst}")


def _agree(got: Tensor, want: Tensor, what: str) -> None:
    tol = 1e-9 if want.dtype == torch.float64 else 1e-4
    dev = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
    if dev > tol:
        raise ValueError(f"{what} differs from the model by {dev:.2e} (relative); drop it from `sections`")


Kernel = Callable[[Any, Tensor, Tensor, Tensor, Tensor], Tensor]
GramFn = Callable[[Any, Tensor, Tensor, Tensor, IntegrationRule, bool, int], "Tensor | None"]


@dataclass(frozen=True)
class SectionShortcut:
    """A section computed from the source activations alone, optionally with an analytic kernel.

    ``fn(inputs, f)`` returns f^{dst} from raw f^{src}; ``tangent(inputs, f, δf)``, when given, its JVP
    in closed form. ``kernel(inputs, f, scale, directions, C_out)``,
    when given, returns the attributions C_out J(f) [directions_j · scale_{s,j}] for every input
    direction j at once, shape (batch, P_out, m, k), in float64, by closed-form Jacobian-vector products
    that exploit the rank-one tangents (no automatic differentiation); :func:`interaction_graph` uses
    it when ``jacobian_mode="auto"``. ``gram(inputs, x, R₊, C_out, rule, constant, max_elements)``,
    when given, returns Σ_x Σ_(t,i) Σ_s Jᵀ J of the basis Jacobian J = C_out ∂F/∂x R₊ (the un-normalised M of
    METHOD §2.2) in closed form, or ``None`` where it does not apply (see :func:`shortcut_gram`).
    """

    fn: Callable[[Any, Tensor], Tensor]
    kernel: Kernel | None = None
    tangent: Callable[[Any, Tensor, Tensor], Tensor] | None = None
    gram: GramFn | None = None

    def __call__(self, inputs: Any, x: Tensor) -> Tensor:
        return self.fn(inputs, x)

    def jvp(self, inputs: Any, f: Tensor, tangent: Tensor) -> Tensor:
        """J(f)·tangent (closed form when ``tangent`` is given, else ``torch.func.jvp``)."""
        if self.tangent is not None:
            return self.tangent(inputs, f, tangent)
        return jvp(lambda z: self.fn(inputs, z), (f,), (tangent.to(f.dtype),))[1]


def slice_inputs(inputs: Any, sl: slice) -> Any:
    if isinstance(inputs, Mapping):
        return {k: v[sl] for k, v in inputs.items()}
    return inputs[sl]


def transformer_lens_sections(model: nn.Module, layers: Sequence[Any]) -> dict[Pair, SectionFn]:
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
    """
    from degeneracy.capture import as_node_layers

    cfg = getattr(model, "cfg", None)
    blocks = getattr(model, "blocks", None)
    if cfg is None or blocks is None:
        raise ValueError("transformer_lens_sections needs a TransformerLens HookedTransformer")
    nodes = as_node_layers(model, layers)
    out: dict[Pair, SectionFn] = {}
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
    for a, b in zip(nodes[:-1], nodes[1:], strict=True):
        wa, wb = where(a), where(b)
        if wa is None or wb is None:
            continue
        (ia, ka), (ib, kb) = wa, wb
        pair = (a.name, b.name)
        plain = getattr(cfg, "normalization_type", None) is None  # no LayerNorm: closed-form kernels
        if ia == ib and (ka, kb) == ("pre", "mid") and a.positions is None and standard:
            direction = getattr(cfg, "attention_dir", "causal")
            attn_fn = _tl_attention(blocks[ia], b.positions, direction)
            attn_tangent = _attention_tangent(blocks[ia].attn, b.positions, direction) if plain else None
            out[pair] = SectionShortcut(
                attn_fn,
                _attention_kernel(blocks[ia].attn, b.positions, direction) if plain else None,
                attn_tangent,
                _attention_gram(blocks[ia].attn, b.positions, direction, attn_fn, attn_tangent)
                if plain
                else None,
            )
        elif ia == ib and (ka, kb) == ("mid", "post") and not getattr(cfg, "attn_only", False):
            blk = blocks[ia]
            relu = plain and getattr(cfg, "act_fn", None) == "relu" and hasattr(blk.mlp, "W_in")
            out[pair] = SectionShortcut(
                _tl_positionwise(lambda x, blk=blk: x + blk.mlp(blk.ln2(x)), a, b),
                _mlp_kernel(blk.mlp, a, b) if relu else None,
                _mlp_tangent(blk.mlp, a, b) if relu else None,
                _gated_gram(None, blk.mlp.b_out, blk.mlp, a, b) if relu else None,
            )
        elif ib == ia + 1 and (ka, kb) == ("post", "pre") and ib < n_blocks:
            out[pair] = SectionShortcut(
                _tl_positionwise(lambda x: x, a, b),
                _affine_kernel(None, a, b),
                _affine_tangent(None, a, b),
                _gated_gram(None, None, None, a, b),
            )
        elif ia == n_blocks - 1 and ka == "post" and kb == "output":
            ln_final = getattr(model, "ln_final", None)
            ln_final = nn.Identity() if ln_final is None else ln_final
            unembed = model.unembed
            out[pair] = SectionShortcut(
                _tl_positionwise(lambda x, ln=ln_final, un=unembed: un(ln(x)), a, b),
                _affine_kernel(unembed.W_U, a, b) if plain else None,
                _affine_tangent(unembed.W_U, a, b) if plain else None,
                _gated_gram(unembed.W_U, unembed.b_U, None, a, b) if plain else None,
            )
    return out


def _select_positions(src: NodeLayer, dst: NodeLayer, n: int) -> list[int]:
    have, want = _positions(src.positions, n), _positions(dst.positions, n)
    return [have.index(p) for p in want]


def _affine_kernel(weight: Tensor | None, src: NodeLayer, dst: NodeLayer) -> Kernel:
    """y = f W + b at each target position: A_{t,i,j} = T_ij f̂_{t,j}, T = C_out Wᵀ directions."""

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        idx = _select_positions(src, dst, _sequence_length(inputs))
        w = dirs if weight is None else weight.detach().to(torch.float64).T @ dirs  # (d_out, k)
        t = c_out @ w  # (m, k)
        return t[None, None] * scale[:, idx, None, :]

    return kernel


def _mlp_kernel(mlp: nn.Module, src: NodeLayer, dst: NodeLayer) -> Kernel:
    """y = f + relu(f W_in + b_in) W_out + b_out: A = (K + P diag(1[pre > 0]) Q) ⊙ f̂ per position,
    with K = C_out·directions, P = C_out W_outᵀ and Q = W_inᵀ·directions folded once."""

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        idx = _select_positions(src, dst, _sequence_length(inputs))
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


def _gated_gram(
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
    """

    def gram(
        inputs: Any,
        x: Tensor,
        in_map: Tensor,
        out_map: Tensor,
        rule: IntegrationRule,
        constant: bool,
        max_elements: int,
    ) -> Tensor | None:
        if constant and x.shape[1] != 1:
            return None
        f64 = torch.float64
        xt = x[:, _select_positions(src, dst, _sequence_length(inputs))].to(f64)
        d = xt.shape[-1] - int(constant)
        lin = torch.eye(d, dtype=f64, device=x.device) if weight is None else weight.detach().to(f64)
        d_out = lin.shape[1]
        jac = lin.T  # (d_out[+1]) × (d[+1]) linear part in column convention
        if constant:
            jac = torch.zeros(d_out + 1, d + 1, dtype=f64, device=x.device)
            jac[:d_out, :d] = lin.T
            if bias is not None:
                jac[:d_out, d] = bias.detach().to(f64)
            jac[d_out, d] = 1.0
        in64, out64 = in_map.to(device=x.device, dtype=f64), out_map.to(device=x.device, dtype=f64)
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


def shortcut_gram(
    short: SectionFn,
    inputs: Any,
    x: Tensor,
    in_map: Tensor,
    out_map: Tensor,
    rule: IntegrationRule,
    constant: bool,
    max_elements: int,
) -> Tensor | None:
    """Σ_x Σ_s Σ_(t,i) J_{(t,i),(s,·)}ᵀ J_{(t,i),(s,·)} (k × k, float64) from a shortcut's closed forms.

    J = C_out ∂F/∂x_s R₊ is the basis Jacobian of the (extended, with ``constant``) section at input
    position s, integrated over ``rule``. Uses ``short.gram`` when it applies, else the kernel with one
    block of directions per input position (the Jacobian of every position in one call); with the
    constant coordinate the column of R₊'s constant direction r₀ = [m₀; s₀] comes from Euler's identity,
    J_s r₀ = C_out [s₀/P (g(f) − J f) + J (m₀ at s); s₀/P]. ``None`` if neither applies (no kernel, or
    a constant direction mixed into the other columns).
    """
    gram = getattr(short, "gram", None)
    if gram is not None:
        got = gram(inputs, x, in_map, out_map, rule, constant, max_elements)
        if got is not None:
            return got
    if getattr(short, "kernel", None) is None:
        return None
    assert isinstance(short, SectionShortcut) and short.kernel is not None
    f64 = torch.float64
    in64, out64 = in_map.to(device=x.device, dtype=f64), out_map.to(device=x.device, dtype=f64)
    d = x.shape[-1] - int(constant)
    d_out = out64.shape[1] - int(constant)
    start = int(constant)
    if constant and in64.shape[1] > 1 and float(in64[d, 1:].abs().max()) > 1e-12 * float(in64.abs().max()):
        return None
    batch, n_pos = x.shape[0], x.shape[1]
    dirs = in64[:d, start:]
    kk = dirs.shape[1]
    k = in64.shape[1]
    blocks = dirs.repeat(1, n_pos)  # direction j of position s is column s·kk + j
    one_hot = torch.eye(n_pos, dtype=f64, device=x.device).repeat_interleave(kk, dim=1)  # (P, P·kk)
    c_feat = out64[:, :d_out]
    # about one (m × P·k) block per example lives at a time; 8·max_elements numbers keep the GEMMs
    # large (as for the edge kernels, benchmarks/edges_modadd.md)
    chunk = max(1, 8 * max_elements // max(1, out64.shape[0] * n_pos * k))
    total = torch.zeros(k, k, dtype=f64, device=x.device)
    for b0 in range(0, batch, chunk):
        sl = slice(b0, b0 + chunk)
        sub, f = slice_inputs(inputs, sl), x[sl, :, :d]
        scale = one_hot.expand(f.shape[0], n_pos, n_pos * kk)
        points = [(1.0, 1.0)] if constant else list(zip(rule.points, rule.weights, strict=True))
        jac = None
        for alpha, w in points:
            term = w * short.kernel(sub, alpha * f, scale, blocks, c_feat)  # (b, P_out, m, P·kk)
            jac = term if jac is None else jac + term
        assert jac is not None
        jac = jac.reshape(*jac.shape[:3], n_pos, kk)
        if constant:
            m0, s0 = in64[:d, 0], float(in64[d, 0])
            euler = short(sub, f).to(f64) - short.jvp(sub, f, f).to(f64)  # g(f) − J f
            col = []
            for s in range(n_pos):
                tangent = torch.zeros_like(f)
                tangent[:, s] = m0.to(f.dtype)
                moved = short.jvp(sub, f, tangent).to(f64) + (s0 / n_pos) * euler
                col.append(moved @ c_feat.T + (s0 / n_pos) * out64[:, d_out])  # (b, P_out, m)
            jac = torch.cat([torch.stack(col, dim=3)[..., None], jac], dim=-1)
        flat = jac.reshape(-1, k)
        total += flat.T @ flat
    return total


def _affine_tangent(weight: Tensor | None, src: NodeLayer, dst: NodeLayer) -> Callable[..., Tensor]:
    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        rt = r[:, _select_positions(src, dst, _sequence_length(inputs))].to(torch.float64)
        return rt if weight is None else rt @ weight.detach().to(torch.float64)

    return tangent


def _mlp_tangent(mlp: nn.Module, src: NodeLayer, dst: NodeLayer) -> Callable[..., Tensor]:
    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        idx = _select_positions(src, dst, _sequence_length(inputs))
        w_in = mlp.W_in.detach().to(torch.float64)
        ft, rt = f[:, idx].to(torch.float64), r[:, idx].to(torch.float64)
        gate = (ft @ w_in + mlp.b_in.detach().to(torch.float64)) > 0
        return rt + ((rt @ w_in) * gate) @ mlp.W_out.detach().to(torch.float64)

    return tangent


def _attention_parts(attn: nn.Module, f: Tensor, qpos: list[int], direction: str) -> dict[str, Tensor]:
    """Weights (float64), queries at ``qpos``, keys, values and the attention pattern p (b, t, h, s)."""
    n = f.shape[1]
    x = f.to(torch.float64)
    w = {name: getattr(attn, name).detach().to(torch.float64) for name in ("W_Q", "W_K", "W_V", "W_O")}
    bias = {name: getattr(attn, name).detach().to(torch.float64) for name in ("b_Q", "b_K", "b_V")}
    q = torch.einsum("btd,hde->bthe", x[:, qpos], w["W_Q"]) + bias["b_Q"]
    k = torch.einsum("bsd,hde->bshe", x, w["W_K"]) + bias["b_K"]
    v = torch.einsum("bsd,hde->bshe", x, w["W_V"]) + bias["b_V"]
    scores = torch.einsum("bthe,bshe->bths", q, k) / float(attn.attn_scale)
    if direction == "causal":
        allowed = torch.arange(n, device=x.device)[None, :] <= torch.tensor(qpos, device=x.device)[:, None]
        scores = scores.masked_fill(~allowed[None, :, None, :], float("-inf"))
    return {**w, "q": q, "k": k, "v": v, "p": scores.softmax(dim=-1)}


def _attention_tangent(attn: nn.Module, positions: Any, direction: str) -> Callable[..., Tensor]:
    """J(f)·δf of x_t + attn(x)_t for a general tangent δf (b, P, d), in closed form."""

    def tangent(inputs: Any, f: Tensor, r: Tensor) -> Tensor:
        qpos = _positions(positions, f.shape[1])
        a = _attention_parts(attn, f, qpos, direction)
        r = r.to(torch.float64)
        dq = torch.einsum("btd,hde->bthe", r[:, qpos], a["W_Q"])
        dk = torch.einsum("bsd,hde->bshe", r, a["W_K"])
        dv = torch.einsum("bsd,hde->bshe", r, a["W_V"])
        p = a["p"]
        ds = (
            torch.einsum("bthe,bshe->bths", dq, a["k"]) + torch.einsum("bthe,bshe->bths", a["q"], dk)
        ) / float(attn.attn_scale)
        dp = p * (ds - (p * ds).sum(-1, keepdim=True))
        dz = torch.einsum("bths,bshe->bthe", dp, a["v"]) + torch.einsum("bths,bshe->bthe", p, dv)
        return r[:, qpos] + torch.einsum("bthe,hed->btd", dz, a["W_O"])

    return tangent


def _attention_kernel(attn: nn.Module, positions: Any, direction: str) -> Kernel:
    """Closed-form JVPs of x_t + attn(x)_t along the rank-one tangents δx_s = f̂_{s,j} c_j.

    With aQ/aK/aV = directionsᵀ W_Q/K/V folded once, δq_t = f̂_{t,j} aQ_j, δk_s = f̂_{s,j} aK_j,
    δv_s = f̂_{s,j} aV_j; δscore, the softmax JVP δp = p (δscore − Σ p δscore) and
    δz = Σ_s δp v + p δv follow per feature j at the cost of a few small contractions, and the only
    large product is δz·(W_O C_outᵀ).
    """

    def kernel(inputs: Any, f: Tensor, scale: Tensor, dirs: Tensor, c_out: Tensor) -> Tensor:
        qpos = _positions(positions, f.shape[1])
        w = _attention_parts(attn, f, qpos, direction)
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


def _attention_gram(
    attn: nn.Module,
    positions: Any,
    direction: str,
    fn: SectionFn,
    tangent: Callable[..., Tensor] | None,
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
    """

    def gram(
        inputs: Any,
        x: Tensor,
        in_map: Tensor,
        out_map: Tensor,
        rule: IntegrationRule,
        constant: bool,
        max_elements: int,
    ) -> Tensor | None:
        f64 = torch.float64
        n_pos = x.shape[1]
        qpos = _positions(positions, n_pos)
        d = x.shape[-1] - int(constant)
        in64, out64 = in_map.to(device=x.device, dtype=f64), out_map.to(device=x.device, dtype=f64)
        k = in64.shape[1]
        if constant and k > 1 and float(in64[d, 1:].abs().max()) > 1e-12 * float(in64.abs().max()):
            return None
        heads = attn.W_Q.shape[0]
        if heads * (n_pos + 1) > k or (constant and tangent is None):
            return None
        dirs, c_f = in64[:d], out64[:, :d]
        w = {name: getattr(attn, name).detach().to(f64) for name in ("W_Q", "W_K", "W_V", "W_O")}
        a_q = torch.einsum("dj,hde->hje", dirs, w["W_Q"])
        a_k = torch.einsum("dj,hde->hje", dirs, w["W_K"])
        a_v = torch.einsum("dj,hde->hje", dirs, w["W_V"])
        ow = torch.einsum("hed,md->hem", w["W_O"], c_f)  # (h, e, m)
        fixed = torch.cat([(c_f @ dirs)[None], torch.einsum("hje,hem->hmj", a_v, ow)])  # (1 + H, m, k)
        scale_attn = float(attn.attn_scale)
        points = [(1.0, 1.0)] if constant else list(zip(rule.points, rule.weights, strict=True))
        f = x[..., :d].to(f64)
        b, t, m = f.shape[0], len(qpos), c_f.shape[0]
        sigma = torch.zeros(b, t, n_pos, 1 + heads, dtype=f64, device=x.device)
        for i, q in enumerate(qpos):
            sigma[:, i, q, 0] = 1.0
        lam_q, lam_k, bt_q, bt_k = [], [], [], []
        for alpha, weight in points:
            part = _attention_parts(attn, alpha * f, qpos, direction)
            p, q_, k_, v_ = part["p"], part["q"], part["k"], part["v"]  # p (b, t, h, s); q, k, v (b, ·, h, e)
            sigma[..., 1:] += weight * p.permute(0, 1, 3, 2)
            vbar = torch.einsum("bths,bshe->bthe", p, v_)
            kbar = torch.einsum("bths,bshe->bthe", p, k_)
            cq = p[..., None] * (k_.permute(0, 2, 1, 3)[:, None] - kbar[:, :, :, None])  # (b, t, h, s', e)
            lam_q.append(weight * v_.permute(0, 2, 1, 3)[:, None].expand(b, t, -1, -1, -1))  # (b,t,h,s',e)
            bt_q.append(torch.einsum("bthse,hje->bthsj", cq, a_q) / scale_attn)
            key = p.permute(0, 1, 3, 2)[..., None] * (v_[:, None] - vbar[:, :, None])  # (b, t, s, h, e)
            lam_k.append(weight * key[:, :, :, :, None])
            bt_k.append((torch.einsum("bthe,hje->bthj", q_, a_k) / scale_attn)[:, :, None, :, None])
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


def _positions(spec: Any, n: int) -> list[int]:
    if spec is None:
        return list(range(n))
    idx = [spec] if isinstance(spec, int) else list(spec)
    return [i % n for i in idx]


def _tl_positionwise(fn: Callable[[Tensor], Tensor], src: NodeLayer, dst: NodeLayer) -> SectionFn:
    """A position-wise section evaluated only at the target's positions (a subset of the source's)."""

    def short(inputs: Any, x: Tensor) -> Tensor:
        n = _sequence_length(inputs)
        have = _positions(src.positions, n)
        want = _positions(dst.positions, n)
        missing = [p for p in want if p not in have]
        if missing:
            raise ValueError(f"{dst.name} reads positions {missing} that {src.name} does not hold")
        idx = [have.index(p) for p in want]
        sel = x if idx == list(range(len(have))) else x[:, idx]
        return fn(sel)

    return short


def _sequence_length(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        inputs = inputs.get("input", next(iter(inputs.values())))
    return int(inputs.shape[1])


def _tl_attention(block: nn.Module, positions: Any, direction: str) -> SectionFn:
    """x ↦ (x + attn(ln1(x)))[:, positions] with queries at ``positions`` only."""
    attn = block.attn
    ln1 = getattr(block, "ln1", None)
    ln1 = nn.Identity() if ln1 is None else ln1

    def short(inputs: Any, x: Tensor) -> Tensor:
        n = x.shape[1]
        qpos = _positions(positions, n)
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


Sections = Mapping[Pair, SectionFn] | Literal["auto"] | None


def is_hooked_transformer(model: nn.Module) -> bool:
    """A TransformerLens ``HookedTransformer`` (the only architecture the shortcuts know)."""
    named = any(cls.__name__ == "HookedTransformer" for cls in type(model).__mro__)
    return named and hasattr(model, "blocks")


def resolve_sections(
    ctx: Any, inputs: Any, acts: Mapping[str, Tensor], sections: Sections, constant: bool
) -> tuple[dict[Pair, SectionFn], dict[str, str]]:
    """The checked shortcuts to use, and for each adjacent pair which kind of section it gets.

    ``ctx`` carries ``model``, ``layers`` and ``widths`` (the build context), ``inputs`` and ``acts``
    the first batch and its activations at every node layer. Explicit shortcuts that differ from the
    model raise ``ValueError``; automatic ones (``"auto"``) are dropped instead.
    """
    names = [layer.name for layer in ctx.layers]
    pairs = list(zip(names[:-1], names[1:], strict=True))
    auto = isinstance(sections, str)
    if auto and sections != "auto":
        raise ValueError(f"sections must be 'auto', None or a mapping, got {sections!r}")
    if sections is None:
        chosen: dict[Pair, SectionFn] = {}
    elif auto:
        chosen = transformer_lens_sections(ctx.model, ctx.layers) if is_hooked_transformer(ctx.model) else {}
    else:
        chosen = dict(sections)
        unknown = [pair for pair in chosen if pair not in pairs]
        if unknown:
            raise ValueError(f"sections given for {unknown}, which are not adjacent node layers {pairs}")
    used: dict[Pair, SectionFn] = {}
    for pair, short in chosen.items():
        try:
            check_shortcut(ctx, inputs, acts, pair, short, constant)
        except ValueError:
            if not auto:
                raise
            continue
        used[pair] = short
    kinds = {
        f"{a}->{b}": (
            "hooks"
            if (a, b) not in used
            else "closed form"
            if getattr(used[(a, b)], "kernel", None) is not None
            else "shortcut"
        )
        for a, b in pairs
    }
    return used, kinds
