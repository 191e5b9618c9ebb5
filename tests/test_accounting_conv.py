"""Degeneracy accounting of convolutional networks: weight sharing (one rescaling per channel, not
per pixel), convolutions as linear sites on their patches, and the free-direction count equal to the
exact Hessian nullity (checked against torch.func.hessian), as for MLPs in tests/test_accounting.py.
float64, fixed seeds."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from degeneracy.accounting import degeneracy_report, sparsify
from degeneracy.accounting.structure import discover
from tests.test_accounting import torch_func_hessian


def cnn(
    seed: int, *, channels=(2, 3, 4), conv1d: bool = False, padding: int = 0, size: int = 6
) -> nn.Sequential:
    """conv1 (c0→c1, k3) → act1 (ReLU) → conv2 (c1→c2, k2) → act2 (ReLU) → flat → out (→ 3), float64."""
    torch.manual_seed(seed)
    conv = nn.Conv1d if conv1d else nn.Conv2d
    c0, c1, c2 = channels
    side = size - 3 + 4 * padding  # after both convolutions
    flat = c2 * (side if conv1d else side * side)
    return nn.Sequential(
        OrderedDict(
            conv1=conv(c0, c1, 3, padding=padding),
            act1=nn.ReLU(),
            conv2=conv(c1, c2, 2, padding=padding),
            act2=nn.ReLU(),
            flat=nn.Flatten(),
            out=nn.Linear(flat, 3),
        )
    ).double()


def inputs(n: int, shape: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_conv_sites_and_channel_neurons_are_discovered() -> None:
    model = cnn(0)
    s = discover(model, inputs(4, (2, 6, 6)))
    sites = {site.name: site for site in s.sites}
    assert (sites["conv1"].d_in, sites["conv1"].d_out, sites["conv2"].d_in) == (18, 3, 12)
    assert s.covered_parameters() == s.layout.numel  # every parameter lies in a site
    act1, act2 = s.neuron_layers
    assert (act1.width, act1.in_site.name, act1.out_site.name) == (3, "conv1", "conv2")
    assert act1.columns().tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # kernel taps
    assert (act2.width, act2.out_site.name, tuple(act2.columns().shape)) == (4, "out", (4, 9))  # pixels
    # the conv site's input transform gives the patches: p = W f + b at every output position
    x = inputs(3, (2, 6, 6))
    f = sites["conv1"].input_transform(x.permute(0, 2, 3, 1).reshape(3, 36, 2))
    w, b = model.conv1.weight.reshape(3, -1), model.conv1.bias
    want = model.conv1(x).permute(0, 2, 3, 1).reshape(3, 16, 3)
    torch.testing.assert_close(f @ w.T + b, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "case",
    [
        # one rescaling per channel (2 + 3), nothing else
        dict(seed=2, n=100, shape=(1, 5, 5), channels=(1, 2, 3), size=5, nullity=5),
        # + pixels of act2 that never fire (activation rank of out: 3 × 3) and gated ranks of conv2 (7)
        dict(seed=0, n=100, shape=(1, 5, 5), channels=(1, 2, 3), size=5, nullity=21),
        # Conv1d; one act2 channel always fires: + one translation
        dict(seed=2, n=300, shape=(2, 7), conv1d=True, size=7, nullity=8),
    ],
    ids=["conv2d", "conv2d-gated", "conv1d"],
)
def test_cnn_free_directions_equal_the_exact_hessian_nullity(case: dict) -> None:
    kw = {k: case[k] for k in ("conv1d", "size", "channels") if k in case}
    model, x = cnn(case["seed"], **kw), inputs(case["n"], case["shape"])
    r = degeneracy_report(model, x)
    _, c1, c2 = case.get("channels", (2, 3, 4))
    assert r.count("neuron rescaling", "act1") == c1 and r.count("neuron rescaling", "act2") == c2
    assert r.hessian_method == "exact" and r.hessian_nullity == case["nullity"]
    assert r.total == r.union == case["nullity"]
    rank = int(torch.linalg.matrix_rank(torch_func_hessian(model, x), hermitian=True))
    assert r.num_parameters - rank == case["nullity"]
    for row in r.rows:
        curvature = row.details.get("relative_curvature")
        if curvature is not None:
            assert curvature < 1e-12, (row.layer, row.source, curvature)


def test_padded_cnn_with_a_dead_channel() -> None:
    """Zero padding (shared weights see padded zeros at the border) and a dead channel: its conv row is
    Jacobian-free (d_in + 1 = 19) and conv2's taps reading it are activation-free (4 taps × 3 outputs)."""
    model = cnn(3, channels=(2, 3, 3), padding=1, size=2)
    with torch.no_grad():
        model.conv1.bias[0] = -100.0
    x = inputs(400, (2, 2, 2))
    r = degeneracy_report(model, x)
    assert r.count("jacobian rank", "conv1") == 19 and r.count("activation rank", "conv2") == 12
    assert r.count("neuron rescaling", "act1") == 2  # the live channels
    assert r.total == r.union == r.hessian_nullity
    rank = int(torch.linalg.matrix_rank(torch_func_hessian(model, x), hermitian=True))
    assert r.num_parameters - rank == r.hessian_nullity


def test_section4_construction_refuses_convolutions() -> None:
    model = cnn(0)
    with pytest.raises(NotImplementedError, match="conv1"):
        sparsify(model, inputs(20, (2, 6, 6)))


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (4, 2, 9, 8)),
        (nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), (4, 2, 11)),
    ],
    ids=["conv2d", "conv1d"],
)
def test_conv_site_patches_reproduce_the_convolution(conv: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv).double()
    x = inputs(shape[0], shape[1:])
    site = discover(model, x).sites[0]
    f = site.input_transform(x.reshape(4, 2, -1).transpose(1, 2))  # channels last, as node layers read it
    w = model[0].weight.reshape(3, -1)
    want = model[0](x).reshape(4, 3, -1).transpose(1, 2)
    torch.testing.assert_close(f @ w.T + model[0].bias, want, rtol=0, atol=1e-13)
