"""Squared integrated-gradient attributions of one batch (METHOD §4): the numerics behind the edges.

:func:`squared_attributions` differentiates any section f^l ↦ f^{l+1} with ``torch.func`` (one VJP per
output row, or one JVP per input feature); :func:`kernel_attributions` uses a section shortcut's
closed-form kernel instead (:class:`degeneracy.sections.SectionShortcut`).

>>> from degeneracy.linalg import integration_rule
>>> x = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
>>> eye = torch.eye(2, dtype=torch.float64)
>>> total, sums = squared_attributions(lambda z: 3 * z, x, eye, eye, integration_rule("gradient", 1),
...                                    num_out_positions=1)
>>> total.tolist()  # A = 3 diag(f): A² on the diagonal
[[9.0, 0.0], [0.0, 36.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import vjp

from degeneracy.deprecation import renamed_arguments
from degeneracy.graph_result import Mode
from degeneracy.jacobian import choose_mode, forward_mode_unsupported, integrated_jvp, integrated_vjp
from degeneracy.linalg import IntegrationRule
from degeneracy.sections import SectionShortcut, slice_inputs

__all__ = ["attribution_mode", "squared_attributions", "kernel_attributions"]


def attribution_mode(mode: Mode, rows: int, features: int) -> Literal["vjp", "jvp"]:
    """``mode``, or for ``"auto"`` the cheaper path: one VJP per output row or one JVP per feature.

    >>> attribution_mode("auto", rows=10, features=3)
    'jvp'
    """
    if mode == "auto":
        return choose_mode(rows, features)
    if mode not in ("vjp", "jvp"):
        raise ValueError(f"jacobian_mode must be 'auto', 'vjp' or 'jvp', got {mode!r}")
    return mode


@renamed_arguments(out_positions="num_out_positions")
def squared_attributions(
    fn: Callable[[Tensor], Tensor],
    x: Float[Tensor, "batch pos_in d_in"],
    in_map: Float[Tensor, "d_in k"],
    out_map: Float[Tensor, "m d_out"],
    rule: IntegrationRule,
    *,
    in_features: Float[Tensor, "batch pos_in k"] | None = None,
    num_out_positions: int,
    signs: Float[Tensor, "batch sources pos_out"] | None = None,
    mode: Mode = "auto",
    max_elements: int = 2**21,
    in_mask: Tensor | None = None,
    out_mask: Tensor | None = None,
    per_source: bool = False,
) -> tuple[Float[Tensor, "*sources m k"], Float[Tensor, "batch rows m"]]:
    """Σ_x Σ_t A(x)_{t,i,j}² for one batch, and Σ_j A (for the completeness check); float64.

    Args:
        fn: the section f^l ↦ f^{l+1} (batched over examples), e.g. :func:`degeneracy.capture.section`.
        x: the activations f^l (augmented with the constant coordinate if the basis has one).
        in_map: C₊^l (d_in × d̂_l): the columns are the input feature directions.
        out_map: C^{l+1} (d̂_{l+1} × d_out).
        rule: integration rule (points α_a, weights w_a, baseline 0).
        in_features: f̂^l = x C^lᵀ (computed from ``in_map``'s pseudo-inverse if not given).
        num_out_positions: P_out, the number of positions of the output node layer.
        signs: ±1 sources r[b, r, t] (VJP path): rows become (r, i) and the sum over t is replaced by
            Σ_t r_t A_t; the result is then summed (not averaged) over sources.
        mode: ``"vjp"``, ``"jvp"`` or ``"auto"``; the JVP path is exact over positions and ignores
            ``signs``.
        max_elements: the largest number of entries a vmapped chunk may hold.
        in_mask, out_mask: valid (unpadded) input and output positions, (batch, pos_in) and
            (batch, pos_out) bools: padded positions get no attribution (``None``: all valid).
        per_source: with ``signs`` on the VJP path, S per source (R × m × k) instead of its sum.

    Returns:
        ``(S, Σ_j A)``: S[i, j] = Σ_b Σ_rows A² (m × k) and the row sums of A, shape
        (batch, P_out or R, m).

    >>> from degeneracy.linalg import integration_rule
    >>> x, eye = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    >>> total, sums = squared_attributions(lambda z: z.square(), x, eye, eye, integration_rule("gradient"),
    ...                                    num_out_positions=1)
    >>> total.tolist(), sums.tolist()  # A = 2 f² at the gradient rule
    ([[4.0, 0.0], [0.0, 64.0]], [[[2.0, 8.0]]])
    """
    batch, p_in, d_in = x.shape
    m, d_out = out_map.shape
    k = in_map.shape[1]
    if in_features is None:
        in_features = x.to(torch.float64) @ torch.linalg.pinv(in_map.to(torch.float64)).T
    feats = in_features.to(torch.float64)
    if in_mask is not None:  # a padded input position contributes nothing
        feats = feats * in_mask[..., None].to(feats)
    out_valid = None if out_mask is None else out_mask.to(device=x.device, dtype=torch.float64)
    if out_valid is not None and signs is not None:  # padded output positions draw no source
        signs = signs * out_valid[:, None, :].to(signs)
    n_out = num_out_positions if signs is None else signs.shape[1]
    if mode == "auto" and attribution_mode(mode, n_out * m, k) == "jvp":
        try:  # forward mode; reverse mode where an operation does not support it
            return squared_attributions(
                fn, x, in_map, out_map, rule, in_features=feats, num_out_positions=num_out_positions,
                signs=signs, mode="jvp", max_elements=max_elements, out_mask=out_mask,
            )  # fmt: skip
        except (NotImplementedError, RuntimeError) as error:
            if not forward_mode_unsupported(error):
                raise
            mode = "vjp"
    if attribution_mode(mode, n_out * m, k) == "jvp":
        # A_{·,·,j} as the JVP along T_j[b, s] = f̂_{b,s,j} C₊[:, j], for chunks of features j
        in_model = in_map.to(device=x.device, dtype=x.dtype)
        feats_model = feats.to(x.dtype)
        per = batch * max(p_in * d_in, num_out_positions * max(d_out, m))
        chunk = max(1, max_elements // max(1, per))
        total = torch.zeros(m, k, dtype=torch.float64, device=x.device)
        row_sums = torch.zeros(batch, num_out_positions, m, dtype=torch.float64, device=x.device)
        points = [(alpha * x, w) for alpha, w in zip(rule.points, rule.weights, strict=True)]
        for start in range(0, k, chunk):
            stop = min(k, start + chunk)
            # tangents (c, batch, p_in, d_in): feature j's own values along its direction
            tangents = (
                feats_model[None, :, :, start:stop].permute(3, 1, 2, 0)
                * in_model[:, start:stop].T[:, None, None, :]
            )
            a = integrated_jvp(fn, points, tangents, out_map)  # (c, batch, p_out, m)
            if out_valid is not None:
                a = a * out_valid[None, :, :, None]
            total[:, start:stop] += torch.einsum("cbtm,cbtm->mc", a, a)
            row_sums += a.sum(0)
        return total, row_sums
    # one VJP per output row (t, i), or per (source r, i) with cotangent r_t C[i] at every t
    n_rows = n_out * m
    out_model = out_map.to(device=x.device, dtype=x.dtype)
    pullbacks = [(vjp(fn, alpha * x)[1], w) for alpha, w in zip(rule.points, rule.weights, strict=True)]
    per_row = batch * max(p_in * max(d_in, k), num_out_positions * d_out)
    chunk = max(1, max_elements // max(1, per_row))
    total = torch.zeros(n_rows, k, dtype=torch.float64, device=x.device)
    sums = torch.zeros(batch, n_rows, dtype=torch.float64, device=x.device)
    sgn = None if signs is None else signs.to(device=x.device, dtype=x.dtype)
    for start in range(0, n_rows, chunk):
        rows = torch.arange(start, min(n_rows, start + chunk), device=x.device)
        t_idx, i_idx = rows // m, rows % m
        if sgn is None:  # cotangent of row (t, i): C[i] at output position t, for every example
            cot = torch.zeros(rows.numel(), num_out_positions, d_out, dtype=x.dtype, device=x.device)
            cot[torch.arange(rows.numel()), t_idx] = out_model[i_idx]
            cot = cot[:, None].expand(rows.numel(), batch, num_out_positions, d_out)
            if out_valid is not None:
                cot = cot * out_valid[None, :, :, None].to(cot)
        else:  # row (r, i): r_{b,t} C[i] at every output position t
            cot = sgn[:, t_idx].permute(1, 0, 2)[..., None] * out_model[i_idx][:, None, None, :]
        # A[row, b, j] = Σ_s J[row, b, s, j] f̂[b, s, j]
        a = (integrated_vjp(pullbacks, cot, in_map) * feats[None]).sum(2)
        total[rows] += torch.einsum("rbk,rbk->rk", a, a)
        sums[:, rows] = a.sum(-1).T
    total = total.reshape(n_out, m, k)
    return (total if per_source and signs is not None else total.sum(0)), sums.reshape(batch, n_out, m)


def kernel_attributions(
    short: SectionShortcut,
    inputs: Any,
    x: Tensor,
    feats: Tensor,
    in_map: Tensor,
    out_map: Tensor,
    rule: IntegrationRule,
    constant: bool,
    max_elements: int,
    target: Tensor,
    in_mask: Tensor | None = None,
    out_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Σ_x Σ_t A² and Σ_j A from a shortcut's analytic kernel, or ``None`` if it does not apply.

    With the constant coordinate, the columns j ≥ 1 come from the kernel at f (the Jacobian of the
    homogeneous extension is constant along α·f, so every rule agrees), and the constant column from
    Euler's identity Σ_j A_j = f̂^{l+1}(f) − C J r, r = f − C₊ C f the truncation residual (one extra
    JVP). This needs C₊'s constant row to vanish off column 0, as for every centred basis here.
    ``in_mask``, ``out_mask``: valid input and output positions of a padded batch, as for
    :func:`squared_attributions` (the kernel must not let padded positions reach valid outputs).

    >>> from degeneracy.linalg import integration_rule
    >>> from degeneracy.sections import SectionShortcut
    >>> kernel = lambda inputs, f, scale, dirs, c_out: (c_out @ dirs)[None, None] * scale[:, :, None, :]
    >>> short = SectionShortcut(lambda inputs, f: f, kernel=kernel)  # the identity
    >>> x, eye = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    >>> rule = integration_rule("gradient")
    >>> total, _ = kernel_attributions(short, x, x, x, eye, eye, rule, False, 2**10, x)
    >>> total.tolist()
    [[1.0, 0.0], [0.0, 4.0]]
    """
    assert short.kernel is not None
    d = x.shape[-1] - (1 if constant else 0)
    in64 = in_map.to(device=x.device, dtype=torch.float64)
    out64 = out_map.to(device=x.device, dtype=torch.float64)
    d_out = out64.shape[1] - (1 if constant else 0)
    if constant and in64.shape[1] > 1 and float(in64[d, 1:].abs().max()) > 1e-12 * float(in64.abs().max()):
        return None
    f = x[..., :d]
    start = 1 if constant else 0
    dirs, scale = in64[:d, start:], feats[..., start:]
    if in_mask is not None:  # a padded input position contributes nothing
        scale = scale * in_mask[..., None].to(scale)
    valid = None if out_mask is None else out_mask.to(device=x.device, dtype=torch.float64)[..., None]
    k_reg = dirs.shape[1]
    batch = x.shape[0]
    # The kernels hold about one (m × k) block per example: max_elements numbers (~170 examples of the
    # modular-addition model at the default) keep their GEMMs large without leaving the cache; chunks
    # 8× smaller made the reference edges 2.2 s instead of 1.4 s (benchmarks/edges_modadd.md).
    per = max(1, out64.shape[0] * max(k_reg, 1))
    chunk = max(1, max_elements // per)
    total = torch.zeros(out64.shape[0], in64.shape[1], dtype=torch.float64, device=x.device)
    complete = None
    if constant:  # Euler: Σ_j A_j = f̂^{l+1}(f) − C J r, with r = f − C₊ C f (constant coordinate 0)
        complete = target.to(torch.float64) @ out64.T
        r = (x.to(torch.float64) - feats @ in64.T)[..., :d]
        if float(r.abs().max()) > 1e-13 * float(x[..., :d].abs().max()):  # else J r is below round-off
            jr = short.jvp(inputs, f, r)
            complete = complete - jr.to(torch.float64) @ out64[:, :d_out].T
        if valid is not None:
            complete = complete * valid
    row_sums = []
    for b0 in range(0, batch, chunk):
        sl = slice(b0, b0 + chunk)
        sub = slice_inputs(inputs, sl)
        if constant:
            a = short.kernel(sub, f[sl], scale[sl], dirs, out64[:, :d_out])
        else:
            a = None
            for alpha, w in zip(rule.points, rule.weights, strict=True):
                term = w * short.kernel(sub, alpha * f[sl], scale[sl], dirs, out64[:, :d_out])
                a = term if a is None else a + term
        if valid is not None:  # padded output positions are left out
            a = a * valid[sl, :, :, None]
        sums = a.sum(-1)
        total[:, start:] += a.square_().sum(dim=(0, 1))
        if complete is not None:
            a0 = complete[sl] - sums
            total[:, 0] += torch.einsum("btm,btm->m", a0, a0)
            sums = complete[sl]
        row_sums.append(sums)
    return total, torch.cat(row_sums)
