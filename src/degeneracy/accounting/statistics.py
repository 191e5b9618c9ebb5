"""One pass over the data collecting what paper §3 needs, in float64.

* activation Grams of every site input (paper eq 14, bias as a constant coordinate: G over [f; 1]);
* Jacobian Grams of the whitened output z with respect to every site output (paper eq 15):
  K = E[Σ_r (∂z_r/∂p)ᵀ(∂z_r/∂p)], per position (METHOD §1: E averages over inputs and positions,
  products pair the same position);
* pre-activations of neuron layers (for firing patterns, paper eq 17) and attention patterns.

**Relevant positions.** For sequence models a position whose site output never affects the model
output (its Jacobian is zero on every example, e.g. the MLP at earlier tokens of a one-layer model
read at the last token) contributes nothing to the Hessian; such positions are left out of that
site's G and of the firing patterns (only when Jacobians are computed and there are ≤ 64 positions).

**Projections.** ``jacobian_projections=m`` replaces the rows of z by m Gaussian combinations per
example, an unbiased estimate of K (E[ωωᵀ] = I) for outputs with many rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.accounting._model import ForwardFn, resolve_module, run_model
from degeneracy.accounting.behavioral import LossKind, whiten_outputs
from degeneracy.accounting.structure import Point, Structure
from degeneracy.capture import to_bpd
from degeneracy.data import Batch

MAX_MASKED_POSITIONS = 64


@dataclass
class PointStats:
    """Accumulators of one point: per-position Gram, Jacobian Gram and raw values as asked."""

    gram: Tensor | None = None  # (P, d, d) sums
    jac: Tensor | None = None  # (P, d, d) sums
    raw: list[Tensor] = field(default_factory=list)  # (batch, pos, d) float64 chunks
    count: int = 0  # examples
    positions: int = 0
    dtype: torch.dtype = torch.float64
    augment: bool = False

    def relevant(self) -> Tensor | None:
        """Bool (P,) of positions with a nonzero Jacobian on some example, or None if unknown."""
        if self.jac is None or self.positions > MAX_MASKED_POSITIONS:
            return None
        norms = torch.diagonal(self.jac, dim1=1, dim2=2).sum(-1)
        mask = norms > 0
        return mask if bool(mask.any()) else None


@dataclass
class Statistics:
    """Everything one pass collects, keyed by :class:`Point`."""

    points: dict[Point, PointStats]
    num_examples: int
    kind: str
    projections: int | None

    def gram(self, point: Point, mask: Tensor | None) -> Tensor:
        """Mean activation Gram over examples and (relevant) positions, float64."""
        st = self.points[point]
        assert st.gram is not None
        if st.gram.shape[0] == 1 or mask is None:
            total, npos = st.gram.sum(0), st.gram.shape[0]
        else:
            total, npos = st.gram[mask].sum(0), int(mask.sum())
        return total / (st.count * max(npos, 1))

    def jacobian_gram(self, point: Point) -> Tensor | None:
        """K = 1/(n·P_rel) Σ_x Σ_pos Σ_r g gᵀ (the whitened-output Jacobian Gram), float64."""
        st = self.points[point]
        if st.jac is None:
            return None
        mask = st.relevant()
        npos = int(mask.sum()) if mask is not None else st.jac.shape[0]
        return st.jac.sum(0) / (st.count * max(npos, 1))

    def raw(self, point: Point, mask: Tensor | None) -> Tensor:
        """Stored values (rows, d): examples × relevant positions, float64."""
        st = self.points[point]
        x = torch.cat(st.raw, dim=0)
        if mask is not None and x.shape[1] == mask.numel():
            x = x[:, mask]
        return x.reshape(-1, x.shape[-1])


def collect(
    model: nn.Module,
    batches: list[Batch],
    *,
    gram_points: dict[Point, bool] | None = None,
    raw_points: set[Point] | None = None,
    jacobian_points: set[Point] | None = None,
    input_transforms: dict[Point, Callable[[Tensor], Tensor]] | None = None,
    kind: LossKind = "mse",
    position: int | None = None,
    forward: ForwardFn | None = None,
    jacobian_projections: int | None = None,
    rows_per_pass: int = 16,
    seed: int = 0,
) -> Statistics:
    """Run the data once and accumulate Grams / Jacobian Grams / raw values at the given points.

    Args:
        gram_points: points whose Gram to accumulate, mapped to whether to append the constant 1.
        raw_points: points whose values to keep.
        jacobian_points: points whose output-Jacobian Gram to accumulate (requires a backward pass per
            output row, or per projection).
        input_transforms: maps raw captured tensors to ``(batch, pos, d)`` (e.g. one-hot tokens).
    """
    gram_points = dict(gram_points or {})
    raw_points = set(raw_points or ())
    jacobian_points = set(jacobian_points or ())
    input_transforms = dict(input_transforms or {})
    all_points = set(gram_points) | raw_points | jacobian_points
    for p in all_points:
        resolve_module(model, p.module)
    stats = {p: PointStats(augment=gram_points.get(p, False)) for p in all_points}
    generator = torch.Generator().manual_seed(seed)
    captured: dict[Point, Tensor] = {}
    deltas: dict[Point, Tensor] = {}

    def record(point: Point, value: Tensor) -> Tensor:
        captured[point] = value.detach()
        if point in jacobian_points and value.is_floating_point():
            delta = torch.zeros_like(value, requires_grad=True)
            deltas[point] = delta
            return value + delta
        return value

    handles = []
    try:
        for point in all_points:
            module = resolve_module(model, point.module)
            if point.read == "output":

                def fwd_hook(mod: nn.Module, args: tuple, output: Any, point: Point = point) -> Any:
                    if isinstance(output, Tensor):
                        return record(point, output)
                    return None

                handles.append(module.register_forward_hook(fwd_hook))
            else:

                def pre_hook(mod: nn.Module, args: tuple, point: Point = point) -> Any:
                    if args and isinstance(args[0], Tensor):
                        return (record(point, args[0]), *args[1:])
                    return None

                handles.append(module.register_forward_pre_hook(pre_hook))

        n = 0
        for batch in batches:
            captured.clear()
            deltas.clear()
            with torch.set_grad_enabled(bool(jacobian_points)):
                out = run_model(model, batch.inputs, forward=forward, position=position)
            missing = [p for p in all_points if p not in captured]
            if missing:
                raise RuntimeError(f"no tensor was read at {missing} during the forward pass")
            b = batch.size
            n += b
            for point in all_points:
                value = captured[point]
                if point in input_transforms:
                    value = input_transforms[point](value)
                x = to_bpd(value).to(torch.float64)
                st = stats[point]
                st.count += b
                st.positions = x.shape[1]
                st.dtype = value.dtype if value.is_floating_point() else torch.float64
                if point in gram_points:
                    if st.augment:
                        x_aug = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
                    else:
                        x_aug = x
                    g = torch.einsum("bpi,bpj->pij", x_aug, x_aug)
                    st.gram = g if st.gram is None else st.gram + g
                if point in raw_points:
                    st.raw.append(x)
            if jacobian_points:
                _accumulate_jacobians(
                    out, deltas, stats, kind, jacobian_projections, rows_per_pass, generator
                )
    finally:
        for h in handles:
            h.remove()
    return Statistics(points=stats, num_examples=n, kind=kind, projections=jacobian_projections)


def _accumulate_jacobians(
    out: Tensor,
    deltas: dict[Point, Tensor],
    stats: dict[Point, PointStats],
    kind: LossKind,
    projections: int | None,
    rows_per_pass: int,
    generator: torch.Generator,
) -> None:
    z = whiten_outputs(out, out.detach(), kind)  # (batch, rows); at θ* the reference is the output itself
    batch, rows = z.shape
    points = list(deltas)
    tensors = [deltas[p] for p in points]
    total = rows if projections is None else projections
    for start in range(0, total, rows_per_pass):
        stop = min(start + rows_per_pass, total)
        if projections is None:
            cot = torch.zeros(stop - start, batch, rows, dtype=z.dtype)
            for j, r in enumerate(range(start, stop)):
                cot[j, :, r] = 1.0
        else:
            cot = torch.randn(stop - start, batch, rows, generator=generator, dtype=torch.float64)
            cot = (cot / projections**0.5).to(z.dtype)
        try:
            grads = torch.autograd.grad(
                z, tensors, grad_outputs=cot, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
        except RuntimeError:
            per = [
                torch.autograd.grad(z, tensors, grad_outputs=c, retain_graph=True, allow_unused=True)
                for c in cot
            ]
            grads = tuple(
                None if per[0][i] is None else torch.stack([g[i] for g in per]) for i in range(len(tensors))
            )
        for point, g, delta in zip(points, grads, tensors, strict=True):
            st = stats[point]
            bpd = to_bpd(delta)
            if g is None:
                k = torch.zeros(bpd.shape[1], bpd.shape[2], bpd.shape[2], dtype=torch.float64)
            else:
                g = g.reshape(g.shape[0], *bpd.shape).to(torch.float64)
                k = torch.einsum("rbpi,rbpj->pij", g, g)
            st.jac = k if st.jac is None else st.jac + k


def _pattern_by_query(pattern: Tensor) -> Tensor:
    """(batch, head, query, key) → (batch, query, head·key), so that positions are queries."""
    b, h, q, k = pattern.shape
    return pattern.permute(0, 2, 1, 3).reshape(b, q, h * k)


def collect_for_structure(
    model: nn.Module,
    batches: list[Batch],
    structure: Structure,
    *,
    jacobians: bool = True,
    **options: Any,
) -> Statistics:
    """:func:`collect` with the points a :class:`Structure` needs for the degeneracy report."""
    gram_points: dict[Point, bool] = {}
    transforms: dict[Point, Callable[[Tensor], Tensor]] = {}
    jac_points: set[Point] = set()
    raw_points: set[Point] = set()
    for site in structure.sites:
        gram_points[site.input_point] = gram_points.get(site.input_point, False) or site.has_bias
        if site.input_transform is not None:
            transforms[site.input_point] = site.input_transform
        jac_points.add(site.output_point)
    for layer in structure.neuron_layers:
        raw_points.add(layer.pre_point)
        if layer.in_site is None:
            jac_points.add(layer.pre_point)
        elif layer.activation == "relu":
            raw_points.add(layer.in_site.input_point)  # for the gated activation ranks
    for attn in structure.attention_layers:
        raw_points.add(attn.pattern_point)
        transforms[attn.pattern_point] = _pattern_by_query
        gram_points.setdefault(attn.value_point, False)
        jac_points.add(attn.z_point)
    # A site input point with and without bias would need two Grams; the augmented one contains both.
    return collect(
        model,
        batches,
        gram_points=gram_points,
        raw_points=raw_points,
        jacobian_points=jac_points if jacobians else set(),
        input_transforms=transforms,
        **options,
    )
