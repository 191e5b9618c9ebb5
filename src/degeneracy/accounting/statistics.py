"""One pass over the data collecting what paper §3 needs, in float64.

* activation Grams of every site input (paper eq 14, bias as a constant coordinate: G over [f; 1]);
* Jacobian Grams of the whitened output z with respect to every site output (paper eq 15):
  K = E[Σ_r (∂z_r/∂p)ᵀ(∂z_r/∂p)], per position (METHOD §1: E averages over inputs and positions,
  products pair the same position);
* pre-activations of neuron layers (for firing patterns, paper eq 17) and attention patterns.

Values are read at :class:`degeneracy.capture.NodeLayer` s (through :mod:`degeneracy.accounting.reading`)
and summed per position in :class:`degeneracy.stats.MatrixAccumulator` s (sums and counts, mergeable).
The Jacobian with respect to a node layer p is taken by substituting p + δ (δ = 0) in a pass of its
own, so that it is the total derivative through every later node layer.

**Relevant positions.** For sequence models a position whose site output never affects the model
output (its Jacobian is zero on every example, e.g. the MLP at earlier tokens of a one-layer model
read at the last token) contributes nothing to the Hessian; such positions are left out of that
site's G and of the firing patterns (only when Jacobians are computed and there are ≤ 64 positions).

**Projections.** ``jacobian_projections=m`` replaces the rows of z by m Gaussian combinations per
example, an unbiased estimate of K (E[ωωᵀ] = I) for outputs with many rows.

>>> import torch
>>> from degeneracy.data import Batch
>>> from degeneracy.accounting.structure import node_at
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()).double()
>>> point = node_at("1", "input")
>>> stats = collect(model, [Batch(torch.randn(5, 2, dtype=torch.float64))], gram_points={point: True})
>>> stats.gram(point, None).shape, stats.num_examples
(torch.Size([4, 4]), 5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.accounting.reading import check_node_layers, read_node_layers
from degeneracy.accounting.structure import Structure
from degeneracy.adapters.transformer_lens.structure import pattern_by_query
from degeneracy.behavioral import LossKind, whiten_outputs
from degeneracy.capture import NodeLayer, to_bpd
from degeneracy.data import Batch
from degeneracy.deprecation import renamed_arguments
from degeneracy.distributed import all_gather_rows, all_reduce_sum, is_distributed
from degeneracy.run import ForwardFn
from degeneracy.stats import MatrixAccumulator

__all__ = ["MAX_MASKED_POSITIONS", "PointStats", "Statistics", "collect", "collect_for_structure"]

MAX_MASKED_POSITIONS = 64


def _accumulate(accs: list[MatrixAccumulator] | None, sums: Tensor, count: int) -> list[MatrixAccumulator]:
    """Add (pos, d, d) sums to one accumulator per position (created on first use)."""
    if accs is None:
        accs = [MatrixAccumulator(sums.shape[-1]) for _ in range(sums.shape[0])]
    for acc, matrix in zip(accs, sums, strict=True):
        acc.add(matrix, count)
    return accs


@dataclass
class PointStats:
    """Accumulators of one node layer: per-position Grams, Jacobian Grams and raw values as asked.

    >>> st = PointStats()
    >>> st.grams = _accumulate(None, torch.eye(2)[None], 3)
    >>> st.gram.shape, st.jac
    (torch.Size([1, 2, 2]), None)
    """

    grams: list[MatrixAccumulator] | None = None  # per position: Σ f fᵀ
    jacobians: list[MatrixAccumulator] | None = None  # per position: Σ_r g gᵀ
    raw: list[Tensor] = field(default_factory=list)  # (batch, pos, d) float64 chunks
    count: int = 0  # examples
    positions: int = 0
    dtype: torch.dtype = torch.float64
    augment: bool = False

    @property
    def gram(self) -> Tensor | None:
        """(P, d, d) sums of f fᵀ per position, or None."""
        return None if self.grams is None else torch.stack([acc.sum for acc in self.grams])

    @property
    def jac(self) -> Tensor | None:
        """(P, d, d) sums of the output-Jacobian Gram per position, or None."""
        return None if self.jacobians is None else torch.stack([acc.sum for acc in self.jacobians])

    def relevant(self) -> Tensor | None:
        """Bool (P,) of positions with a nonzero Jacobian on some example, or None if unknown."""
        jac = self.jac
        if jac is None or self.positions > MAX_MASKED_POSITIONS:
            return None
        norms = torch.diagonal(jac, dim1=1, dim2=2).sum(-1)
        mask = norms > 0
        return mask if bool(mask.any()) else None


@dataclass
class Statistics:
    """Everything one pass collects, keyed by :class:`~degeneracy.capture.NodeLayer`.

    >>> Statistics({}, 0, "mse", None).projections is None
    True
    """

    points: dict[NodeLayer, PointStats]
    num_examples: int
    kind: str
    projections: int | None

    def gram(self, point: NodeLayer, mask: Tensor | None) -> Tensor:
        """Mean activation Gram over examples and (relevant) positions, float64."""
        st = self.points[point]
        gram = st.gram
        assert gram is not None
        if gram.shape[0] == 1 or mask is None:
            total, npos = gram.sum(0), gram.shape[0]
        else:
            total, npos = gram[mask].sum(0), int(mask.sum())
        return total / (st.count * max(npos, 1))

    def jacobian_gram(self, point: NodeLayer) -> Tensor | None:
        """K = 1/(n·P_rel) Σ_x Σ_pos Σ_r g gᵀ (the whitened-output Jacobian Gram), float64."""
        st = self.points[point]
        jac = st.jac
        if jac is None:
            return None
        mask = st.relevant()
        npos = int(mask.sum()) if mask is not None else jac.shape[0]
        return jac.sum(0) / (st.count * max(npos, 1))

    def relevant_raw(
        self, point: NodeLayer, jacobian_point: NodeLayer
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Stored values at ``point`` over the positions where ``jacobian_point``'s Jacobian is nonzero
        (:meth:`raw`), that position mask, and ``jacobian_point``'s Jacobian Gram (both ``None`` when its
        Jacobians were not collected)."""
        jac = self.points.get(jacobian_point)
        mask = jac.relevant() if jac is not None else None
        gram = self.jacobian_gram(jacobian_point) if jac is not None else None
        return self.raw(point, mask), mask, gram

    def raw(self, point: NodeLayer, mask: Tensor | None) -> Tensor:
        """Stored values (rows, d): examples × relevant positions, float64."""
        st = self.points[point]
        x = torch.cat(st.raw, dim=0)
        if mask is not None and x.shape[1] == mask.numel():
            x = x[:, mask]
        return x.reshape(-1, x.shape[-1])


@renamed_arguments(position="positions")
def collect(
    model: nn.Module,
    batches: list[Batch],
    *,
    gram_points: dict[NodeLayer, bool] | None = None,
    raw_points: Iterable[NodeLayer] | None = None,
    jacobian_points: Iterable[NodeLayer] | None = None,
    input_transforms: dict[NodeLayer, Callable[[Tensor], Tensor]] | None = None,
    kind: LossKind = "mse",
    positions: int | None = None,
    forward: ForwardFn | None = None,
    jacobian_projections: int | None = None,
    rows_per_pass: int = 16,
    seed: int = 0,
) -> Statistics:
    """Run the data and accumulate Grams / Jacobian Grams / raw values at the given node layers.

    Under ``torch.distributed`` ``batches`` are this rank's share of the data (e.g. from
    :class:`degeneracy.run.ModelRun`); the sums are combined over the ranks and the raw values gathered,
    so every rank returns the statistics of the whole data set.

    Args:
        gram_points: node layers whose Gram to accumulate, mapped to whether to append the constant 1.
        raw_points: node layers whose values to keep.
        jacobian_points: node layers whose output-Jacobian Gram to accumulate (a backward pass per
            output row, or per projection).
        input_transforms: maps captured ``(batch, pos, d)`` values to ``(batch, pos, d')`` (e.g. one-hot
            tokens).
        positions: read a ``(batch, pos, d)`` model output at one position (``-1``: the last token).

    >>> from degeneracy.accounting.structure import node_at
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()).double()
    >>> hidden = node_at("1", "input")
    >>> x = torch.randn(5, 2, dtype=torch.float64)
    >>> stats = collect(model, [Batch(x)], raw_points=[hidden], jacobian_points=[hidden])
    >>> stats.raw(hidden, None).shape, stats.jacobian_gram(hidden).shape, stats.num_examples
    (torch.Size([5, 3]), torch.Size([3, 3]), 5)
    """
    gram_points = dict(gram_points or {})
    raw_list = list(raw_points or ())
    raw_points = set(raw_list)
    jac_points = list(dict.fromkeys(jacobian_points or ()))
    input_transforms = dict(input_transforms or {})
    all_points = list(dict.fromkeys([*gram_points, *raw_list, *jac_points]))
    check_node_layers(model, all_points)
    stats = {p: PointStats(augment=gram_points.get(p, False)) for p in all_points}
    generator = torch.Generator().manual_seed(seed)
    n = 0
    for batch in batches:
        with torch.no_grad():
            captured, _ = read_node_layers(
                model, batch.inputs, all_points, forward=forward, positions=positions
            )
        b = batch.size
        n += b
        for point in all_points:
            value = captured[point]
            if point in input_transforms:
                value = input_transforms[point](value)
            x = to_bpd(value).to(torch.float64)
            st = stats[point]
            if st.count and st.positions != x.shape[1]:
                raise ValueError(
                    f"the accounting's statistics are per position, but {point.name!r} has {st.positions} "
                    f"positions in one batch and {x.shape[1]} in another: give batches of one length (pad "
                    "them to it with an attention_mask; padded positions count as positions here)"
                )
            st.count += b
            st.positions = x.shape[1]
            st.dtype = value.dtype if value.is_floating_point() else torch.float64
            if point in gram_points:
                x_aug = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) if st.augment else x
                st.grams = _accumulate(st.grams, torch.einsum("bpi,bpj->pij", x_aug, x_aug), b)
            if point in raw_points:
                st.raw.append(x)
        cotangents: list[Tensor] | None = None
        for point in jac_points:
            cotangents = _accumulate_jacobian(
                model, batch, point, captured[point], stats[point], cotangents,
                kind=kind, positions=positions, forward=forward, projections=jacobian_projections,
                rows_per_pass=rows_per_pass, generator=generator,
            )  # fmt: skip
    n = _combine_ranks(stats, n)
    return Statistics(points=stats, num_examples=n, kind=kind, projections=jacobian_projections)


def _combine_ranks(stats: dict[NodeLayer, PointStats], n: int) -> int:
    """Under ``torch.distributed`` (``batches`` being this rank's share): sum the Grams, Jacobian Grams
    and counts over the ranks and gather the raw values (in rank order), so that every rank holds the
    statistics of the whole data set. Returns the total number of examples."""
    if not is_distributed():
        return n
    for point in sorted(stats, key=repr):  # one order on every rank (sets of points hash per process)
        st = stats[point]
        for accs in (st.grams, st.jacobians):
            for acc in accs or []:
                acc.all_reduce()
        st.count = int(all_reduce_sum(torch.tensor([float(st.count)], dtype=torch.float64)).item())
        if st.raw:
            st.raw = [all_gather_rows(torch.cat(st.raw, dim=0))]
    return int(all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64)).item())


def _cotangents(
    z: Tensor, projections: int | None, rows_per_pass: int, generator: torch.Generator
) -> list[Tensor]:
    """Output rows (unit vectors, or Gaussian projections) in chunks of ``rows_per_pass``."""
    batch, rows = z.shape
    total = rows if projections is None else projections
    chunks = []
    for start in range(0, total, rows_per_pass):
        stop = min(start + rows_per_pass, total)
        if projections is None:
            cot = torch.zeros(stop - start, batch, rows, dtype=z.dtype)
            for j, r in enumerate(range(start, stop)):
                cot[j, :, r] = 1.0
        else:
            cot = torch.randn(stop - start, batch, rows, generator=generator, dtype=torch.float64)
            cot = (cot / projections**0.5).to(z.dtype)
        chunks.append(cot)
    return chunks


def _accumulate_jacobian(
    model: nn.Module,
    batch: Batch,
    point: NodeLayer,
    value: Tensor,
    st: PointStats,
    cotangents: list[Tensor] | None,
    *,
    kind: LossKind,
    positions: int | None,
    forward: ForwardFn | None,
    projections: int | None,
    rows_per_pass: int,
    generator: torch.Generator,
) -> list[Tensor] | None:
    """Add Σ_r g gᵀ per position for the node layer ``point`` (g = ∂z_r/∂p) on one batch.

    The cotangents are drawn once per batch (by the first node layer) and shared by all node layers.
    """
    with torch.enable_grad():
        delta = torch.zeros_like(value, requires_grad=value.is_floating_point())
        substitute = {point: value + delta} if value.is_floating_point() else {}
        _, out = read_node_layers(
            model, batch.inputs, [], forward=forward, positions=positions, substitute=substitute, output=True
        )
        assert out is not None
        z = whiten_outputs(out, out.detach(), kind)  # (batch, rows); at θ* the reference is the output
    if cotangents is None:
        cotangents = _cotangents(z, projections, rows_per_pass, generator)
    for cot in cotangents:
        g = _batched_grad(z, delta, cot) if delta.requires_grad else None
        d = value.shape[2]
        if g is None:
            k = torch.zeros(value.shape[1], d, d, dtype=torch.float64)
        else:
            g = g.to(torch.float64)
            k = torch.einsum("rbpi,rbpj->pij", g, g)
        st.jacobians = _accumulate(st.jacobians, k, batch.size if cot is cotangents[0] else 0)
    return cotangents


def _batched_grad(z: Tensor, delta: Tensor, cot: Tensor) -> Tensor | None:
    """∂(cot_r · z)/∂δ for every row r of ``cot`` (vmapped, or one by one where vmap fails)."""
    try:
        (grad,) = torch.autograd.grad(
            z, [delta], grad_outputs=cot, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        return grad
    except RuntimeError:
        per = [
            torch.autograd.grad(z, [delta], grad_outputs=c, retain_graph=True, allow_unused=True)[0]
            for c in cot
        ]
        return None if per[0] is None else torch.stack(per)  # type: ignore[misc]


def collect_for_structure(
    model: nn.Module,
    batches: list[Batch],
    structure: Structure,
    *,
    jacobians: bool = True,
    **options: Any,
) -> Statistics:
    """:func:`collect` with the node layers a :class:`Structure` needs for the degeneracy report.

    >>> from degeneracy.accounting.structure import discover, node_at
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1)).double()
    >>> x = torch.randn(6, 2, dtype=torch.float64)
    >>> stats = collect_for_structure(model, [Batch(x)], discover(model, x))
    >>> stats.jacobian_gram(node_at("2", "output")).shape
    torch.Size([1, 1])
    """
    gram_points: dict[NodeLayer, bool] = {}
    transforms: dict[NodeLayer, Callable[[Tensor], Tensor]] = {}
    jac_points: dict[NodeLayer, None] = {}
    raw_points: dict[NodeLayer, None] = {}
    for site in structure.sites:
        gram_points[site.input_point] = gram_points.get(site.input_point, False) or site.has_bias
        if site.input_transform is not None:
            transforms[site.input_point] = site.input_transform
        jac_points[site.output_point] = None
    for layer in structure.neuron_layers:
        raw_points[layer.pre_point] = None
        if layer.in_site is None:
            jac_points[layer.pre_point] = None
        elif layer.activation == "relu":
            raw_points[layer.in_site.input_point] = None  # for the gated activation ranks
    for attn in structure.attention_layers:
        raw_points[attn.pattern_point] = None
        transforms[attn.pattern_point] = pattern_by_query
        gram_points.setdefault(attn.value_point, False)
        jac_points[attn.z_point] = None
    # A site input point with and without bias would need two Grams; the augmented one contains both.
    return collect(
        model,
        batches,
        gram_points=gram_points,
        raw_points=list(raw_points),
        jacobian_points=list(jac_points) if jacobians else [],
        input_transforms=transforms,
        **options,
    )
