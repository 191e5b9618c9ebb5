"""Interaction bases: LIB (default), the global interaction basis, PCA and neuron baselines.

METHOD §2 in symbols: G = E[f fᵀ] (centred when ``center``), whitening R = diag(D)^{-1/2} Uᵀ;
for LIB, M = E_s Σ_(t,i) Jᵀ J with J = ∂f̂^{l+1}/∂z the Jacobian of the next layer's features with
respect to the whitened activations z = R f; M = Vᵀ diag(Λ) V and C = diag(Λ)^{1/2} V R. The global
basis uses the final layer's features instead of the next layer's (paper §6, eq 40).

With ``center=True`` (or ``constant_coordinate=True``) activations carry a constant coordinate
(METHOD §0): node-layer vectors are [f; 1] of width d + 1, and direction 0 of every centred basis is
the constant direction, kept always and left out of the eigendecomposition of M.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

import degeneracy
from degeneracy.capture import (
    NodeLayer,
    as_node_layers,
    capture,
    check_cut,
    compact_is_exact,
    module_widths,
    section,
)
from degeneracy.data import Batch, iter_batches, num_examples
from degeneracy.io import load_tensors, save_tensors
from degeneracy.jacobian import constant_jacobian, gram_of_constant_jacobian, jacobian_gram
from degeneracy.linalg import (
    INTEGRATION_RULES,
    Eigh,
    eigh_descending,
    homogeneous_rule,
    integration_rule,
    truncate,
    whitening,
)
from degeneracy.sections import (
    SectionFn,
    Sections,
    is_hooked_transformer,
    resolve_sections,
    shortcut_gram,
    slice_inputs,
)
from degeneracy.stats import MatrixAccumulator, MomentAccumulator, check_finite, shard

__all__ = ["BasisConfig", "LayerBasis", "Basis", "interaction_basis", "load_basis"]

Method = Literal["lib", "global", "pca", "neuron"]
METHODS = ("lib", "global", "pca", "neuron")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class BasisConfig:
    """Options of :func:`interaction_basis` (see its docstring)."""

    method: Method = "lib"
    center: bool = True
    constant_coordinate: bool | None = None
    gram_threshold: float = 1e-10
    interaction_threshold: float = 1e-10
    relative_thresholds: bool = True
    rotate_final: bool = True
    integration_rule: str = "gradient"
    integration_steps: int = 1
    batch_size: int | None = 1024
    jacobian_mode: Literal["auto", "vjp", "jvp"] = "auto"
    max_elements: int = 2**20
    dtype: str | None = None
    check_cut: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown basis method {self.method!r}; choose one of {METHODS}")
        if self.integration_rule not in INTEGRATION_RULES:
            raise ValueError(
                f"unknown integration rule {self.integration_rule!r}; choose one of {INTEGRATION_RULES}"
            )
        if self.center and self.constant_coordinate is False:
            raise ValueError(
                "center=True keeps the mean as a constant direction: it needs constant_coordinate"
            )
        if self.gram_threshold < 0 or self.interaction_threshold < 0:
            raise ValueError("truncation thresholds must be >= 0")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {self.dtype!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    @property
    def has_constant(self) -> bool:
        return bool(self.center if self.constant_coordinate is None else self.constant_coordinate)


@dataclass(frozen=True)
class LayerBasis:
    """The basis of one node layer: features f̂ = C f (f augmented with a trailing 1 if ``has_constant``).

    Attributes:
        C: (d̂ × d) basis matrix; rows are the features (direction 0 is the constant if present).
        C_pinv: (d × d̂) its pseudo-inverse on the kept subspace, C C_pinv = I.
        eigenvalues: Λ for lib/global (E[f̂ f̂ᵀ] = diag(Λ)); the Gram eigenvalues for pca; the
            diagonal of the Gram for neuron. Index 0 is the constant direction when present.
        gram_eigenvalues: all eigenvalues of the (centred) Gram, before truncation.
        width: d, the node layer's width including the constant coordinate.
        positions: number of positions the node layer has.
        truncated_gram_mass, truncated_interaction_mass: fractions of eigenvalue mass dropped.
    """

    name: str
    C: Float[Tensor, "dhat d"]
    C_pinv: Float[Tensor, "d dhat"]
    eigenvalues: Float[Tensor, " dhat"]
    gram_eigenvalues: Float[Tensor, " g"]
    has_constant: bool
    positions: int
    truncated_gram_mass: float = 0.0
    truncated_interaction_mass: float = 0.0

    @property
    def width(self) -> int:
        return int(self.C.shape[1])

    @property
    def dim(self) -> int:
        return int(self.C.shape[0])

    def transform(self, activations: Float[Tensor, "... d_raw"]) -> Float[Tensor, "... dhat"]:
        """Features f̂ = C f of raw activations (the constant coordinate is appended here)."""
        x = activations.to(torch.float64)
        if self.has_constant:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        if x.shape[-1] != self.width:
            raise ValueError(
                f"node layer {self.name!r} has width {self.width - self.has_constant}, "
                f"got activations of shape {tuple(activations.shape)}"
            )
        return x @ self.C.T

    def inverse_transform(self, features: Float[Tensor, "... dhat"]) -> Float[Tensor, "... d_raw"]:
        """Activations C₊ f̂ (without the constant coordinate)."""
        x = features.to(torch.float64) @ self.C_pinv.T
        return x[..., :-1] if self.has_constant else x


@dataclass
class Basis:
    """Bases of all node layers, in order, with the configuration and timings that produced them."""

    layers: list[NodeLayer]
    bases: dict[str, LayerBasis]
    config: BasisConfig
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerBasis:
        if name not in self.bases:
            raise KeyError(f"no node layer {name!r}; node layers are {self.names}")
        return self.bases[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def dims(self) -> dict[str, int]:
        """Retained dimension d̂ per node layer."""
        return {name: self.bases[name].dim for name in self.names}

    def transform(self, name: str, activations: Tensor) -> Tensor:
        """Features of node layer ``name`` for raw activations of shape (..., d)."""
        return self[name].transform(activations)

    def summary(self) -> str:
        lines = [f"{self.config.method} basis ({'centred' if self.config.center else 'uncentred'})"]
        for name in self.names:
            b = self.bases[name]
            lines.append(f"  {name}: {b.dim} of {b.width} directions, {b.positions} position(s)")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (tensors + JSON metadata) atomically."""
        tensors: dict[str, Tensor] = {}
        per_layer = {}
        for name, b in self.bases.items():
            tensors[f"{name}/C"] = b.C
            tensors[f"{name}/C_pinv"] = b.C_pinv
            tensors[f"{name}/eigenvalues"] = b.eigenvalues
            tensors[f"{name}/gram_eigenvalues"] = b.gram_eigenvalues
            per_layer[name] = {
                "has_constant": b.has_constant,
                "positions": b.positions,
                "truncated_gram_mass": b.truncated_gram_mass,
                "truncated_interaction_mass": b.truncated_interaction_mass,
            }
        meta = {
            "kind": "basis",
            "version": degeneracy.__version__,
            "config": asdict(self.config),
            "layers": [layer.to_dict() for layer in self.layers],
            "per_layer": per_layer,
            "info": self.info,
        }
        save_tensors(path, tensors, meta)


def load_basis(path: str | Path) -> Basis:
    """Read a basis written by :meth:`Basis.save`; a clear ``ValueError`` for unreadable or partial files."""
    tensors, meta = load_tensors(path, kind="basis")
    try:
        layers = [NodeLayer.from_dict(d) for d in meta["layers"]]
        config = BasisConfig(**meta["config"])
        per_layer = meta["per_layer"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: basis metadata is incomplete ({err})") from err
    keys = [
        f"{layer.name}/{t}" for layer in layers for t in ("C", "C_pinv", "eigenvalues", "gram_eigenvalues")
    ]
    missing = [k for k in keys if k not in tensors]
    if missing or any(layer.name not in per_layer for layer in layers):
        raise ValueError(f"{path}: incomplete basis file, missing {missing or 'per-layer metadata'}")
    bases = {
        layer.name: LayerBasis(
            name=layer.name,
            C=tensors[f"{layer.name}/C"],
            C_pinv=tensors[f"{layer.name}/C_pinv"],
            eigenvalues=tensors[f"{layer.name}/eigenvalues"],
            gram_eigenvalues=tensors[f"{layer.name}/gram_eigenvalues"],
            **per_layer[layer.name],
        )
        for layer in layers
    }
    return Basis(layers, bases, config, meta.get("info", {}))


# ---------------------------------------------------------------------------------------------------
# Pure steps


@dataclass(frozen=True)
class _Whitening:
    """R (k × d) and R₊ (d × k) with R R₊ = I; row 0 is the constant direction when ``has_constant``."""

    R: Tensor
    R_pinv: Tensor
    gram: Eigh  # truncated (centred) Gram eigensystem, D and U
    all_values: Tensor
    has_constant: bool  # row 0 is the constant direction (centred variant)
    augmented: bool  # vectors are [f; 1]
    truncated_mass: float


def _pca_step(moments: MomentAccumulator, cfg: BasisConfig) -> _Whitening:
    """Eigendecompose G (centred with a constant direction, or plain) and build the whitening maps."""
    centre = cfg.center
    if centre:
        d = moments.d - 1
        cov = moments.covariance[:d, :d]
        mean = moments.mean[:d]
    else:
        cov = moments.gram
    full = eigh_descending(cov)
    kept, k = truncate(full, cfg.gram_threshold, relative=cfg.relative_thresholds)
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
    return _Whitening(R, R_pinv, kept, full.values, centre, cfg.has_constant, mass)


def _pca_basis(name: str, w: _Whitening, positions: int) -> LayerBasis:
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


def _neuron_basis(name: str, moments: MomentAccumulator, w: _Whitening, positions: int) -> LayerBasis:
    """Neuron baseline: C = I, reordered so that the constant coordinate (if any) comes first."""
    d = moments.d
    order = [d - 1, *range(d - 1)] if w.augmented else list(range(d))
    C = torch.eye(d, dtype=torch.float64)[order]
    eig = torch.diagonal(moments.gram)[order].clone()
    return LayerBasis(name, C, C.T.clone(), eig, w.all_values, w.augmented, positions)


def _interaction_step(
    name: str, w: _Whitening, M: Float[Tensor, "k k"], cfg: BasisConfig, positions: int
) -> LayerBasis:
    """C = diag(Λ)^{1/2} V R from M = Vᵀ diag(Λ) V; the constant direction (if any) kept as row 0."""
    start = 1 if w.has_constant else 0
    full = eigh_descending(M[start:, start:])
    kept, k = truncate(full, cfg.interaction_threshold, relative=cfg.relative_thresholds)
    total = float(full.values.clamp_min(0).sum())
    mass = 0.0 if total == 0 else float(full.values[k:].clamp_min(0).sum()) / total
    sqrt = kept.values.sqrt()
    rows = sqrt[:, None] * (kept.vectors.T @ w.R[start:])
    cols = (w.R_pinv[:, start:] @ kept.vectors) / sqrt[None, :]
    eig = kept.values
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
    return LayerBasis(name, rows, cols, eig, w.all_values, w.augmented, positions, w.truncated_mass, mass)


# ---------------------------------------------------------------------------------------------------
# The driver


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _cast_inputs(batch: Batch, dtype: torch.dtype, explicit: bool, device: torch.device) -> Tensor | Mapping:
    def cast(x: Tensor, key: str) -> Tensor:
        if x.is_floating_point() and x.dtype != dtype:
            if not explicit:
                raise ValueError(
                    f"input {key} has dtype {x.dtype} but the model computes in {dtype}: pass inputs "
                    f"in {dtype}, or pass dtype={str(dtype).removeprefix('torch.')!r} to cast both"
                )
            x = x.to(dtype)
        return x.to(device)

    inputs = batch.inputs
    if isinstance(inputs, Mapping):
        return {k: cast(v, repr(k)) for k, v in inputs.items()}
    return cast(inputs, "tensor")


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


CACHE_BYTES = 256 * 2**20  # activations kept between the passes of one build


class _Context:
    """The model, node layers and data of one build, with inputs cast consistently."""

    def __init__(self, model: nn.Module, data: Any, node_layers: Sequence[Any], cfg: BasisConfig) -> None:
        self.layers = as_node_layers(model, node_layers)
        explicit = cfg.dtype is not None
        dtype = _DTYPES[cfg.dtype] if cfg.dtype else _model_dtype(model)
        if explicit and _model_dtype(model) != dtype:
            model = copy.deepcopy(model).to(dtype)
        self.model, self.dtype, self.explicit = model, dtype, explicit
        self.device = _device(model)
        self.data, self.batch_size = shard(data), cfg.batch_size
        self.n = num_examples(self.data)
        self.widths: dict[str, list[int]] = {}
        # activations of every node layer per batch, kept from the moments pass while they fit in
        # CACHE_BYTES and the data batches the same way every time (a tensor or a dict of tensors)
        deterministic = isinstance(self.data, (Tensor, Mapping))
        self.cache: dict[str, list[Tensor]] | None = {} if deterministic else None

    def keep(self, acts: Mapping[str, Tensor]) -> None:
        """Add one batch's activations to the cache (dropped for good once over the budget)."""
        if self.cache is None:
            return
        for name, x in acts.items():
            self.cache.setdefault(name, []).append(x)
        if sum(t.numel() * t.element_size() for v in self.cache.values() for t in v) > CACHE_BYTES:
            self.cache = None

    def cached(self, name: str, index: int) -> Tensor | None:
        if self.cache is None or name not in self.cache or index >= len(self.cache[name]):
            return None
        return self.cache[name][index]

    def batches(self, desc: str, progress: bool) -> Iterator[Tensor | Mapping]:
        bar = tqdm(total=self.n, desc=desc, unit="ex", disable=not progress, leave=False)
        try:
            for batch in iter_batches(self.data, self.batch_size):
                yield _cast_inputs(batch, self.dtype, self.explicit, self.device)
                bar.update(batch.size)
        finally:
            bar.close()


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
    relative_thresholds: bool = True,
    rotate_final: bool = True,
    integration_rule: str = "gradient",
    integration_steps: int = 1,
    batch_size: int | None = 1024,
    jacobian_mode: Literal["auto", "vjp", "jvp"] = "auto",
    max_elements: int = 2**20,
    dtype: str | torch.dtype | None = None,
    check_cut: bool = True,
    sections: Sections = "auto",
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
        relative_thresholds: ``False`` makes both thresholds absolute.
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
            (default: closed forms for the residual-stream sections of a TransformerLens
            ``HookedTransformer``, each checked against the model on the first batch and dropped
            if it differs), ``None`` (always differentiate the hook-based section) or a mapping
            ``{(layer_in, layer_out): fn}`` (checked; a mismatch raises). They change the cost,
            not the result; ``B.info["jacobians"]`` records how each pair's Jacobians were had.
        progress: show progress bars.

    Returns:
        :class:`Basis`: ``B[name].C`` (d̂ × d), ``B[name].C_pinv``, ``B[name].eigenvalues``,
        ``B.transform(name, activations)``, ``B.save(path)``.
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    cfg = BasisConfig(
        method=method,
        center=center,
        constant_coordinate=constant_coordinate,
        gram_threshold=gram_threshold,
        interaction_threshold=interaction_threshold,
        relative_thresholds=relative_thresholds,
        rotate_final=rotate_final,
        integration_rule=integration_rule,
        integration_steps=integration_steps,
        batch_size=batch_size,
        jacobian_mode=jacobian_mode,
        max_elements=max_elements,
        dtype=dtype,
        check_cut=check_cut,
    )
    ctx = _Context(model, data, node_layers, cfg)
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        return _build(ctx, cfg, progress, sections)
    finally:
        ctx.model.train(was_training)


def collect_moments(
    ctx: _Context, constant: bool, progress: bool, check: bool = True
) -> tuple[dict[str, MomentAccumulator], dict[str, int]]:
    """One pass over the data: moments of every node layer, and its number of positions."""
    moments: dict[str, MomentAccumulator] = {}
    positions: dict[str, int] = {}
    with torch.no_grad():
        for i, inputs in enumerate(ctx.batches("moments", progress)):
            if i == 0:
                ctx.widths = {
                    layer.name: module_widths(ctx.model, inputs, layer)
                    for layer in ctx.layers
                    if len(layer.modules) > 1
                }
                if check and len(ctx.layers) > 1:
                    _first_batch_cut_check(ctx, inputs)
            acts = capture(ctx.model, inputs, ctx.layers, constant=constant)
            ctx.keep(acts)
            for name in (layer.name for layer in ctx.layers):
                x = acts[name]
                check_finite(x, f"activations of node layer {name!r} (batch {i})")
                if name not in moments:
                    moments[name] = MomentAccumulator(x.shape[-1])
                    positions[name] = x.shape[1]
                moments[name].update(x)
    for acc in moments.values():
        acc.all_reduce()
    return moments, positions


CUT_CHECK_EXAMPLES = 256  # of the first batch: any two inputs that differ can expose a leak


def _first_batch_cut_check(ctx: _Context, inputs: Tensor | Mapping) -> None:
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    if first.shape[0] >= 2:
        rtol = 1e-4 if ctx.dtype in (torch.float32, torch.float64) else 1e-2
        rtol = 1e-9 if ctx.dtype == torch.float64 else rtol
        few = slice_inputs(inputs, slice(0, CUT_CHECK_EXAMPLES))
        check_cut(ctx.model, few, ctx.layers, rtol=rtol, widths=ctx.widths)


def _first_batch_sections(ctx: _Context, cfg: BasisConfig, sections: Sections) -> dict:
    """The checked section shortcuts (see :mod:`degeneracy.sections`), from the first batch."""
    if sections is None or cfg.method not in ("lib", "global"):
        return {}
    if sections == "auto" and not is_hooked_transformer(ctx.model):
        return {}  # no automatic shortcuts for this architecture: nothing to check
    inputs = next(ctx.batches("sections", progress=False))
    with torch.no_grad():
        kept = {layer.name: ctx.cached(layer.name, 0) for layer in ctx.layers}
        if any(x is None for x in kept.values()):
            kept = capture(ctx.model, inputs, ctx.layers, constant=cfg.has_constant)
        return resolve_sections(ctx, inputs, kept, sections, cfg.has_constant)[0]


def _build(ctx: _Context, cfg: BasisConfig, progress: bool, sections: Sections = None) -> Basis:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    moments, positions = collect_moments(ctx, cfg.has_constant, progress, cfg.check_cut)
    timings["moments"] = time.perf_counter() - t0
    shortcuts = _first_batch_sections(ctx, cfg, sections)
    methods: dict[str, str] = {}
    names = [layer.name for layer in ctx.layers]
    white = {name: _pca_step(moments[name], cfg) for name in names}
    bases: dict[str, LayerBasis] = {}
    if cfg.method in ("pca", "neuron"):
        for name in names:
            if cfg.method == "pca":
                bases[name] = _pca_basis(name, white[name], positions[name])
            else:
                bases[name] = _neuron_basis(name, moments[name], white[name], positions[name])
    else:
        rule = integration_rule(cfg.integration_rule, cfg.integration_steps)
        if cfg.has_constant:
            rule = homogeneous_rule(rule)
        last = names[-1]
        if cfg.rotate_final:
            bases[last] = _pca_basis(last, white[last], positions[last])
        else:
            bases[last] = _neuron_basis(last, moments[last], white[last], positions[last])
        for l in range(len(names) - 2, -1, -1):
            t1 = time.perf_counter()
            src = names[l]
            dst = names[l + 1] if cfg.method == "lib" else last
            short = shortcuts.get((src, dst))
            M, methods[f"{src}->{dst}"] = _interaction_matrix(
                ctx, cfg, src, dst, white[src], bases[dst], positions, rule, progress, short
            )
            bases[src] = _interaction_step(src, white[src], M, cfg, positions[src])
            timings[f"interaction/{src}"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    info = {
        "timings": timings,
        "n_examples": moments[names[0]].count // max(1, positions[names[0]]),
        "jacobians": methods,
        "version": degeneracy.__version__,
    }
    return Basis(list(ctx.layers), {name: bases[name] for name in names}, cfg, info)


def _first_example(inputs: Tensor | Mapping[str, Tensor]) -> Tensor | Mapping[str, Tensor]:
    if isinstance(inputs, Mapping):
        return {k: v[:1] for k, v in inputs.items()}
    return inputs[:1]


def _interaction_matrix(
    ctx: _Context,
    cfg: BasisConfig,
    src: str,
    dst: str,
    white: _Whitening,
    out_basis: LayerBasis,
    positions: Mapping[str, int],
    rule: Any,
    progress: bool,
    shortcut: SectionFn | None = None,
) -> tuple[Float[Tensor, "k k"], str]:
    """M = 1/(n P_in) Σ_x Σ_s Jᵀ J for J = C^dst ∂f^dst/∂f^src R₊^src (METHOD §2.2), and how the
    Jacobians were had: ``"closed form"`` (a section shortcut), ``"affine"`` (one Jacobian for all
    inputs) or ``"autodiff"`` (``torch.func`` through the hook-based section)."""
    acc = MatrixAccumulator(white.R.shape[0])
    how: set[str] = set()
    constant = cfg.has_constant
    compact = None
    affine: bool | None = None  # is the section affine (one Jacobian for all inputs)? tested per batch
    for i, inputs in enumerate(ctx.batches(f"M[{src}]", progress)):
        with torch.no_grad():
            x = ctx.cached(src, i)
            if x is None:
                x = capture(ctx.model, inputs, ctx.layers, [src], constant=constant)[src]
            total = None
            if shortcut is not None:
                total = shortcut_gram(
                    shortcut, inputs, x, white.R_pinv, out_basis.C, rule, constant, cfg.max_elements
                )
            if total is not None:
                how.add("closed form")
            else:  # the hook-based section: one Jacobian if it is affine, else torch.func
                if compact is None:
                    compact = compact_is_exact(
                        ctx.model, inputs, ctx.layers, src, dst, x, constant=constant, widths=ctx.widths
                    )
                kw = dict(constant=constant, widths=ctx.widths, compact=compact)
                fn = section(ctx.model, inputs, ctx.layers, src, dst, **kw)
                j0 = None
                if affine is not False:
                    first = section(ctx.model, _first_example(inputs), ctx.layers, src, dst, **kw)
                    j0 = constant_jacobian(fn, x, first)
                    affine = j0 is not None
                if j0 is not None:
                    total = gram_of_constant_jacobian(j0, white.R_pinv, out_basis.C, x.shape[0])
                    how.add("affine")
                else:
                    how.add("autodiff")
                    total = jacobian_gram(
                        fn,
                        x,
                        white.R_pinv,
                        out_basis.C,
                        rule,
                        out_positions=positions[dst],
                        mode=cfg.jacobian_mode,
                        max_elements=cfg.max_elements,
                    )
            check_finite(total, f"the Jacobian Gram of node layer {src!r}")
            acc.add(total, x.shape[0] * x.shape[1])
    return acc.all_reduce().value, " + ".join(sorted(how))
