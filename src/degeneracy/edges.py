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
E[r_t r_t'] = δ_tt'. The estimate averages R sources, R·d̂_{l+1} VJPs per example instead of
P_out·d̂_{l+1}; the spread of the R independent sources gives each edge's standard error
(``G.edge_se``, :mod:`degeneracy.probes`). The output features i stay exact (each edge E_ij needs its
own i, so sources cannot mix them, unlike the basis Grams). Pairs with one output position, and pairs
where the exact JVP path is cheaper than R sources, are computed exactly.

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
from degeneracy.adapters.huggingface import eager_attention
from degeneracy.attributions import attribution_mode, kernel_attributions, squared_attributions
from degeneracy.basis import NodeLayerRun
from degeneracy.basis_result import config_from, dtype_name
from degeneracy.capture import capture, section
from degeneracy.cuts import check_basis_fits
from degeneracy.data import eval_mode
from degeneracy.distributed import all_reduce_max, all_reduce_sum, global_indices
from degeneracy.fingerprint import basis_fingerprint, check_model, fingerprint
from degeneracy.graph_result import EdgeConfig, InteractionGraph, Mode, gini, load_graph, sparsity
from degeneracy.linalg import homogeneous_rule, integration_rule
from degeneracy.probes import SignSource, build_cost, draw_signs, resolve_sources, source_mean_and_se
from degeneracy.run import full_precision
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
    sources: str | SignSource = "rademacher",
    batch_size: int | None = None,
    jacobian_mode: Mode = "auto",
    max_elements: int = 2**21,
    dtype: str | torch.dtype | None = None,
    sections: Sections = "auto",
    device: str | torch.device | None = None,
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
            output position; ``None`` (default) is exact. Unbiased; ``G.edge_se`` holds each edge's
            standard error (needs R ≥ 2). Pairs with one output position or a cheaper exact JVP path
            stay exact. An exact graph that needs more than
            :data:`~degeneracy.probes.LONG_BUILD_PRODUCTS` products logs its cost and this alternative.
        seed: seed of the ±1 sources (per example and layer pair, ``torch.randint(0, 2, (num_sources,
            P_out))`` from a ``torch.Generator`` seeded by :func:`~degeneracy.probes.example_seed`
            from ``seed``, the pair and the example's index: the same on any number of processes).
        sources: ``"rademacher"`` (default) or a callable ``draw(shape)`` returning ±1 float64 signs
            of that shape (e.g. :func:`degeneracy.probes.pattern_sources`).
        batch_size: examples per pass (default: the basis's).
        jacobian_mode: ``"vjp"``, ``"jvp"`` or ``"auto"`` (fewer passes wins).
        max_elements: the largest number of entries a vmapped chunk may hold (bounds memory).
        dtype: compute dtype (default: the basis's); edges are always accumulated in float64.
        sections: ``"auto"`` (default: :func:`~degeneracy.sections.auto_sections`: closed forms for a
            ``HookedTransformer`` and for Hugging Face BERT / GPT-2 blocks, dropped where they differ
            from the model), ``None`` (hook-based
            sections only) or shortcuts ``{(layer_in, layer_out): fn}`` with ``fn(inputs, f)``
            returning f^{layer_out} (batch, positions, d) from raw f^{layer_in} without re-running
            the model from its input. Each is checked on the first batch against the hook-based
            section, at the data and at a perturbed input; an explicit one that differs raises
            ``ValueError``. ``G.info["sections"]`` records which kind each pair used.
        device: where to run (``"cpu"``, ``"cuda:0"``, ...): a copy of the model is moved there;
            ``None`` (default): the model's device. Edges are float64 on the CPU either way.
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
        device=device,
    )
    if run.probe is not None:
        check_basis_fits(run.model, run.probe, run.layers, basis)
    with eval_mode(run.model), frozen_parameters(run.model), full_precision(), eager_attention(run.model):
        graph = _build(run, basis, cfg, progress, sections, resolve_sources(sources, cfg.seed))
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
    run: NodeLayerRun,
    basis: Any,
    cfg: EdgeConfig,
    progress: bool,
    sections: Sections,
    draw: SignSource | None = None,
) -> InteractionGraph:
    names = [layer.name for layer in run.layers]
    pairs = list(zip(names[:-1], names[1:], strict=True))
    constant = bool(basis.config.has_constant)
    rule = integration_rule(cfg.integration_rule, cfg.integration_steps)
    if constant:
        rule = homogeneous_rule(rule)
    shortcuts: dict[Pair, SectionFn] = {}
    kinds: dict[str, str] = {}
    draw = draw or resolve_sources("rademacher", cfg.seed)
    sums = {pair: torch.zeros(basis[pair[1]].dim, basis[pair[0]].dim, dtype=torch.float64) for pair in pairs}
    num = cfg.num_sources or 0
    source_sums = {pair: torch.zeros(num, *sums[pair].shape, dtype=torch.float64) for pair in pairs}
    sampled = dict.fromkeys(pairs, False)
    cost: dict[str, int] = {}
    counts = dict.fromkeys(pairs, 0)
    worst = dict.fromkeys(pairs, 0.0)
    scale = dict.fromkeys(pairs, 0.0)
    timings = dict.fromkeys((f"{a}->{b}" for a, b in pairs), 0.0)
    modes: dict[str, str] = {}
    t_start = time.perf_counter()
    seen = 0  # this rank's examples so far (the sources are drawn per example, by global index)
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
            masks = run.masks(inputs, acts)
            if i == 0:
                shortcuts, kinds = resolve_sections(
                    run.model, run.layers, inputs, acts, sections, constant=constant, widths=run.widths
                )
                cost = _log_cost(run, basis, cfg, pairs, acts, shortcuts, len(rule.points))
        run.within(1, len(pairs) + 1)  # the forward pass, then each pair: the bar moves within a batch
        for part, (src, dst) in enumerate(pairs, start=2):
            t0 = time.perf_counter()
            x = acts[src]
            C_in, Cp_in = maps[src]
            C_out, _ = maps[dst]
            feats = x.to(torch.float64) @ C_in.T
            if (src, dst) in shortcuts:
                fn = extended(shortcuts[(src, dst)], inputs, constant, run.layer(src).positions)
            else:
                fn = section(run.model, inputs, run.layers, src, dst, constant=constant, widths=run.widths)
            p_out = acts[dst].shape[1]
            signs = None
            if cfg.num_sources is not None:
                shape, examples = (x.shape[0], cfg.num_sources, p_out), global_indices(seen, x.shape[0])
                signs = draw_signs(draw, shape, examples, f"edges {src}->{dst}").to(x.device, torch.float64)
                sampled_rows = cfg.num_sources * C_out.shape[0]
                if p_out == 1 or attribution_mode(cfg.jacobian_mode, sampled_rows, C_in.shape[0]) == "jvp":
                    signs = None  # exact at no more cost (drawn all the same: the draws stay in step)
            n_out = p_out if signs is None else cfg.num_sources
            modes[f"{src}->{dst}"] = attribution_mode(
                cfg.jacobian_mode, n_out * C_out.shape[0], C_in.shape[0]
            )
            short = shortcuts.get((src, dst))
            analytic = None
            padded = masks[src] is not None or masks[dst] is not None
            if (
                isinstance(short, SectionShortcut)
                and short.kernel is not None
                and cfg.jacobian_mode == "auto"
                and (not padded or getattr(short.kernel, "masks_padding", False))  # keys masked in it
            ):
                with torch.no_grad():
                    analytic = kernel_attributions(
                        short, inputs, x, feats, Cp_in, C_out, rule, constant, cfg.max_elements, acts[dst],
                        in_mask=masks[src], out_mask=masks[dst],
                    )  # fmt: skip
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
                        in_mask=masks[src],
                        out_mask=masks[dst],
                        per_source=True,
                    )
                if signs is not None:  # the average over sources estimates Σ_t A_t²
                    source_sums[(src, dst)] += total.cpu()
                    sampled[(src, dst)] = True
                    total = total.sum(0) / cfg.num_sources
                elif cfg.num_sources is not None:  # an exact batch: the same for every source
                    source_sums[(src, dst)] += total.cpu()
                check_finite(total, f"the edges {src} -> {dst}")
                sums[(src, dst)] += total.cpu()
                counts[(src, dst)] += x.shape[0] * x.shape[1] if masks[src] is None else int(masks[src].sum())
                # completeness: Σ_j A = f̂^{l+1}(f) − f̂^{l+1}(0)
                y = acts[dst].to(torch.float64) @ C_out.T  # (batch, p_out, m)
                if not constant:  # with the constant coordinate the baseline output is exactly 0
                    y = y - fn(torch.zeros_like(x)).to(torch.float64) @ C_out.T
                if masks[dst] is not None:  # padded output positions are left out
                    y = y * masks[dst][..., None].to(y)
                    signs = None if signs is None else signs * masks[dst][:, None, :].to(signs)
                target = y if signs is None else torch.einsum("brt,btm->brm", signs, y)
                dev = float((row_sums - target).abs().max())
                worst[(src, dst)] = max(worst[(src, dst)], dev)
                scale[(src, dst)] = max(scale[(src, dst)], float(target.abs().max()))
            timings[f"{src}->{dst}"] += time.perf_counter() - t0
            run.within(part, len(pairs) + 1)
        seen += acts[names[0]].shape[0]
    for pair in pairs:  # under torch.distributed: every rank's shard (sums, counts, worst cases)
        sums[pair] = all_reduce_sum(sums[pair])
        if cfg.num_sources is not None:  # the per-source sums too (each rank draws its examples' signs)
            source_sums[pair] = all_reduce_sum(source_sums[pair])
            sampled[pair] = bool(all_reduce_max(torch.tensor([float(sampled[pair])], dtype=torch.float64)))
        counts[pair] = int(all_reduce_sum(torch.tensor([float(counts[pair])], dtype=torch.float64)).item())
        both = all_reduce_max(torch.tensor([worst[pair], scale[pair]], dtype=torch.float64))
        worst[pair], scale[pair] = float(both[0]), float(both[1])
    edges = {pair: sums[pair] / counts[pair] for pair in pairs}
    edge_se = {
        pair: source_mean_and_se(source_sums[pair] / counts[pair])[1]
        if sampled[pair]
        else torch.zeros_like(edges[pair])
        for pair in pairs
        if cfg.num_sources is not None
    }
    completeness = {pair: worst[pair] / scale[pair] if scale[pair] > 0 else worst[pair] for pair in pairs}
    info = {
        "timings": {**timings, "total": time.perf_counter() - t_start},
        "n_examples": counts[pairs[0]] // max(1, basis[pairs[0][0]].positions) if pairs else 0,
        "modes": modes,
        "sections": kinds,
        "cost": cost,
        "version": degeneracy.__version__,
    }
    eigenvalues = {name: basis[name].eigenvalues.clone() for name in names}
    return InteractionGraph(
        tuple(run.layers), edges, basis.config.method, constant, eigenvalues, completeness, cfg, info, edge_se
    )


def _log_cost(
    run: NodeLayerRun, basis: Any, cfg: EdgeConfig, pairs: list[Pair], acts: Any, shortcuts: Any, points: int
) -> dict[str, int]:
    """Jacobian products of the edges (pairs without a closed-form kernel), logged before the passes
    with the ±1-source alternative (R sources: R·d̂_out VJPs per example); per example when the data
    (an iterable of batches) do not say how many examples they hold."""
    shapes = []
    for src, dst in pairs:
        short = shortcuts.get((src, dst))
        if isinstance(short, SectionShortcut) and short.kernel is not None and cfg.jacobian_mode == "auto":
            continue
        # one VJP per output row (t, i), or one JVP per input feature j (all input positions at once)
        shapes.append((acts[dst].shape[1], basis[dst].dim, 1, basis[src].dim, basis[dst].dim))
    what = "edges" if run.n is not None else "edges, per example,"
    return build_cost(what, run.n or 1, shapes, points, cfg.jacobian_mode, cfg.num_sources)
