"""Activation layouts: which axis of a module activation holds the features of a node layer.

Every node-layer activation is handled as ``(batch, pos, d)``. How a raw activation is read that way is
its *feature axis*:

* ``feature_axis=None`` (the default) picks it by the rule below;
* ``feature_axis=k`` (an int, not 0: axis 0 is the batch) makes axis ``k`` the features, and every other
  non-batch axis a position (flattened in row-major order): ``(N, C, H, W)`` with ``k = 1`` is read as
  ``(N, H·W, C)``.

**The default rule.** An activation of one or two dimensions is ``(batch,)`` or ``(batch, d)``. For three
or more dimensions:

1. at a *channels-first* module (``nn.Conv*``, ``nn.ConvTranspose*``, ``nn.BatchNorm*``,
   ``nn.InstanceNorm*``, ``nn.GroupNorm``, pooling, ``nn.Dropout1d/2d/3d``, ``nn.Upsample``): axis 1,
   the channels (positions are the spatial positions);
2. at a *features-last* module (``nn.Linear``, ``nn.Bilinear``, ``nn.Embedding``, ``nn.LayerNorm``,
   ``nn.RMSNorm``): axis 1 is the positions and the remaining axes are the features (for ``(batch,
   pos, d)``: the last axis), as for sequence models;
3. at any other module (an activation function, ``nn.Identity``, a dropout, a container, a hook point):
   the layout of the module that produced the tensor in the same forward pass (followed through
   elementwise modules such as ``ReLU``; see :class:`LayoutTracker`). When the model has no
   channels-first module at all the answer is rule 2; when it has one and the producer is not a module
   of rule 1 or 2 (e.g. the tensor came out of a ``torch`` function), reading the node layer is an error
   that asks for an explicit ``feature_axis``.

``feature_axis=-1`` is not the same as rule 2 for four or more dimensions: ``(batch, pos, head, d_head)``
is read as ``(batch, pos, head·d_head)`` by rule 2 and as ``(batch, pos·head, d_head)`` with ``-1``.

>>> x = torch.arange(24.0).reshape(2, 3, 2, 2)  # (N, C, H, W)
>>> to_bpd(x, 1).shape, to_bpd(x).shape
(torch.Size([2, 4, 3]), torch.Size([2, 3, 4]))
>>> torch.equal(from_bpd(to_bpd(x, 1), x.shape, 1), x)
True
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch
from jaxtyping import Shaped
from torch import Tensor, nn

__all__ = [
    "CHANNELS",
    "SEQUENCE",
    "CHANNELS_FIRST_MODULES",
    "FEATURES_LAST_MODULES",
    "ELEMENTWISE_MODULES",
    "LayoutTracker",
    "check_feature_axis",
    "from_bpd",
    "has_channels_first",
    "module_layout",
    "needs_tracker",
    "resolve_axis",
    "place_positions",
    "select_positions",
    "to_bpd",
    "validate_feature_axis",
]

Positions = int | tuple[int, ...] | None

CHANNELS = 1
"""The feature axis of channels-first activations ``(N, C, *spatial)``."""
SEQUENCE = None
"""The default reading ``(batch, pos, *features)``: axis 1 positions, later axes flattened into features."""

CHANNELS_FIRST_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.modules.pooling._MaxUnpoolNd,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
"""Modules whose activations of three or more dimensions are ``(N, C, *spatial)``."""

FEATURES_LAST_MODULES: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.Linear, nn.Bilinear, nn.Embedding, nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t
)
"""Modules that act on the last axis: their activations are read ``(batch, pos, *features)``."""

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.AlphaDropout,
)  # fmt: skip
"""Modules whose output has the layout of their input (elementwise maps)."""

Layout = Literal["channels", "sequence", "inherit"]


def module_layout(module: nn.Module) -> Layout:
    """``"channels"`` (rule 1 of the module docstring), ``"sequence"`` (rule 2) or ``"inherit"`` (rule 3).

    >>> module_layout(nn.Conv2d(1, 2, 3)), module_layout(nn.Linear(2, 2)), module_layout(nn.ReLU())
    ('channels', 'sequence', 'inherit')
    """
    if isinstance(module, CHANNELS_FIRST_MODULES):
        return "channels"
    if isinstance(module, FEATURES_LAST_MODULES):
        return "sequence"
    return "inherit"


def has_channels_first(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is channels-first (then rule 3 needs a producer).

    >>> has_channels_first(nn.Sequential(nn.Conv1d(1, 2, 3))), has_channels_first(nn.Linear(2, 2))
    (True, False)
    """
    return any(isinstance(m, CHANNELS_FIRST_MODULES) for m in model.modules())


def needs_tracker(
    model: nn.Module,
    layers: list[tuple[int | None, tuple[str, ...]]],
    modules: dict[str, nn.Module] | None = None,
) -> bool:
    """Whether reading node layers given as ``(feature_axis, modules)`` needs a :class:`LayoutTracker`:
    some layer without a ``feature_axis`` reads a module of rule 3 (or the output, ``"output"``) in a
    model that has channels-first modules. ``modules``: ``dict(model.named_modules())`` if at hand.

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    >>> needs_tracker(model, [(None, ("1",))]), needs_tracker(model, [(1, ("1",)), (None, ("0",))])
    (True, False)
    """
    modules = dict(model.named_modules()) if modules is None else modules
    follows = any(
        axis is None and any(m not in modules or module_layout(modules[m]) == "inherit" for m in names)
        for axis, names in layers
    )
    return follows and any(isinstance(m, CHANNELS_FIRST_MODULES) for m in modules.values())


def resolve_axis(
    x: Tensor,
    feature_axis: int | None,
    layout: str,
    tracker: LayoutTracker | None,
    name: str = "",
    module: str = "",
) -> int | None:
    """The feature axis of activation ``x`` read at a module of ``layout`` (:func:`module_layout`):
    ``None`` for the sequence reading, else a non-negative axis (the rule of the module docstring).

    >>> x = torch.zeros(2, 3, 4, 4)
    >>> [resolve_axis(x, a, kind, None) for a, kind in [(None, "channels"), (None, "sequence"), (-1, "")]]
    [1, None, 3]
    """
    if x.dim() <= 2:
        return None
    if feature_axis is not None:
        return check_feature_axis(feature_axis, x.dim(), name)
    if layout == "channels":
        return CHANNELS
    if layout == "sequence" or tracker is None:
        return SEQUENCE
    return tracker.axis_of(x, name, module)


def validate_feature_axis(feature_axis: Any, name: str = "") -> int | None:
    """``feature_axis`` if it is ``None`` or a non-zero int (axis 0 is the batch), else a ``ValueError``.

    >>> validate_feature_axis(-1), validate_feature_axis(None)
    (-1, None)
    """
    bad = isinstance(feature_axis, bool) or not isinstance(feature_axis, int) or feature_axis == 0
    if feature_axis is not None and bad:
        raise ValueError(f"node layer {name!r}: feature_axis must be a non-zero int (axis 0 is the batch "
                         f"axis) or None for the default rule, got {feature_axis!r}")  # fmt: skip
    return feature_axis


def check_feature_axis(feature_axis: int | None, ndim: int, name: str = "") -> int | None:
    """``feature_axis`` as a non-negative axis of an ``ndim``-dimensional activation (``None`` stays).

    Raises a ``ValueError`` naming the node layer when the axis is the batch axis or out of range.

    >>> check_feature_axis(-1, 4), check_feature_axis(None, 4)
    (3, None)
    >>> check_feature_axis(0, 4, "conv")
    Traceback (most recent call last):
    ...
    ValueError: node layer 'conv': feature_axis 0 is the batch axis; choose an axis from 1 to 3 (or -3 to -1)
    """
    if feature_axis is None:
        return None
    if isinstance(feature_axis, bool) or not isinstance(feature_axis, int):
        raise TypeError(f"node layer {name!r}: feature_axis must be an int or None, got {feature_axis!r}")
    if ndim < 2:
        raise ValueError(f"node layer {name!r}: feature_axis {feature_axis} given, but the activation has "
                         f"{ndim} dimension(s) (only a batch axis): leave feature_axis out")  # fmt: skip
    axis = feature_axis % ndim if -ndim <= feature_axis < ndim else None
    if axis is None or axis == 0:
        what = "the batch axis" if axis == 0 else f"out of range for a {ndim}-dimensional activation"
        raise ValueError(f"node layer {name!r}: feature_axis {feature_axis} is {what}; choose an axis from 1 "
                         f"to {ndim - 1} (or {1 - ndim} to -1)")  # fmt: skip
    return axis


def to_bpd(x: Tensor, feature_axis: int | None = None) -> Shaped[Tensor, "batch pos d"]:
    """(batch,) → (batch, 1, 1); (batch, d) → (batch, 1, d); otherwise (batch, pos, d) with features on
    ``feature_axis`` and every other non-batch axis a position, or, for ``None``, (batch, pos, ...) →
    (batch, pos, prod(...)).

    >>> to_bpd(torch.zeros(2, 3)).shape, to_bpd(torch.zeros(2, 5, 3, 4), 1).shape
    (torch.Size([2, 1, 3]), torch.Size([2, 12, 5]))
    """
    if x.dim() == 1:
        return x[:, None, None]
    if x.dim() == 2:
        return x[:, None, :]
    axis = check_feature_axis(feature_axis, x.dim())
    if axis is None:
        return x.reshape(x.shape[0], x.shape[1], -1)
    return x.movedim(axis, -1).reshape(x.shape[0], -1, x.shape[axis])


def from_bpd(y: Tensor, shape: torch.Size | tuple[int, ...], feature_axis: int | None = None) -> Tensor:
    """The inverse of :func:`to_bpd`: ``(batch, pos, d)`` values back in the activation's ``shape``.

    >>> x = torch.randn(2, 3, 4, 5)
    >>> all(torch.equal(from_bpd(to_bpd(x, k), x.shape, k), x) for k in (None, 1, 2, -1))
    True
    """
    shape = torch.Size(shape)
    axis = check_feature_axis(feature_axis, len(shape)) if len(shape) > 2 else None
    if axis is None:
        return y.reshape(shape)
    moved = [n for i, n in enumerate(shape) if i != axis] + [shape[axis]]
    return y.reshape(moved).movedim(-1, axis)


def select_positions(x: Tensor, positions: Positions, name: str = "") -> Tensor:
    """The ``positions`` of a ``(batch, pos, d)`` tensor (all for ``None``), kept as a position axis;
    a ``ValueError`` naming the node layer for positions out of range.

    >>> select_positions(torch.arange(6).reshape(1, 3, 2), -1).tolist()
    [[[4, 5]]]
    """
    if positions is None:
        return x
    count, wanted = x.shape[1], (positions,) if isinstance(positions, int) else positions
    if bad := [p for p in wanted if not -count <= p < count]:
        raise ValueError(f"node layer {name!r} selects positions {bad}, but its activation has {count} "
                         f"position(s): choose positions from {-count} to {count - 1}")  # fmt: skip
    if isinstance(positions, int):
        return x[:, positions : positions + 1] if positions != -1 else x[:, -1:]
    return x[:, list(positions)]


def place_positions(original: Tensor, value: Tensor, positions: Positions) -> Tensor:
    """``original`` (batch, pos, d) with ``value`` written at ``positions`` (out of place, torch.func
    friendly).

    >>> place_positions(torch.zeros(1, 3, 1), torch.ones(1, 1, 1), 1).flatten().tolist()
    [0.0, 1.0, 0.0]
    """
    if positions is None:
        return value
    n_pos = original.shape[1]
    idx = [positions] if isinstance(positions, int) else list(positions)
    idx = [i % n_pos for i in idx]
    where = {p: k for k, p in enumerate(idx)}
    cols = [value[:, where[p]] if p in where else original[:, p] for p in range(n_pos)]
    return torch.stack(cols, dim=1)


class LayoutTracker:
    """Remembers, during one forward pass, which tensors came out of channels-first or features-last
    modules (rule 3 of the module docstring), following them through elementwise modules.

    ``hooks(model)`` registers the forward hooks (remove them afterwards); :meth:`axis_of` answers
    ``1`` (channels), ``None`` (sequence) or raises when the producer is unknown.

    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    >>> tracker = LayoutTracker()
    >>> seen = []
    >>> handles = tracker.hooks(model)
    >>> handle = model[1].register_forward_pre_hook(lambda m, args: seen.append(tracker.axis_of(args[0])))
    >>> _ = model(torch.zeros(1, 1, 5, 5))
    >>> for h in [*handles, handle]: h.remove()
    >>> seen
    [1]
    """

    def __init__(self) -> None:
        self._known: dict[int, tuple[weakref.ref, int | None]] = {}

    def mark(self, x: Any, axis: int | None) -> None:
        """Record that tensor ``x`` has feature axis ``axis`` (1, or ``None`` for the sequence layout)."""
        if isinstance(x, Tensor):
            self._known[id(x)] = (weakref.ref(x), axis)

    def lookup(self, x: Tensor) -> tuple[bool, int | None]:
        """``(known, axis)`` of tensor ``x``."""
        entry = self._known.get(id(x))
        if entry is None or entry[0]() is not x:
            return False, None
        return True, entry[1]

    def axis_of(self, x: Tensor, name: str = "", module: str = "") -> int | None:
        """The feature axis of ``x`` by its producer; a ``ValueError`` asking for ``feature_axis`` if
        unknown."""
        known, axis = self.lookup(x)
        if known:
            return axis
        raise ValueError(
            f"node layer {name!r} reads a {x.dim()}-dimensional activation at {module or 'the output'!r}, "
            "whose layout cannot be told: it is not a channels-first or features-last module and the tensor "
            "was not produced by one (the model has channels-first modules). Give the node layer a "
            "feature_axis: 1 for channels-first (N, C, *spatial) activations, -1 for features last "
            "(NodeLayer(..., feature_axis=1), or a 'feature_axis' key in the config)"
        )

    def hooks(self, model: nn.Module) -> list[Any]:
        """Forward hooks on every module of ``model`` that mark outputs (remove them after the pass)."""
        handles = []
        for module in model.modules():
            kind = module_layout(module)
            if kind != "inherit" or isinstance(module, ELEMENTWISE_MODULES):
                handles.append(module.register_forward_hook(self._hook(kind)))
        return handles

    def _hook(self, kind: Layout) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = output[0] if isinstance(output, tuple) else output
            if kind == "channels":
                self.mark(y, CHANNELS)
            elif kind == "sequence":
                self.mark(y, SEQUENCE)
            elif args and isinstance(args[0], Tensor):
                known, axis = self.lookup(args[0])
                if known:
                    self.mark(y, axis)

        return hook
