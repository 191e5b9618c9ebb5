"""Section shortcuts: f^{l+1} computed from f^l without re-running the model from its input.

A *section* maps the activations of one node layer to the next (:func:`degeneracy.capture.section`
does it for any model by substituting f^l through forward hooks and re-running the model). For
TransformerLens models :func:`transformer_lens_sections` recognises the standard sections between
residual-stream hook points (attention, MLP, identity, unembedding) and computes them from f^l alone,
at the target positions only. A :class:`SectionShortcut` may also carry closed-form Jacobian-vector
products: a ``tangent`` for a general direction and a ``kernel`` for the rank-one tangents that bases
and edges need, with the basis maps folded into the weights once (no automatic differentiation).

Bases (:func:`degeneracy.interaction_basis`) and edges (:func:`degeneracy.interaction_graph`) take
``sections="auto"`` (these shortcuts for a ``HookedTransformer``, :func:`bert_sections` /
:func:`gpt2_sections` for Hugging Face BERT / GPT-2 models, none otherwise), ``None`` (always
the hook-based section) or an explicit mapping ``{(layer_in, layer_out): fn}``. Every shortcut is
checked against the hook-based section on the first batch, at the data and off it
(:func:`check_shortcut`): an explicit shortcut that differs raises, an automatic one is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import jvp

from degeneracy.adapters.huggingface import eager_attention
from degeneracy.adapters.huggingface_sections import bert_closed_forms, gpt2_closed_forms, huggingface_family
from degeneracy.adapters.transformer_lens import is_hooked_transformer
from degeneracy.adapters.transformer_lens.sections import closed_form_sections
from degeneracy.capture import NodeLayer, as_node_layers, section
from degeneracy.data import input_mask, node_mask, position_mask, slice_inputs
from degeneracy.graph_result import Pair
from degeneracy.jacobian import GramFn, GramQuery, Kernel, SectionFn

__all__ = [
    "SectionFn",
    "SectionShortcut",
    "Sections",
    "transformer_lens_sections",
    "gpt2_sections",
    "bert_sections",
    "resolve_sections",
    "auto_sections",
    "shortcut_gram",
    "check_shortcut",
    "extended",
    "slice_inputs",
]

Sections = Mapping[Pair, SectionFn] | Literal["auto"] | None


def extended(
    short: SectionFn, inputs: Any, constant: bool, positions: int | tuple[int, ...] | None = None
) -> Callable[[Tensor], Tensor]:
    """``short(inputs, ·)`` as a function of (augmented, with ``constant``) activations, exactly like
    :func:`degeneracy.capture.section` (the homogeneous extension F([f; c]) = [c̄ g(f/c̄); c̄], c̄ the
    mean constant coordinate over the valid input positions of a padded batch; ``positions`` are the
    source node layer's).

    >>> fn = extended(lambda inputs, f: f + 1, None, constant=True)
    >>> fn(torch.tensor([[[1.0, 2.0]]])).tolist()  # [f; c] = [1; 2]: [c (f/c + 1); c]
    [[[3.0, 2.0]]]
    """
    if not constant:
        return lambda x: short(inputs, x)
    mask = input_mask(inputs)

    def fn(x: Tensor) -> Tensor:
        ones, c = x[..., -1:], x[..., -1:].mean(dim=1, keepdim=True)
        valid = position_mask(mask, positions, x.shape[1])
        if valid is not None:  # as capture.section: the mean over the valid (unpadded) positions
            valid = valid.to(device=x.device, dtype=x.dtype)[..., None]
            count = valid.sum(1, True)
            c = torch.where(count > 0, (ones * valid).sum(1, True) / count.clamp_min(1), c)
        out = short(inputs, x[..., :-1] / c)
        return torch.cat([out * c, c.expand(out.shape[0], out.shape[1], 1)], dim=-1)

    return fn


@dataclass(frozen=True)
class SectionShortcut:
    """A section computed from the source activations alone, optionally with an analytic kernel.

    ``fn(inputs, f)`` returns f^{dst} from raw f^{src}; ``tangent(inputs, f, δf)``, when given, its JVP
    in closed form. ``kernel(inputs, f, scale, directions, C_out)``,
    when given, returns the attributions C_out J(f) [directions_j · scale_{s,j}] for every input
    direction j at once, shape (batch, P_out, m, k), in float64, by closed-form Jacobian-vector products
    that exploit the rank-one tangents (no automatic differentiation); :func:`interaction_graph` uses
    it when ``jacobian_mode="auto"``. ``gram(inputs, x, R₊, C_out, rule, constant, max_elements)``,
    when given, returns Σ_x Σ_(t,i) Σ_s Jᵀ J of the basis Jacobian J = C_out ∂F/∂x R₊ (the un-normalised M of
    METHOD §2.2) in closed form, or ``None`` where it does not apply (see :func:`shortcut_gram`).

    >>> short = SectionShortcut(lambda inputs, f: f.square())
    >>> short.jvp(None, torch.tensor([3.0]), torch.tensor([1.0])).tolist()  # torch.func without a tangent
    [6.0]
    """

    fn: Callable[[Any, Tensor], Tensor]
    kernel: Kernel | None = None
    tangent: Callable[[Any, Tensor, Tensor], Tensor] | None = None
    gram: GramFn | None = None

    def __call__(self, inputs: Any, x: Tensor) -> Tensor:
        return self.fn(inputs, x)

    def jvp(self, inputs: Any, f: Tensor, tangent: Tensor) -> Tensor:
        """J(f)·tangent (closed form when ``tangent`` is given, else ``torch.func.jvp``)."""
        if self.tangent is not None:
            return self.tangent(inputs, f, tangent)
        return jvp(lambda z: self.fn(inputs, z), (f,), (tangent.to(f.dtype),))[1]


def transformer_lens_sections(model: nn.Module, layers: Sequence[Any]) -> dict[Pair, SectionFn]:
    """Section shortcuts for a TransformerLens ``HookedTransformer`` whose node layers are hook points.

    The closed forms of :func:`degeneracy.adapters.transformer_lens.sections.closed_form_sections`
    (attention, ReLU MLP, identity and unembedding sections between residual-stream hook points), as
    :class:`SectionShortcut` s. Bases and edges check every shortcut against the model before use.

    >>> transformer_lens_sections(torch.nn.Linear(2, 2), ["weight"])
    Traceback (most recent call last):
    ...
    ValueError: transformer_lens_sections needs a TransformerLens HookedTransformer
    """
    return {pair: SectionShortcut(*form) for pair, form in closed_form_sections(model, layers).items()}


def gpt2_sections(model: nn.Module, layers: Sequence[Any]) -> dict[Pair, SectionFn]:
    """Section shortcuts for a Hugging Face GPT-2 model whose node layers read the inputs of its blocks
    ``transformer.h.{i}`` and of ``transformer.ln_f``: each block (pre-LayerNorm attention and GELU MLP)
    in closed form (:func:`degeneracy.adapters.huggingface_sections.gpt2_closed_forms`). Pass them as
    ``sections=`` to bases and edges, which check each one against the model on the first batch.

    >>> gpt2_sections(torch.nn.Linear(2, 2), ["weight"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: gpt2_closed_forms needs a Hugging Face GPT-2 model ...
    """
    return {pair: SectionShortcut(*form) for pair, form in gpt2_closed_forms(model, layers).items()}


def bert_sections(model: nn.Module, layers: Sequence[Any]) -> dict[Pair, SectionFn]:
    """Section shortcuts for a Hugging Face BERT encoder whose node layers read the inputs of
    ``encoder.layer.{i}`` (and the output of the last one): each post-LayerNorm layer in closed form
    (:func:`degeneracy.adapters.huggingface_sections.bert_closed_forms`), for ``sections=``.

    >>> bert_sections(torch.nn.Linear(2, 2), ["weight"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: bert_closed_forms needs a Hugging Face BERT model ...
    """
    return {pair: SectionShortcut(*form) for pair, form in bert_closed_forms(model, layers).items()}


def auto_sections(model: nn.Module, layers: Sequence[Any]) -> dict[Pair, SectionFn]:
    """The shortcuts ``sections="auto"`` proposes: :func:`transformer_lens_sections` for a
    ``HookedTransformer``, :func:`bert_sections` for a Hugging Face BERT encoder, :func:`gpt2_sections`
    for a GPT-2 model (:func:`degeneracy.adapters.huggingface_sections.huggingface_family`), none for
    other models. Each is still checked against the model before use (:func:`resolve_sections`).

    >>> auto_sections(torch.nn.Linear(2, 2), ["weight"])
    {}
    """
    if is_hooked_transformer(model):
        return transformer_lens_sections(model, layers)
    family = huggingface_family(model)
    if family == "bert":
        return bert_sections(model, layers)
    if family == "gpt2":
        return gpt2_sections(model, layers)
    return {}


def check_shortcut(
    model: nn.Module,
    layers: Sequence[NodeLayer],
    inputs: Any,
    acts: Mapping[str, Tensor],
    pair: Pair,
    short: SectionFn,
    *,
    constant: bool,
    widths: Mapping[str, list[int]] | None = None,
) -> None:
    """A section shortcut must agree with the hook-based section at the data and off it.

    ``acts`` holds the activations of ``inputs`` at the node layers ``layers`` (augmented with the
    constant coordinate when ``constant``); ``widths`` the module widths of multi-module node layers.
    Raises ``ValueError`` when the shortcut (or its closed-form JVP) differs from the model.

    >>> from degeneracy.capture import as_node_layers, capture
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()).double()
    >>> layers = as_node_layers(model, ["1", "output"])
    >>> x = torch.randn(4, 2, dtype=torch.float64)
    >>> acts = capture(model, x, layers, constant=False)
    >>> check_shortcut(model, layers, x, acts, ("1", "output"), lambda i, f: f.relu(), constant=False)
    >>> check_shortcut(model, layers, x, acts, ("1", "output"), lambda i, f: f, constant=False)
    Traceback (most recent call last):
    ...
    ValueError: the section shortcut for 1 -> output differs from the model ...
    """
    src, dst = pair
    few = slice(0, 64)  # a slice of the first batch is enough to tell two functions apart
    inputs = slice_inputs(inputs, few)
    x = acts[src][few]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    scale = x.abs().amax(dim=(0, 1), keepdim=True)
    if constant:
        noise[..., -1] = 0.0
    widths = dict(widths or {})
    src_layer = next(layer for layer in layers if layer.name == src)
    dst_layer = next(layer for layer in layers if layer.name == dst)
    valid = None  # padded output positions are excluded from every statistic, so from the check too
    for probe in (x, x + 0.1 * scale * noise):
        want = section(model, inputs, layers, src, dst, constant=constant, widths=widths)(probe)
        got = extended(short, inputs, constant, src_layer.positions)(probe)
        if got.shape != want.shape:
            raise ValueError(
                f"the section shortcut for {src} -> {dst} returns shape {tuple(got.shape)}, "
                f"the model gives {tuple(want.shape)}"
            )
        valid = node_mask(inputs, dst_layer.positions, want.shape[1])
        _agree(got, want, f"the section shortcut for {src} -> {dst}", valid)
    tangent = getattr(short, "tangent", None)
    if tangent is not None:  # the closed-form Jacobians assume the model is what its weights say
        f = x[..., :-1] if constant else x
        r = noise[..., : f.shape[-1]]
        raw = section(model, inputs, layers, src, dst, constant=False, widths=widths)
        with eager_attention(model):  # (SDPA has no forward mode; eager is the same function)
            want = jvp(raw, (f,), (r,))[1]
        got = tangent(inputs, f, r).to(want.dtype)
        _agree(got, want, f"the closed-form Jacobian for {src} -> {dst}", valid)


def _agree(got: Tensor, want: Tensor, what: str, valid: Tensor | None = None) -> None:
    if valid is not None and valid.shape == want.shape[:2]:
        keep = valid.to(want.device)[..., None]
        got, want = got * keep, want * keep
    tol = 1e-9 if want.dtype == torch.float64 else 1e-4

    dev = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
    if dev > tol:
        raise ValueError(f"{what} differs from the model by {dev:.2e} (relative); drop it from `sections`")


def resolve_sections(
    model: nn.Module,
    layers: Sequence[Any],
    inputs: Any,
    acts: Mapping[str, Tensor],
    sections: Sections,
    *,
    constant: bool,
    widths: Mapping[str, list[int]] | None = None,
) -> tuple[dict[Pair, SectionFn], dict[str, str]]:
    """The checked shortcuts to use, and for each adjacent pair which kind of section it gets.

    ``inputs`` and ``acts`` are the first batch and its activations at every node layer of ``layers``
    (augmented when ``constant``); ``widths`` the module widths of multi-module node layers.
    ``sections`` is ``"auto"`` (:func:`auto_sections`), ``None`` or a mapping
    ``{(layer_in, layer_out): fn}``. Explicit shortcuts that differ from the model raise ``ValueError``;
    automatic ones are dropped instead.

    >>> from degeneracy.capture import as_node_layers, capture
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()).double()
    >>> layers = as_node_layers(model, ["1", "output"])
    >>> x = torch.randn(4, 2, dtype=torch.float64)
    >>> acts = capture(model, x, layers, constant=False)
    >>> used, kinds = resolve_sections(
    ...     model, layers, x, acts, {("1", "output"): lambda i, f: f.relu()}, constant=False
    ... )
    >>> kinds
    {'1->output': 'shortcut'}
    """
    layers = as_node_layers(model, layers)
    names = [layer.name for layer in layers]
    pairs = list(zip(names[:-1], names[1:], strict=True))
    auto = isinstance(sections, str)
    if auto and sections != "auto":
        raise ValueError(f"sections must be 'auto', None or a mapping, got {sections!r}")
    if sections is None:
        chosen: dict[Pair, SectionFn] = {}
    elif auto:
        chosen = auto_sections(model, layers)
    else:
        chosen = dict(sections)
        unknown = [pair for pair in chosen if pair not in pairs]
        if unknown:
            raise ValueError(f"sections given for {unknown}, which are not adjacent node layers {pairs}")
    used: dict[Pair, SectionFn] = {}
    for pair, short in chosen.items():
        try:
            check_shortcut(model, layers, inputs, acts, pair, short, constant=constant, widths=widths)
        except ValueError:
            if not auto:
                raise
            continue
        used[pair] = short
    kinds = {
        f"{a}->{b}": (
            "hooks"
            if (a, b) not in used
            else "closed form"
            if getattr(used[(a, b)], "kernel", None) is not None
            else "shortcut"
        )
        for a, b in pairs
    }
    return used, kinds


def shortcut_gram(short: SectionFn, *args: Any) -> Tensor | None:
    """Σ_x Σ_s Σ_(t,i) J_{(t,i),(s,·)}ᵀ J_{(t,i),(s,·)} (k × k, float64) from a shortcut's closed forms.

    ``args`` are a Gram function's (:data:`degeneracy.jacobian.GramFn`): ``inputs, x, R₊, C_out, rule,
    constant, max_elements``. J = C_out ∂F/∂x_s R₊ is the basis Jacobian of the (extended, with
    ``constant``) section at input position s, integrated over ``rule``. Uses ``short.gram`` when it
    applies, else the kernel with one block of directions per input position (the Jacobian of every
    position in one call); with the constant coordinate the column of R₊'s constant direction
    r₀ = [m₀; s₀] comes from Euler's identity,
    J_s r₀ = C_out [s₀/P (g(f) − J f) + J (m₀ at s); s₀/P]. ``None`` if neither applies (no kernel, or
    a constant direction mixed into the other columns).

    >>> from degeneracy.linalg import integration_rule
    >>> kernel = lambda inputs, f, scale, dirs, c_out: (c_out @ dirs)[None, None] * scale[:, :, None, :]
    >>> short = SectionShortcut(lambda inputs, f: f, kernel=kernel)  # the identity: J = I per example
    >>> x, eye = torch.ones(3, 1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    >>> shortcut_gram(short, x, x, eye, eye, integration_rule("gradient"), False, 2**10).tolist()
    [[3.0, 0.0], [0.0, 3.0]]
    """
    gram = getattr(short, "gram", None)
    if gram is not None:
        got = gram(*args)
        if got is not None:
            return got
    q = GramQuery(*args)
    if getattr(short, "kernel", None) is None or q.mixes_constant():
        return None
    assert isinstance(short, SectionShortcut) and short.kernel is not None
    inputs, x, rule, constant = q.inputs, q.x, q.rule, q.constant
    f64 = torch.float64
    in64, out64 = q.maps64()
    d = q.width
    d_out = out64.shape[1] - int(constant)
    start = int(constant)
    batch, n_pos = x.shape[0], x.shape[1]
    dirs = in64[:d, start:]
    kk = dirs.shape[1]
    k = in64.shape[1]
    blocks = dirs.repeat(1, n_pos)  # direction j of position s is column s·kk + j
    one_hot = torch.eye(n_pos, dtype=f64, device=x.device).repeat_interleave(kk, dim=1)  # (P, P·kk)
    c_feat = out64[:, :d_out]
    # about one (m × P·k) block per example lives at a time; 8·max_elements numbers keep the GEMMs
    # large (as for the edge kernels, benchmarks/edges_modadd.md)
    chunk = max(1, 8 * q.max_elements // max(1, out64.shape[0] * n_pos * k))
    total = torch.zeros(k, k, dtype=f64, device=x.device)
    for b0 in range(0, batch, chunk):
        sl = slice(b0, b0 + chunk)
        sub, f = slice_inputs(inputs, sl), x[sl, :, :d]
        scale = one_hot.expand(f.shape[0], n_pos, n_pos * kk)
        points = [(1.0, 1.0)] if constant else list(zip(rule.points, rule.weights, strict=True))
        jac = None
        for alpha, w in points:
            term = w * short.kernel(sub, alpha * f, scale, blocks, c_feat)  # (b, P_out, m, P·kk)
            jac = term if jac is None else jac + term
        assert jac is not None
        jac = jac.reshape(*jac.shape[:3], n_pos, kk)
        if constant:
            m0, s0 = in64[:d, 0], float(in64[d, 0])
            euler = short(sub, f).to(f64) - short.jvp(sub, f, f).to(f64)  # g(f) − J f
            col = []
            for s in range(n_pos):
                tangent = torch.zeros_like(f)
                tangent[:, s] = m0.to(f.dtype)
                moved = short.jvp(sub, f, tangent).to(f64) + (s0 / n_pos) * euler
                col.append(moved @ c_feat.T + (s0 / n_pos) * out64[:, d_out])  # (b, P_out, m)
            jac = torch.cat([torch.stack(col, dim=3)[..., None], jac], dim=-1)
        flat = jac.reshape(-1, k)
        total += flat.T @ flat
    return total
