"""Basis Jacobians between node layers with ``torch.func`` (METHOD §2.2, §3, §4).

For a section F: x ↦ y between node layers (batched: examples are independent), input directions
R₊ (d_in × k) and output rows C (m × d_out), the *basis Jacobian* of example b is

    J_b[(t, i), (s, a)] = Σ_o C[i, o] · ∂F(x)_b[t, o] / ∂x_b[s, :] · R₊[:, a],

integrated over the rule's points α (J = Σ_α w_α J at α·x). :func:`jacobian_blocks` yields it in
blocks ``(rows, positions, J[b, rows, positions, a])``, computed either by vector-Jacobian products
(one per output row (t, i), vmapped) or Jacobian-vector products (one per input direction (s, a),
vmapped), whichever needs fewer, never by a Python loop over output dimensions. Memory is bounded by
``max_elements``: vmaps are chunked so no intermediate holds more than that many numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import jacfwd, jacrev, jvp, vjp, vmap

from degeneracy.deprecation import renamed_arguments
from degeneracy.linalg import IntegrationRule

__all__ = [
    "jacobian_blocks",
    "jacobian_gram",
    "choose_mode",
    "constant_jacobian",
    "gram_of_constant_jacobian",
    "integrated_vjp",
    "integrated_jvp",
    "SectionFn",
    "Kernel",
    "GramFn",
    "GramQuery",
    "gram_function",
    "forward_mode_unsupported",
]

Mode = Literal["auto", "vjp", "jvp"]
SectionFn = Callable[[Any, Tensor], Tensor]  # f^{l+1} = fn(inputs, f^l)
# kernel(inputs, f, scale, directions, C_out): C_out J(f) [directions_j · scale_{s,j}] for every j
Kernel = Callable[[Any, Tensor, Tensor, Tensor, Tensor], Tensor]
# gram(inputs, x, R₊, C_out, rule, constant, max_elements): Σ Jᵀ J, or None where it does not apply
GramFn = Callable[[Any, Tensor, Tensor, Tensor, IntegrationRule, bool, int], "Tensor | None"]
DEFAULT_MAX_ELEMENTS = 2**20  # larger chunks fall out of cache: slower and bigger (benchmarks/basis.md)


@dataclass(frozen=True)
class GramQuery:
    """The arguments of a closed-form Gram function (:data:`GramFn`): a batch's ``inputs``, the
    (augmented, with ``constant``) activations ``x``, the input directions R₊ (``in_map``), the output
    rows C_out (``out_map``), the integration ``rule`` and the chunking bound ``max_elements``.

    >>> from degeneracy.linalg import integration_rule
    >>> in_map = torch.eye(3, dtype=torch.float64).roll(1, dims=1)  # the constant row is [1, 0, 0]
    >>> q = GramQuery(None, torch.ones(1, 1, 3), in_map, in_map, integration_rule("gradient"), True, 2**10)
    >>> q.width, q.mixes_constant()
    (2, False)
    """

    inputs: Any
    x: Tensor
    in_map: Tensor
    out_map: Tensor
    rule: IntegrationRule
    constant: bool
    max_elements: int

    @property
    def width(self) -> int:
        """d, the width of the activations without the constant coordinate."""
        return self.x.shape[-1] - int(self.constant)

    def maps64(self) -> tuple[Tensor, Tensor]:
        """R₊ and C_out in float64 on the activations' device."""
        as64 = {"device": self.x.device, "dtype": torch.float64}
        return self.in_map.to(**as64), self.out_map.to(**as64)

    def mixes_constant(self) -> bool:
        """Whether R₊'s constant row is non-zero off column 0 (the closed forms then do not apply)."""
        in64 = self.maps64()[0]
        if not self.constant or in64.shape[1] <= 1:
            return False
        return float(in64[self.width, 1:].abs().max()) > 1e-12 * float(in64.abs().max())


def gram_function(body: Callable[[GramQuery], Tensor | None]) -> GramFn:
    """``body`` as a :data:`GramFn` ``gram(inputs, x, R₊, C_out, rule, constant, max_elements)``.

    >>> from degeneracy.linalg import integration_rule
    >>> gram = gram_function(lambda q: q.in_map.T @ q.in_map)
    >>> x, rule = torch.ones(1, 1, 2), integration_rule("gradient")
    >>> gram(None, x, 2 * torch.eye(2), torch.eye(2), rule, False, 2**10).tolist()
    [[4.0, 0.0], [0.0, 4.0]]
    """

    def gram(*args: Any) -> Tensor | None:
        return body(GramQuery(*args))

    gram.__doc__ = body.__doc__
    return gram


def forward_mode_unsupported(error: BaseException) -> bool:
    """Whether ``error`` says that forward-mode autodiff is not implemented for an operation (e.g. the
    fused scaled-dot-product attention of Hugging Face models); ``"auto"`` modes then use reverse mode.

    >>> forward_mode_unsupported(NotImplementedError("Trying to use forward AD with _scaled_dot_product"))
    True
    """
    text = str(error)
    return isinstance(error, NotImplementedError | RuntimeError) and (
        "forward AD" in text or "forward-mode" in text or "forward mode" in text
    )


def choose_mode(n_rows: int, n_directions: int) -> Literal["vjp", "jvp"]:
    """VJPs cost one backward pass per output row, JVPs one forward per input direction.

    >>> choose_mode(n_rows=2, n_directions=10)
    'vjp'
    """
    return "vjp" if n_rows <= n_directions else "jvp"


def integrated_vjp(
    pullbacks: Sequence[tuple[Callable[[Tensor], tuple[Tensor, ...]], float]],
    cotangents: Tensor,
    in_map: Float[Tensor, "d_in k"],
) -> Tensor:
    """Σ_α w_α vjp_α(c) R₊ for a stack of cotangents c (vmapped), in float64.

    ``pullbacks`` pairs each rule point's ``torch.func.vjp`` pull-back with its weight w_α;
    ``cotangents`` is (c, *output shape); the result is (c, *input shape but the last axis, k).

    >>> pull = vjp(lambda z: 3 * z, torch.ones(1, 2, dtype=torch.float64))[1]
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> integrated_vjp([(pull, 0.5), (pull, 0.5)], eye[:, None], eye)[:, 0].tolist()
    [[3.0, 0.0], [0.0, 3.0]]
    """
    in64 = in_map.to(device=cotangents.device, dtype=torch.float64)
    total = None
    for pull, w in pullbacks:
        (g,) = vmap(pull)(cotangents)
        g = w * (g.to(torch.float64) @ in64)
        total = g if total is None else total + g
    assert total is not None
    return total


def integrated_jvp(
    fn: Callable[[Tensor], Tensor],
    points: Sequence[tuple[Tensor, float]],
    tangents: Tensor,
    out_map: Float[Tensor, "m d_out"],
) -> Tensor:
    """Σ_α w_α J(α x) t C_outᵀ for a stack of tangents t (vmapped), in float64.

    ``points`` pairs each rule point α x with its weight w_α; ``tangents`` is (c, *input shape); the
    result is (c, *output shape but the last axis, m).

    >>> x, eye = torch.ones(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    >>> integrated_jvp(lambda z: z.square(), [(x, 1.0)], eye[:, None], eye)[:, 0].tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    """
    out64 = out_map.to(device=tangents.device, dtype=torch.float64)
    total = None
    for xa, w in points:
        _, y = vmap(lambda t, xa=xa: jvp(fn, (xa,), (t,)))(tangents)
        y = w * (y.to(torch.float64) @ out64.T)
        total = y if total is None else total + y
    assert total is not None
    return total


@renamed_arguments(out_positions="num_out_positions")
def jacobian_blocks(
    fn: Callable[[Tensor], Tensor],
    x: Float[Tensor, "batch pos_in d_in"],
    in_map: Float[Tensor, "d_in k"],
    out_map: Float[Tensor, "m d_out"],
    rule: IntegrationRule,
    *,
    num_out_positions: int,
    mode: Mode = "auto",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Iterator[tuple[slice, slice, Float[Tensor, "batch rows pos k"]]]:
    """Yield ``(row_slice, position_slice, J)`` blocks of the integrated basis Jacobian (float64).

    Rows index (t, i) flattened as t·m + i over ``num_out_positions`` output positions; positions index
    the input positions s; the last axis indexes the input directions a (columns of ``in_map``).

    >>> from degeneracy.linalg import integration_rule
    >>> x, eye = torch.ones(1, 1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    >>> rule = integration_rule("gradient")
    >>> blocks = list(jacobian_blocks(lambda z: 3 * z, x, eye, eye, rule, num_out_positions=1))
    >>> blocks[0][2][0, :, 0].tolist()  # J[b, rows, position 0, directions] = 3 I
    [[3.0, 0.0], [0.0, 3.0]]
    """
    batch, p_in, d_in = x.shape
    m, d_out = out_map.shape
    k = in_map.shape[1]
    n_rows, n_dirs = num_out_positions * m, p_in * k
    if mode == "auto":
        mode = choose_mode(n_rows, n_dirs)
        if mode == "jvp":  # forward mode; reverse mode where an operation does not support it
            blocks = jacobian_blocks(fn, x, in_map, out_map, rule, num_out_positions=num_out_positions,
                                     mode="jvp", max_elements=max_elements)  # fmt: skip
            try:
                first = next(blocks)
            except (NotImplementedError, RuntimeError) as error:
                if not forward_mode_unsupported(error):
                    raise
                mode = "vjp"
            else:
                yield first
                yield from blocks
                return
    out_model = out_map.to(device=x.device, dtype=x.dtype)
    points = [(alpha * x, w) for alpha, w in zip(rule.points, rule.weights, strict=True)]
    if mode == "vjp":
        pullbacks = [(vjp(fn, xa)[1], w) for xa, w in points]
        chunk = max(1, max_elements // max(1, batch * p_in * max(d_in, k)))
        # cotangent for row (t, i): C[i] placed at output position t, for every example
        eye_t = torch.eye(num_out_positions, dtype=x.dtype, device=x.device)
        rows = (eye_t[:, None, :, None] * out_model[None, :, None, :]).reshape(
            n_rows, num_out_positions, d_out
        )
        for start in range(0, n_rows, chunk):
            block = rows[start : start + chunk]
            cot = block[:, None].expand(block.shape[0], batch, num_out_positions, d_out)
            total = integrated_vjp(pullbacks, cot, in_map)  # (rows, batch, p_in, k)
            yield slice(start, start + block.shape[0]), slice(0, p_in), total.permute(1, 0, 2, 3)
    elif mode == "jvp":
        in_model = in_map.to(device=x.device, dtype=x.dtype)
        chunk = max(1, max_elements // max(1, batch * num_out_positions * max(d_out, m)))
        for s in range(p_in):
            cols = []
            for start in range(0, k, chunk):
                dirs = in_model[:, start : start + chunk].T  # (c, d_in)
                tangents = torch.zeros(dirs.shape[0], batch, p_in, d_in, dtype=x.dtype, device=x.device)
                tangents[:, :, s, :] = dirs[:, None, :]
                total = integrated_jvp(fn, points, tangents, out_map)  # (c, batch, p_out, m)
                cols.append(total.reshape(total.shape[0], batch, n_rows))
            jac = torch.cat(cols, 0).permute(1, 2, 0)  # (batch, rows, k)
            yield slice(0, n_rows), slice(s, s + 1), jac[:, :, None, :]
    else:
        raise ValueError(f"mode must be 'auto', 'vjp' or 'jvp', got {mode!r}")


def jacobian_gram(
    fn: Callable[[Tensor], Tensor],
    x: Float[Tensor, "batch pos_in d_in"],
    in_map: Float[Tensor, "d_in k"],
    out_map: Float[Tensor, "m d_out"],
    rule: IntegrationRule,
    *,
    in_mask: Tensor | None = None,
    out_mask: Tensor | None = None,
    advance: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Float[Tensor, "k k"]:
    """Σ_b Σ_s Σ_(t,i) J_b[(t,i),(s,·)]ᵀ J_b[(t,i),(s,·)] (k × k, float64; not yet divided by n·P_in).

    This is the un-normalised M of METHOD §2.2 (products pair the same input position s), summed over
    the blocks of :func:`jacobian_blocks`, which takes the same arguments (``options``: its keywords
    ``num_out_positions``, ``mode`` and ``max_elements``). ``in_mask`` (batch, pos_in) and
    ``out_mask`` (batch, pos_out) leave out the padded input positions s and output positions t.
    ``advance(done, parts)`` is told after each block how much of the work is done (a progress bar,
    :meth:`degeneracy.run.ModelRun.within`).

    >>> from degeneracy.linalg import integration_rule
    >>> x, eye = torch.ones(2, 1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    >>> rule = integration_rule("gradient")
    >>> jacobian_gram(lambda z: 3 * z, x, eye, eye, rule, num_out_positions=1).tolist()
    [[18.0, 0.0], [0.0, 18.0]]
    """
    k, m = in_map.shape[1], out_map.shape[0]
    total = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    rows_valid = None if out_mask is None else out_mask.to(x.device, torch.float64).repeat_interleave(m, 1)
    in_valid = None if in_mask is None else in_mask.to(x.device, torch.float64)
    for rows, positions, jac in jacobian_blocks(fn, x, in_map, out_map, rule, **options):
        if rows_valid is not None:
            jac = jac * rows_valid[:, rows, None, None]
        if in_valid is not None:
            jac = jac * in_valid[:, None, positions, None]
        flat = jac.reshape(-1, k)
        total += flat.T @ flat
        if advance is not None:  # rows (reverse mode) or input positions (forward mode) done
            out_positions = options.get("num_out_positions", options.get("out_positions", 1))
            advance(rows.stop * positions.stop, out_positions * m * x.shape[1])
    return total


def constant_jacobian(
    fn: Callable[[Tensor], Tensor],
    x: Float[Tensor, "batch pos_in d_in"],
    fn_first: Callable[[Tensor], Tensor],
    *,
    mode: Mode = "auto",
    seed: int = 0,
) -> Float[Tensor, "pos_out d_out pos_in d_in"] | None:
    """The section's Jacobian if it is the same at every example of the batch and does not depend on
    the activations (an affine section, such as an unembedding), else ``None``.

    The probe costs two products: for a random direction v shared by all examples (or, in reverse
    mode, a random cotangent u), J v (uᵀ J) at x and at a random x + w must be the same at every
    example and at both points, to 1e-10 relative in float64 (1e-5 otherwise). A Jacobian that differs
    anywhere passes this test with probability zero. Only then is the Jacobian J₀ of ``fn_first`` (the
    same section for the batch's first example alone) computed, and every integration rule gives J₀
    too, so M or the edges follow from J₀ alone. ``mode``: ``"jvp"`` (forward), ``"vjp"`` (reverse)
    or ``"auto"`` (forward, reverse where forward mode is not supported).

    >>> x = torch.randn(4, 1, 2, dtype=torch.float64)
    >>> constant_jacobian(lambda z: 2 * z + 1, x, lambda z: 2 * z + 1).shape
    torch.Size([1, 2, 1, 2])
    >>> constant_jacobian(torch.tanh, x, torch.tanh, mode="vjp") is None
    True
    """
    gen = torch.Generator(device=x.device).manual_seed(seed)
    opts = {"generator": gen, "dtype": x.dtype, "device": x.device}
    scale = x.abs().amax(dim=(0, 1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    w = 0.1 * scale * torch.randn(x.shape, **opts)  # a step of 10 % of each coordinate's range
    reverse = mode == "vjp"
    if not reverse:
        v = torch.randn(x.shape[1:], **opts).expand(x.shape)
        try:
            probes = [jvp(fn, (point,), (v,))[1] for point in (x, x + w)]
        except (NotImplementedError, RuntimeError) as error:
            if mode != "auto" or not forward_mode_unsupported(error):
                raise
            reverse = True
    if reverse:
        y, pull = vjp(fn, x)
        u = torch.randn(y.shape[1:], **opts).expand(y.shape)
        probes = [pull(u)[0], vjp(fn, x + w)[1](u)[0]]
    rtol = 1e-10 if x.dtype == torch.float64 else 1e-5
    scale = max(float(probes[0].abs().max()), 1e-300)
    for probe in probes:
        if float((probe - probes[0][:1]).abs().max()) > rtol * scale:
            return None
    jacobian = jacrev if reverse else jacfwd
    return jacobian(fn_first)(x[:1])[0, :, :, 0].to(torch.float64)  # (pos_out, d_out, pos_in, d_in)


def gram_of_constant_jacobian(
    j0: Float[Tensor, "pos_out d_out pos_in d_in"],
    in_map: Float[Tensor, "d_in k"],
    out_map: Float[Tensor, "m d_out"],
    count: int,
    *,
    in_mask: Tensor | None = None,
    out_mask: Tensor | None = None,
) -> Float[Tensor, "k k"]:
    """What :func:`jacobian_gram` returns for ``count`` examples sharing the Jacobian ``j0`` (with
    the same ``in_mask`` / ``out_mask`` of valid positions, if given).

    >>> j0 = 2 * torch.eye(2, dtype=torch.float64).reshape(1, 2, 1, 2)
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> gram_of_constant_jacobian(j0, eye, eye, count=3).tolist()
    [[12.0, 0.0], [0.0, 12.0]]
    """
    jac = torch.einsum("io,tosd,da->stia", out_map.to(j0), j0, in_map.to(j0))  # (pos_in, pos_out, m, k)
    flat = jac.reshape(jac.shape[0], jac.shape[1], -1, jac.shape[-1])
    p_in, p_out = jac.shape[0], jac.shape[1]
    valid_in = torch.ones(count, p_in, dtype=j0.dtype) if in_mask is None else in_mask.to(j0)
    valid_out = torch.ones(count, p_out, dtype=j0.dtype) if out_mask is None else out_mask.to(j0)
    # (pos_in, pos_out): the number of examples where both positions are valid
    weights = valid_in.to(j0.device).T @ valid_out.to(j0.device)
    return torch.einsum("st,stra,strb->ab", weights, flat, flat)
