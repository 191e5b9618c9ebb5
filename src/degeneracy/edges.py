"""Interaction edges between adjacent node layers (METHOD §4, the companion paper's squared edges).

For node layers l → l+1 with features f̂^l = C^l f^l and f̂^{l+1} = C^{l+1} f^{l+1} (any basis: LIB,
global, PCA, neuron), the *integrated-gradient attribution* of input feature j to output feature i at
output position t is

    A(x)_{t,i,j} = Σ_s Jint_{(t,i),(s,j)} · f̂^l_{s,j}(x),
    Jint = Σ_a w_a ∂f̂^{l+1}(α_a f) / ∂f̂^l        (integration rule of METHOD §3, baseline 0),

and the edge is **E_ij = 1/(n P_in) Σ_x Σ_t A(x)_{t,i,j}²**, accumulated as a float64 sum plus a count.

Completeness: Σ_j A_{t,i,j} = f̂^{l+1}_{t,i}(f) − f̂^{l+1}_{t,i}(0) up to the integration error; the
largest deviation relative to the output scale max|f̂^{l+1}(f) − f̂^{l+1}(0)| is reported per layer pair.
With a constant coordinate (centred bases) the section is the positively homogeneous extension of
:func:`degeneracy.capture.section`, so the baseline output is 0, the Jacobian is constant along the
ray α·f, and every rule (even the plain gradient) is exact: Euler's theorem for degree-1 maps.

Two vectorised ways to get A (``torch.func``; no Python loop over features):

* ``"vjp"``: one vector-Jacobian product per output row (t, i) (vmapped pullbacks), then
  A = Σ_s J f̂_s. Costs P_out·d̂_{l+1} backward passes.
* ``"jvp"``: one Jacobian-vector product per *input feature* j, along the tangent
  T_j[s] = f̂^l_{s,j}(x) · C₊[:, j] (the feature's own values at every input position): its output is
  exactly A_{·,·,j}, summed over input positions. Costs d̂_l forward passes, independent of positions.
* ``"auto"`` picks the cheaper one, or a section shortcut's closed-form kernel when it has one.

Section shortcuts (``sections=``, :mod:`degeneracy.sections`; automatic for TransformerLens models)
compute f^{l+1} from f^l without re-running the model from its input, at the target positions only;
each is checked against the hook-based section before use. A :class:`SectionShortcut` may also carry
a closed-form kernel: for the TransformerLens attention, ReLU MLP and unembedding sections, the
attributions follow from Jacobian-vector products along the rank-one tangents f̂_{s,j} C₊[:, j] with
the basis maps folded into the weights once, which is what brings the modular-addition edges to about
two seconds (benchmarks/).

Long contexts: with ``num_sources = R`` the sum over output positions is estimated by random ±1
sources (VJP path): A^r_{i,j} = Σ_t r_t A_{t,i,j} with Rademacher r_t, and E[(A^r)²] = Σ_t A_t², since
E[r_t r_t'] = δ_tt'. The estimate averages R sources; it is exact when P_out = 1 (r² = 1).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

import degeneracy
from degeneracy.capture import NodeLayer, capture, module_widths, section
from degeneracy.io import ResultFileError, load_tensors, save_tensors
from degeneracy.linalg import INTEGRATION_RULES, IntegrationRule, homogeneous_rule, integration_rule
from degeneracy.sections import (
    SectionFn,
    Sections,
    SectionShortcut,
    extended,
    resolve_sections,
    slice_inputs,
    transformer_lens_sections,
)
from degeneracy.stats import check_finite

__all__ = [
    "EdgeConfig",
    "InteractionGraph",
    "interaction_graph",
    "load_graph",
    "squared_attributions",
    "transformer_lens_sections",
    "SectionShortcut",
    "sparsity",
    "gini",
]

Mode = Literal["auto", "vjp", "jvp"]
Pair = tuple[str, str]


@dataclass(frozen=True)
class EdgeConfig:
    """Options of :func:`interaction_graph` (see its docstring)."""

    integration_rule: str = "gradient"
    integration_steps: int = 1
    num_sources: int | None = None
    seed: int = 0
    batch_size: int | None = None
    jacobian_mode: Mode = "auto"
    max_elements: int = 2**21
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.integration_rule not in INTEGRATION_RULES:
            raise ValueError(
                f"unknown integration rule {self.integration_rule!r}; choose one of {INTEGRATION_RULES}"
            )
        if self.integration_rule != "gradient" and self.integration_steps < 1:
            raise ValueError("integration_steps must be >= 1")
        if self.num_sources is not None and self.num_sources < 1:
            raise ValueError(f"num_sources must be a positive number of ±1 sources, got {self.num_sources}")
        if self.jacobian_mode not in ("auto", "vjp", "jvp"):
            raise ValueError(f"jacobian_mode must be 'auto', 'vjp' or 'jvp', got {self.jacobian_mode!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_elements < 1:
            raise ValueError("max_elements must be positive")


@dataclass(frozen=True)
class InteractionGraph:
    """Edges between adjacent node layers, with the basis facts and self-checks behind them.

    Attributes:
        layers: the node layers, in order.
        edges: ``edges[(layer_in, layer_out)]`` is E (d̂_out × d̂_in, float64, ≥ 0): E_ij is the edge
            from feature j of ``layer_in`` to feature i of ``layer_out``.
        basis_method: ``"lib"``, ``"global"``, ``"pca"`` or ``"neuron"``.
        has_constant: feature 0 of every layer is the constant direction.
        eigenvalues: the basis importance Λ of every node layer (from the basis).
        completeness: per layer pair, max_x,t,i |Σ_j A − (f̂^{l+1}(f) − f̂^{l+1}(0))| divided by the output
            scale max |f̂^{l+1}(f) − f̂^{l+1}(0)|.
        config: the :class:`EdgeConfig` used.
        info: timings (seconds per layer pair and total), number of examples, modes, library version.
    """

    layers: tuple[NodeLayer, ...]
    edges: dict[Pair, Float[Tensor, "dout din"]]
    basis_method: str
    has_constant: bool
    eigenvalues: dict[str, Float[Tensor, " d"]]
    completeness: dict[Pair, float]
    config: EdgeConfig
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def pairs(self) -> list[Pair]:
        names = self.names
        return list(zip(names[:-1], names[1:], strict=True))

    @property
    def dims(self) -> dict[str, int]:
        """Number of features d̂ per node layer."""
        return {name: int(self.eigenvalues[name].numel()) for name in self.names}

    def subgraph(self, first: str, last: str) -> InteractionGraph:
        """The graph of the node layers ``first`` … ``last`` (a contiguous range), e.g. to find modules
        without an unrotated output layer."""
        names = self.names
        if first not in names or last not in names or names.index(first) > names.index(last):
            raise ValueError(f"{first!r} … {last!r} is not a range of the node layers {names}")
        keep = names[names.index(first) : names.index(last) + 1]
        pairs = list(zip(keep[:-1], keep[1:], strict=True))
        return dataclasses.replace(
            self,
            layers=tuple(layer for layer in self.layers if layer.name in keep),
            edges={p: self.edges[p] for p in pairs},
            eigenvalues={n: self.eigenvalues[n] for n in keep},
            completeness={p: self.completeness[p] for p in pairs},
        )

    def __getitem__(self, pair: Pair) -> Tensor:
        if pair not in self.edges:
            raise KeyError(f"no edges {pair}; layer pairs are {self.pairs}")
        return self.edges[pair]

    def summary(self) -> str:
        lines = [f"interaction graph ({self.basis_method} basis, rule {self.config.integration_rule})"]
        for pair in self.pairs:
            e = self.edges[pair]
            lines.append(
                f"  {pair[0]} -> {pair[1]}: {e.shape[0]} x {e.shape[1]} edges, total {float(e.sum()):.4g}, "
                f"completeness residual {self.completeness[pair]:.2e}"
            )
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (edges, eigenvalues + JSON metadata) atomically."""
        tensors: dict[str, Tensor] = {}
        for k, pair in enumerate(self.pairs):
            tensors[f"edges/{k}"] = self.edges[pair]
        for k, name in enumerate(self.names):
            tensors[f"eigenvalues/{k}"] = self.eigenvalues[name]
        meta = {
            "kind": "graph",
            "version": degeneracy.__version__,
            "layers": [layer.to_dict() for layer in self.layers],
            "basis_method": self.basis_method,
            "has_constant": self.has_constant,
            "completeness": [self.completeness[pair] for pair in self.pairs],
            "config": asdict(self.config),
            "info": self.info,
        }
        save_tensors(path, tensors, meta)


def load_graph(path: str | Path) -> InteractionGraph:
    """Read a graph written by :meth:`InteractionGraph.save`.

    Raises :class:`degeneracy.io.ResultFileError` (a ``ValueError``) for missing, unreadable, foreign or
    incomplete files.
    """
    tensors, meta = load_tensors(path, kind="graph")
    try:
        layers = tuple(NodeLayer.from_dict(d) for d in meta["layers"])
        config = EdgeConfig(**meta["config"])
        completeness_list = list(meta["completeness"])
        basis_method = str(meta["basis_method"])
        has_constant = bool(meta["has_constant"])
    except (KeyError, TypeError, ValueError) as err:
        raise ResultFileError(f"{path}: graph metadata is incomplete ({err})") from err
    names = [layer.name for layer in layers]
    pairs = list(zip(names[:-1], names[1:], strict=True))
    keys = [f"edges/{k}" for k in range(len(pairs))] + [f"eigenvalues/{k}" for k in range(len(names))]
    missing = [k for k in keys if k not in tensors]
    if missing or len(completeness_list) != len(pairs):
        raise ResultFileError(f"{path}: incomplete graph file, missing {missing or 'completeness entries'}")
    edges = {pair: tensors[f"edges/{k}"] for k, pair in enumerate(pairs)}
    eigenvalues = {name: tensors[f"eigenvalues/{k}"] for k, name in enumerate(names)}
    for (a, b), e in edges.items():
        if e.shape != (eigenvalues[b].numel(), eigenvalues[a].numel()):
            raise ResultFileError(f"{path}: edges {a}->{b} have shape {tuple(e.shape)}, inconsistent")
    completeness = {pair: float(c) for pair, c in zip(pairs, completeness_list, strict=True)}
    return InteractionGraph(
        layers, edges, basis_method, has_constant, eigenvalues, completeness, config, meta.get("info", {})
    )


# ---------------------------------------------------------------------------------------------------
# Pure numerics: squared attributions of one batch


def _choose_mode(mode: Mode, rows: int, features: int) -> Literal["vjp", "jvp"]:
    if mode == "auto":
        return "vjp" if rows <= features else "jvp"
    if mode not in ("vjp", "jvp"):
        raise ValueError(f"jacobian_mode must be 'auto', 'vjp' or 'jvp', got {mode!r}")
    return mode


def squared_attributions(
    fn: Callable[[Tensor], Tensor],
    x: Float[Tensor, "batch pos_in d_in"],
    in_map: Float[Tensor, "d_in k"],
    out_map: Float[Tensor, "m d_out"],
    rule: IntegrationRule,
    *,
    in_features: Float[Tensor, "batch pos_in k"] | None = None,
    out_positions: int,
    signs: Float[Tensor, "batch sources pos_out"] | None = None,
    mode: Mode = "auto",
    max_elements: int = 2**21,
) -> tuple[Float[Tensor, "m k"], Float[Tensor, "batch rows m"]]:
    """Σ_x Σ_t A(x)_{t,i,j}² for one batch, and Σ_j A (for the completeness check); float64.

    Args:
        fn: the section f^l ↦ f^{l+1} (batched over examples), e.g. :func:`degeneracy.capture.section`.
        x: the activations f^l (augmented with the constant coordinate if the basis has one).
        in_map: C₊^l (d_in × d̂_l): the columns are the input feature directions.
        out_map: C^{l+1} (d̂_{l+1} × d_out).
        rule: integration rule (points α_a, weights w_a, baseline 0).
        in_features: f̂^l = x C^lᵀ (computed from ``in_map``'s pseudo-inverse if not given).
        out_positions: P_out, the number of positions of the output node layer.
        signs: ±1 sources r[b, r, t] (VJP path): rows become (r, i) and the sum over t is replaced by
            Σ_t r_t A_t; the result is then summed (not averaged) over sources.
        mode: ``"vjp"``, ``"jvp"`` or ``"auto"``; the JVP path is exact over positions and ignores
            ``signs``.
        max_elements: the largest number of entries a vmapped chunk may hold.

    Returns:
        ``(S, Σ_j A)``: S[i, j] = Σ_b Σ_rows A² (m × k) and the row sums of A, shape
        (batch, P_out or R, m).
    """
    batch, p_in, d_in = x.shape
    m, d_out = out_map.shape
    k = in_map.shape[1]
    if in_features is None:
        in_features = x.to(torch.float64) @ torch.linalg.pinv(in_map.to(torch.float64)).T
    feats = in_features.to(torch.float64)
    n_out = out_positions if signs is None else signs.shape[1]
    chosen = _choose_mode(mode, n_out * m, k)
    if chosen == "jvp":
        return _jvp_path(fn, x, feats, in_map, out_map, rule, out_positions, max_elements)
    return _vjp_path(fn, x, feats, in_map, out_map, rule, out_positions, signs, max_elements)


def _vjp_path(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    feats: Tensor,
    in_map: Tensor,
    out_map: Tensor,
    rule: IntegrationRule,
    out_positions: int,
    signs: Tensor | None,
    max_elements: int,
) -> tuple[Tensor, Tensor]:
    """One VJP per output row (t, i), or per (source r, i) with cotangent r_t C[i] at every t."""
    batch, p_in, d_in = x.shape
    m, d_out = out_map.shape
    k = in_map.shape[1]
    n_out = out_positions if signs is None else signs.shape[1]
    n_rows = n_out * m
    in64 = in_map.to(device=x.device, dtype=torch.float64)
    out_model = out_map.to(device=x.device, dtype=x.dtype)
    pullbacks = [(vjp(fn, alpha * x)[1], w) for alpha, w in zip(rule.points, rule.weights, strict=True)]
    per_row = batch * max(p_in * max(d_in, k), out_positions * d_out)
    chunk = max(1, max_elements // max(1, per_row))
    total = torch.zeros(n_rows, k, dtype=torch.float64, device=x.device)
    row_sums = torch.zeros(batch, n_rows, dtype=torch.float64, device=x.device)
    sgn = None if signs is None else signs.to(device=x.device, dtype=x.dtype)
    for start in range(0, n_rows, chunk):
        rows = torch.arange(start, min(n_rows, start + chunk), device=x.device)
        t_idx, i_idx = rows // m, rows % m
        if sgn is None:  # cotangent of row (t, i): C[i] at output position t, for every example
            cot = torch.zeros(rows.numel(), out_positions, d_out, dtype=x.dtype, device=x.device)
            cot[torch.arange(rows.numel()), t_idx] = out_model[i_idx]
            cot = cot[:, None].expand(rows.numel(), batch, out_positions, d_out)
        else:  # row (r, i): r_{b,t} C[i] at every output position t
            cot = sgn[:, t_idx].permute(1, 0, 2)[..., None] * out_model[i_idx][:, None, None, :]
        a = None
        for pull, w in pullbacks:
            (g,) = vmap(pull)(cot)  # (rows, batch, p_in, d_in)
            g = g.to(torch.float64) @ in64  # (rows, batch, p_in, k)
            # A[row, b, j] = Σ_s J[row, b, s, j] f̂[b, s, j]
            contrib = w * (g * feats[None]).sum(2)
            a = contrib if a is None else a + contrib
        assert a is not None
        total[rows] += torch.einsum("rbk,rbk->rk", a, a)
        row_sums[:, rows] = a.sum(-1).T
    return total.reshape(n_out, m, k).sum(0), row_sums.reshape(batch, n_out, m)


def _jvp_path(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    feats: Tensor,
    in_map: Tensor,
    out_map: Tensor,
    rule: IntegrationRule,
    out_positions: int,
    max_elements: int,
) -> tuple[Tensor, Tensor]:
    """A_{·,·,j} as the JVP along T_j[b, s] = f̂_{b,s,j} C₊[:, j], for chunks of features j."""
    batch, p_in, d_in = x.shape
    m, d_out = out_map.shape
    k = in_map.shape[1]
    in_model = in_map.to(device=x.device, dtype=x.dtype)
    out64 = out_map.to(device=x.device, dtype=torch.float64)
    feats_model = feats.to(x.dtype)
    per = batch * max(p_in * d_in, out_positions * max(d_out, m))
    chunk = max(1, max_elements // max(1, per))
    total = torch.zeros(m, k, dtype=torch.float64, device=x.device)
    row_sums = torch.zeros(batch, out_positions, m, dtype=torch.float64, device=x.device)
    points = [(alpha * x, w) for alpha, w in zip(rule.points, rule.weights, strict=True)]
    for start in range(0, k, chunk):
        stop = min(k, start + chunk)
        # tangents (c, batch, p_in, d_in): feature j's own values along its direction
        tangents = (
            feats_model[None, :, :, start:stop].permute(3, 1, 2, 0)
            * in_model[:, start:stop].T[:, None, None, :]
        )
        a = None
        for xa, w in points:
            _, y = vmap(lambda t, xa=xa: jvp(fn, (xa,), (t,)))(tangents)  # (c, batch, p_out, d_out)
            y = w * (y.to(torch.float64) @ out64.T)  # (c, batch, p_out, m)
            a = y if a is None else a + y
        assert a is not None
        total[:, start:stop] += torch.einsum("cbtm,cbtm->mc", a, a)
        row_sums += a.sum(0)
    return total, row_sums


# ---------------------------------------------------------------------------------------------------
# The driver


def interaction_graph(
    model: nn.Module,
    data: Any,
    basis: Any,
    *,
    integration_rule: str = "gradient",
    integration_steps: int = 1,
    num_sources: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    jacobian_mode: Mode = "auto",
    max_elements: int = 2**21,
    dtype: str | torch.dtype | None = None,
    sections: Sections = "auto",
    progress: bool = True,
) -> InteractionGraph:
    """Interaction edges E between every pair of adjacent node layers of ``basis`` (METHOD §4).

    Args:
        model: the model the basis was built on (any ``torch.nn.Module``); run in eval mode.
        data: inputs, as for :func:`degeneracy.interaction_basis` (tensor, dict, or iterable of batches).
        basis: a :class:`degeneracy.basis.Basis` (any method); its node layers and constant
            coordinate are used.
        integration_rule: ``"gradient"`` (default), ``"trapezoid"`` or ``"gauss-legendre"`` (METHOD §3)
            with ``integration_steps``. With a constant coordinate every rule gives the same edges
            (the section is homogeneous of degree 1); without one, use an integrating rule for
            completeness.
        integration_steps: intervals (trapezoid) or nodes − 1 (Gauss-Legendre).
        num_sources: random ±1 sources over output positions (VJP path) instead of one VJP per
            output position; ``None`` (default) is exact.
        seed: seed of the ±1 sources (per batch, ``torch.randint(0, 2, (batch, num_sources, P_out))``
            from one ``torch.Generator`` seeded with ``seed``, drawn for the layer pairs in order).
        batch_size: examples per pass (default: the basis's).
        jacobian_mode: ``"vjp"``, ``"jvp"`` or ``"auto"`` (fewer passes wins).
        max_elements: the largest number of entries a vmapped chunk may hold (bounds memory).
        dtype: compute dtype (default: the basis's); edges are always accumulated in float64.
        sections: ``"auto"`` (default: :func:`~degeneracy.sections.transformer_lens_sections` for a
            ``HookedTransformer``, dropped where they differ from the model), ``None`` (hook-based
            sections only) or shortcuts ``{(layer_in, layer_out): fn}`` with ``fn(inputs, f)``
            returning f^{layer_out} (batch, positions, d) from raw f^{layer_in} without re-running
            the model from its input. Each is checked on the first batch against the hook-based
            section, at the data and at a perturbed input; an explicit one that differs raises
            ``ValueError``. ``G.info["sections"]`` records which kind each pair used.
        progress: show a progress bar.

    Returns:
        :class:`InteractionGraph` with ``G.edges[(layer_in, layer_out)]`` (d̂_out × d̂_in),
        ``G.completeness``, ``G.save(path)``.
    """
    from degeneracy.basis import _DTYPES, _Context

    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    cfg = EdgeConfig(
        integration_rule=integration_rule,
        integration_steps=integration_steps,
        num_sources=num_sources,
        seed=seed,
        batch_size=batch_size,
        jacobian_mode=jacobian_mode,
        max_elements=max_elements,
        dtype=dtype,
    )
    if cfg.dtype is not None and cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {cfg.dtype!r}")
    bcfg = dataclasses.replace(
        basis.config,
        batch_size=cfg.batch_size or basis.config.batch_size,
        dtype=cfg.dtype or basis.config.dtype,
    )
    ctx = _Context(model, data, basis.layers, bcfg)
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        with frozen_parameters(ctx.model):
            return _build(ctx, basis, cfg, progress, sections)
    finally:
        ctx.model.train(was_training)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad=False`` inside the block (restored after).

    ``torch.func`` differentiates only with respect to the activations, but autograd would otherwise
    also build (and, in vmapped pullbacks, compute) parameter gradients: this halves the work.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _build(ctx: Any, basis: Any, cfg: EdgeConfig, progress: bool, sections: Sections) -> InteractionGraph:
    names = [layer.name for layer in ctx.layers]
    pairs = list(zip(names[:-1], names[1:], strict=True))
    constant = bool(basis.config.has_constant)
    rule = integration_rule(cfg.integration_rule, cfg.integration_steps)
    if constant:
        rule = homogeneous_rule(rule)
    shortcuts: dict[Pair, SectionFn] = {}
    kinds: dict[str, str] = {}
    generator = torch.Generator().manual_seed(cfg.seed)
    sums = {pair: torch.zeros(basis[pair[1]].dim, basis[pair[0]].dim, dtype=torch.float64) for pair in pairs}
    counts = dict.fromkeys(pairs, 0)
    worst = dict.fromkeys(pairs, 0.0)
    scale = dict.fromkeys(pairs, 0.0)
    timings = dict.fromkeys((f"{a}->{b}" for a, b in pairs), 0.0)
    modes: dict[str, str] = {}
    t_start = time.perf_counter()
    maps = {
        name: (
            basis[name].C.to(device=ctx.device),
            basis[name].C_pinv.to(device=ctx.device),
        )
        for name in names
    }
    for i, inputs in enumerate(ctx.batches("edges", progress)):
        if i == 0:
            ctx.widths = {
                layer.name: module_widths(ctx.model, inputs, layer)
                for layer in ctx.layers
                if len(layer.modules) > 1
            }
        with torch.no_grad():
            acts = capture(ctx.model, inputs, ctx.layers, constant=constant)
            if i == 0:
                shortcuts, kinds = resolve_sections(ctx, inputs, acts, sections, constant)
        for src, dst in pairs:
            t0 = time.perf_counter()
            x = acts[src]
            C_in, Cp_in = maps[src]
            C_out, _ = maps[dst]
            feats = x.to(torch.float64) @ C_in.T
            if (src, dst) in shortcuts:
                fn = extended(shortcuts[(src, dst)], inputs, constant)
            else:
                fn = section(ctx.model, inputs, ctx.layers, src, dst, constant=constant, widths=ctx.widths)
            p_out = acts[dst].shape[1]
            signs = None
            if cfg.num_sources is not None:
                draws = torch.randint(0, 2, (x.shape[0], cfg.num_sources, p_out), generator=generator)
                signs = (2 * draws - 1).to(device=x.device, dtype=torch.float64)
            n_out = p_out if signs is None else cfg.num_sources
            modes[f"{src}->{dst}"] = _choose_mode(cfg.jacobian_mode, n_out * C_out.shape[0], C_in.shape[0])
            short = shortcuts.get((src, dst))
            analytic = None
            if (
                isinstance(short, SectionShortcut)
                and short.kernel is not None
                and cfg.jacobian_mode == "auto"
            ):
                with torch.no_grad():
                    analytic = _kernel_attributions(
                        short, inputs, x, feats, Cp_in, C_out, rule, constant, cfg.max_elements, acts[dst]
                    )
            with torch.no_grad():
                if analytic is not None:  # exact: the ±1 sources are not needed
                    signs = None
                    modes[f"{src}->{dst}"] = "analytic"
                    total, row_sums = analytic
                else:
                    total, row_sums = squared_attributions(
                        fn,
                        x,
                        Cp_in,
                        C_out,
                        rule,
                        in_features=feats,
                        out_positions=p_out,
                        signs=signs,
                        mode=cfg.jacobian_mode,
                        max_elements=cfg.max_elements,
                    )
                if signs is not None:  # the average over sources estimates Σ_t A_t²
                    total = total / cfg.num_sources
                check_finite(total, f"the edges {src} -> {dst}")
                sums[(src, dst)] += total.cpu()
                counts[(src, dst)] += x.shape[0] * x.shape[1]
                # completeness: Σ_j A = f̂^{l+1}(f) − f̂^{l+1}(0)
                y = acts[dst].to(torch.float64) @ C_out.T  # (batch, p_out, m)
                if not constant:  # with the constant coordinate the baseline output is exactly 0
                    y = y - fn(torch.zeros_like(x)).to(torch.float64) @ C_out.T
                target = y if signs is None else torch.einsum("brt,btm->brm", signs, y)
                dev = float((row_sums - target).abs().max())
                worst[(src, dst)] = max(worst[(src, dst)], dev)
                scale[(src, dst)] = max(scale[(src, dst)], float(target.abs().max()))
            timings[f"{src}->{dst}"] += time.perf_counter() - t0
    edges = {pair: sums[pair] / counts[pair] for pair in pairs}
    completeness = {pair: worst[pair] / scale[pair] if scale[pair] > 0 else worst[pair] for pair in pairs}
    info = {
        "timings": {**timings, "total": time.perf_counter() - t_start},
        "n_examples": counts[pairs[0]] // max(1, basis[pairs[0][0]].positions) if pairs else 0,
        "modes": modes,
        "sections": kinds,
        "version": degeneracy.__version__,
    }
    eigenvalues = {name: basis[name].eigenvalues.clone() for name in names}
    return InteractionGraph(
        tuple(ctx.layers), edges, basis.config.method, constant, eigenvalues, completeness, cfg, info
    )


def _kernel_attributions(
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
) -> tuple[Tensor, Tensor] | None:
    """Σ_x Σ_t A² and Σ_j A from a shortcut's analytic kernel, or ``None`` if it does not apply.

    With the constant coordinate, the columns j ≥ 1 come from the kernel at f (the Jacobian of the
    homogeneous extension is constant along α·f, so every rule agrees), and the constant column from
    Euler's identity Σ_j A_j = f̂^{l+1}(f) − C J r, r = f − C₊ C f the truncation residual (one extra
    JVP). This needs C₊'s constant row to vanish off column 0, as for every centred basis here.
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
        sums = a.sum(-1)
        total[:, start:] += a.square_().sum(dim=(0, 1))
        if complete is not None:
            a0 = complete[sl] - sums
            total[:, 0] += torch.einsum("btm,btm->m", a0, a0)
            sums = complete[sl]
        row_sums.append(sums)
    return total, torch.cat(row_sums)


# ---------------------------------------------------------------------------------------------------
# Sparsity


def gini(values: Tensor) -> float:
    """Gini coefficient of non-negative values (0: all equal, → 1: all mass on one entry)."""
    v = values.flatten().to(torch.float64).clamp_min(0).sort().values
    n = v.numel()
    total = float(v.sum())
    if n == 0 or total == 0.0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * ranks - n - 1) * v).sum() / (n * total))


def sparsity(
    graph: InteractionGraph,
    fractions: Sequence[float] = (0.9, 0.99, 0.999),
    *,
    exclude_constant: bool = True,
) -> dict[Pair, dict[str, float]]:
    """Per layer pair: how many edges hold each fraction of the total edge weight, and the Gini.

    With ``exclude_constant`` (default) edges from or to the constant direction are left out (they
    carry the mean, not an interaction). Returns ``{pair: {"n_edges", "n_90", "n_99", "n_99.9",
    "gini"}}`` (keys ``n_<100·fraction>``).
    """
    out: dict[Pair, dict[str, float]] = {}
    for pair in graph.pairs:
        e = graph.edges[pair]
        if exclude_constant and graph.has_constant:
            e = e[1:, 1:]
        flat = e.flatten().clamp_min(0).sort(descending=True).values
        total = float(flat.sum())
        row: dict[str, float] = {"n_edges": float(flat.numel()), "gini": gini(flat)}
        cum = flat.cumsum(0)
        for frac in fractions:
            key = f"n_{100 * frac:g}"
            if total == 0.0:
                row[key] = 0.0
            else:
                row[key] = float(int((cum < frac * total * (1 - 1e-12)).sum()) + 1)
        out[pair] = row
    return out
