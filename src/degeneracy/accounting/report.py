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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from degeneracy.accounting.directions import union_rank
from degeneracy.accounting.hessian import BehavioralHessian, HessianSpectrum, hessian_spectrum
from degeneracy.accounting.records import record
from degeneracy.accounting.rows import (
    SOURCE_KEYS,
    Ledger,
    SourceRow,
    attention_rows,
    neuron_rows,
    site_rows,
)
from degeneracy.accounting.sources import check_epsilon
from degeneracy.accounting.statistics import collect_for_structure
from degeneracy.accounting.structure import discover
from degeneracy.adapters.huggingface import with_eager_attention
from degeneracy.behavioral import LossKind
from degeneracy.data import in_eval_mode
from degeneracy.deprecation import renamed_arguments
from degeneracy.display import html_summary, text_summary
from degeneracy.fingerprint import result_fingerprint
from degeneracy.io import JsonResult, json_text
from degeneracy.run import ForwardFn, ModelRun, full_precision

__all__ = ["SourceRow", "DegeneracyReport", "degeneracy_report", "load_degeneracy_report", "curvature_checks"]


@dataclass
class DegeneracyReport(JsonResult):
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

    >>> report = DegeneracyReport([SourceRow("fc1", "activation rank", 8)], 20, 20, 0.0, False, "mse", 10)
    >>> report.total, report.count("activation rank", "fc1")
    (8, 8)
    >>> import json
    >>> DegeneracyReport.from_dict(json.loads(report.to_json())).rows[0].count
    8
    """

    KIND: ClassVar[str] = "degeneracy_report"

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

    def _display(self) -> tuple[str, list[tuple[str, Any]], list[str], list[list[Any]]]:
        eps = f"{self.epsilon:g}{' (relative)' if self.relative else ''}"
        title = f"DegeneracyReport: kind={self.kind}, ε={eps}, n={self.num_examples:,}"
        facts: list[tuple[str, Any]] = [
            ("nominal parameters N", self.num_parameters),
            ("free directions counted (Σ rows)", self.total),
            ("distinct (span of directions)", self.union),
        ]
        if self.hessian_nullity is not None:
            facts += [
                (f"Hessian rank ({self.hessian_method})", self.hessian_rank),
                (f"Hessian nullity ({self.hessian_method})", self.hessian_nullity),
            ]
        rows = [
            [r.layer, r.source, r.count, "≤ (upper bound)" if r.is_upper_bound else "", "generic" * r.generic]
            for r in self.rows
        ]
        return title, facts, ["layer", "source", "free directions", "bound", "generic"], rows

    def __repr__(self) -> str:
        """The headline counts and the first rows (``print(report)`` shows every row).

        >>> report = DegeneracyReport([SourceRow("fc1", "activation rank", 8)], 20, 20, 0.0, False, "mse", 10)
        >>> print(repr(report))
        DegeneracyReport: kind=mse, ε=0, n=10
          nominal parameters N: 20
          free directions counted (Σ rows): 8
          distinct (span of directions): –
          layer  source           free directions  bound  generic
          fc1    activation rank                8
        """
        return text_summary(*self._display())

    def _repr_html_(self) -> str:
        return html_summary(*self._display())

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
        """Every field (rows as dicts) and the ``total``; :meth:`from_dict` reads it back.

        >>> report = DegeneracyReport([SourceRow("fc1", "activation rank", 8)], 20, 20, 0.0, False, "mse", 10)
        >>> report.to_dict()["total"], report.to_dict()["rows"][0]["source"]
        (8, 'activation rank')
        """
        return {**record(self, derived=("total",)), "rows": [r.to_dict() for r in self.rows]}

    def to_json(self, **kwargs: Any) -> str:
        return json_text(self.to_dict(), indent=2, **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DegeneracyReport:
        rows = [SourceRow(**r) for r in d["rows"]]
        fields = {k: v for k, v in d.items() if k not in ("rows", "total")}
        return cls(rows=rows, **fields)



def load_degeneracy_report(path: str | Path) -> DegeneracyReport:
    """Read a report written by :meth:`DegeneracyReport.save` (same as ``DegeneracyReport.load``).

    >>> import tempfile
    >>> report = DegeneracyReport([SourceRow("fc1", "activation rank", 8)], 20, 20, 0.0, False, "mse", 10)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     loaded = load_degeneracy_report(report.save(Path(folder) / "report.json"))
    >>> loaded == report
    True
    """
    return DegeneracyReport.load(path)


# ---------------------------------------------------------------------------------------------------


@renamed_arguments(position="positions")
@full_precision()
@in_eval_mode
@with_eager_attention
def degeneracy_report(
    model: nn.Module,
    data: Any,
    *,
    epsilon: float = 0.0,
    relative: bool = False,
    kind: LossKind = "mse",
    positions: int | None = None,
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

    Steps: discover the structure, collect the statistics, count the sources per layer (sites, neuron
    layers, attention layers), the Hessian spectrum, the span of the explicit directions with a curvature
    check of each source, and the report.

    Args:
        model: a plain torch model built from ``nn.Linear`` and ReLU/LeakyReLU/Identity modules, or a
            TransformerLens ``HookedTransformer`` (others: the parts that fit are analysed).
        data: the dataset D (anything :func:`degeneracy.data.iter_batches` reads).
        epsilon: eigenvalues (and synchronisation residuals) at or below ε count as zero.
        relative: ε relative to the largest eigenvalue of each matrix instead of absolute.
        kind: behavioral loss, ``"mse"`` (eq 6) or ``"kl"``; it sets the output whitening of the
            Jacobian Grams and the Hessian.
        positions: read a ``(batch, pos, d)`` output at one position (``-1``: last token); ``None``: all.
            (``position=`` is the deprecated name.)
        forward: ``forward(model, inputs)`` replacing ``model(inputs)`` for the statistics (it must call
            the model's modules, so that node layers can be read).
        batch_size: batch size of every pass.
        dtype: compute in this dtype (a cast copy of the model, and float inputs cast; see
            :class:`degeneracy.run.ModelRun`), e.g. ``torch.float64``.
        jacobians: compute Jacobian Grams (needed for Jacobian rank drops, t_a and relevant positions).
        jacobian_projections: estimate Jacobian Grams from this many random output projections.
        hessian: ``"auto"``, ``"exact"``, ``"lanczos"`` or ``None`` (skip the Hessian).
        hessian_options: extra arguments of :func:`degeneracy.accounting.hessian_spectrum` (for
            ``"lanczos"`` the default is ``k=50, num_rank_probes=8, num_rank_steps=60``).
        hessian_forward: a cheaper ``forward`` for the Hessian only (may bypass the modules).
        union_max_parameters: compute the exact union of free directions up to this N.
        gated: compute the gated activation ranks of ReLU layers (``None``: when they cost at most
            about 4e9 operations).
        seed: seeds the projections and stochastic estimates.

    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(30, 3, dtype=torch.float64)
    >>> x[:, 2] = 0.0  # a constant input: one activation rank drop, d_out = 4 free directions
    >>> report = degeneracy_report(model, x, hessian=None)
    >>> report.count("activation rank", "0"), report.hessian_nullity
    (4, None)
    """
    from degeneracy import __version__

    check_epsilon(epsilon, relative)  # before any pass over the data
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run = ModelRun(model, data, dtype=dtype, batch_size=batch_size, cache=False)
    model, batches = run.model, run.materialize()
    structure = discover(model, batches[0].inputs)
    timings["discover"] = time.perf_counter() - t0

    t = time.perf_counter()
    stats = collect_for_structure(
        model,
        batches,
        structure,
        jacobians=jacobians,
        kind=kind,
        positions=positions,
        forward=forward,
        jacobian_projections=jacobian_projections,
        seed=seed,
    )
    timings["statistics"] = time.perf_counter() - t

    n_params = structure.layout.numel
    flat = structure.layout.flatten(dict(model.named_parameters())).detach().to(torch.float64)
    ledger = Ledger(n_params, flat, want_union=n_params <= union_max_parameters, notes=list(structure.notes))
    t = time.perf_counter()
    site_rows(stats, structure, ledger, epsilon, relative)
    timings["sites"] = time.perf_counter() - t
    t = time.perf_counter()
    neuron_results = neuron_rows(stats, structure, ledger, epsilon, relative, gated)
    timings["neurons"] = time.perf_counter() - t
    t = time.perf_counter()
    head_results = attention_rows(stats, structure, ledger, epsilon, relative)
    timings["attention"] = time.perf_counter() - t

    covered = structure.covered_parameters()
    if covered < n_params:
        ledger.notes.append(
            f"{n_params - covered} of {n_params} parameters lie outside the analysed linear sites"
        )
    if stats.projections is not None:
        ledger.notes.append(f"Jacobian Grams estimated from {stats.projections} random output projections")

    t = time.perf_counter()
    spectrum = _hessian(
        model, batches, hessian, hessian_options, kind, positions, hessian_forward or forward, seed
    )
    timings["hessian"] = time.perf_counter() - t

    t = time.perf_counter()
    union = _span(
        ledger, model, batches, kind, positions, hessian_forward or forward, spectrum, union_max_parameters
    )
    timings["union"] = time.perf_counter() - t

    report = DegeneracyReport(
        rows=ledger.rows,
        num_parameters=n_params,
        covered_parameters=covered,
        epsilon=epsilon,
        relative=relative,
        kind=kind,
        num_examples=stats.num_examples,
        union=union,
        neuron_layers=[s.to_dict() for s in neuron_results],
        attention_layers=[h.to_dict() for h in head_results],
        sites=ledger.sites,
        notes=ledger.notes,
        config={
            "epsilon": epsilon,
            "relative": relative,
            "kind": kind,
            "position": positions,
            "batch_size": batch_size,
            "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
            "jacobians": jacobians,
            "jacobian_projections": jacobian_projections,
            "hessian": hessian,
            "gated": gated,
            "seed": seed,
            "fingerprint": result_fingerprint(model, data),  # model + data (older files have none)
        },
        version=__version__,
    )
    if spectrum is not None:
        report.attach_hessian(spectrum)
    timings["total"] = time.perf_counter() - t0
    report.timings = timings
    return report


def _hessian(
    model: nn.Module,
    batches: list[Any],
    method: str | None,
    options: dict[str, Any] | None,
    kind: LossKind,
    positions: int | None,
    forward: ForwardFn | None,
    seed: int,
) -> HessianSpectrum | None:
    """The Hessian step: :func:`hessian_spectrum` with the report's defaults (``None``: skipped)."""
    if method is None:
        return None
    options = dict(options or {})
    for old in ("rank_probes", "rank_steps", "trace_probes"):  # former names (deprecated)
        if old in options:
            options.setdefault(f"num_{old}", options.pop(old))
    if method == "lanczos":
        options.setdefault("num_rank_probes", 8)
        options.setdefault("num_rank_steps", 60)
    return hessian_spectrum(
        model,
        batches,
        kind=kind,
        method=method,
        positions=positions,
        forward=forward,
        seed=seed,
        **options,  # type: ignore[arg-type]
    )


def _span(
    ledger: Ledger,
    model: nn.Module,
    batches: list[Any],
    kind: LossKind,
    positions: int | None,
    forward: ForwardFn | None,
    spectrum: HessianSpectrum | None,
    union_max_parameters: int,
) -> int | None:
    """The span step: dim of the span of every explicit direction, and each source's curvature check."""
    if not ledger.want_union:
        ledger.notes.append(
            f"union of free directions not computed (N = {ledger.num_parameters} > {union_max_parameters})"
        )
        return None
    if not ledger.directions:
        return None
    union = union_rank([m for ms in ledger.directions.values() for m in ms])
    if spectrum is not None and spectrum.complete:
        curvature_checks(ledger.rows, ledger.directions, model, batches, kind, positions, forward, spectrum)
    return union


def curvature_checks(
    rows: list[SourceRow],
    directions: dict[str, list[Tensor]],
    model: nn.Module,
    batches: list[Any],
    kind: LossKind,
    positions: int | None,
    forward: ForwardFn | None,
    spectrum: HessianSpectrum,
) -> None:
    """For each source, vᵀHv/(‖v‖² λ_max) of a random combination v of its explicit directions (≈ 0 when
    they are Hessian-null), stored as ``relative_curvature`` in the rows' details.

    >>> from degeneracy.data import Batch
    >>> model = torch.nn.Linear(2, 1).double()  # parameters [w₀, w₁, b]
    >>> x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> x[:, 1] = 0.0  # input 1 is constant: w₁ is a free direction
    >>> batches = [Batch(x)]
    >>> spectrum = hessian_spectrum(model, batches, method="exact")
    >>> rows = [SourceRow("0", "activation rank", 1), SourceRow("1", "activation rank", 1)]
    >>> e = torch.eye(3, dtype=torch.float64)
    >>> directions = {"0/activation": [e[1:2]], "1/activation": [e[0:1]]}  # w₁ (free) and w₀ (not)
    >>> curvature_checks(rows, directions, model, batches, "mse", None, None, spectrum)
    >>> [round(r.details["relative_curvature"], 4) for r in rows]
    [0.0, 0.7547]
    """
    op = BehavioralHessian(model, batches, kind, positions=positions, forward=forward, dtype=torch.float64)
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
        key_source = SOURCE_KEYS.get(r.source)
        if key_source is not None and f"{r.layer}/{key_source}" in curvature:
            r.details["relative_curvature"] = curvature[f"{r.layer}/{key_source}"]
