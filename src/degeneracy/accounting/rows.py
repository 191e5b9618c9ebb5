"""The rows of the degeneracy report, source by source (conventions in
:mod:`degeneracy.accounting.sources`; the report itself in :mod:`degeneracy.accounting.report`).

Each step reads the collected :class:`~degeneracy.accounting.statistics.Statistics` and adds to a
:class:`Ledger`: rows (one source in one layer with its count), the explicit free directions of each
source (for the union), per-site ranks and notes.

>>> ledger = Ledger(num_parameters=4, flat=torch.zeros(4, dtype=torch.float64), want_union=True)
>>> ledger.rows.append(SourceRow("fc1", "activation rank", 2))
>>> ledger.rows[0].to_dict()["count"]
2
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from degeneracy.accounting.directions import (
    activation_directions,
    block_directions,
    gated_directions,
    head_directions,
    jacobian_directions,
    translation_directions,
)
from degeneracy.accounting.records import record
from degeneracy.accounting.sources import (
    HeadSync,
    NeuronSync,
    RankInfo,
    gated_ranks,
    gram_rank,
    head_sync,
    neuron_sync,
)
from degeneracy.accounting.statistics import Statistics
from degeneracy.accounting.structure import Site, Structure, parameter_index

__all__ = ["Ledger", "SourceRow", "site_rows", "neuron_rows", "attention_rows", "SOURCE_KEYS"]


@dataclass
class SourceRow:
    """One source of free directions in one layer."""

    layer: str
    source: str
    count: int
    is_upper_bound: bool = False
    generic: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The row as a dict of its fields (``SourceRow(**d)`` rebuilds it).

        >>> SourceRow("fc1", "jacobian rank", 3, is_upper_bound=True).to_dict()["is_upper_bound"]
        True
        """
        return record(self)


@dataclass
class Ledger:
    """What the report's steps add up: rows, explicit directions (for the union), per-site info, notes.

    ``directions`` maps ``"<layer>/<source key>"`` to (k × N) matrices, kept only when ``want_union``.

    >>> Ledger(3, torch.zeros(3), want_union=False).directions
    {}
    """

    num_parameters: int
    flat: Tensor
    want_union: bool
    rows: list[SourceRow] = field(default_factory=list)
    directions: dict[str, list[Tensor]] = field(default_factory=dict)
    sites: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


SOURCE_KEYS: dict[str, str] = {
    "activation rank": "activation",
    "jacobian rank": "jacobian",
    "synchronised neurons": "neurons",
    "neuron rescaling": "neurons",
    "linear-block translation": "translation",
    "gated activation rank": "gated",
    "synchronised heads": "ov",
    "attention OV (W_V E, E⁻¹ W_O)": "ov",
    "attention QK (W_Q B, W_K B⁻ᵀ)": "qk",
    "key bias (softmax shift)": "biases",
    "value bias (pattern rows sum to 1)": "biases",
}
"""Row source → the key of its explicit directions in :attr:`Ledger.directions` (``"<layer>/<key>"``)."""


def _site_grams(
    stats: Statistics, site: Site, epsilon: float, relative: bool
) -> tuple[RankInfo, RankInfo | None, Tensor | None]:
    out_stats = stats.points[site.output_point]
    mask = out_stats.relevant()
    gram = stats.gram(site.input_point, mask)
    d = site.d_in_aug
    if stats.points[site.input_point].augment and not site.has_bias:
        d = site.d_in
    gram = gram[:d, :d]
    in_stats = stats.points[site.input_point]
    samples = in_stats.count * (int(mask.sum()) if mask is not None else in_stats.positions)
    act = gram_rank(gram, epsilon, relative=relative, num_samples=samples, src_dtype=in_stats.dtype)
    k = stats.jacobian_gram(site.output_point)
    jac = None
    if k is not None:
        jac = gram_rank(k, epsilon, relative=relative, num_samples=samples, src_dtype=out_stats.dtype)
    return act, jac, mask


def _smallest(info: RankInfo, count: int = 3) -> list[float]:
    return [float(v) for v in info.eigenvalues[-count:].tolist()] if info.dim else []


def site_rows(
    stats: Statistics, structure: Structure, ledger: Ledger, epsilon: float, relative: bool
) -> None:
    """Activation rank, Jacobian rank and their overlap for every site (paper §3.1).

    >>> from degeneracy.accounting.statistics import collect_for_structure
    >>> from degeneracy.accounting.structure import discover
    >>> from degeneracy.data import Batch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1)).double()
    >>> x = torch.ones(4, 2, dtype=torch.float64)  # two equal inputs and the constant: rank 1 of 3
    >>> structure = discover(model, x)
    >>> ledger = Ledger(3, torch.zeros(3, dtype=torch.float64), want_union=False)
    >>> site_rows(collect_for_structure(model, [Batch(x)], structure), structure, ledger, 0.0, False)
    >>> [(row.source, row.count) for row in ledger.rows]
    [('activation rank', 2)]
    """
    rows, directions, want_union, n_params = (
        ledger.rows,
        ledger.directions,
        ledger.want_union,
        ledger.num_parameters,
    )
    site_info = ledger.sites
    for site in structure.sites:
        act, jac, mask = _site_grams(stats, site, epsilon, relative)
        info = {
            "site": site.name,
            "d_in": site.d_in,
            "bias": site.has_bias,
            "d_out": site.d_out,
            "activation_rank": act.rank,
            "activation_dim": act.dim,
            "activation_threshold": act.threshold,
            "activation_smallest": _smallest(act),
            "relevant_positions": None if mask is None else torch.nonzero(mask).flatten().tolist(),
        }
        if jac is not None:
            info.update(
                jacobian_rank=jac.rank,
                jacobian_dim=jac.dim,
                jacobian_threshold=jac.threshold,
                jacobian_smallest=_smallest(jac),
            )
        site_info.append(info)
        if act.drops:
            rows.append(
                SourceRow(
                    site.name,
                    "activation rank",
                    act.drops * site.d_out,
                    details={"drops": act.drops, "d_out": site.d_out, "rank": act.rank, "dim": act.dim},
                )
            )
            if want_union:
                directions.setdefault(f"{site.name}/activation", []).append(
                    activation_directions(site, act.null_vectors, n_params)
                )
        if jac is not None and jac.drops:
            rows.append(
                SourceRow(
                    site.name,
                    "jacobian rank",
                    jac.drops * site.d_in_aug,
                    is_upper_bound=True,
                    details={"drops": jac.drops, "d_in_with_bias": site.d_in_aug, "rank": jac.rank},
                )
            )
            if want_union:
                directions.setdefault(f"{site.name}/jacobian", []).append(
                    jacobian_directions(site, jac.null_vectors, n_params)
                )
            if act.drops:
                rows.append(
                    SourceRow(
                        site.name,
                        "overlap activation×jacobian",
                        -act.drops * jac.drops,
                        details={"activation_drops": act.drops, "jacobian_drops": jac.drops},
                    )
                )


def neuron_rows(
    stats: Statistics,
    structure: Structure,
    ledger: Ledger,
    epsilon: float,
    relative: bool,
    gated: bool | None,
) -> list[NeuronSync]:
    """Synchronised neurons, rescalings, gated activation ranks and linear-block translations of every
    neuron layer (paper §3.2); needs :func:`site_rows` first (for the global activation ranks).

    >>> from degeneracy.accounting.statistics import collect_for_structure
    >>> from degeneracy.accounting.structure import discover
    >>> from degeneracy.data import Batch
    >>> model = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)).double()
    >>> x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    >>> structure = discover(model, x)
    >>> stats = collect_for_structure(model, [Batch(x)], structure)
    >>> ledger = Ledger(7, torch.zeros(7, dtype=torch.float64), want_union=False)
    >>> site_rows(stats, structure, ledger, 0.0, False)
    >>> [sync.layer for sync in neuron_rows(stats, structure, ledger, 0.0, False, None)]
    ['1']
    """
    rows, directions, want_union, n_params, flat = (
        ledger.rows,
        ledger.directions,
        ledger.want_union,
        ledger.num_parameters,
        ledger.flat,
    )
    site_info, gate_notes = ledger.sites, ledger.notes
    neuron_results: list[NeuronSync] = []
    for layer in structure.neuron_layers:
        jac_point = layer.in_site.output_point if layer.in_site is not None else layer.pre_point
        jac_stats = stats.points.get(jac_point)
        mask = jac_stats.relevant() if jac_stats is not None else None
        pre = stats.raw(layer.pre_point, mask)
        k = stats.jacobian_gram(jac_point) if jac_stats is not None else None
        sync = neuron_sync(
            pre,
            layer.activation,
            layer=layer.name,
            epsilon=epsilon,
            relative=relative,
            jacobian_gram=k,
            src_dtype=stats.points[layer.pre_point].dtype,
        )
        neuron_results.append(sync)
        connected = layer.in_site is not None and layer.out_site is not None
        details = {
            "blocks": sync.synchronised_blocks,
            "block_ranks_s": [sync.block_ranks[sync.blocks.index(b)] for b in sync.synchronised_blocks],
            "jacobian_ranks_t": None
            if sync.jacobian_ranks is None
            else [sync.jacobian_ranks[sync.blocks.index(b)] for b in sync.synchronised_blocks],
            "paper_count_sum_s2": sync.paper_count,
            "dead": sync.dead,
            "num_blocks": len(sync.blocks),
        }
        if not connected:
            details["note"] = "no adjacent linear maps found: the count is the paper's Σ s_a² formula"
        rows.append(SourceRow(layer.name, "synchronised neurons", sync.synchronised_count, details=details))
        if sync.generic_count:
            rows.append(
                SourceRow(
                    layer.name,
                    "neuron rescaling",
                    sync.generic_count,
                    generic=True,
                    details={"neurons": sum(1 for b in sync.blocks if len(b) == 1 and b[0] not in sync.dead)},
                )
            )
        can_gate = (
            layer.activation == "relu"
            and layer.in_site is not None
            and layer.in_site.input_point in stats.points
        )
        gated_cost = pre.shape[0] * layer.width * (layer.in_site.d_in_aug if layer.in_site else 0) ** 2
        if can_gate and not (gated if gated is not None else gated_cost <= 4e9):
            gate_notes.append(
                f"{layer.name}: gated activation ranks skipped (~{gated_cost:.1e} operations; "
                "pass gated=True)"
            )
            can_gate = False
        if can_gate:
            site = layer.in_site
            site_inputs = stats.raw(site.input_point, mask)
            if site.has_bias:
                site_inputs = torch.cat([site_inputs, torch.ones_like(site_inputs[:, :1])], dim=1)
            global_rank = next(info["activation_rank"] for info in site_info if info["site"] == site.name)
            gated_info = gated_ranks(
                site_inputs,
                pre > 0,
                epsilon,
                relative=relative,
                src_dtype=stats.points[site.input_point].dtype,
            )
            dead = set(sync.dead)
            extra = {
                i: global_rank - g.rank
                for i, g in enumerate(gated_info)
                if i not in dead and g.rank < global_rank
            }
            if extra:
                rows.append(
                    SourceRow(
                        site.name,
                        "gated activation rank",
                        sum(extra.values()),
                        details={
                            "neurons": extra,
                            "note": "a ReLU neuron's incoming weights only see the inputs where it fires "
                            "(not in the paper's list; generalises dead neurons)",
                        },
                    )
                )
                if want_union:
                    directions.setdefault(f"{site.name}/gated", []).extend(
                        gated_directions(site, i, gated_info[i].null_vectors, n_params) for i in extra
                    )
        translatable = (
            layer.in_site is not None
            and layer.out_site is not None
            and layer.in_site.has_bias
            and layer.out_site.has_bias
        )
        linear_blocks = sync.linear_blocks() if translatable else []
        if linear_blocks:
            rows.append(
                SourceRow(
                    layer.name,
                    "linear-block translation",
                    sum(sync.block_count_translation(a) for a in linear_blocks),
                    details={
                        "blocks": [sync.blocks[a] for a in linear_blocks],
                        "note": "a block that never switches (always on, or always off for LeakyReLU) is "
                        "affine: p → p + u, b_out → b_out − W_out u; t_a directions per block",
                    },
                )
            )
        if want_union and connected:
            dead = set(sync.dead)
            for a, block in enumerate(sync.blocks):
                if not set(block) <= dead:
                    directions.setdefault(f"{layer.name}/neurons", []).append(
                        block_directions(layer, block, flat)
                    )
                if a in linear_blocks:
                    directions.setdefault(f"{layer.name}/translation", []).append(
                        translation_directions(layer, block, flat)
                    )
    return neuron_results


def attention_rows(
    stats: Statistics, structure: Structure, ledger: Ledger, epsilon: float, relative: bool
) -> list[HeadSync]:
    """Synchronised heads and the exact attention symmetries (OV, QK, key and value biases) of every
    TransformerLens attention layer (paper §3.2, "Attention"); nothing for other models.

    >>> from degeneracy.accounting.structure import discover
    >>> structure = discover(torch.nn.Linear(2, 1), torch.ones(1, 2))
    >>> stats = Statistics({}, 1, "mse", None)
    >>> attention_rows(stats, structure, Ledger(3, torch.zeros(3), want_union=False), 0.0, False)
    []
    """
    rows, directions, want_union, n_params, flat = (
        ledger.rows,
        ledger.directions,
        ledger.want_union,
        ledger.num_parameters,
        ledger.flat,
    )
    head_results: list[HeadSync] = []
    spec_index = {name: parameter_index(structure.layout, name) for name in structure.layout.names}
    for attn in structure.attention_layers:
        z_stats = stats.points.get(attn.z_point)
        mask = z_stats.relevant() if z_stats is not None else None
        patterns = stats.raw(attn.pattern_point, mask)
        value_gram = stats.gram(attn.value_point, None)
        z_k = stats.jacobian_gram(attn.z_point) if z_stats is not None else None
        hs = head_sync(
            patterns,
            attn.n_heads,
            attn.d_head,
            layer=attn.name,
            epsilon=epsilon,
            relative=relative,
            value_gram=value_gram,
            z_jacobian_gram=z_k,
            samples=patterns.shape[0],
            src_dtype=stats.points[attn.pattern_point].dtype,
        )
        head_results.append(hs)
        d2 = attn.d_head**2
        rows.append(
            SourceRow(
                attn.name,
                "synchronised heads",
                hs.synchronised_count,
                details={
                    "blocks": hs.synchronised_blocks,
                    "paper_count": hs.paper_synchronised_count,
                    "value_ranks": hs.block_value_ranks,
                    "jacobian_ranks": hs.block_jacobian_ranks,
                },
            )
        )
        rows.append(
            SourceRow(
                attn.name,
                "attention OV (W_V E, E⁻¹ W_O)",
                hs.generic_count,
                generic=True,
                details={"per_head_s_t": list(zip(hs.head_value_ranks, hs.head_jacobian_ranks, strict=True))},
            )
        )
        p = attn.prefix
        names = set(structure.layout.names)
        rows.append(
            SourceRow(
                attn.name,
                "attention QK (W_Q B, W_K B⁻ᵀ)",
                attn.n_heads * d2,
                generic=True,
                details={"note": "exact symmetry, not in the paper's list"},
            )
        )
        if f"{p}b_K" in names:
            rows.append(
                SourceRow(
                    attn.name,
                    "key bias (softmax shift)",
                    attn.n_heads * attn.d_head,
                    generic=True,
                    details={"note": "q·b_K is the same for every key: exact, not in the paper's list"},
                )
            )
        if f"{p}b_V" in names and f"{p}b_O" in names:
            rows.append(
                SourceRow(
                    attn.name,
                    "value bias (pattern rows sum to 1)",
                    attn.n_heads * attn.d_head,
                    generic=True,
                    details={"note": "b_V W_O moves into b_O: exact, not in the paper's list"},
                )
            )
        if want_union:
            ov_pairs = [(h, h) for h in range(attn.n_heads)]
            for block in hs.synchronised_blocks:
                ov_pairs += [(a, b) for a in block for b in block if a != b]
            directions.setdefault(f"{attn.name}/ov", []).append(
                head_directions(attn, spec_index, flat, ov_pairs, "ov")
            )
            directions.setdefault(f"{attn.name}/qk", []).append(
                head_directions(attn, spec_index, flat, [(h, h) for h in range(attn.n_heads)], "qk")
            )
            extra = []
            if f"{p}b_K" in names:
                for i in spec_index[f"{p}b_K"].reshape(-1).tolist():
                    v = torch.zeros(n_params, dtype=torch.float64)
                    v[i] = 1.0
                    extra.append(v)
            if f"{p}b_V" in names and f"{p}b_O" in names:
                w_o, b_v, b_o = spec_index[f"{p}W_O"], spec_index[f"{p}b_V"], spec_index[f"{p}b_O"]
                for h in range(attn.n_heads):
                    for j in range(attn.d_head):
                        v = torch.zeros(n_params, dtype=torch.float64)
                        v[b_v[h, j]] = 1.0
                        v[b_o] = -flat[w_o[h, j]]
                        extra.append(v)
            if extra:
                directions.setdefault(f"{attn.name}/biases", []).append(torch.stack(extra))
    return head_results
