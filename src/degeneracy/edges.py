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

The results (:class:`InteractionGraph`, :func:`load_graph`, :func:`sparsity`) live in
:mod:`degeneracy.graph_result`, the per-batch numerics in :mod:`degeneracy.attributions`; both are
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import degeneracy
from degeneracy.attributions import attribution_mode, kernel_attributions, squared_attributions
from degeneracy.basis import NodeLayerRun
from degeneracy.basis_result import config_from, dtype_name
from degeneracy.capture import capture, section
from degeneracy.checks import check_basis_fits
from degeneracy.fingerprint import basis_fingerprint, check_model, fingerprint
from degeneracy.graph_result import EdgeConfig, InteractionGraph, Mode, gini, load_graph, sparsity
from degeneracy.linalg import homogeneous_rule, integration_rule
from degeneracy.sections import (
    SectionFn,
    Sections,
    SectionShortcut,
    extended,
    resolve_sections,
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
    "frozen_parameters",
]

Pair = tuple[str, str]


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
    allow_other_model: bool = False,
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
        allow_other_model: use a basis built on another model (its fingerprint differs from this
            model's, :func:`degeneracy.fingerprint.check_model`) with a warning instead of a
            ``ModelMismatchError``.

    Returns:
        :class:`InteractionGraph` with ``G.edges[(layer_in, layer_out)]`` (d̂_out × d̂_in),
        ``G.completeness``, ``G.save(path)``.

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> B = degeneracy.interaction_basis(model, x, ["1", "2", "output"], progress=False)
    >>> G = interaction_graph(model, x, B, progress=False)
    >>> G.completeness[("1", "2")] < 1e-10  # with the constant coordinate every rule is exact
    True
    """
    cfg = config_from(EdgeConfig, locals(), dtype=dtype_name(dtype))
    check_model(basis, model, allow_other_model=allow_other_model)
    run = NodeLayerRun(
        model,
        data,
        basis.layers,
        dtype=cfg.dtype or basis.config.dtype,
        batch_size=cfg.batch_size or basis.config.batch_size,
    )
    if run.probe is not None:
        check_basis_fits(run.model, run.probe, run.layers, basis)
    was_training = run.model.training
    run.model.eval()
    try:
        with frozen_parameters(run.model):
            graph = _build(run, basis, cfg, progress, sections)
    finally:
        run.model.train(was_training)
    graph.info["fingerprint"] = {**fingerprint(model, data, run.layers), "basis": basis_fingerprint(basis)}
    return graph


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad=False`` inside the block (restored after).

    ``torch.func`` differentiates only with respect to the activations, but autograd would otherwise
    also build (and, in vmapped pullbacks, compute) parameter gradients: this halves the work.

    >>> model = torch.nn.Linear(2, 2)
    >>> with frozen_parameters(model):
    ...     model.weight.requires_grad
    False
    >>> model.weight.requires_grad
    True
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _build(
    run: NodeLayerRun, basis: Any, cfg: EdgeConfig, progress: bool, sections: Sections
) -> InteractionGraph:
    names = [layer.name for layer in run.layers]
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
            basis[name].C.to(device=run.device),
            basis[name].C_pinv.to(device=run.device),
        )
        for name in names
    }
    for i, inputs in enumerate(run.inputs("edges", progress)):
        if i == 0:
            run.learn_widths(inputs)
        with torch.no_grad():
            acts = capture(run.model, inputs, run.layers, constant=constant)
            if i == 0:
                shortcuts, kinds = resolve_sections(
                    run.model, run.layers, inputs, acts, sections, constant=constant, widths=run.widths
                )
        for src, dst in pairs:
            t0 = time.perf_counter()
            x = acts[src]
            C_in, Cp_in = maps[src]
            C_out, _ = maps[dst]
            feats = x.to(torch.float64) @ C_in.T
            if (src, dst) in shortcuts:
                fn = extended(shortcuts[(src, dst)], inputs, constant)
            else:
                fn = section(run.model, inputs, run.layers, src, dst, constant=constant, widths=run.widths)
            p_out = acts[dst].shape[1]
            signs = None
            if cfg.num_sources is not None:
                draws = torch.randint(0, 2, (x.shape[0], cfg.num_sources, p_out), generator=generator)
                signs = (2 * draws - 1).to(device=x.device, dtype=torch.float64)
            n_out = p_out if signs is None else cfg.num_sources
            modes[f"{src}->{dst}"] = attribution_mode(
                cfg.jacobian_mode, n_out * C_out.shape[0], C_in.shape[0]
            )
            short = shortcuts.get((src, dst))
            analytic = None
            if (
                isinstance(short, SectionShortcut)
                and short.kernel is not None
                and cfg.jacobian_mode == "auto"
            ):
                with torch.no_grad():
                    analytic = kernel_attributions(
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
                        num_out_positions=p_out,
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
        tuple(run.layers), edges, basis.config.method, constant, eigenvalues, completeness, cfg, info
    )
