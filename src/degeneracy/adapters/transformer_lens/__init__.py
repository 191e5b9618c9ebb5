"""TransformerLens ``HookedTransformer`` knowledge: detection, and (in submodules) closed-form sections,
attention-head structure and cheaper forwards used by the methods."""

from __future__ import annotations

from torch import nn

__all__ = ["is_hooked_transformer"]


def is_hooked_transformer(model: nn.Module) -> bool:
    """A TransformerLens ``HookedTransformer`` (found by class name, so TransformerLens need not be
    installed to ask).

    >>> import torch
    >>> is_hooked_transformer(torch.nn.Linear(2, 2))
    False
    """
    named = any(cls.__name__ == "HookedTransformer" for cls in type(model).__mro__)
    return named and hasattr(model, "blocks") and hasattr(model, "cfg")
