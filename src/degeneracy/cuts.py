"""Side inputs and the cut check (METHOD §8).

A node layer is a *cut* when the next node layer is a function of it alone, given the model's
*side inputs*: keyword inputs of the whole model such as a Hugging Face ``attention_mask`` (which
positions are padding), ``token_type_ids`` or ``position_ids`` (:data:`SIDE_INPUTS`). They are not
activations of any module: every section f^l ↦ f^{l+1} runs with its batch's own side inputs, and the
cut check substitutes activations of other inputs together with those inputs' side inputs. Padded
positions (``attention_mask`` 0, see :func:`degeneracy.data.input_mask`) are left out of the check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from degeneracy.capture import NodeLayer, capture, forward
from degeneracy.checks import head
from degeneracy.data import eval_mode, input_mask, position_mask

__all__ = ["SIDE_INPUTS", "CutReport", "check_cut", "with_side_inputs", "check_basis_fits"]

SIDE_INPUTS = ("attention_mask", "token_type_ids", "position_ids", "encoder_attention_mask")
"""Keyword inputs that travel with substituted activations (they describe the whole input, not a
module's activation)."""


@dataclass
class CutReport:
    """Result of :func:`check_cut`: the largest relative deviation per node-layer transition.

    >>> CutReport({("1", "2"): 0.0}).deviations
    {('1', '2'): 0.0}
    """

    deviations: dict[tuple[str, str], float] = field(default_factory=dict)


def with_side_inputs(
    inputs: Tensor | Mapping[str, Tensor], other: Tensor | Mapping[str, Tensor]
) -> Tensor | Mapping[str, Tensor]:
    """``inputs`` with the side inputs (:data:`SIDE_INPUTS`) of ``other``.

    >>> a = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 1]])}
    >>> b = {"input_ids": torch.tensor([[3, 0]]), "attention_mask": torch.tensor([[1, 0]])}
    >>> {k: v.tolist() for k, v in with_side_inputs(a, b).items()}
    {'input_ids': [[1, 2]], 'attention_mask': [[1, 0]]}
    """
    if not isinstance(inputs, Mapping) or not isinstance(other, Mapping):
        return inputs
    return {k: other[k] if k in SIDE_INPUTS and k in other else v for k, v in inputs.items()}


def check_cut(
    model: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    layers: Sequence[NodeLayer],
    *,
    rtol: float = 1e-5,
    widths: Mapping[str, list[int]] | None = None,
) -> CutReport:
    """Check that every node layer is a cut (METHOD §8).

    Substitutes f^l computed on a permuted batch x' while running x with the side inputs of x'
    (:func:`with_side_inputs`); f^{l+1} must then equal its value on x' at the valid (unpadded)
    positions of x'. Raises ``ValueError`` naming the node layer when the deviation exceeds ``rtol``
    relative to the scale of f^{l+1}. Needs a batch with at least two distinct examples.

    >>> from degeneracy.capture import as_node_layers
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> report = check_cut(model, torch.randn(5, 3, dtype=torch.float64), as_node_layers(model, ["1", "2"]))
    >>> list(report.deviations)
    [('1', '2')]
    """
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    n = first.shape[0]
    if n < 2:
        raise ValueError("the cut check needs a batch of at least 2 examples")
    perm = torch.roll(torch.arange(n), 1)
    permuted = {k: v[perm] for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs[perm]
    mixed = with_side_inputs(inputs, permuted)
    mask = input_mask(permuted)
    with torch.no_grad():
        acts = forward(model, permuted, layers, capture=[layer.name for layer in layers])
        report = CutReport()
        for src, dst in zip(layers[:-1], layers[1:], strict=True):
            got = forward(
                model,
                mixed,
                layers,
                capture=[dst.name],
                substitute={src.name: acts[src.name]},
                widths=widths,
            )[dst.name]
            want = acts[dst.name]
            valid = position_mask(mask, dst.positions, want.shape[1])
            if valid is not None:  # padded positions are left out
                got, want = got[valid.to(got.device)], want[valid.to(want.device)]
            scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
            dev = float((got - want).abs().max() / scale)
            report.deviations[(src.name, dst.name)] = dev
            if dev > rtol:
                raise ValueError(
                    f"node layer {src.name!r} is not a cut: {dst.name!r} is not a function of it alone "
                    f"(substituting {src.name!r} from other inputs changes {dst.name!r} "
                    f"by {dev:.2e} relative). "
                    "Include every path that bypasses it (e.g. the whole residual stream, all positions "
                    "the next layer reads, or the side inputs as extra modules of the node layer)."
                )
    return report


def check_basis_fits(model: nn.Module, inputs: Any, layers: Any, basis: Any) -> None:
    """Check that every node layer of ``basis`` has the width (and positions) that ``model`` gives it on
    ``inputs`` (one batch); a ``ValueError`` naming the layer otherwise.

    >>> import degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> B = degeneracy.interaction_basis(model, x, ["1", "output"], progress=False)
    >>> wider = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    >>> try:
    ...     check_basis_fits(wider, x, B.layers, B)
    ... except ValueError as err:
    ...     print(str(err)[:70])
    the basis does not fit this model: node layer '1' has width 5 in the m
    """
    if not (hasattr(basis, "layers") and hasattr(basis, "bases")):
        raise TypeError(f"basis must be a Basis (interaction_basis, load_basis), got {type(basis).__name__}")
    with torch.no_grad(), eval_mode(model):  # a batch norm in train mode would update its statistics
        acts = capture(model, head(inputs), layers)
    for name, x in acts.items():
        b = basis[name]
        width = b.width - int(b.has_constant)
        if x.shape[-1] != width:
            raise ValueError(
                f"the basis does not fit this model: node layer {name!r} has width {x.shape[-1]} in the "
                f"model, {width} in the basis; build the basis on this model"
            )
