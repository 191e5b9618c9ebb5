"""Reading node layers during the accounting's passes, on :func:`degeneracy.capture.forward`.

The accounting runs the model through its own ``forward(model, inputs)`` (a user function, see
:data:`degeneracy.run.ForwardFn`) and reads the output at ``positions``; :func:`read_node_layers` wraps
the model in a module that does exactly that, so that capture's one hook mechanism reads (and
substitutes) node layers of the model during such a call.

>>> import torch
>>> from degeneracy.accounting.structure import node_at
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
>>> values, out = read_node_layers(model, torch.ones(2, 3), [node_at("1", "input")], output=True)
>>> values[node_at("1", "input")].shape, out.shape
(torch.Size([2, 1, 4]), torch.Size([2, 4]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from degeneracy import capture
from degeneracy.accounting.structure import resolve_module
from degeneracy.capture import OUTPUT, NodeLayer
from degeneracy.run import ForwardFn, run_model

__all__ = ["ModelCall", "check_node_layers", "output_position", "read_node_layers"]


def output_position(positions: Any) -> int | None:
    """``positions`` as the one output position the accounting supports (an int, or ``None`` for all).

    >>> output_position(-1), output_position(None)
    (-1, None)
    """
    if positions is None or isinstance(positions, int):
        return positions
    raise ValueError(
        f"the accounting reads the output at one position or at all, got positions={positions!r}"
    )


class ModelCall(nn.Module):
    """``model`` run by ``forward`` (or called) with its output read at ``positions``, as one module.

    The model is the submodule ``inner``; the last output is kept in :attr:`output`.

    >>> import torch
    >>> call = ModelCall(torch.nn.Linear(2, 1), None, None)
    >>> call(torch.ones(3, 2)).shape == call.output.shape
    True
    """

    def __init__(self, model: nn.Module, forward: ForwardFn | None, positions: int | None) -> None:
        super().__init__()
        self.inner = model
        self._forward_fn = forward
        self.positions = output_position(positions)
        self.output: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        inputs = args[0] if args else kwargs
        self.output = run_model(self.inner, inputs, forward=self._forward_fn, positions=self.positions)
        return self.output

    @staticmethod
    def inside(layer: NodeLayer) -> NodeLayer:
        """The node layer naming the same modules as seen from the wrapper (``inner.<module>``)."""
        if layer.is_output:
            return layer
        modules = tuple(f"inner.{m}" if m else "inner" for m in layer.modules)
        return dataclasses.replace(layer, modules=modules)


_OUTPUT = NodeLayer("model output", (OUTPUT,))


def check_node_layers(model: nn.Module, layers: Sequence[NodeLayer]) -> None:
    """Raise a ``KeyError`` listing the valid module names if a node layer names an unknown module.

    >>> import torch
    >>> check_node_layers(torch.nn.Linear(2, 2), [NodeLayer("fc", ("fc",))])
    Traceback (most recent call last):
    ...
    KeyError: "model has no module named 'fc'; valid names: "
    """
    for layer in layers:
        for module in layer.modules:
            if module != OUTPUT:
                resolve_module(model, module)


def read_node_layers(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    layers: Sequence[NodeLayer],
    *,
    forward: ForwardFn | None = None,
    positions: int | None = None,
    substitute: Mapping[NodeLayer, Tensor] | None = None,
    output: bool = False,
) -> tuple[dict[NodeLayer, Tensor], Tensor | None]:
    """One pass of ``model`` on ``inputs``: the ``(batch, pos, d)`` values of ``layers``, and the output.

    ``substitute`` replaces node layers by given ``(batch, pos, d)`` values (the rest of the pass runs
    on them, keeping their autograd graph). ``output=True`` runs the whole model and returns its output
    (``forward`` applied, read at ``positions``); otherwise the pass stops once ``layers`` are read and
    the second value is ``None``.

    >>> import torch
    >>> from degeneracy.accounting.structure import node_at
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> hidden = node_at("1", "input")
    >>> _, out = read_node_layers(model, torch.ones(1, 2), [], substitute={hidden: -torch.ones(1, 1, 2)},
    ...                           output=True)
    >>> out.tolist()  # the ReLU ran on the substituted values
    [[0.0, 0.0]]
    """
    substitute = dict(substitute or {})
    wanted = list(dict.fromkeys([*layers, *substitute]))
    inner = {layer: ModelCall.inside(layer) for layer in wanted}
    call = ModelCall(model, forward, positions)
    names = [inner[layer].name for layer in layers] + ([_OUTPUT.name] if output else [])
    subs = {inner[layer].name: value for layer, value in substitute.items()}
    acts = capture.forward(call, inputs, [*inner.values(), _OUTPUT], capture=names, substitute=subs)
    return {layer: acts[inner[layer].name] for layer in layers}, call.output if output else None
