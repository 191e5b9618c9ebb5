"""Shared test fixtures: float64, fixed seeds, two threads (the project's CI machine has two cores)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def mlp(widths: list[int], act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    """fc0, act0, fc1, act1, ..., fcN (no activation after the last layer), float64."""
    parts: list[tuple[str, nn.Module]] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        parts.append((f"fc{i}", nn.Linear(a, b, bias=bias)))
        if i < len(widths) - 2:
            parts.append((f"act{i}", act()))
    return nn.Sequential(OrderedDict(parts)).double()


@pytest.fixture
def tanh_mlp() -> nn.Sequential:
    return mlp([5, 8, 7, 6, 3])


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(200, 5, dtype=torch.float64)
