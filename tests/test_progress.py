"""Progress bars: counted in examples with a rate and an ETA when stderr is a terminal; quiet otherwise."""

from __future__ import annotations

import io
import sys

import torch

import degeneracy
from degeneracy.ablation import node_ablation_curves
from tests.conftest import mlp


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _setup():
    torch.manual_seed(0)
    model = mlp([4, 6, 5, 3])
    x = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


def test_bars_count_examples_in_a_terminal_and_are_quiet_otherwise(monkeypatch) -> None:
    model, x = _setup()
    quiet = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", quiet)
    basis = degeneracy.interaction_basis(model, x, ["fc1", "fc2", "output"], batch_size=16, progress=True)
    node_ablation_curves(model, x, basis, labels=model(x).argmax(-1), num_points=2, progress=True)
    assert quiet.getvalue() == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    degeneracy.interaction_basis(model, x, ["fc1", "fc2", "output"], batch_size=16, progress=True)
    node_ablation_curves(model, x, basis, labels=model(x).argmax(-1), num_points=2, progress=True)
    text = terminal.getvalue()
    for shown in ("moments", "M[fc1]", "ablate fc1", "16/40", "32/40", "40/40", "ex/s"):
        assert shown in text, (shown, text[-500:])
    assert "<" in text  # tqdm's elapsed<remaining: the ETA
