"""Interaction bases: LIB (default), the global interaction basis, PCA and neuron baselines.

METHOD §2 in symbols: G = E[f fᵀ] (centred when ``center``), whitening R = diag(D)^{-1/2} Uᵀ;
for LIB, M = E_s Σ_(t,i) Jᵀ J with J = ∂f̂^{l+1}/∂z the Jacobian of the next layer's features with
respect to the whitened activations z = R f; M = Vᵀ diag(Λ) V and C = diag(Λ)^{1/2} V R. The global
basis uses the final layer's features instead of the next layer's (paper §6, eq 40).

With ``center=True`` (or ``constant_coordinate=True``) activations carry a constant coordinate
(METHOD §0): node-layer vectors are [f; 1] of width d + 1, and direction 0 of every centred basis is
the constant direction, kept always and left out of the eigendecomposition of M.

The results (:class:`Basis`, :class:`LayerBasis`, :class:`BasisConfig`, :func:`load_basis`) live in
:mod:`degeneracy.basis_result` and are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor, nn

import degeneracy
from degeneracy.adapters.huggingface import eager_attention
from degeneracy.adapters.huggingface_sections import huggingface_family
from degeneracy.adapters.transformer_lens import is_hooked_transformer
from degeneracy.basis_result import (
    METHODS,
    Basis,
    BasisConfig,
    LayerBasis,
    Method,
    config_from,
    dtype_name,
    load_basis,
)
from degeneracy.capture import (
    NodeLayer,
    as_node_layers,
    capture,
    compact_is_exact,
    module_widths,
    section,
)
from degeneracy.cuts import check_cut
from degeneracy.data import eval_mode, node_mask
from degeneracy.deprecation import renamed_arguments
from degeneracy.distributed import global_indices
from degeneracy.fingerprint import fingerprint
from degeneracy.jacobian import constant_jacobian, gram_of_constant_jacobian, jacobian_gram
from degeneracy.linalg import (
    Eigh,
    eigh_descending,
    homogeneous_rule,
    integration_rule,
    truncate,
    whitening,
)
from degeneracy.probes import (
    SignSource,
    build_cost,
    draw_signs,
    eigenvalue_se,
    resolve_sources,
    source_gram,
)
from degeneracy.run import ModelRun, full_precision
from degeneracy.sections import SectionFn, Sections, resolve_sections, shortcut_gram, slice_inputs
from degeneracy.stats import MatrixAccumulator, MomentAccumulator, check_finite

__all__ = [
    "METHODS",
    "Method",
    "BasisConfig",
    "LayerBasis",
    "Basis",
    "interaction_basis",
    "load_basis",
    "NodeLayerRun",
    "collect_moments",
    "Whitening",
    "pca_step",
]


class NodeLayerRun(ModelRun):
    """A :class:`~degeneracy.run.ModelRun` at node layers: the model on its (sharded, cast) data, the
    checked node layers and, once :meth:`learn_widths` has seen a batch, the module widths of node
    layers that concatenate several modules.

    >>> run = NodeLayerRun(torch.nn.Linear(3, 2), torch.ones(5, 3), ["output"], batch_size=2)
    >>> [layer.name for layer in run.layers], run.n
    (['output'], 5)
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        node_layers: Sequence[str | Mapping[str, Any] | NodeLayer],
        *,
        dtype: str | torch.dtype | None = None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(model, data, dtype=dtype, batch_size=batch_size, device=device)
        self.layers = as_node_layers(self.model, node_layers)
        self.widths: dict[str, list[int]] = {}
        self.num_seen, self.padded = 0, False  # examples read by collect_moments; any padding seen

    def layer(self, name: str) -> NodeLayer:
        """The node layer called ``name``."""
        return next(layer for layer in self.layers if layer.name == name)

    def masks(self, inputs: Any, acts: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
        """The valid (unpadded) positions of each node layer's activations ``acts`` of the batch
        ``inputs``: ``(batch, pos)`` bools, or ``None`` where all are valid
        (:func:`degeneracy.data.node_mask`)."""
        return {name: node_mask(inputs, self.layer(name).positions, x.shape[1]) for name, x in acts.items()}

    def learn_widths(self, inputs: Any) -> dict[str, list[int]]:
        """The widths of the modules of every multi-module node layer, from one batch's ``inputs``."""
        self.widths = {
            layer.name: module_widths(self.model, inputs, layer)
            for layer in self.layers
            if len(layer.modules) > 1
        }
        return self.widths


# ---------------------------------------------------------------------------------------------------
# Pure steps


@dataclass(frozen=True)
class Whitening:
    """R (k × d) and R₊ (d × k) with R R₊ = I; row 0 is the constant direction when ``has_constant``.

    >>> from degeneracy.stats import MomentAccumulator
    >>> acc = MomentAccumulator(2)
    >>> acc.update(torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]], dtype=torch.float64))
    >>> w = pca_step(acc, BasisConfig(center=False))
    >>> (w.R @ w.R_pinv).tolist()
    [[1.0]]
    """

    R: Tensor
    R_pinv: Tensor
    gram: Eigh  # truncated (centred) Gram eigensystem, D and U
    all_values: Tensor
    has_constant: bool  # row 0 is the constant direction (centred variant)
    augmented: bool  # vectors are [f; 1]
    truncated_mass: float


def pca_step(moments: MomentAccumulator, cfg: BasisConfig) -> Whitening:
    """Eigendecompose G (centred with a constant direction, or plain) and build the whitening maps.

    >>> from degeneracy.stats import MomentAccumulator
    >>> acc = MomentAccumulator(2)
    >>> acc.update(torch.tensor([[[2.0, 0.0]], [[-2.0, 0.0]]], dtype=torch.float64))
    >>> pca_step(acc, BasisConfig(center=False)).R.tolist()  # D^{-1/2} Uᵀ on the kept direction
    [[0.5, 0.0]]
    """
    centre = cfg.center
    if centre:
        d = moments.d - 1
        cov = moments.covariance[:d, :d]
        mean = moments.mean[:d]
    else:
        cov = moments.gram
    full = eigh_descending(cov)
    kept, k = truncate(full, cfg.gram_threshold, relative=cfg.relative)
    total = float(full.values.clamp_min(0).sum())
    mass = 0.0 if total == 0 else float(full.values[k:].clamp_min(0).sum()) / total
    R, R_pinv = whitening(kept)
    if centre:
        # z_0 = constant coordinate; z_i = D^{-1/2} Uᵀ (f − μ)  (METHOD §0 option (b))
        R_aug = torch.zeros(k + 1, d + 1, dtype=torch.float64)
        R_aug[0, d] = 1.0
        R_aug[1:, :d] = R
        R_aug[1:, d] = -(R @ mean)
        Rp_aug = torch.zeros(d + 1, k + 1, dtype=torch.float64)
        Rp_aug[:d, 0] = mean
        Rp_aug[d, 0] = 1.0
        Rp_aug[:d, 1:] = R_pinv
        R, R_pinv = R_aug, Rp_aug
    return Whitening(R, R_pinv, kept, full.values, centre, cfg.has_constant, mass)


def _pca_basis(name: str, w: Whitening, positions: int) -> LayerBasis:
    """PCA baseline: unwhitened principal directions, C = Uᵀ (plus the constant direction)."""
    scale = w.gram.values.sqrt()
    if w.has_constant:
        scale = torch.cat([torch.ones(1, dtype=torch.float64), scale])
        eig = torch.cat([torch.ones(1, dtype=torch.float64), w.gram.values])
    else:
        eig = w.gram.values
    C = scale[:, None] * w.R
    C_pinv = w.R_pinv / scale[None, :]
    return LayerBasis(name, C, C_pinv, eig, w.all_values, w.augmented, positions, w.truncated_mass)


def _neuron_basis(name: str, moments: MomentAccumulator, w: Whitening, positions: int) -> LayerBasis:
    """Neuron baseline: C = I, reordered so that the constant coordinate (if any) comes first."""
    d = moments.d
    order = [d - 1, *range(d - 1)] if w.augmented else list(range(d))
    C = torch.eye(d, dtype=torch.float64)[order]
    eig = torch.diagonal(moments.gram)[order].clone()
    return LayerBasis(name, C, C.T.clone(), eig, w.all_values, w.augmented, positions)


def _interaction_step(
    name: str,
    w: Whitening,
    M: Float[Tensor, "k k"],
    cfg: BasisConfig,
    positions: int,
    per_source: Float[Tensor, "sources k k"] | None = None,
) -> LayerBasis:
    """C = diag(Λ)^{1/2} V R from M = Vᵀ diag(Λ) V; the constant direction (if any) kept as row 0.
    With ``per_source`` (the independent estimates M_r whose mean is M) the eigenvalues get their
    standard errors."""
    start = 1 if w.has_constant else 0
    full = eigh_descending(M[start:, start:])
    kept, k = truncate(full, cfg.interaction_threshold, relative=cfg.relative)
    total = float(full.values.clamp_min(0).sum())
    mass = 0.0 if total == 0 else float(full.values[k:].clamp_min(0).sum()) / total
    sqrt = kept.values.sqrt()
    rows = sqrt[:, None] * (kept.vectors.T @ w.R[start:])
    cols = (w.R_pinv[:, start:] @ kept.vectors) / sqrt[None, :]
    eig = kept.values
    se = None if per_source is None else eigenvalue_se(per_source[:, start:, start:], kept.vectors)
    if w.has_constant:
        # the constant direction: scaled by sqrt(M_00) so that E[f̂_0²] = Λ_0 (1 if it has no effect)
        lam0 = float(M[0, 0])
        lam0 = (
            lam0
            if lam0 > cfg.interaction_threshold * float(full.values[0].clamp_min(0)) and lam0 > 0
            else 1.0
        )
        s0 = lam0**0.5
        rows = torch.cat([s0 * w.R[:1], rows])
        cols = torch.cat([w.R_pinv[:, :1] / s0, cols], dim=1)
        eig = torch.cat([torch.tensor([lam0], dtype=torch.float64), eig])
        if se is not None and per_source is not None:  # Λ_0 = M_00 (or 1 when it is not used)
            se0 = eigenvalue_se(per_source, torch.eye(M.shape[0], 1, dtype=torch.float64))
            se = torch.cat([se0 if lam0 == float(M[0, 0]) else torch.zeros(1, dtype=torch.float64), se])
    return LayerBasis(name, rows, cols, eig, w.all_values, w.augmented, positions, w.truncated_mass, mass, se)


# ---------------------------------------------------------------------------------------------------
# The driver


@renamed_arguments(relative_thresholds="relative")
def interaction_basis(
    model: nn.Module,
    data: Any,
    node_layers: Sequence[str | Mapping[str, Any] | NodeLayer],
    *,
    method: Method = "lib",
    center: bool = True,
    constant_coordinate: bool | None = None,
    gram_threshold: float = 1e-10,
    interaction_threshold: float = 1e-10,
    relative: bool = True,
    rotate_final: bool = True,
    integration_rule: str = "gradient",
    integration_steps: int = 1,
    batch_size: int | None = 1024,
    jacobian_mode: Literal["auto", "vjp", "jvp"] = "auto",
    max_elements: int = 2**20,
    dtype: str | torch.dtype | None = None,
    check_cut: bool = True,
    sections: Sections = "auto",
    num_sources: int | None = None,
    seed: int = 0,
    sources: str | SignSource = "rademacher",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Basis:
    """Build an interaction basis at every node layer of ``model`` over ``data``.

    Args:
        model: any ``torch.nn.Module`` (plain torch, TransformerLens, Hugging Face). It is run in
            eval mode for the build and restored afterwards.
        data: a tensor of inputs, a dict of keyword tensors, or an iterable of batches
            (see :mod:`degeneracy.data`). Float inputs must match the model dtype unless ``dtype`` is given.
        node_layers: ordered node layers l = 0..L: module names (the activation is the module's
            input), ``"output"`` (the model output, last only), dicts
            ``{"name", "modules", "positions", "read"}`` or :class:`~degeneracy.capture.NodeLayer`.
            Each must be a cut (checked on the first batch unless ``check_cut=False``).
        method: ``"lib"`` (Local Interaction Basis, default), ``"global"`` (paper §6), ``"pca"``,
            ``"neuron"``.
        center: centre activations and keep the mean as constant direction 0 (METHOD §0 option (b));
            ``False`` uses plain uncentred second moments.
        constant_coordinate: with ``center=False``, ``True`` appends a constant coordinate 1 and
            uses uncentred moments of [f; 1] (option (a)). Defaults to ``center``.
        gram_threshold: truncation of the Gram eigenvalues (PCA step), relative to the largest.
        interaction_threshold: truncation of the eigenvalues of M, relative to the largest.
        relative: ``False`` makes both thresholds absolute (formerly ``relative_thresholds``).
        rotate_final: PCA-rotate the last node layer (default); ``False`` keeps its neuron basis.
        integration_rule: basis Jacobian rule, ``"gradient"`` (default, J at the input),
            ``"trapezoid"`` (``integration_steps`` intervals) or ``"gauss-legendre"``
            (``integration_steps + 1`` nodes), integrated from the zero baseline (METHOD §3).
        integration_steps: see ``integration_rule``.
        batch_size: examples per forward pass (bounds memory with ``max_elements``).
        jacobian_mode: ``"vjp"``, ``"jvp"`` or ``"auto"`` (fewer products wins).
        max_elements: the largest number of entries a vmapped Jacobian chunk may hold.
        dtype: compute dtype (e.g. ``"float64"``); the model is copied and cast if it differs.
            Statistics and eigendecompositions are always float64; results are float64.
        check_cut: verify on the first batch that each node layer is a cut (METHOD §8).
        sections: section shortcuts for the Jacobians of M (:mod:`degeneracy.sections`): ``"auto"``
            (default: closed forms of a TransformerLens ``HookedTransformer``'s residual-stream sections
            and of Hugging Face BERT / GPT-2 blocks, :func:`~degeneracy.sections.auto_sections`, these
            not with ``num_sources``), each checked on the first batch and dropped
            if it differs), ``None`` (always differentiate the hook-based section) or a mapping
            ``{(layer_in, layer_out): fn}`` (checked; a mismatch raises). They change the cost,
            not the result; ``B.info["jacobians"]`` records how each pair's Jacobians were had.
        num_sources: stochastic sources for M (:mod:`degeneracy.probes`): ``None`` (default) sums
            exactly over every output row (position t, direction i), one VJP per row and example;
            a count R replaces that sum by R random ±1 combinations of the rows, R VJPs per example
            (unbiased: E[M] is the exact M). ``B[name].eigenvalue_se`` then holds each eigenvalue's
            standard error (spread of the R independent sources, delta method; needs R ≥ 2).
            Closed-form and affine sections stay exact. An exact build that needs more than
            :data:`~degeneracy.probes.LONG_BUILD_PRODUCTS` products logs its cost and this alternative.
        seed: seed of the ±1 sources (reproducible; drawn per example and layer pair, shape
            (R, P_out, d̂_out), keyed by the example's index: the same on any number of processes).
        sources: ``"rademacher"`` (default: independent ±1 signs) or a callable ``draw(shape)``
            returning ±1 float64 signs of that shape, e.g. :func:`degeneracy.probes.pattern_sources`.
        device: where to run (``"cpu"``, ``"cuda:0"``, ...): a copy of the model is moved there;
            ``None`` (default): the model's device. Results are float64 on the CPU either way.
        progress: show progress bars.

    Returns:
        :class:`Basis`: ``B[name].C`` (d̂ × d), ``B[name].C_pinv``, ``B[name].eigenvalues``,
        ``B.transform(name, activations)``, ``B.save(path)``.

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> B.names, B["output"].dim  # the constant direction and two output directions
    (['1', '2', 'output'], 3)
    """
    cfg = config_from(BasisConfig, locals(), dtype=dtype_name(dtype))
    run = NodeLayerRun(model, data, node_layers, dtype=cfg.dtype, batch_size=cfg.batch_size, device=device)
    with eval_mode(run.model), full_precision(), eager_attention(run.model):
        built = _build(run, cfg, progress, sections, resolve_sources(sources, seed))
    built.info["fingerprint"] = fingerprint(model, data, run.layers)  # checked by interaction_graph
    return built


def collect_moments(
    run: NodeLayerRun, constant: bool, progress: bool = False, check: bool = True
) -> tuple[dict[str, MomentAccumulator], dict[str, int]]:
    """One pass over the data: moments of every node layer, and its number of positions.

    Activations are kept in ``run``'s cache for the later passes; with ``check`` the first batch
    verifies that the node layers are cuts.

    >>> run = NodeLayerRun(torch.nn.Linear(2, 2).double(), torch.ones(4, 2, dtype=torch.float64), ["output"])
    >>> moments, positions = collect_moments(run, constant=False)
    >>> moments["output"].count, positions["output"]
    (4, 1)
    """
    moments: dict[str, MomentAccumulator] = {}
    positions: dict[str, int] = {}
    run.num_seen, run.padded = 0, False
    with torch.no_grad():
        for i, inputs in enumerate(run.inputs("moments", progress)):
            if i == 0:
                run.learn_widths(inputs)
                if check and len(run.layers) > 1:
                    _first_batch_cut_check(run, inputs)
            acts = capture(run.model, inputs, run.layers, constant=constant)
            run.keep(acts)
            parts = len(run.layers) + 1  # the forward pass, then each node layer's moments: the bar moves
            run.within(1, parts)
            for j, name in enumerate(layer.name for layer in run.layers):
                x = acts[name]
                check_finite(x, f"activations of node layer {name!r} (batch {i})")
                if name not in moments:
                    moments[name] = MomentAccumulator(x.shape[-1])
                    positions[name] = x.shape[1]
                mask = node_mask(inputs, run.layer(name).positions, x.shape[1])
                moments[name].update(x, mask)
                run.padded |= mask is not None
                run.within(j + 2, parts)
            run.num_seen += x.shape[0]
    for acc in moments.values():
        acc.all_reduce()
    if dist.is_available() and dist.is_initialized():  # examples on every process
        seen = torch.tensor([float(run.num_seen)], dtype=torch.float64)
        dist.all_reduce(seen)
        run.num_seen = int(seen.item())
    return moments, positions


CUT_CHECK_EXAMPLES = 256  # of the first batch: any two inputs that differ can expose a leak


def _first_batch_cut_check(run: NodeLayerRun, inputs: Tensor | Mapping) -> None:
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    if first.shape[0] >= 2:
        rtol = 1e-4 if run.dtype in (torch.float32, torch.float64) else 1e-2
        rtol = 1e-9 if run.dtype == torch.float64 else rtol
        few = slice_inputs(inputs, slice(0, CUT_CHECK_EXAMPLES))
        check_cut(run.model, few, run.layers, rtol=rtol, widths=run.widths)


def _first_batch_sections(run: NodeLayerRun, cfg: BasisConfig, sections: Sections) -> dict:
    """The checked section shortcuts (see :mod:`degeneracy.sections`), from the first batch."""
    if sections is None or cfg.method not in ("lib", "global"):
        return {}
    if sections == "auto" and not is_hooked_transformer(run.model):
        # no automatic shortcuts for this architecture; with ±1 sources a Hugging Face block's exact
        # Gram would cost ≥ 30× a source estimate (benchmarks/minilm.md): nothing to check
        if huggingface_family(run.model) is None or cfg.num_sources is not None:
            return {}
    inputs = next(run.inputs("sections", progress=False))
    with torch.no_grad():
        kept = {layer.name: run.cached(layer.name, 0) for layer in run.layers}
        if any(x is None for x in kept.values()):
            kept = capture(run.model, inputs, run.layers, constant=cfg.has_constant)
        return resolve_sections(
            run.model, run.layers, inputs, kept, sections, constant=cfg.has_constant, widths=run.widths
        )[0]


def _build(
    run: NodeLayerRun,
    cfg: BasisConfig,
    progress: bool,
    sections: Sections = None,
    draw: SignSource | None = None,
) -> Basis:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    moments, positions = collect_moments(run, cfg.has_constant, progress, cfg.check_cut)
    timings["moments"] = time.perf_counter() - t0
    shortcuts = _first_batch_sections(run, cfg, sections)
    methods: dict[str, str] = {}
    names = [layer.name for layer in run.layers]
    white = {name: pca_step(moments[name], cfg) for name in names}
    bases: dict[str, LayerBasis] = {}
    if cfg.method in ("pca", "neuron"):
        for name in names:
            if cfg.method == "pca" and (cfg.rotate_final or name != names[-1]):
                bases[name] = _pca_basis(name, white[name], positions[name])
            else:
                bases[name] = _neuron_basis(name, moments[name], white[name], positions[name])
    else:
        rule = integration_rule(cfg.integration_rule, cfg.integration_steps)
        if cfg.has_constant:
            rule = homogeneous_rule(rule)
        last = names[-1]
        # the products M needs where no closed-form Gram applies (affine sections turn out cheaper), logged
        n = moments[names[0]].count // max(1, positions[names[0]])
        dsts = {src: names[l + 1] if cfg.method == "lib" else last for l, src in enumerate(names[:-1])}
        shapes = [
            (positions[dst], white[dst].R.shape[0], positions[src], white[src].R.shape[0], 1)
            for src, dst in dsts.items()
            if getattr(shortcuts.get((src, dst)), "gram", None) is None
        ]
        what, points = f"{cfg.method.upper()} M", len(rule.points)
        info_cost = build_cost(what, n, shapes, points, cfg.jacobian_mode, cfg.num_sources)
        if cfg.rotate_final:
            bases[last] = _pca_basis(last, white[last], positions[last])
        else:
            bases[last] = _neuron_basis(last, moments[last], white[last], positions[last])
        for l in range(len(names) - 2, -1, -1):
            t1 = time.perf_counter()
            src = names[l]
            dst = names[l + 1] if cfg.method == "lib" else last
            short = shortcuts.get((src, dst))
            k = white[src].R.shape[0]
            per = None if cfg.num_sources is None else [MatrixAccumulator(k) for _ in range(cfg.num_sources)]
            sourced = {"per_source": per, "draw": draw}
            M, methods[f"{src}->{dst}"] = _interaction_matrix(
                run, cfg, src, dst, white[src], bases[dst], rule, progress, short, **sourced
            )
            spread = None if per is None else torch.stack([acc.value for acc in per])
            bases[src] = _interaction_step(src, white[src], M, cfg, positions[src], spread)
            timings[f"interaction/{src}"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    info = {
        "timings": timings,
        "n_examples": run.num_seen,
        "jacobians": methods,
        "version": degeneracy.__version__,
    }
    if cfg.method in ("lib", "global"):
        info["cost"] = info_cost
    return Basis(list(run.layers), {name: bases[name] for name in names}, cfg, info)


def _interaction_matrix(
    run: NodeLayerRun,
    cfg: BasisConfig,
    src: str,
    dst: str,
    white: Whitening,
    out_basis: LayerBasis,
    rule: Any,
    progress: bool,
    shortcut: SectionFn | None = None,
    per_source: list[MatrixAccumulator] | None = None,
    draw: SignSource | None = None,
) -> tuple[Float[Tensor, "k k"], str]:
    """M = 1/(n P_in) Σ_x Σ_s Jᵀ J for J = C^dst ∂f^dst/∂f^src R₊^src (METHOD §2.2), and how the
    Jacobians were had: ``"closed form"`` (a section shortcut), ``"affine"`` (one Jacobian for all
    inputs), ``"autodiff"`` (``torch.func`` through the hook-based section) or ``"±1 sources"``
    (``cfg.num_sources`` random combinations of the output rows, drawn by ``draw``). With
    ``per_source`` (one accumulator per source), each gets its own estimate M_r (exact parts
    added to all): independent estimates of M, with mean M."""
    acc = MatrixAccumulator(white.R.shape[0])
    how: set[str] = set()
    constant = cfg.has_constant
    compact = None
    affine: bool | None = None  # is the section affine (one Jacobian for all inputs)? tested per batch
    estimates = None  # this batch's per-source Grams, when drawn
    seen = 0  # this rank's examples so far (the sources are drawn per example, by global index)
    for i, inputs in enumerate(run.inputs(f"M[{src}]", progress)):
        with torch.no_grad():
            x, y = run.cached(src, i), run.cached(dst, i)
            if x is None or y is None:  # (the batch's own numbers of positions: lengths may vary)
                both = capture(run.model, inputs, run.layers, [src, dst], constant=constant)
                x, y = both[src], both[dst]
            in_mask = node_mask(inputs, run.layer(src).positions, x.shape[1])
            out_mask = node_mask(inputs, run.layer(dst).positions, y.shape[1])
            total = None
            if shortcut is not None and in_mask is None and out_mask is None:  # (padding: autodiff)
                total = shortcut_gram(
                    shortcut, inputs, x, white.R_pinv, out_basis.C, rule, constant, cfg.max_elements
                )
            if total is not None:
                how.add("closed form")
            else:  # the hook-based section: one Jacobian if it is affine, else torch.func
                if compact is None:
                    compact = compact_is_exact(
                        run.model, inputs, run.layers, src, dst, x, constant=constant, widths=run.widths
                    )
                kw = dict(constant=constant, widths=run.widths, compact=compact)
                fn = section(run.model, inputs, run.layers, src, dst, **kw)
                j0 = None
                if affine is not False:
                    first = section(run.model, slice_inputs(inputs, slice(0, 1)), run.layers, src, dst, **kw)
                    j0 = constant_jacobian(fn, x, first, mode=cfg.jacobian_mode)
                    affine = j0 is not None
                if j0 is not None:
                    total = gram_of_constant_jacobian(
                        j0, white.R_pinv, out_basis.C, x.shape[0], in_mask=in_mask, out_mask=out_mask
                    )
                    how.add("affine")
                elif cfg.num_sources is not None and draw is not None:
                    how.add("±1 sources")
                    shape = (x.shape[0], cfg.num_sources, y.shape[1], out_basis.C.shape[0])
                    signs = draw_signs(draw, shape, global_indices(seen, x.shape[0]), f"M[{src}]")
                    estimates = source_gram(
                        fn, x, white.R_pinv, out_basis.C, rule, signs, max_elements=cfg.max_elements,
                        in_mask=in_mask, out_mask=out_mask, advance=run.within,
                    )  # fmt: skip
                    total = estimates.mean(0)
                else:
                    how.add("autodiff")
                    total = jacobian_gram(
                        fn,
                        x,
                        white.R_pinv,
                        out_basis.C,
                        rule,
                        in_mask=in_mask,
                        out_mask=out_mask,
                        num_out_positions=y.shape[1],
                        mode=cfg.jacobian_mode,
                        max_elements=cfg.max_elements,
                        advance=run.within,  # the bar moves per block of Jacobian rows or positions
                    )
            check_finite(total, f"the Jacobian Gram of node layer {src!r}")
            count = x.shape[0] * x.shape[1] if in_mask is None else int(in_mask.sum())
            acc.add(total, count)
            for r, source_acc in enumerate(per_source or []):  # exact batches count for every source
                source_acc.add(total if estimates is None else estimates[r], count)
            estimates = None
            seen += x.shape[0]
    for source_acc in per_source or []:
        source_acc.all_reduce()
    return acc.all_reduce().value, " + ".join(sorted(how))
