"""Where the free directions of paper §3 live in a model: linear sites, neuron layers, attention layers.

* A **linear site** is an affine map p = W f + b inside the model (paper eq 12, bias as the extra
  constant coordinate of footnote 6): an ``nn.Linear``, or a TransformerLens weight (W_Q, W_K, W_V,
  W_O, W_in, W_out, W_U, and W_E with W_pos as one map on one-hot [token; position]). It is read at an
  *input point* (f) and an *output point* (p); ``weight_index`` (d_out × d_in) and ``bias_index``
  (d_out) give the flat positions of W and b in the parameter vector.
* A **neuron layer** is a piecewise-linear elementwise nonlinearity (ReLU, LeakyReLU, or the identity
  of a purely linear layer, paper §3.2) read at its pre-activation point, with the linear sites that
  produce its input (``in_site``) and read its output (``out_site``) when they are found.
* An **attention layer** (TransformerLens) exposes its pattern, values and z hook points.

A point is a module name plus ``read="input"`` (the first positional input) or ``"output"``.
Plain ``torch`` models are discovered by running one batch and matching tensors; TransformerLens
``HookedTransformer`` models from their config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from degeneracy.accounting._model import ParamSpec, param_spec, resolve_module
from degeneracy.data import call_model

Read = Literal["input", "output"]


@dataclass(frozen=True)
class Point:
    """A tensor read at a module: its first input or its output."""

    module: str
    read: Read = "output"


@dataclass
class Site:
    """An affine map p = W f + b between two points (paper eq 12)."""

    name: str
    input_point: Point
    output_point: Point
    d_in: int
    d_out: int
    weight_index: Tensor  # (d_out, d_in) flat indices into the parameter vector
    bias_index: Tensor | None  # (d_out,)
    input_transform: Callable[[Tensor], Tensor] | None = None  # raw captured → (batch, pos, d_in)

    @property
    def has_bias(self) -> bool:
        return self.bias_index is not None

    @property
    def d_in_aug(self) -> int:
        """d_in plus the constant coordinate of the bias (paper footnote 6)."""
        return self.d_in + int(self.has_bias)

    @property
    def num_parameters(self) -> int:
        return self.d_out * self.d_in_aug

    def augmented_weight(self, flat: Tensor) -> Tensor:
        """[W | b] (d_out × d_in_aug) read from a flat parameter vector."""
        w = flat[self.weight_index]
        if self.bias_index is None:
            return w
        return torch.cat([w, flat[self.bias_index][:, None]], dim=1)

    def augmented_index(self) -> Tensor:
        if self.bias_index is None:
            return self.weight_index
        return torch.cat([self.weight_index, self.bias_index[:, None]], dim=1)


@dataclass
class NeuronLayer:
    """A layer of elementwise piecewise-linear neurons (paper §3.2)."""

    name: str
    pre_point: Point
    activation: Literal["relu", "leaky_relu", "identity"]
    width: int
    negative_slope: float = 0.0
    in_site: Site | None = None
    out_site: Site | None = None


@dataclass
class AttentionLayer:
    """A TransformerLens attention layer (paper §3.2, "Attention")."""

    name: str
    pattern_point: Point
    value_point: Point
    z_point: Point
    n_heads: int
    d_head: int
    prefix: str  # e.g. "blocks.0.attn."


@dataclass
class Structure:
    """Sites, neuron layers and attention layers of a model, and the parameter layout."""

    spec: ParamSpec
    sites: list[Site] = field(default_factory=list)
    neuron_layers: list[NeuronLayer] = field(default_factory=list)
    attention_layers: list[AttentionLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    is_transformer_lens: bool = False

    def covered_parameters(self) -> int:
        idx = set()
        for site in self.sites:
            idx.update(site.augmented_index().reshape(-1).tolist())
        return len(idx)


def _param_index(spec: ParamSpec, name: str) -> Tensor:
    sl = spec.slice(name)
    return torch.arange(sl.start, sl.stop).view(spec.shapes[spec.names.index(name)])


def is_transformer_lens(model: nn.Module) -> bool:
    return hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "unembed")


# ---------------------------------------------------------------------------------------------------
# Plain torch models


_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Identity)


def _activation_kind(module: nn.Module) -> tuple[Literal["relu", "leaky_relu", "identity"], float] | None:
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.Identity):
        return "identity", 1.0
    return None


def _linear_site(spec: ParamSpec, name: str, module: nn.Linear) -> Site:
    prefix = f"{name}." if name else ""
    weight = _param_index(spec, f"{prefix}weight")
    bias = _param_index(spec, f"{prefix}bias") if module.bias is not None else None
    return Site(
        name=name,
        input_point=Point(name, "input"),
        output_point=Point(name, "output"),
        d_in=module.in_features,
        d_out=module.out_features,
        weight_index=weight,
        bias_index=bias,
    )


def _record_calls(model: nn.Module, inputs: Any) -> list[tuple[str, nn.Module, Tensor | None, Tensor | None]]:
    """(name, module, first input, output) of every leaf-module call of one forward pass, in order."""
    calls: list[tuple[str, nn.Module, Tensor | None, Tensor | None]] = []
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args and isinstance(args[0], Tensor) else None
            y = output if isinstance(output, Tensor) else None
            calls.append(
                (
                    name,
                    module,
                    None if x is None else x.detach().clone(),
                    None if y is None else y.detach().clone(),
                )
            )

        return hook

    try:
        for name, module in model.named_modules():
            if name and not list(module.children()):
                handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def discover_torch(model: nn.Module, inputs: Any) -> Structure:
    """Sites and neuron layers of a plain torch model, matched on one forward pass of ``inputs``.

    Every ``nn.Linear`` called exactly once is a site. An activation module (ReLU, LeakyReLU,
    Identity) called once is a neuron layer; its ``in_site`` is the linear map whose output equals the
    activation's input, its ``out_site`` the one whose input equals the activation's output. Two
    linear maps with nothing between them (A's output is B's input) form a purely linear neuron layer
    named after A (read at A's output).
    """
    spec = param_spec(model)
    structure = Structure(spec=spec)
    calls = _record_calls(model, inputs)
    counts: dict[str, int] = {}
    for name, *_ in calls:
        counts[name] = counts.get(name, 0) + 1
    linear_calls = []
    for i, (name, module, x, y) in enumerate(calls):
        if isinstance(module, nn.Linear):
            if counts[name] > 1:
                if name not in {s.name for s in structure.sites}:
                    structure.notes.append(f"{name}: called {counts[name]} times per forward; not analysed")
                continue
            site = _linear_site(spec, name, module)
            structure.sites.append(site)
            linear_calls.append((i, site, x, y))

    def same(a: Tensor | None, b: Tensor | None) -> bool:
        return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)

    used_as_hidden: set[str] = set()
    for i, (name, module, x, y) in enumerate(calls):
        kind = _activation_kind(module)
        if kind is None or counts[name] > 1 or x is None:
            continue
        before = [(j, s, yy) for j, s, _, yy in linear_calls if j < i and same(yy, x)]
        after = [(j, s, xx) for j, s, xx, _ in linear_calls if j > i and same(xx, y)]
        in_site = before[-1][1] if before else None
        out_site = after[0][1] if after else None
        width = int(x.shape[-1])
        structure.neuron_layers.append(
            NeuronLayer(name, Point(name, "input"), kind[0], width, kind[1], in_site, out_site)
        )
        if in_site is not None:
            used_as_hidden.add(in_site.name)
    # purely linear layers: A's output is B's input with no activation module in between
    for idx, (_i, site_a, _, y_a) in enumerate(linear_calls):
        if site_a.name in used_as_hidden:
            continue
        for _j, site_b, x_b, _ in linear_calls[idx + 1 :]:
            if same(y_a, x_b):
                structure.neuron_layers.append(
                    NeuronLayer(
                        site_a.name,
                        Point(site_a.name, "output"),
                        "identity",
                        site_a.d_out,
                        1.0,
                        site_a,
                        site_b,
                    )
                )
                break
    return structure


# ---------------------------------------------------------------------------------------------------
# TransformerLens


def _one_hot_embed_input(d_vocab: int, n_ctx: int) -> Callable[[Tensor], Tensor]:
    def transform(tokens: Tensor) -> Tensor:
        batch, pos = tokens.shape
        tok = torch.nn.functional.one_hot(tokens.long(), d_vocab)
        positions = torch.nn.functional.one_hot(torch.arange(pos, device=tokens.device), n_ctx)
        return torch.cat([tok, positions.expand(batch, pos, n_ctx)], dim=-1).to(torch.float64)

    return transform


def discover_transformer_lens(model: nn.Module) -> Structure:
    """Sites, MLP neuron layers and attention layers of a TransformerLens ``HookedTransformer``.

    Covers standard positional embeddings, attention with or without parameter-free normalisation
    (LayerNorm weights, if any, are not covered), ReLU MLPs (other activations: no neuron layer).
    """
    cfg = model.cfg
    spec = param_spec(model)
    s = Structure(spec=spec, is_transformer_lens=True)
    names = set(spec.names)
    norm = cfg.normalization_type
    if norm in ("LN", "RMS"):
        s.notes.append(f"normalisation {norm!r}: its weights are not covered by the sites")
    d_model, n_heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head

    def idx(name: str) -> Tensor:
        return _param_index(spec, name)

    def resid_point(i: int, which: str) -> Point:
        if norm is None:
            return Point(f"blocks.{i}.hook_resid_{'pre' if which == 'attn' else 'mid'}", "output")
        return Point(f"blocks.{i}.ln{1 if which == 'attn' else 2}.hook_normalized", "output")

    positional = getattr(cfg, "positional_embedding_type", "standard")
    if "embed.W_E" in names and positional == "standard" and "pos_embed.W_pos" in names:
        w_index = torch.cat([idx("embed.W_E").T, idx("pos_embed.W_pos").T], dim=1)  # (d_model, vocab + n_ctx)
        s.sites.append(
            Site(
                name="embed",
                input_point=Point("embed", "input"),
                output_point=Point("blocks.0.hook_resid_pre", "output"),
                d_in=cfg.d_vocab + cfg.n_ctx,
                d_out=d_model,
                weight_index=w_index,
                bias_index=None,
                input_transform=_one_hot_embed_input(cfg.d_vocab, cfg.n_ctx),
            )
        )
    else:
        s.notes.append("embeddings: only standard positional embeddings are covered")

    for i in range(cfg.n_layers):
        a = f"blocks.{i}.attn."
        for letter in ("Q", "K", "V"):
            w = idx(f"{a}W_{letter}")  # (h, d_model, d_head)
            b = idx(f"{a}b_{letter}") if f"{a}b_{letter}" in names else None
            s.sites.append(
                Site(
                    name=f"{a}W_{letter}",
                    input_point=resid_point(i, "attn"),
                    output_point=Point(f"{a}hook_{letter.lower()}", "output"),
                    d_in=d_model,
                    d_out=n_heads * d_head,
                    weight_index=w.permute(0, 2, 1).reshape(n_heads * d_head, d_model),
                    bias_index=None if b is None else b.reshape(-1),
                )
            )
        w_o = idx(f"{a}W_O")  # (h, d_head, d_model)
        s.sites.append(
            Site(
                name=f"{a}W_O",
                input_point=Point(f"{a}hook_z", "output"),
                output_point=Point(f"blocks.{i}.hook_attn_out", "output"),
                d_in=n_heads * d_head,
                d_out=d_model,
                weight_index=w_o.permute(2, 0, 1).reshape(d_model, n_heads * d_head),
                bias_index=idx(f"{a}b_O") if f"{a}b_O" in names else None,
            )
        )
        s.attention_layers.append(
            AttentionLayer(
                name=f"blocks.{i}.attn",
                pattern_point=Point(f"{a}hook_pattern", "output"),
                value_point=Point(f"{a}hook_v", "output"),
                z_point=Point(f"{a}hook_z", "output"),
                n_heads=n_heads,
                d_head=d_head,
                prefix=a,
            )
        )
        if cfg.attn_only:
            continue
        m = f"blocks.{i}.mlp."
        if f"{m}W_in" not in names:
            s.notes.append(f"blocks.{i}.mlp: not a standard MLP; not analysed")
            continue
        site_in = Site(
            name=f"{m}W_in",
            input_point=resid_point(i, "mlp"),
            output_point=Point(f"{m}hook_pre", "output"),
            d_in=d_model,
            d_out=cfg.d_mlp,
            weight_index=idx(f"{m}W_in").T,
            bias_index=idx(f"{m}b_in") if f"{m}b_in" in names else None,
        )
        site_out = Site(
            name=f"{m}W_out",
            input_point=Point(f"{m}hook_post", "output"),
            output_point=Point(f"blocks.{i}.hook_mlp_out", "output"),
            d_in=cfg.d_mlp,
            d_out=d_model,
            weight_index=idx(f"{m}W_out").T,
            bias_index=idx(f"{m}b_out") if f"{m}b_out" in names else None,
        )
        s.sites.extend([site_in, site_out])
        if cfg.act_fn == "relu":
            s.neuron_layers.append(
                NeuronLayer(
                    f"{m}hook_pre", Point(f"{m}hook_pre", "output"), "relu", cfg.d_mlp, 0.0, site_in, site_out
                )
            )
        else:
            s.notes.append(
                f"blocks.{i}.mlp: activation {cfg.act_fn!r} is not piecewise linear; no synchronisation"
            )
    if "unembed.W_U" in names:
        s.sites.append(
            Site(
                name="unembed",
                input_point=Point("unembed.hook_in", "output"),
                output_point=Point("unembed.hook_out", "output"),
                d_in=d_model,
                d_out=cfg.d_vocab_out,
                weight_index=idx("unembed.W_U").T,
                bias_index=idx("unembed.b_U") if "unembed.b_U" in names else None,
            )
        )
    return s


def discover(model: nn.Module, inputs: Any) -> Structure:
    """:func:`discover_transformer_lens` for TransformerLens models, :func:`discover_torch` otherwise."""
    if is_transformer_lens(model):
        return discover_transformer_lens(model)
    return discover_torch(model, inputs)


def neuron_layer(model: nn.Module, structure: Structure, layer: str) -> NeuronLayer:
    """The neuron layer called ``layer``: an activation module, a TransformerLens ``hook_pre`` or MLP
    (``blocks.0.mlp``), or a linear map feeding another directly (a purely linear layer)."""
    module = resolve_module(model, layer)
    for candidate in structure.neuron_layers:
        if candidate.name == layer or candidate.name == f"{layer}.hook_pre":
            return candidate
    kind = _activation_kind(module)
    if kind is not None:
        raise ValueError(
            f"{layer!r} is an activation module that is not called exactly once per forward pass"
        )
    valid = ", ".join(repr(c.name) for c in structure.neuron_layers) or "none found"
    raise ValueError(
        f"{layer!r} ({type(module).__name__}) is not a ReLU/LeakyReLU/identity neuron layer; "
        f"neuron layers of this model: {valid}"
    )
