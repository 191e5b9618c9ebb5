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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from degeneracy.accounting.directions import (
    activation_directions,
    bias_directions,
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
from degeneracy.accounting.structure import NeuronLayer, Site, Structure, parameter_index

__all__ = [
    "Ledger",
    "SourceRow",
    "layer_synchronisation",
    "site_rows",
    "neuron_rows",
    "attention_rows",
    "ATTENTION_NOTES",
    "SOURCE_KEYS",
]


@dataclass
class SourceRow:
    """One source of free directions in one layer (``is_upper_bound``: the count may overcount;
    ``generic``: present for every parameter value, e.g. the ReLU rescaling).

    >>> row = SourceRow("fc1", "jacobian rank", 3, is_upper_bound=True)
    >>> row.count, SourceRow(**row.to_dict()) == row
    (3, True)
    """

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

    def keep(self, key: str, make: Callable[..., Tensor], *args: Any) -> None:
        """With ``want_union``, add the directions ``make(*args)`` under ``key`` (``"<layer>/<source
        key>"``); without, ``make`` is never called.

        >>> ledger = Ledger(2, torch.zeros(2), want_union=True)
        >>> ledger.keep("fc/activation", torch.eye, 2)
        >>> [m.shape[0] for m in ledger.directions["fc/activation"]]
        [2]
        """
        if self.want_union:
            self.directions.setdefault(key, []).append(make(*args))


ATTENTION_NOTES = {
    "qk": "exact symmetry, not in the paper's list",
    "key": "q·b_K is the same for every key: exact, not in the paper's list",
    "value": "b_V W_O moves into b_O: exact, not in the paper's list",
}
"""The ``note`` of the exact attention symmetries beyond the paper's list (QK, key bias, value bias)."""

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
    out_stats = stats.points.get(site.output_point)  # absent without Jacobian statistics
    mask = None if out_stats is None else out_stats.relevant()
    gram = stats.gram(site.input_point, mask)
    d = site.d_in_aug
    if stats.points[site.input_point].augment and not site.has_bias:
        d = site.d_in
    gram = gram[:d, :d]
    in_stats = stats.points[site.input_point]
    samples = in_stats.count * (int(mask.sum()) if mask is not None else in_stats.positions)
    act = gram_rank(gram, epsilon, relative=relative, num_samples=samples, src_dtype=in_stats.dtype)
    k = None if out_stats is None else stats.jacobian_gram(site.output_point)
    jac = None
    if k is not None and out_stats is not None:
        jac = gram_rank(k, epsilon, relative=relative, num_samples=samples, src_dtype=out_stats.dtype)
    return act, jac, mask


def _smallest(info: RankInfo, count: int = 3) -> list[float]:
    return [float(v) for v in info.eigenvalues[-count:].tolist()] if info.dim else []


def layer_synchronisation(
    stats: Statistics, layer: NeuronLayer, epsilon: float, relative: bool
) -> tuple[NeuronSync, Tensor, Tensor | None]:
    """Synchronised blocks of one neuron layer from collected statistics (t_a when they hold the
    Jacobian Gram at :attr:`NeuronLayer.jacobian_point`), with the pre-activations read (examples ×
    relevant positions) and the relevant-position mask (None: every position).

    >>> from degeneracy.accounting.statistics import PointStats
    >>> from degeneracy.accounting.structure import node_at
    >>> layer = NeuronLayer("act", node_at("act", "input"), "relu", 2)
    >>> pre = torch.tensor([[[1.0, 2.0]], [[-1.0, -2.0]]], dtype=torch.float64)  # (batch, pos, d)
    >>> stats = Statistics({layer.pre_point: PointStats(raw=[pre], count=2, positions=1)}, 2, "mse", None)
    >>> sync, read, mask = layer_synchronisation(stats, layer, 0.0, False)
    >>> sync.blocks, read.shape, mask
    ([[0, 1]], torch.Size([2, 2]), None)
    """
    pre, mask, jacobian_gram = stats.relevant_raw(layer.pre_point, layer.jacobian_point)
    dtype = stats.points[layer.pre_point].dtype
    sync = neuron_sync(pre, layer.activation, layer=layer.name, epsilon=epsilon, relative=relative,
                       jacobian_gram=jacobian_gram, src_dtype=dtype)
    return sync, pre, mask


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
    rows, n_params = ledger.rows, ledger.num_parameters
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
        ledger.sites.append(info)
        if act.drops:
            rows.append(
                SourceRow(
                    site.name,
                    "activation rank",
                    act.drops * site.d_out,
                    details={"drops": act.drops, "d_out": site.d_out, "rank": act.rank, "dim": act.dim},
                )
            )
            ledger.keep(f"{site.name}/activation", activation_directions, site, act.null_vectors, n_params)
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
            ledger.keep(f"{site.name}/jacobian", jacobian_directions, site, jac.null_vectors, n_params)
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
    rows, flat, n_params = ledger.rows, ledger.flat, ledger.num_parameters
    neuron_results: list[NeuronSync] = []
    for layer in structure.neuron_layers:
        sync, pre, mask = layer_synchronisation(stats, layer, epsilon, relative)
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
            ledger.notes.append(
                f"{layer.name}: gated activation ranks skipped (~{gated_cost:.1e} operations; "
                "pass gated=True)"
            )
            can_gate = False
        if can_gate:
            site = layer.in_site
            site_inputs = stats.raw(site.input_point, mask)
            if site.has_bias:
                site_inputs = torch.cat([site_inputs, torch.ones_like(site_inputs[:, :1])], dim=1)
            global_rank = next(info["activation_rank"] for info in ledger.sites if info["site"] == site.name)
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
                for i in extra:
                    ledger.keep(
                        f"{site.name}/gated", gated_directions, site, i, gated_info[i].null_vectors, n_params
                    )
        translatable = (
            layer.in_site is not None
            and layer.out_site is not None
            and layer.in_site.has_bias
            and layer.out_site.has_bias
            and layer.shift_exact
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
        if connected:
            dead = set(sync.dead)
            for a, block in enumerate(sync.blocks):
                if not set(block) <= dead:
                    ledger.keep(f"{layer.name}/neurons", block_directions, layer, block, flat)
                if a in linear_blocks:
                    ledger.keep(f"{layer.name}/translation", translation_directions, layer, block, flat)
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
    head_results: list[HeadSync] = []
    spec_index = {name: parameter_index(structure.layout, name) for name in structure.layout.names}
    for attn in structure.attention_layers:
        patterns, _, z_jacobian_gram = stats.relevant_raw(attn.pattern_point, attn.z_point)
        hs = head_sync(
            patterns,
            attn.n_heads,
            attn.d_head,
            layer=attn.name,
            epsilon=epsilon,
            relative=relative,
            value_gram=stats.gram(attn.value_point, None),
            z_jacobian_gram=z_jacobian_gram,
            num_samples=patterns.shape[0],
            src_dtype=stats.points[attn.pattern_point].dtype,
        )
        head_results.append(hs)
        ledger.rows.append(
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
        per_head_s_t = list(zip(hs.head_value_ranks, hs.head_jacobian_ranks, strict=True))
        p, heads = attn.prefix, attn.n_heads
        key_bias = f"{p}b_K" in spec_index
        value_bias = f"{p}b_V" in spec_index and f"{p}b_O" in spec_index
        width = heads * attn.d_head
        exact = [  # (source, count, details, present): the generic symmetries of an attention layer
            ("attention OV (W_V E, E⁻¹ W_O)", hs.generic_count, {"per_head_s_t": per_head_s_t}, True),
            ("attention QK (W_Q B, W_K B⁻ᵀ)", width * attn.d_head, {"note": ATTENTION_NOTES["qk"]}, True),
            ("key bias (softmax shift)", width, {"note": ATTENTION_NOTES["key"]}, key_bias),
            ("value bias (pattern rows sum to 1)", width, {"note": ATTENTION_NOTES["value"]}, value_bias),
        ]
        ledger.rows.extend(
            SourceRow(attn.name, source, count, generic=True, details=details)
            for source, count, details, present in exact
            if present
        )
        ov_pairs = [(h, h) for h in range(heads)]  # the generic ones, then pairs inside synchronised blocks
        for block in hs.synchronised_blocks:
            ov_pairs += [(a, b) for a in block for b in block if a != b]
        flat, own = ledger.flat, [(h, h) for h in range(heads)]
        ledger.keep(f"{attn.name}/ov", head_directions, attn, spec_index, flat, ov_pairs, "ov")
        ledger.keep(f"{attn.name}/qk", head_directions, attn, spec_index, flat, own, "qk")
        if key_bias or value_bias:
            ledger.keep(f"{attn.name}/biases", bias_directions, attn, spec_index, flat)
    return head_results
