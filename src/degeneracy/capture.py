"""Reading and substituting activations at node layers.

A :class:`NodeLayer` names one or more submodules of any ``torch.nn.Module`` (their inputs, or their
outputs when ``read="output"``), or the model ``"output"``; several modules are concatenated along
the feature dimension. Every activation is handled as ``(batch, pos, d)``: a ``(batch, d)`` tensor
gets ``pos = 1``; for more dimensions the node layer's ``feature_axis`` says which axis holds the
features (channels-first modules such as ``nn.Conv2d``: the channels, the spatial positions being the
positions; sequence activations ``(batch, pos, ...)``: the trailing axes) by the rule of
:mod:`degeneracy.layout`, and substitution puts the features back on that axis.

One hook mechanism (:func:`forward`) captures some node layers, substitutes others and stops the
forward pass early once everything asked for has been read (:func:`trace_calls` records every module
call, for structure discovery). Hooks are always removed.

When a basis carries a *constant coordinate* (METHOD §0) activations are augmented to ``[f; 1]``.
The map between node layers is then extended to the augmented vectors as the positively homogeneous
map F([f; c]) = [c·g(f / c); c] (c the mean constant coordinate over input positions). At c = 1 it
equals the network; for affine or ReLU sections it is exactly "the bias multiplies the constant
coordinate" (paper footnote 6), and scaling the whole input to zero scales the output to zero, which
is the integrated-gradient baseline of METHOD §4.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from degeneracy.data import call_model, input_mask, position_mask
from degeneracy.layout import (
    LayoutTracker,
    from_bpd,
    module_layout,
    needs_tracker,
    place_positions,
    resolve_axis,
    select_positions,
    to_bpd,
    validate_feature_axis,
)
from degeneracy.lazy import lazy_exports
from degeneracy.run import select_output

__all__ = [
    "OUTPUT",
    "NodeLayer",
    "as_node_layers",
    "forward",
    "capture",
    "section",
    "append_constant",
    "to_bpd",
    "ModuleCall",
    "trace_calls",
]

OUTPUT = "output"
Positions = int | tuple[int, ...] | None
# check_cut and CutReport moved to degeneracy.cuts; still importable from here
__getattr__ = lazy_exports(globals(), {"check_cut": "degeneracy.cuts", "CutReport": "degeneracy.cuts"})[0]


@dataclass(frozen=True)
class NodeLayer:
    """A named point in the model where activations are read (METHOD §0, §8).

    Args:
        name: label of the node layer (defaults to the module name).
        modules: submodule names (as in ``model.named_modules()``), or ``("output",)``.
        positions: ``None`` for all positions, an index or a tuple of indices (``-1``: last token).
        read: ``"input"`` (default: the module's first input) or ``"output"``.
        output: for the ``"output"`` node layer, which output of the model: a key of a ``ModelOutput``
            or dict, or an index of a tuple (default: ``logits``, else ``last_hidden_state``, else the
            first tensor; see :func:`degeneracy.run.select_output`).
        feature_axis: the axis of the activation holding the features (``1``: channels of a conv net);
            ``None`` (default) picks it by the rule of :mod:`degeneracy.layout`.

    >>> NodeLayer("mlp_in", ("blocks.0.mlp",), positions=-1).to_dict()
    {'name': 'mlp_in', 'modules': ['blocks.0.mlp'], 'positions': -1, 'read': 'input'}
    """

    name: str
    modules: tuple[str, ...]
    positions: Positions = None
    read: Literal["input", "output"] = "input"
    output: str | int | None = None
    feature_axis: int | None = None

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError(f"node layer {self.name!r} names no module")
        if OUTPUT in self.modules and len(self.modules) > 1:
            raise ValueError(f"node layer {self.name!r}: 'output' cannot be combined with other modules")
        if self.read not in ("input", "output"):
            raise ValueError(f"node layer {self.name!r}: read must be 'input' or 'output', got {self.read!r}")
        validate_feature_axis(self.feature_axis, self.name)

    @property
    def is_output(self) -> bool:
        return self.modules == (OUTPUT,)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "modules": list(self.modules), "positions": self.positions}
        out["read"] = self.read
        if self.output is not None:
            out["output"] = self.output
        if self.feature_axis is not None:
            out["feature_axis"] = self.feature_axis
        return out

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> NodeLayer:
        modules = spec.get("modules", spec.get("module"))
        if modules is None:
            raise ValueError(f"node layer spec {dict(spec)} needs 'module' or 'modules'")
        modules = (modules,) if isinstance(modules, str) else tuple(modules)
        positions = spec.get("positions")
        if isinstance(positions, list):
            positions = tuple(int(p) for p in positions)
        return cls(
            name=spec.get("name", "+".join(modules)),
            modules=modules,
            positions=positions,
            read=spec.get("read", "input"),
            output=spec.get("output"),
            feature_axis=validate_feature_axis(spec.get("feature_axis"), spec.get("name", "+".join(modules))),
        )


def as_node_layers(model: nn.Module, specs: Iterable[Any]) -> list[NodeLayer]:
    """Normalise node-layer specs (names, dicts or :class:`NodeLayer`) and check them against the model.

    Raises ``ValueError`` naming the unknown modules and listing the valid ones.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> [layer.name for layer in as_node_layers(model, ["1", {"name": "h", "module": "2"}, "output"])]
    ['1', 'h', 'output']
    """
    layers: list[NodeLayer] = []
    for spec in specs:
        if isinstance(spec, NodeLayer):
            layers.append(spec)
        elif isinstance(spec, str):
            layers.append(NodeLayer(spec, (spec,)))
        elif isinstance(spec, Mapping):
            layers.append(NodeLayer.from_dict(spec))
        else:
            raise TypeError(
                f"a node layer is a module name, a dict or a NodeLayer, not {type(spec).__name__}"
            )
    if not layers:
        raise ValueError("no node layers given")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"node layer names must be unique, got {names}")
    valid = [name for name, _ in model.named_modules() if name]
    known = set(valid)
    unknown = [m for layer in layers for m in layer.modules if m != OUTPUT and m not in known]
    if unknown:
        listing = ", ".join(repr(name) for name in valid)  # quoted: nn.Sequential names are digits
        raise ValueError(f"unknown node layer module(s) {unknown}. Valid names: 'output', {listing}")
    if any(layer.is_output for layer in layers[:-1]):
        raise ValueError("'output' can only be the last node layer")
    return layers


# ---------------------------------------------------------------------------------------------------
# The hook mechanism


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once everything needed has been read."""


@dataclass
class _Piece:
    """Bookkeeping for one module of a node layer during one forward pass."""

    layer: NodeLayer
    index: int  # position of the module within layer.modules
    shape: torch.Size | None = None  # the module activation's full shape, learned when it fires
    module: str = OUTPUT  # the module's name
    layout: str = "inherit"  # its layout rule (degeneracy.layout.module_layout)


def _first_tensor(args: tuple, kwargs: dict) -> tuple[Tensor, Callable[[Tensor], tuple[tuple, dict]]]:
    """The module's first input tensor and a function that rebuilds (args, kwargs) with a new one."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda new: ((new, *args[1:]), kwargs)
    for key in ("hidden_states", "input", "x", *kwargs):
        value = kwargs.get(key)
        if isinstance(value, Tensor) and value.is_floating_point():
            return value, lambda new, key=key: (args, {**kwargs, key: new})
    raise TypeError("cannot find the input tensor of the module (no tensor positional or keyword input)")


class _Run:
    """State of one hooked forward pass."""

    def __init__(
        self,
        layers: Sequence[NodeLayer],
        capture: set[str],
        substitute: Mapping[str, Tensor],
        stop_after: set[str],
        compact: bool = False,
    ) -> None:
        self.capture = capture
        self.compact = compact
        self.substitute = dict(substitute)
        self.pending_stop = set(stop_after)
        self.pieces: dict[str, list[Tensor | None]] = {
            layer.name: [None] * len(layer.modules) for layer in layers
        }
        self.widths: dict[str, list[int]] = {}
        self.tracker: LayoutTracker | None = None  # set when a node layer's layout follows its producer

    def axis(self, piece: _Piece, x: Tensor) -> int | None:
        """The feature axis of activation ``x`` of ``piece`` (see :mod:`degeneracy.layout`)."""
        where = "" if piece.layer.is_output else piece.module
        return resolve_axis(x, piece.layer.feature_axis, piece.layout, self.tracker, piece.layer.name, where)

    def visit(self, piece: _Piece, x: Tensor) -> Tensor | None:
        """Record a module activation; return a replacement tensor if the layer is substituted."""
        layer = piece.layer
        axis = self.axis(piece, x)
        full = to_bpd(x, axis)
        selected = select_positions(full, layer.positions, layer.name)
        replacement = None
        if layer.name in self.substitute:
            new_full = self._replacement(piece, full, selected)
            if self.compact and x.dim() >= 3 and layer.positions is not None and axis is None:
                # only the selected positions go on (valid when nothing downstream reads the others)
                replacement = new_full.reshape(x.shape[0], new_full.shape[1], *x.shape[2:])
                selected = new_full
            else:
                new_full = place_positions(full, new_full, layer.positions)
                replacement = from_bpd(new_full, x.shape, axis)
                selected = select_positions(new_full, layer.positions, layer.name)
            if self.tracker is not None:
                self.tracker.mark(replacement, axis)
        self.pieces[layer.name][piece.index] = selected
        if layer.name in self.pending_stop and all(p is not None for p in self.pieces[layer.name]):
            self.pending_stop.discard(layer.name)
            if not self.pending_stop and replacement is None:
                raise _Stop
        return replacement

    def _replacement(self, piece: _Piece, full: Tensor, selected: Tensor) -> Tensor:
        value = self.substitute[piece.layer.name]
        widths = self.widths.get(piece.layer.name)
        if widths is None:
            if len(piece.layer.modules) > 1:
                raise RuntimeError(
                    f"node layer {piece.layer.name!r} combines modules: capture it once before substituting"
                )
            widths = [value.shape[-1]]
        start = sum(widths[: piece.index])
        part = value[..., start : start + widths[piece.index]]
        if part.shape != selected.shape:
            raise ValueError(
                f"substitute for node layer {piece.layer.name!r} has shape {tuple(part.shape)}, "
                f"expected {tuple(selected.shape)}"
            )
        return part.to(full.dtype)

    def result(self, name: str) -> Tensor:
        parts = self.pieces[name]
        if any(p is None for p in parts):
            raise RuntimeError(f"node layer {name!r} was not reached in the forward pass")
        if len(parts) > 1 and len({p.shape[:2] for p in parts}) != 1:  # type: ignore[union-attr]
            shapes = [tuple(p.shape) for p in parts]  # type: ignore[union-attr]
            raise ValueError(f"node layer {name!r} combines modules whose (batch, pos) differ: {shapes}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # type: ignore[arg-type]


def _register(model: nn.Module, run: _Run, layers: Sequence[NodeLayer]) -> list[Any]:
    handles = []
    modules = dict(model.named_modules())
    if needs_tracker(model, [(layer.feature_axis, layer.modules) for layer in layers], modules):
        run.tracker = LayoutTracker()
        handles.extend(run.tracker.hooks(model))
    for layer in layers:
        if layer.is_output:
            continue
        for index, module_name in enumerate(layer.modules):
            module = modules[module_name]
            piece = _Piece(layer, index, module=module_name, layout=module_layout(module))
            if layer.read == "input":

                def pre_hook(mod, args, kwargs, piece=piece):
                    x, rebuild = _first_tensor(args, kwargs)
                    new = run.visit(piece, x)
                    return None if new is None else rebuild(new)

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def post_hook(mod, args, kwargs, output, piece=piece):
                    x = output[0] if isinstance(output, tuple) else output
                    new = run.visit(piece, x)
                    if new is None:
                        return None
                    return (new, *output[1:]) if isinstance(output, tuple) else new

                handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    return handles


def forward(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    layers: Sequence[NodeLayer],
    *,
    capture: Iterable[str] = (),
    substitute: Mapping[str, Tensor] | None = None,
    widths: Mapping[str, list[int]] | None = None,
    compact: bool = False,
) -> dict[str, Tensor]:
    """Run ``model`` once, reading the node layers in ``capture`` and replacing those in ``substitute``.

    Stops the forward pass as soon as every captured layer has been read (unless ``"output"`` is
    captured). ``substitute`` values are ``(batch, pos_selected, d)`` tensors. ``widths`` gives the
    per-module widths of combined node layers (see :func:`module_widths`). With ``compact=True`` a
    substituted node layer that selects positions passes on only those positions (the sequence gets
    shorter from there on): faster, and exact when nothing downstream reads the other positions,
    which callers must verify (see :func:`compact_is_exact`).

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> layers = as_node_layers(model, ["1", "2", "output"])
    >>> x = torch.randn(5, 3, dtype=torch.float64)
    >>> zero = torch.zeros(5, 1, 4, dtype=torch.float64)
    >>> acts = forward(model, x, layers, capture=["2"], substitute={"1": zero})
    >>> torch.equal(acts["2"], zero)  # tanh(0) = 0
    True
    """
    capture = set(capture)
    known = {layer.name: layer for layer in layers}
    for name in capture | set(substitute or {}):
        if name not in known:
            raise ValueError(f"unknown node layer {name!r}; node layers are {list(known)}")
    wants_output = any(known[name].is_output for name in capture)
    stop_after = set() if wants_output else {n for n in capture if not known[n].is_output}
    active = [layer for layer in layers if layer.name in capture or layer.name in (substitute or {})]
    run = _Run(active, capture, substitute or {}, stop_after, compact)
    run.widths = dict(widths or {})
    handles = _register(model, run, active)
    captured: dict[str, Tensor] = {}
    try:
        output = call_model(model, inputs)
        if wants_output:
            out_layer = next(known[n] for n in capture if known[n].is_output)
            out = select_output(output, key=out_layer.output)
            axis = run.axis(_Piece(out_layer, 0), out)
            out = select_positions(to_bpd(out, axis), out_layer.positions, out_layer.name)
            captured[out_layer.name] = out
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    for name in capture:
        if not known[name].is_output:
            captured[name] = run.result(name)
    return captured


class ModuleCall(NamedTuple):
    """One leaf-module call of a forward pass: its name, the module, its first input and its output
    (detached copies; ``None`` where not a tensor), as :func:`trace_calls` lists them.

    >>> call = trace_calls(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), torch.zeros(5, 3))[1]
    >>> call.name, type(call.module).__name__, tuple(call.input.shape), bool((call.output >= 0).all())
    ('1', 'ReLU', (5, 4), True)
    """

    name: str
    module: nn.Module
    input: Tensor | None
    output: Tensor | None


def trace_calls(model: nn.Module, inputs: Tensor | Mapping[str, Tensor]) -> list[ModuleCall]:
    """Every leaf-module call of one forward pass of ``inputs``, in call order (without gradients).

    For discovering a model's structure (which module feeds which, how often each is called); the hooks
    are removed whatever happens.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> [(call.name, tuple(call.output.shape)) for call in trace_calls(model, torch.zeros(5, 3))]
    [('0', (5, 4)), ('1', (5, 4)), ('2', (5, 2))]
    """
    calls: list[ModuleCall] = []

    def hook(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args and isinstance(args[0], Tensor) else None
        y = output if isinstance(output, Tensor) else None
        copy = [None if t is None else t.detach().clone() for t in (x, y)]
        calls.append(ModuleCall(name, module, copy[0], copy[1]))

    handles = [
        module.register_forward_hook(functools.partial(hook, name))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def module_widths(model: nn.Module, inputs: Any, layer: NodeLayer) -> list[int]:
    """Feature width of each module of a node layer (needed to split substitutes of combined layers).

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> module_widths(model, torch.randn(5, 3), NodeLayer("both", ("1", "2")))
    [4, 4]
    """
    run = _Run([layer], {layer.name}, {}, {layer.name})
    handles = _register(model, run, [layer])
    try:
        call_model(model, inputs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [p.shape[-1] for p in run.pieces[layer.name]]  # type: ignore[union-attr]


def append_constant(x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d1"]:
    """[f; 1] along the feature dimension.

    >>> append_constant(torch.zeros(1, 1, 2)).tolist()
    [[[0.0, 0.0, 1.0]]]
    """
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def capture(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    layers: Sequence[NodeLayer],
    names: Iterable[str] | None = None,
    *,
    constant: bool = False,
) -> dict[str, Tensor]:
    """Activations of the named node layers (all by default), optionally augmented with [·; 1].

    Each entry is a ``(batch, pos, d)`` tensor, its own ``pos`` and ``d`` per node layer.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> layers = as_node_layers(model, ["1", "output"])
    >>> acts = capture(model, torch.randn(5, 3, dtype=torch.float64), layers, constant=True)
    >>> tuple(acts["1"].shape), tuple(acts["output"].shape)
    ((5, 1, 5), (5, 1, 3))
    """
    names = [layer.name for layer in layers] if names is None else list(names)
    acts = forward(model, inputs, layers, capture=names)
    return {k: append_constant(v) if constant else v for k, v in acts.items()}


def section(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    layers: Sequence[NodeLayer],
    source: str,
    target: str,
    *,
    constant: bool = False,
    widths: Mapping[str, list[int]] | None = None,
    compact: bool = False,
) -> Callable[[Tensor], Tensor]:
    """The map f^source ↦ f^target for fixed model inputs, as a function torch.func can differentiate.

    With ``constant=True`` both sides are augmented vectors and the map is the homogeneous extension
    F([f; c]) = [c̄·g(f / c̄); c̄] described in the module docstring. ``compact``: see :func:`forward`.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> layers = as_node_layers(model, ["1", "2"])
    >>> f = section(model, torch.randn(5, 3, dtype=torch.float64), layers, "1", "2")
    >>> x = torch.randn(5, 1, 4, dtype=torch.float64)
    >>> torch.allclose(f(x), torch.tanh(x))
    True
    """

    def run(x: Tensor) -> Tensor:
        kw = {"capture": [target], "substitute": {source: x}, "widths": widths, "compact": compact}
        return forward(model, inputs, layers, **kw)[target]

    mask, where = input_mask(inputs), next(lay.positions for lay in layers if lay.name == source)

    def fn(x: Tensor) -> Tensor:
        if not constant:
            return run(x)
        valid = position_mask(mask, where, x.shape[1])
        valid = None if valid is None else valid[..., None].to(x)
        # (batch, 1, 1): the mean constant coordinate over the valid (unpadded) input positions
        ones, c = x[..., -1:], x[..., -1:].mean(1, True)
        if valid is not None:  # (an example with no valid position keeps the plain mean)
            count = valid.sum(1, True)
            c = torch.where(count > 0, (ones * valid).sum(1, True) / count.clamp_min(1), c)
        out = run(x[..., :-1] / c)
        return torch.cat([out * c, c.expand(out.shape[0], out.shape[1], 1)], dim=-1)

    return fn


def compact_is_exact(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    layers: Sequence[NodeLayer],
    source: str,
    target: str,
    x: Tensor,
    *,
    constant: bool = False,
    widths: Mapping[str, list[int]] | None = None,
) -> bool:
    """Whether the compact section (dropping unselected positions of ``source``) gives the same
    ``target`` activations as the full one on this batch (to 1e-12 relative), without raising.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()  # per position
    >>> layers = [NodeLayer("1", ("1",), positions=-1), NodeLayer("2", ("2",), positions=-1)]
    >>> x = torch.randn(5, 6, 3, dtype=torch.float64)  # 6 positions
    >>> compact_is_exact(model, x, layers, "1", "2", torch.randn(5, 1, 4, dtype=torch.float64))
    True
    """
    src = next(layer for layer in layers if layer.name == source)
    if src.positions is None:
        return False
    with torch.no_grad():
        full = section(model, inputs, layers, source, target, constant=constant, widths=widths)(x)
        try:
            short = section(
                model, inputs, layers, source, target, constant=constant, widths=widths, compact=True
            )(x)
        except Exception:  # noqa: BLE001 - any failure means "not applicable here"
            return False
    if short.shape != full.shape:
        return False
    scale = float(full.abs().max()) or 1.0
    return float((short - full).abs().max()) <= 1e-12 * scale
