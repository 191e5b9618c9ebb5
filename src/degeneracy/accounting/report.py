"""The degeneracy report: sources of free directions per layer beside the nominal parameter count and
the Hessian nullity (paper §2–3, METHOD §6).

Every row is one source in one layer with its count at the chosen ε (conventions in
:mod:`degeneracy.accounting.sources`). Double counting is handled as follows:

* activation and Jacobian rank drops of the same site share a·j directions, subtracted in an
  ``overlap`` row (inclusion–exclusion);
* synchronised blocks count s_a·t_a, which excludes directions already counted by activation and
  Jacobian rank drops (the paper's s_a² of eq 22 is given in the details);
* dead neurons count only through the activation/Jacobian rows.

``union`` is the dimension of the span of all explicit free directions (computed for models up to
``union_max_parameters``): the exact number of distinct first-order free directions the sources
explain. Every explicit direction is Hessian-null at ε = 0, so union ≤ Hessian nullity.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.accounting._model import ForwardFn, materialize
from degeneracy.accounting.behavioral import LossKind
from degeneracy.accounting.hessian import (
    BehavioralHessian,
    HessianSpectrum,
    _atomic_write_json,
    hessian_analysis,
)
from degeneracy.accounting.sources import (
    HeadSync,
    NeuronSync,
    RankInfo,
    activation_directions,
    block_directions,
    gated_directions,
    gated_ranks,
    gram_rank,
    head_directions,
    head_sync,
    jacobian_directions,
    neuron_sync,
    translation_directions,
    union_rank,
)
from degeneracy.accounting.statistics import Statistics, collect_for_structure
from degeneracy.accounting.structure import Site, discover

__all__ = ["SourceRow", "DegeneracyReport", "degeneracy_report"]


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
        return {
            "layer": self.layer,
            "source": self.source,
            "count": self.count,
            "is_upper_bound": self.is_upper_bound,
            "generic": self.generic,
            "details": self.details,
        }


@dataclass
class DegeneracyReport:
    """Sources and counts of free directions at noise scale ε, beside N and the Hessian nullity.

    Attributes:
        rows: one :class:`SourceRow` per source and layer.
        num_parameters: nominal parameter count N.
        covered_parameters: parameters inside the analysed sites.
        epsilon, relative: the threshold convention (eigenvalues ≤ ε, or ≤ ε·λ_max, count as zero).
        hessian_rank, hessian_nullity: at ε (exact, or an SLQ estimate with ``hessian_stderr``).
        hessian_method: ``"exact"``, ``"lanczos"`` or ``None`` (not computed).
        union: dimension of the span of the explicit free directions, or None when not computed.
        neuron_layers, attention_layers: the synchronisation analyses (dicts).
        sites: per-site ranks (activation and Jacobian).
    """

    rows: list[SourceRow]
    num_parameters: int
    covered_parameters: int
    epsilon: float
    relative: bool
    kind: str
    num_examples: int
    hessian_rank: float | None = None
    hessian_nullity: float | None = None
    hessian_stderr: float | None = None
    hessian_method: str | None = None
    union: int | None = None
    neuron_layers: list[dict[str, Any]] = field(default_factory=list)
    attention_layers: list[dict[str, Any]] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    version: str = ""

    @property
    def total(self) -> int:
        """Σ of all row counts (generic rows included; Jacobian rows are upper bounds)."""
        return sum(r.count for r in self.rows)

    @property
    def total_non_generic(self) -> int:
        return sum(r.count for r in self.rows if not r.generic)

    def count(self, source: str, layer: str | None = None) -> int:
        """Sum of the counts of rows of one source (optionally one layer)."""
        return sum(r.count for r in self.rows if r.source == source and (layer is None or r.layer == layer))

    def row(self, source: str, layer: str) -> SourceRow | None:
        for r in self.rows:
            if r.source == source and r.layer == layer:
                return r
        return None

    def __str__(self) -> str:
        eps = f"{self.epsilon:g}{' (relative)' if self.relative else ''}"
        lines = [f"Degeneracy report (kind={self.kind}, ε={eps}, n={self.num_examples})"]
        w_layer = max([len("layer"), *(len(r.layer) for r in self.rows)])
        w_source = max([len("source"), *(len(r.source) for r in self.rows)])
        lines.append(f"  {'layer':<{w_layer}}  {'source':<{w_source}}  {'count':>9}")
        lines.append(f"  {'-' * w_layer}  {'-' * w_source}  {'-' * 9}")
        for r in self.rows:
            mark = " ≤" if r.is_upper_bound else ""
            mark += " (generic)" if r.generic else ""
            lines.append(f"  {r.layer:<{w_layer}}  {r.source:<{w_source}}  {r.count:>9}{mark}")
        lines.append(f"  {'-' * w_layer}  {'-' * w_source}  {'-' * 9}")
        lines.append(f"  {'total counted':<{w_layer + w_source + 2}}  {self.total:>9}")
        if self.union is not None:
            lines.append(f"  {'distinct (span of directions)':<{w_layer + w_source + 2}}  {self.union:>9}")
        lines.append(f"  {'nominal parameters N':<{w_layer + w_source + 2}}  {self.num_parameters:>9}")
        if self.hessian_nullity is not None:
            approx = "" if self.hessian_method == "exact" else f" ± {self.hessian_stderr:.3g} (SLQ)"
            label = f"Hessian nullity ({self.hessian_method})"
            value = (
                f"{self.hessian_nullity:.0f}"
                if self.hessian_method == "exact"
                else f"{self.hessian_nullity:.1f}"
            )
            lines.append(f"  {label:<{w_layer + w_source + 2}}  {value:>9}{approx}")
            rank = (
                f"{self.hessian_rank:.0f}" if self.hessian_method == "exact" else f"{self.hessian_rank:.1f}"
            )
            lines.append(f"  {'Hessian rank':<{w_layer + w_source + 2}}  {rank:>9}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def attach_hessian(self, spectrum: HessianSpectrum) -> None:
        """Record the Hessian rank and nullity at this report's ε from a spectrum (exact when complete,
        else the SLQ estimate when the spectrum has a density)."""
        self.hessian_method = spectrum.method
        n = self.num_parameters
        if spectrum.complete:
            rank = spectrum.rank(self.epsilon, relative=self.relative)
            self.hessian_rank, self.hessian_nullity, self.hessian_stderr = float(rank), float(n - rank), 0.0
        elif spectrum.density:
            est, err = spectrum.rank_estimate(self.epsilon, relative=self.relative)
            self.hessian_rank, self.hessian_nullity, self.hessian_stderr = est, n - est, err
        self.config["hessian_eigenvalues_top"] = spectrum.eigenvalues[:10].tolist()
        self.config["hessian_timings"] = spectrum.timings
        self.config["hessian_floor"] = spectrum.floor

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "num_parameters": self.num_parameters,
            "covered_parameters": self.covered_parameters,
            "epsilon": self.epsilon,
            "relative": self.relative,
            "kind": self.kind,
            "num_examples": self.num_examples,
            "hessian_rank": self.hessian_rank,
            "hessian_nullity": self.hessian_nullity,
            "hessian_stderr": self.hessian_stderr,
            "hessian_method": self.hessian_method,
            "union": self.union,
            "total": self.total,
            "neuron_layers": self.neuron_layers,
            "attention_layers": self.attention_layers,
            "sites": self.sites,
            "notes": self.notes,
            "timings": self.timings,
            "config": self.config,
            "version": self.version,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DegeneracyReport:
        rows = [SourceRow(**r) for r in d["rows"]]
        fields = {k: v for k, v in d.items() if k not in ("rows", "total")}
        return cls(rows=rows, **fields)

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (temporary file + ``os.replace``)."""
        return _atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DegeneracyReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------------


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
    act = gram_rank(gram, epsilon, relative=relative, samples=samples, src_dtype=in_stats.dtype)
    k = stats.jacobian_gram(site.output_point)
    jac = None
    if k is not None:
        jac = gram_rank(k, epsilon, relative=relative, samples=samples, src_dtype=out_stats.dtype)
    return act, jac, mask


def _smallest(info: RankInfo, count: int = 3) -> list[float]:
    return [float(v) for v in info.eigenvalues[-count:].tolist()] if info.dim else []


def degeneracy_report(
    model: nn.Module,
    data: Any,
    *,
    epsilon: float = 0.0,
    relative: bool = False,
    kind: LossKind = "mse",
    position: int | None = None,
    forward: ForwardFn | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    jacobians: bool = True,
    jacobian_projections: int | None = None,
    hessian: str | None = "auto",
    hessian_options: dict[str, Any] | None = None,
    hessian_forward: ForwardFn | None = None,
    union_max_parameters: int = 20_000,
    gated: bool | None = None,
    seed: int = 0,
) -> DegeneracyReport:
    """Count the free directions of ``model`` on ``data`` by source and layer, at noise scale ε.

    Args:
        model: a plain torch model built from ``nn.Linear`` and ReLU/LeakyReLU/Identity modules, or a
            TransformerLens ``HookedTransformer`` (others: the parts that fit are analysed).
        data: the dataset D (anything :func:`degeneracy.data.iter_batches` reads).
        epsilon: eigenvalues (and synchronisation residuals) at or below ε count as zero.
        relative: ε relative to the largest eigenvalue of each matrix instead of absolute.
        kind: behavioral loss, ``"mse"`` (eq 6) or ``"kl"``; it sets the output whitening of the
            Jacobian Grams and the Hessian.
        position: read a ``(batch, pos, d)`` output at one position (``-1``: last token).
        forward: ``forward(model, inputs)`` replacing ``model(inputs)`` for the statistics (it must call
            the model's modules, so that hooks fire).
        batch_size: batch size of every pass.
        dtype: cast a copy of the model (and float inputs) to this dtype first (e.g. ``torch.float64``).
        jacobians: compute Jacobian Grams (needed for Jacobian rank drops, t_a and relevant positions).
        jacobian_projections: estimate Jacobian Grams from this many random output projections.
        hessian: ``"auto"``, ``"exact"``, ``"lanczos"`` or ``None`` (skip the Hessian).
        hessian_options: extra arguments of :func:`degeneracy.accounting.hessian_analysis` (for
            ``"lanczos"`` the default is ``k=50, rank_probes=8, rank_steps=60``).
        hessian_forward: a cheaper ``forward`` for the Hessian only (may bypass hooks).
        union_max_parameters: compute the exact union of free directions up to this N.
        gated: compute the gated activation ranks of ReLU layers (``None``: when they cost at most
            about 4e9 operations).
        seed: seeds the projections and stochastic estimates.
    """
    from degeneracy import __version__

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    batches = materialize(data, batch_size)
    if dtype is not None:
        from degeneracy.accounting._model import cast_inputs
        from degeneracy.data import Batch

        batches = [Batch(cast_inputs(b.inputs, dtype), b.extras) for b in batches]
    structure = discover(model, batches[0].inputs)
    timings["discover"] = time.perf_counter() - t0
    t = time.perf_counter()
    stats = collect_for_structure(
        model,
        batches,
        structure,
        jacobians=jacobians,
        kind=kind,
        position=position,
        forward=forward,
        jacobian_projections=jacobian_projections,
        seed=seed,
    )
    timings["statistics"] = time.perf_counter() - t
    flat = structure.spec.flatten(dict(model.named_parameters())).detach().to(torch.float64)
    n_params = structure.spec.size
    want_union = n_params <= union_max_parameters
    directions: dict[str, list[Tensor]] = {}

    rows: list[SourceRow] = []
    site_info: list[dict[str, Any]] = []
    t = time.perf_counter()
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
    timings["sites"] = time.perf_counter() - t

    t = time.perf_counter()
    neuron_results: list[NeuronSync] = []
    gate_notes: list[str] = []
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
    timings["neurons"] = time.perf_counter() - t

    t = time.perf_counter()
    head_results: list[HeadSync] = []
    spec_index = {
        name: torch.arange(structure.spec.slice(name).start, structure.spec.slice(name).stop).view(shape)
        for name, shape in zip(structure.spec.names, structure.spec.shapes, strict=True)
    }
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
        names = set(structure.spec.names)
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
    timings["attention"] = time.perf_counter() - t

    notes = list(structure.notes) + gate_notes
    covered = structure.covered_parameters()
    if covered < n_params:
        notes.append(f"{n_params - covered} of {n_params} parameters lie outside the analysed linear sites")
    if stats.projections is not None:
        notes.append(f"Jacobian Grams estimated from {stats.projections} random output projections")

    union = None
    hessian_result: HessianSpectrum | None = None
    t = time.perf_counter()
    if hessian is not None:
        options = dict(hessian_options or {})
        if hessian == "lanczos":
            options.setdefault("rank_probes", 8)
            options.setdefault("rank_steps", 60)
        hessian_result = hessian_analysis(
            model,
            batches,
            kind=kind,
            method=hessian,  # type: ignore[arg-type]
            position=position,
            forward=hessian_forward or forward,
            seed=seed,
            **options,
        )
    timings["hessian"] = time.perf_counter() - t

    t = time.perf_counter()
    if want_union and directions:
        matrices = [m for ms in directions.values() for m in ms]
        union = union_rank(matrices)
        if hessian_result is not None and hessian_result.complete:
            _attach_checks(
                rows, directions, model, batches, kind, position, hessian_forward or forward, hessian_result
            )
    elif not want_union:
        notes.append(f"union of free directions not computed (N = {n_params} > {union_max_parameters})")
    timings["union"] = time.perf_counter() - t

    report = DegeneracyReport(
        rows=rows,
        num_parameters=n_params,
        covered_parameters=covered,
        epsilon=epsilon,
        relative=relative,
        kind=kind,
        num_examples=stats.num_examples,
        union=union,
        neuron_layers=[s.to_dict() for s in neuron_results],
        attention_layers=[h.to_dict() for h in head_results],
        sites=site_info,
        notes=notes,
        config={
            "epsilon": epsilon,
            "relative": relative,
            "kind": kind,
            "position": position,
            "batch_size": batch_size,
            "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
            "jacobians": jacobians,
            "jacobian_projections": jacobian_projections,
            "hessian": hessian,
            "gated": gated,
            "seed": seed,
        },
        version=__version__,
    )
    if hessian_result is not None:
        report.attach_hessian(hessian_result)
    timings["total"] = time.perf_counter() - t0
    report.timings = timings
    return report


def _attach_checks(
    rows: list[SourceRow],
    directions: dict[str, list[Tensor]],
    model: nn.Module,
    batches: list[Any],
    kind: LossKind,
    position: int | None,
    forward: ForwardFn | None,
    spectrum: HessianSpectrum,
) -> None:
    """For each source, vᵀHv/(‖v‖² λ_max) of a random combination v of its directions (≈ 0 if null)."""
    op = BehavioralHessian(model, batches, kind, position=position, forward=forward, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    top = max(float(spectrum.eigenvalues[0]), 1e-300)
    curvature: dict[str, float] = {}
    for key, mats in directions.items():
        m = torch.cat(mats, dim=0)
        if m.shape[0] == 0:
            continue
        coeff = torch.randn(m.shape[0], generator=generator, dtype=torch.float64)
        v = coeff @ m
        norm2 = float(v.pow(2).sum())
        if norm2 == 0:
            continue
        curvature[key] = op.quadratic_form(v) / (norm2 * top)
    for r in rows:
        key_source = {
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
        }.get(r.source)
        if key_source is not None and f"{r.layer}/{key_source}" in curvature:
            r.details["relative_curvature"] = curvature[f"{r.layer}/{key_source}"]
