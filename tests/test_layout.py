"""Activation layouts (degeneracy.layout): conv layers read as channels × spatial positions.

Oracles: a channels-last twin of a small CNN whose node layers are read by the sequence rule (the
channels moved last by hand), hand-computed PCA, and substitution by hand. float64, fixed seeds.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import degeneracy
from degeneracy.ablation import node_ablation_curve
from degeneracy.capture import NodeLayer, as_node_layers, capture, forward
from degeneracy.layout import from_bpd, to_bpd

TOL = 1e-10


class ChannelsLast(nn.Module):
    """(N, C, H, W) → (N, H·W, C) → an identity node module ``seq`` → back to (N, C, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.seq(x.permute(0, 2, 3, 1).reshape(n, h * w, c))
        return y.reshape(n, h, w, c).permute(0, 3, 1, 2)


def small_cnn(seed: int = 0) -> nn.Sequential:
    """conv1 (2→3, 3×3) → act1 → conv2 (3→4, 2×2) → act2 → flatten → out (4·3·3 → 3), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(2, 3, 3),
            act1=nn.Tanh(),
            conv2=nn.Conv2d(3, 4, 2),
            act2=nn.Tanh(),
            flat=nn.Flatten(),
            out=nn.Linear(36, 3),
        )
    ).double()


def channels_last_twin(model: nn.Sequential) -> nn.Sequential:
    """The same function with a ChannelsLast node module after each conv."""
    parts = OrderedDict()
    for name, module in model.named_children():
        parts[name] = module
        if name.startswith("conv"):
            parts[f"cl_{name}"] = ChannelsLast()
    return nn.Sequential(parts)


@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Sequential, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return small_cnn(), torch.randn(120, 2, 6, 6, generator=g, dtype=torch.float64)


def test_to_bpd_moves_the_feature_axis_last_and_back() -> None:
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y = to_bpd(x, 1)
    torch.testing.assert_close(y, x.permute(0, 2, 3, 1).reshape(2, 20, 3), rtol=0, atol=0)
    torch.testing.assert_close(to_bpd(x, -1), x.reshape(2, 12, 5), rtol=0, atol=0)
    torch.testing.assert_close(to_bpd(x, 2), x.permute(0, 1, 3, 2).reshape(2, 15, 4), rtol=0, atol=0)
    for axis in (None, 1, 2, 3, -2):
        assert torch.equal(from_bpd(to_bpd(x, axis), x.shape, axis), x)


def test_conv_activations_are_read_as_channels_by_spatial_positions(cnn) -> None:
    model, x = cnn
    layers = as_node_layers(model, ["conv1", {"name": "act1", "module": "act1"}, "conv2", "out", "output"])
    acts = capture(model, x, layers)
    pre1 = model.conv1(x)
    want = pre1.permute(0, 2, 3, 1).reshape(120, 16, 3)
    torch.testing.assert_close(acts["act1"], want, rtol=0, atol=0)  # ReLU/Tanh after a conv: its layout
    torch.testing.assert_close(acts["conv2"], want.tanh(), rtol=0, atol=0)  # conv input: channels
    assert acts["conv1"].shape == (120, 36, 2)  # the 2 input channels at 6·6 positions
    assert acts["out"].shape == (120, 1, 36) and acts["output"].shape == (120, 1, 3)
    # an explicit feature axis overrides the rule; positions index the flattened spatial positions
    rows = NodeLayer("rows", ("act1",), positions=(0, 5), feature_axis=2)
    got = capture(model, x, [rows])["rows"]
    torch.testing.assert_close(got, pre1.permute(0, 1, 3, 2).reshape(120, 12, 4)[:, [0, 5]], rtol=0, atol=0)


def test_conv1d_reads_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.BatchNorm1d(5).eval()).double()
    x = torch.randn(7, 2, 9, dtype=torch.float64)
    acts = capture(model, x, as_node_layers(model, ["1", "2"]))
    want = model[0](x).transpose(1, 2)
    torch.testing.assert_close(acts["1"], want, rtol=0, atol=0)
    torch.testing.assert_close(acts["2"], want.relu(), rtol=0, atol=0)


def test_pooling_and_what_follows_it_read_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(0.5).eval()).double()
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    acts = capture(
        model, x, as_node_layers(model, ["1", "2", "3", {"name": "out", "module": "3", "read": "output"}])
    )
    pooled = model[1](model[0](x)).permute(0, 2, 3, 1).reshape(5, 4, 3)
    torch.testing.assert_close(acts["2"], pooled, rtol=0, atol=0)
    torch.testing.assert_close(acts["out"], pooled.relu(), rtol=0, atol=0)
    assert acts["1"].shape == (5, 16, 3) and acts["3"].shape == (5, 4, 3)


def test_substitution_puts_features_back_on_the_channel_axis(cnn) -> None:
    model, x = cnn
    layers = as_node_layers(model, ["act1", "output"])
    acts = capture(model, x, layers)
    same = forward(model, x, layers, capture=["output"], substitute={"act1": acts["act1"]})["output"]
    torch.testing.assert_close(same, model(x)[:, None], rtol=0, atol=0)  # round trip is the identity
    v = torch.randn(120, 16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = forward(model, x, layers, capture=["output"], substitute={"act1": v})["output"]
    by_hand = v.reshape(120, 4, 4, 3).permute(0, 3, 1, 2).tanh()
    for name in ("conv2", "act2", "flat", "out"):
        by_hand = getattr(model, name)(by_hand)
    torch.testing.assert_close(got, by_hand[:, None], rtol=0, atol=1e-14)
    # one spatial position: only that position's channels change
    at = NodeLayer("act1@5", ("act1",), positions=5)
    one = forward(
        model, x, [at, NodeLayer("c2", ("conv2",))], capture=["c2"], substitute={"act1@5": v[:, 5:6]}
    )
    want = acts["act1"].clone()
    want[:, 5] = v[:, 5]
    torch.testing.assert_close(one["c2"], want.tanh(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["lib", "pca"])
def test_conv_basis_equals_the_basis_of_the_channels_last_twin(cnn, method: str) -> None:
    model, x = cnn
    twin = channels_last_twin(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=1e-14)
    ours = degeneracy.interaction_basis(model, x, ["act1", "act2", "output"], method=method, progress=False)
    by_hand = [{"name": f"act{i}", "module": f"cl_conv{i}.seq", "feature_axis": -1} for i in (1, 2)]
    ref = degeneracy.interaction_basis(twin, x, [*by_hand, "output"], method=method, progress=False)
    for name in ("act1", "act2", "output"):
        a, b = ours[name], ref[name]
        assert a.C.shape == b.C.shape and a.positions == b.positions
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-12)
        # rows are defined up to sign (and rotations inside degenerate eigenspaces, absent here)
        signs = torch.sign((a.C * b.C).sum(1))
        torch.testing.assert_close(a.C * signs[:, None], b.C, rtol=1e-7, atol=1e-9)
    assert ours["act1"].positions == 16 and ours["act2"].positions == 9


def test_pca_of_a_conv_layer_is_the_pca_of_its_channel_vectors(cnn) -> None:
    model, x = cnn
    B = degeneracy.interaction_basis(model, x, ["act1", "output"], method="pca", center=False, progress=False)
    f = model.conv1(x).detach().permute(0, 2, 3, 1).reshape(-1, 3)  # examples × positions, channels
    values, vectors = torch.linalg.eigh(f.T @ f / f.shape[0])
    values, vectors = values.flip(0), vectors.flip(1)
    torch.testing.assert_close(B["act1"].eigenvalues, values, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        (B["act1"].C @ vectors).abs(), torch.eye(3, dtype=torch.float64), rtol=0, atol=TOL
    )


def test_ambiguous_layouts_and_bad_feature_axes_are_clear_errors(cnn) -> None:
    model, x = cnn
    twin = channels_last_twin(model)
    with pytest.raises(ValueError, match="feature_axis"):  # produced by a torch function
        capture(twin, x, as_node_layers(twin, ["cl_conv1.seq"]))
    with pytest.raises(ValueError, match="batch axis"):
        NodeLayer("a", ("act1",), feature_axis=0)
    with pytest.raises(ValueError, match="out of range"):
        capture(model, x, [NodeLayer("a", ("act1",), feature_axis=4)])
    with pytest.raises(ValueError, match="feature_axis"):
        NodeLayer.from_dict({"module": "act1", "feature_axis": "channels"})
    layer = NodeLayer.from_dict({"module": "act1", "feature_axis": 1})
    assert NodeLayer.from_dict(layer.to_dict()) == layer and layer.to_dict()["feature_axis"] == 1
    assert "feature_axis" not in NodeLayer("a", ("act1",)).to_dict()  # older records unchanged


def test_edges_and_node_ablation_of_a_cnn_equal_those_of_its_channels_last_twin(cnn) -> None:
    model, x = cnn[0], cnn[1][:40]
    twin = channels_last_twin(model)
    labels = model(x).argmax(-1)
    ours = degeneracy.interaction_basis(model, x, ["act1", "act2", "output"], progress=False)
    by_hand = [{"name": f"act{i}", "module": f"cl_conv{i}.seq", "feature_axis": -1} for i in (1, 2)]
    ref = degeneracy.interaction_basis(twin, x, [*by_hand, "output"], progress=False)
    g_ours = degeneracy.interaction_graph(model, x, ours, progress=False)
    g_ref = degeneracy.interaction_graph(twin, x, ref, progress=False)
    assert g_ours.pairs == g_ref.pairs
    for pair in g_ours.pairs:
        torch.testing.assert_close(g_ours[pair], g_ref[pair], rtol=1e-7, atol=1e-9)
    kept = [0, 1, 2]
    a = node_ablation_curve(model, x, ours, "act1", labels=labels, num_kept=kept)
    b = node_ablation_curve(twin, x, ref, "act1", labels=labels, num_kept=kept)
    assert a.base_accuracy == 1.0
    torch.testing.assert_close(torch.tensor(a.loss), torch.tensor(b.loss), rtol=1e-9, atol=1e-12)
    assert a.accuracy == b.accuracy
