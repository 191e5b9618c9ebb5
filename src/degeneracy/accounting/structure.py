"""Where the free directions of paper §3 live in a model: linear sites, neuron layers, attention layers.

* A **linear site** is an affine map p = W f + b inside the model (paper eq 12, bias as the extra
  constant coordinate of footnote 6): an ``nn.Linear``, an ``nn.Conv1d``/``nn.Conv2d`` (zero padding,
  ``groups=1``; f is the patch of every output position, so that W is shared by all positions: weight
  sharing), or a TransformerLens weight (W_Q, W_K, W_V, W_O, W_in, W_out, W_U, and W_E with W_pos as one
  map on one-hot [token; position]). It is read at an *input* node layer (f) and an *output* node layer
  (p); ``weight_index`` (d_out × d_in) and ``bias_index`` (d_out) give the flat positions of W and b
  in the parameter vector.
* A **neuron layer** is a piecewise-linear elementwise nonlinearity (ReLU, LeakyReLU, or the identity
  of a purely linear layer, paper §3.2) read at its pre-activation, with the linear sites that
  produce its input (``in_site``) and read its output (``out_site``) when they are found. After a
  convolution its neurons are the channels (one rescaling per channel, not per pixel); ``out_columns``
  (width × K) lists the input coordinates of ``out_site`` that read each neuron (K = 1 for an
  ``nn.Linear`` after it; a channel's kernel taps for a convolution; its pixels for ``nn.Flatten``
  followed by an ``nn.Linear``).
* An **attention layer** (TransformerLens) exposes its pattern, values and z hook points.

Every place a tensor is read is a :class:`degeneracy.capture.NodeLayer` of one module (its first input
or its output, all positions; see :func:`node_at`). Plain ``torch`` models are discovered by running one
batch and matching tensors; TransformerLens ``HookedTransformer`` models from their config
(:mod:`degeneracy.adapters.transformer_lens.structure`).

>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> s = discover(model, torch.randn(5, 3))
>>> [site.name for site in s.sites], [(n.name, n.in_site.name, n.out_site.name) for n in s.neuron_layers]
(['0', '2'], [('1', '0', '2')])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from degeneracy.adapters.transformer_lens import is_hooked_transformer
from degeneracy.adapters.transformer_lens.structure import AttentionLayer, describe_hooked_transformer
from degeneracy.capture import NodeLayer, trace_calls
from degeneracy.deprecation import deprecated_alias
from degeneracy.layout import ELEMENTWISE_MODULES, has_channels_first, module_layout
from degeneracy.run import ParamLayout

__all__ = [
    "AttentionLayer",
    "NeuronLayer",
    "Site",
    "Structure",
    "discover",
    "discover_torch",
    "discover_transformer_lens",
    "neuron_layer",
    "node_at",
    "parameter_index",
    "resolve_module",
]

Read = Literal["input", "output"]


def node_at(module: str, read: Read, feature_axis: int | None = None) -> NodeLayer:
    """The node layer reading ``module``'s first input or its output at every position.

    Named ``"<module>@<read>"``, so that equal places give equal (hashable) node layers.

    >>> layer = node_at("fc1", "output")
    >>> layer.name, layer.modules, layer.read, layer.positions, layer.feature_axis
    ('fc1@output', ('fc1',), 'output', None, None)
    """
    return NodeLayer(f"{module}@{read}", (module,), read=read, feature_axis=feature_axis)


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a ``KeyError`` listing the valid names otherwise.

    >>> resolve_module(torch.nn.Sequential(torch.nn.ReLU()), "0")
    ReLU()
    """
    modules = dict(model.named_modules())
    if name not in modules:
        valid = ", ".join(repr(n) for n in modules if n)
        raise KeyError(f"model has no module named {name!r}; valid names: {valid}")
    return modules[name]


def parameter_index(layout: ParamLayout, name: str) -> Tensor:
    """Flat positions of parameter ``name`` in θ, in the parameter's shape.

    >>> parameter_index(ParamLayout.of_model(torch.nn.Linear(2, 1)), "bias")
    tensor([2])
    """
    sl = layout.slice(name)
    return torch.arange(sl.start, sl.stop).view(layout.shapes[layout.names.index(name)])


@dataclass
class Site:
    """An affine map p = W f + b between two node layers (paper eq 12).

    >>> site = Site("fc", node_at("fc", "input"), node_at("fc", "output"), 2, 1,
    ...             torch.tensor([[0, 1]]), torch.tensor([2]))
    >>> site.d_in_aug, site.num_parameters, site.augmented_weight(torch.tensor([1.0, 2.0, 3.0])).tolist()
    (3, 3, [[1.0, 2.0, 3.0]])
    """

    name: str
    input_point: NodeLayer
    output_point: NodeLayer
    d_in: int
    d_out: int
    weight_index: Tensor  # (d_out, d_in) flat indices into the parameter vector
    bias_index: Tensor | None  # (d_out,)
    input_transform: Callable[[Tensor], Tensor] | None = None  # captured (batch, pos, d) → (batch, pos, d_in)

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
        """Flat positions of [W | b] (d_out × d_in_aug)."""
        if self.bias_index is None:
            return self.weight_index
        return torch.cat([self.weight_index, self.bias_index[:, None]], dim=1)


@dataclass
class NeuronLayer:
    """A layer of elementwise piecewise-linear neurons (paper §3.2), read at its pre-activation.

    >>> NeuronLayer("act", node_at("act", "input"), "relu", 4).negative_slope
    0.0
    """

    name: str
    pre_point: NodeLayer
    activation: Literal["relu", "leaky_relu", "identity"]
    width: int
    negative_slope: float = 0.0
    in_site: Site | None = None
    out_site: Site | None = None
    out_columns: Tensor | None = None  # (width, K) input coordinates of out_site per neuron; None: [[i]]
    shift_exact: bool = True  # a constant shift of a neuron moves every out_site input it feeds

    def columns(self) -> Tensor:
        """The (width, K) input coordinates of ``out_site`` that read each neuron.

        >>> NeuronLayer("act", node_at("act", "input"), "relu", 2).columns().tolist()
        [[0], [1]]
        """
        return torch.arange(self.width)[:, None] if self.out_columns is None else self.out_columns

    @property
    def jacobian_point(self) -> NodeLayer:
        """Where the layer's output Jacobian is read: the output of its incoming linear map, or its
        pre-activation when none was found.

        >>> NeuronLayer("act", node_at("act", "input"), "relu", 4).jacobian_point == node_at("act", "input")
        True
        """
        return self.in_site.output_point if self.in_site is not None else self.pre_point


@dataclass
class Structure:
    """Sites, neuron layers and attention layers of a model, and the parameter layout.

    >>> s = discover(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh()), torch.randn(4, 3))
    >>> s.covered_parameters(), s.layout.numel, s.neuron_layers
    (8, 8, [])
    """

    layout: ParamLayout
    sites: list[Site] = field(default_factory=list)
    neuron_layers: list[NeuronLayer] = field(default_factory=list)
    attention_layers: list[AttentionLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    is_transformer_lens: bool = False

    @property
    def spec(self) -> ParamLayout:
        """The parameter layout (old name of :attr:`layout`)."""
        return self.layout

    def covered_parameters(self) -> int:
        """Number of distinct parameters inside the sites."""
        idx = set()
        for site in self.sites:
            idx.update(site.augmented_index().reshape(-1).tolist())
        return len(idx)


is_transformer_lens = deprecated_alias(is_hooked_transformer, "is_transformer_lens")


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


def _linear_site(layout: ParamLayout, name: str, module: nn.Linear) -> Site:
    prefix = f"{name}." if name else ""
    weight = parameter_index(layout, f"{prefix}weight")
    bias = parameter_index(layout, f"{prefix}bias") if module.bias is not None else None
    return Site(
        name=name,
        input_point=node_at(name, "input"),
        output_point=node_at(name, "output"),
        d_in=module.in_features,
        d_out=module.out_features,
        weight_index=weight,
        bias_index=bias,
    )


def _conv_site(layout: ParamLayout, name: str, module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Site | str:
    """A convolution as a site on its patches (im2col), or the reason it is not one."""
    padding = (0, 0) if module.padding == "valid" else module.padding
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(padding, str):
        return (
            f"{name}: a convolution with groups > 1, padding 'same' or a padding mode other than zeros; "
            "not analysed"
        )
    two = isinstance(module, nn.Conv2d)
    spatial = tuple(x.shape[2:]) if two else (1, x.shape[-1])

    def pair(v: tuple[int, ...], fill: int) -> tuple[int, int]:
        return (int(v[0]), int(v[1])) if two else (fill, int(v[0]))

    (kh, kw), (dh, dw) = pair(module.kernel_size, 1), pair(module.dilation, 1)
    (ph, pw), (sh, sw) = pair(padding, 0), pair(module.stride, 1)  # type: ignore[arg-type]

    def patches(v: Tensor) -> Tensor:  # (batch, positions, C_in) → (batch, output positions, C_in·K)
        image = F.pad(v.transpose(1, 2).reshape(v.shape[0], v.shape[2], *spatial), (pw, pw, ph, ph))
        windows = image.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
        b, c, ho, wo = windows.shape[:4]  # (batch, C_in, H_out, W_out, kh, kw), rows of W in its order
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(b, ho * wo, c * kh * kw)

    prefix = f"{name}." if name else ""
    weight = parameter_index(layout, f"{prefix}weight")
    return Site(
        name=name,
        input_point=node_at(name, "input"),
        output_point=node_at(name, "output"),
        d_in=weight[0].numel(),
        d_out=module.out_channels,
        weight_index=weight.reshape(module.out_channels, -1),
        bias_index=parameter_index(layout, f"{prefix}bias") if module.bias is not None else None,
        input_transform=patches,
    )


def _producer_layout(calls: list, i: int, x: Tensor) -> str:
    """Layout (``module_layout``) of the module that produced call ``i``'s input ``x``: the latest
    earlier call whose output equals it, followed back through elementwise modules; ``"unknown"``."""
    for j in range(i - 1, -1, -1):
        _, module, xj, yj = calls[j]
        if yj is not None and yj.shape == x.shape and torch.equal(yj, x):
            kind = module_layout(module)
            if kind != "inherit":
                return kind
            if isinstance(module, ELEMENTWISE_MODULES) and xj is not None:
                return _producer_layout(calls, j, xj)
    return "unknown"


def _out_columns(y: Tensor, x_b: Tensor, site_b: Site, module_b: nn.Module, channels: bool) -> Tensor | None:
    """Input coordinates of ``site_b`` reading each feature of ``y`` (width × K), or None if it does
    not read ``y``: directly (a Linear on features last, a convolution on channels) or through a flatten
    of channels-first ``y`` into a Linear."""
    width = y.shape[1] if channels and y.dim() >= 3 else y.shape[-1]
    same = y.shape == x_b.shape and torch.equal(y, x_b)
    if same and isinstance(module_b, nn.Linear) and not (channels and y.dim() >= 3):
        return torch.arange(width)[:, None]
    if same and isinstance(module_b, (nn.Conv1d, nn.Conv2d)) and channels:
        return torch.arange(site_b.d_in).reshape(width, -1)
    flat = channels and y.dim() >= 3 and x_b.dim() == 2 and isinstance(module_b, nn.Linear)
    if flat and x_b.shape[1] == y[0].numel() and torch.equal(y.flatten(1), x_b):
        return torch.arange(site_b.d_in).reshape(width, -1)
    return None


def discover_torch(model: nn.Module, inputs: Any) -> Structure:
    """Sites and neuron layers of a plain torch model, matched on one forward pass of ``inputs``.

    Every ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` called exactly once is a site. An activation
    module (ReLU, LeakyReLU, Identity) called once is a neuron layer (its neurons the channels when it
    follows a convolution); its ``in_site`` is the site whose output equals the activation's input, its
    ``out_site`` the one whose input equals the activation's output (or, for a channels-first output,
    its flatten). Two sites with nothing between them (A's output is B's input) form a purely linear
    neuron layer named after A (read at A's output).

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    >>> found = discover_torch(model, torch.randn(5, 3))
    >>> [(n.name, n.activation, n.pre_point.name) for n in found.neuron_layers]
    [('0', 'identity', '0@output')]
    """
    layout = ParamLayout.of_model(model)
    structure = Structure(layout=layout)
    calls = trace_calls(model, inputs)
    counts: dict[str, int] = {}
    for name, *_ in calls:
        counts[name] = counts.get(name, 0) + 1
    linear_calls = []
    for i, (name, module, x, y) in enumerate(calls):
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if counts[name] > 1:
                if name not in {s.name for s in structure.sites}:
                    structure.notes.append(f"{name}: called {counts[name]} times per forward; not analysed")
                continue
            own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            tied = [p for p in own if p not in layout.names]
            if tied:  # a parameter tied to another module's (an LM head's weight and the embedding)
                structure.notes.append(f"{name}: {tied[0]} is shared with another module; not analysed")
                continue
            if isinstance(module, nn.Linear):
                site: Site | str = _linear_site(layout, name, module)
            else:
                site = _conv_site(layout, name, module, x) if x is not None else f"{name}: no tensor input"
            if isinstance(site, str):
                structure.notes.append(site)
                continue
            structure.sites.append(site)
            linear_calls.append((i, site, x, y))
    modules = dict(model.named_modules())
    conv_net = has_channels_first(model)

    def same(a: Tensor | None, b: Tensor | None) -> bool:
        return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)

    def reader(y: Tensor, after: int, channels: bool) -> tuple[Site | None, Tensor | None]:
        """The first site after call ``after`` that reads ``y``, and its per-neuron input columns."""
        for j, site_b, x_b, _ in linear_calls:
            if j > after and x_b is not None:
                columns = _out_columns(y, x_b, site_b, modules[site_b.name], channels)
                if columns is not None:
                    return site_b, columns
        return None, None

    def shift_exact(site_b: Site | None) -> bool:
        module_b = modules[site_b.name] if site_b is not None else None
        return not isinstance(module_b, (nn.Conv1d, nn.Conv2d)) or not any(module_b.padding)  # type: ignore[arg-type]

    used_as_hidden: set[str] = set()
    for i, (name, module, x, y) in enumerate(calls):
        kind = _activation_kind(module)
        if kind is None or counts[name] > 1 or x is None or y is None:
            continue
        channels = False
        if x.dim() >= 3 and conv_net:
            producer = _producer_layout(calls, i, x)
            if producer == "unknown":
                structure.notes.append(f"{name}: layout of its {x.dim()}-D input unknown; not analysed")
                continue
            channels = producer == "channels"
        before = [(j, s, yy) for j, s, _, yy in linear_calls if j < i and same(yy, x)]
        in_site = before[-1][1] if before else None
        out_site, columns = reader(y, i, channels)
        width = int(x.shape[1] if channels else x.shape[-1])
        point = node_at(name, "input", 1 if channels else None)
        exact = shift_exact(out_site)
        structure.neuron_layers.append(
            NeuronLayer(name, point, kind[0], width, kind[1], in_site, out_site, columns, exact)
        )
        if in_site is not None:
            used_as_hidden.add(in_site.name)
    # purely linear layers: A's output is B's input with no activation module in between
    for i, site_a, _, y_a in linear_calls:
        if site_a.name in used_as_hidden or y_a is None:
            continue
        channels = isinstance(modules[site_a.name], (nn.Conv1d, nn.Conv2d))
        site_b, columns = reader(y_a, i, channels)
        if site_b is not None:
            structure.neuron_layers.append(
                NeuronLayer(
                    site_a.name,
                    node_at(site_a.name, "output"),
                    "identity",
                    site_a.d_out,
                    1.0,
                    site_a,
                    site_b,
                    columns,
                    shift_exact(site_b),
                )
            )
    return structure


# ---------------------------------------------------------------------------------------------------
# TransformerLens


def discover_transformer_lens(model: nn.Module) -> Structure:
    """Sites, MLP neuron layers and attention layers of a TransformerLens ``HookedTransformer``
    (see :func:`degeneracy.adapters.transformer_lens.structure.describe_hooked_transformer`).

    >>> discover_transformer_lens(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    TypeError: discover_transformer_lens needs a TransformerLens HookedTransformer, not a Linear
    """
    if not is_hooked_transformer(model):
        raise TypeError(
            "discover_transformer_lens needs a TransformerLens HookedTransformer, "
            f"not a {type(model).__name__}"
        )
    layout = ParamLayout.of_model(model)
    found = describe_hooked_transformer(model, layout)
    s = Structure(layout=layout, is_transformer_lens=True, notes=list(found.notes))
    sites = {spec["name"]: Site(**spec) for spec in found.linear_maps}
    s.sites = list(sites.values())
    for spec in found.neuron_layers:
        spec = dict(spec)
        in_site, out_site = sites[spec.pop("in_site")], sites[spec.pop("out_site")]
        s.neuron_layers.append(NeuronLayer(**spec, in_site=in_site, out_site=out_site))
    s.attention_layers = list(found.attention_layers)
    return s


def discover(model: nn.Module, inputs: Any) -> Structure:
    """:func:`discover_transformer_lens` for TransformerLens models, :func:`discover_torch` otherwise.

    >>> [site.name for site in discover(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(4, 3)).sites]
    ['0']
    """
    if is_hooked_transformer(model):
        return discover_transformer_lens(model)
    return discover_torch(model, inputs)


def neuron_layer(model: nn.Module, structure: Structure, layer: str) -> NeuronLayer:
    """The neuron layer called ``layer``: an activation module, a TransformerLens ``hook_pre`` or MLP
    (``blocks.0.mlp``), or a linear map feeding another directly (a purely linear layer).

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> neuron_layer(model, discover(model, torch.randn(5, 3)), "1").activation
    'relu'
    """
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
