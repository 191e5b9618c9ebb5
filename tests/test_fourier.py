"""Fourier labels of modular-addition features and their alignment with modules (closed forms)."""

from __future__ import annotations

import math

import pytest
import torch

from degeneracy.fourier import (
    fourier_labels,
    frequency_module_alignment,
    frequency_module_table,
    modadd_labels,
)

P = 13


def _grid(fn) -> torch.Tensor:
    a = torch.arange(P, dtype=torch.float64)[:, None].expand(P, P)
    b = torch.arange(P, dtype=torch.float64)[None, :].expand(P, P)
    return fn(2 * math.pi * a / P, 2 * math.pi * b / P)


def test_single_frequency_features() -> None:
    feats = torch.stack(
        [
            _grid(lambda a, b: torch.cos(3 * (a + b))),
            _grid(lambda a, b: torch.sin(5 * a) + 7.0),  # a mean offset does not count
            _grid(lambda a, b: torch.cos(2 * a) * torch.cos(2 * b)),  # = (cos 2(a+b) + cos 2(a-b)) / 2
            _grid(lambda a, b: torch.cos(4 * (a - b)) + 0.5 * torch.cos(a)),
            _grid(lambda a, b: torch.full_like(a, 3.0)),
            _grid(lambda a, b: torch.cos(6 * b) - 2 * torch.sin(6 * (a + b))),
        ],
        dim=-1,
    )
    lab = fourier_labels(feats)
    assert lab.frequency.tolist() == [3, 5, 2, 4, 0, 6]
    want = torch.tensor([1.0, 1.0, 1.0, 1.0 / 1.25, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(lab.fraction, want, rtol=1e-12, atol=1e-12)
    assert lab.kind[0] == "a+b" and lab.kind[1] == "a" and lab.kind[3] == "a-b"
    assert lab.kind[4] == "constant" and lab.kind[5] == "a+b"  # 4 units of power on a+b, 1 on b
    assert lab.kind[2] in ("a+b", "a-b")


def test_positions_add_their_power() -> None:
    """An embedding feature reads a at position 0 and b at position 1: one frequency overall."""
    pos0 = _grid(lambda a, b: torch.cos(4 * a))
    pos1 = _grid(lambda a, b: torch.sin(4 * b))
    other = _grid(lambda a, b: torch.cos(1 * a))
    grid = torch.stack([torch.stack([pos0, other], -1), torch.stack([pos1, 0 * other], -1)], dim=2)
    lab = fourier_labels(grid)
    assert lab.frequency.tolist() == [4, 1]
    torch.testing.assert_close(lab.fraction, torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=0)


def test_frequency_module_alignment() -> None:
    freqs = [1, 1, 2, 2, 3, 3, 4, 4]
    feats = torch.stack([_grid(lambda a, b, k=k: torch.cos(k * (a + b))) for k in freqs], -1)
    lab = fourier_labels(feats)
    perfect = {j: 10 + k for j, k in enumerate(freqs)}  # module ids need not equal frequencies
    assert frequency_module_alignment(perfect, lab)["ami"] == pytest.approx(1.0)
    one_module = dict.fromkeys(range(8), 0)
    assert frequency_module_alignment(one_module, lab)["ami"] == pytest.approx(0.0, abs=1e-12)

    class Modules:  # what degeneracy.modules.Modules offers
        modules = [
            [("L", j) for j in range(8) if freqs[j] <= 2],
            [("L", j) for j in range(8) if freqs[j] > 2],
        ]
        isolated = [("L", 7)]

    rows, alignment = frequency_module_table(Modules(), {"L": lab})
    assert [r.frequencies for r in rows] == [{1: 2, 2: 2}, {3: 2, 4: 1}]  # isolated features not counted
    assert rows[0].purity == 0.5 and alignment["num_clean"] == 8 and alignment["num_active"] == 7
    assert 0 < alignment["ami"] < 1 and 0 < alignment["ami_active"] < 1
    with pytest.warns(DeprecationWarning, match="num_active"):  # the former count keys still read
        assert (alignment["n_active"], alignment["n_clean"], alignment["n"]) == (7, 8, 8)
    with pytest.warns(DeprecationWarning, match="num_clean"):
        assert frequency_module_alignment(perfect, lab).get("n_clean") == 8


def test_modadd_labels() -> None:
    inputs = torch.tensor([[3, 12, 13], [7, 7, 13], [0, 0, 13]])
    assert modadd_labels(inputs).tolist() == [2, 1, 0]
    with pytest.raises(ValueError):
        modadd_labels(torch.zeros(3))
