"""Interaction bases: METHOD §2.4 properties, GL invariance, save/load and bad input."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import degeneracy
from degeneracy.capture import capture
from tests.conftest import mlp

METHODS = ["lib", "global", "pca", "neuron"]
LAYERS = ["fc1", "fc2", "fc3", "output"]


def _gram(model, x, basis, name):
    acts = capture(model, x, basis.layers, [name], constant=basis[name].has_constant)[name]
    flat = acts.reshape(-1, acts.shape[-1])
    return flat.T @ flat / flat.shape[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("center", [True, False])
def test_basis_is_orthogonal_in_the_data_metric(tanh_mlp, inputs, method: str, center: bool) -> None:
    B = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, method=method, center=center, progress=False)
    for name in B:
        b = B[name]
        eye = torch.eye(b.dim, dtype=torch.float64)
        torch.testing.assert_close(b.C @ b.C_pinv, eye, rtol=0, atol=1e-10)
        if method == "neuron":
            continue
        cgc = b.C @ _gram(tanh_mlp, inputs, B, name) @ b.C.T
        scale = b.eigenvalues.abs().max()
        torch.testing.assert_close(cgc / scale, torch.diag(b.eigenvalues) / scale, rtol=0, atol=1e-10)
        assert (b.eigenvalues[1:] <= b.eigenvalues[:-1] + 1e-12).all() or center  # descending


def test_deep_linear_network_is_identity_in_lib_coordinates() -> None:
    """METHOD §2.4.2 / paper appendix A: transitions are ±I and every Λ is the output's PCA spectrum."""
    model = mlp([6, 5, 7, 4], act=nn.Identity, bias=False)
    model = nn.Sequential(OrderedDict((k, v) for k, v in model.named_children() if k.startswith("fc")))
    x = torch.randn(300, 6, dtype=torch.float64)
    B = degeneracy.interaction_basis(model, x, ["fc0", "fc1", "fc2", "output"], center=False, progress=False)
    out = model(x).detach()
    pca = torch.linalg.eigvalsh(out.T @ out / 300).flip(0)
    weights = [model.fc0.weight, model.fc1.weight, model.fc2.weight]
    names = B.names
    for l, w in enumerate(weights):
        transition = B[names[l + 1]].C @ w.detach() @ B[names[l]].C_pinv
        torch.testing.assert_close(transition.abs(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(transition, torch.diag(torch.diagonal(transition)), rtol=0, atol=1e-12)
    for name in names:
        torch.testing.assert_close(B[name].eigenvalues, pca, rtol=1e-12, atol=0)


@pytest.mark.parametrize("center", [True, False])
def test_pca_with_rotate_final_false_leaves_the_last_layer_unrotated(tanh_mlp, inputs, center: bool) -> None:
    with torch.no_grad():  # a rank-deficient output: PCA would rotate and truncate it to 2 directions
        tanh_mlp.fc3.weight[2] = tanh_mlp.fc3.weight[0] + tanh_mlp.fc3.weight[1]
        tanh_mlp.fc3.bias[2] = tanh_mlp.fc3.bias[0] + tanh_mlp.fc3.bias[1]
    opts = dict(center=center, progress=False)
    rotated = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, method="pca", **opts)
    kept = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, method="pca", rotate_final=False, **opts)
    neurons = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, method="neuron", **opts)
    assert rotated["output"].dim == 2 + center  # truncated when rotated
    out = kept["output"]
    assert out.dim == 3 + center
    for field in ("C", "C_pinv", "eigenvalues"):
        torch.testing.assert_close(getattr(out, field), getattr(neurons["output"], field), rtol=0, atol=0)
    eye = torch.eye(4, dtype=torch.float64)
    want = eye[[3, 0, 1, 2]] if center else eye[:3, :3]  # the constant coordinate first, then the logits
    torch.testing.assert_close(out.C, want, rtol=0, atol=0)
    for name in LAYERS[:-1]:  # the other layers are PCA-rotated as before
        torch.testing.assert_close(kept[name].C, rotated[name].C, rtol=0, atol=0)


def _with_inserted_map(model: nn.Sequential, a: torch.Tensor) -> nn.Sequential:
    """Same function, with f -> A f inserted before fc1 and fc1's weight replaced by W A^-1."""
    insert = nn.Linear(a.shape[0], a.shape[0], bias=False).double()
    fc1 = nn.Linear(model.fc1.in_features, model.fc1.out_features).double()
    with torch.no_grad():
        insert.weight.copy_(a)
        fc1.weight.copy_(model.fc1.weight @ torch.linalg.inv(a))
        fc1.bias.copy_(model.fc1.bias)
    parts = OrderedDict()
    for name, module in model.named_children():
        if name == "fc1":
            parts["inserted"] = insert
            parts["fc1"] = fc1
        else:
            parts[name] = module
    return nn.Sequential(parts)


@pytest.mark.parametrize("method", ["global", "lib"])
@pytest.mark.parametrize("center", [True, False])
def test_gl_invariance(tanh_mlp, inputs, method: str, center: bool) -> None:
    """Paper §6.2: an invertible linear map at a node layer leaves its features unchanged up to sign."""
    a = torch.randn(8, 8, dtype=torch.float64) + 3 * torch.eye(8, dtype=torch.float64)
    other = _with_inserted_map(tanh_mlp, a)
    torch.testing.assert_close(other(inputs), tanh_mlp(inputs), rtol=1e-10, atol=1e-12)
    kw = dict(method=method, center=center, progress=False)
    B1 = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, **kw)
    B2 = degeneracy.interaction_basis(other, inputs, LAYERS, **kw)
    acts1 = capture(tanh_mlp, inputs, B1.layers, ["fc1"])["fc1"]
    acts2 = capture(other, inputs, B2.layers, ["fc1"])["fc1"]
    f1 = B1.transform("fc1", acts1)
    f2 = B2.transform("fc1", acts2)
    assert f1.shape == f2.shape
    signs = torch.sign((f1 * f2).sum(dim=(0, 1)))
    torch.testing.assert_close(f2 * signs, f1, rtol=1e-7, atol=1e-7 * float(f1.abs().max()))


def test_truncation_by_downstream_rank(inputs) -> None:
    """METHOD §2.4.4: a layer feeding a rank-2 map keeps at most 2 (+ constant) directions."""
    model = mlp([5, 8, 2, 4])
    B = degeneracy.interaction_basis(model, inputs, ["fc1", "fc2", "output"], progress=False)
    assert B["fc1"].dim <= 3
    assert B["fc2"].dim <= 3
    assert (
        degeneracy.interaction_basis(model, inputs, ["fc1", "fc2", "output"], method="pca", progress=False)[
            "fc1"
        ].dim
        == 9
    )


def test_integrated_rules_run_and_differ(tanh_mlp, inputs) -> None:
    grad = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, progress=False)
    gl = degeneracy.interaction_basis(
        tanh_mlp,
        inputs,
        LAYERS,
        integration_rule="gauss-legendre",
        integration_steps=3,
        center=False,
        progress=False,
    )
    assert grad.dims.keys() == gl.dims.keys()
    assert not torch.allclose(grad["fc1"].eigenvalues[1:4], gl["fc1"].eigenvalues[:3])


def test_dataloader_and_tensor_agree(tanh_mlp, inputs) -> None:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, torch.zeros(200)), batch_size=33
    )
    B1 = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, batch_size=64, progress=False)
    B2 = degeneracy.interaction_basis(tanh_mlp, loader, LAYERS, progress=False)
    for name in B1:
        torch.testing.assert_close(B1[name].eigenvalues, B2[name].eigenvalues, rtol=1e-10, atol=1e-14)


def test_positions_and_combined_modules() -> None:
    """A sequence model: node layers restricted to the last position, and two modules concatenated."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 4).double()
            self.side = nn.Linear(3, 2).double()
            self.mix = nn.Linear(6, 5).double()
            self.head = nn.Linear(5, 2).double()

        def forward(self, x):  # x: (b, pos, 3)
            h = torch.tanh(self.embed(x)).mean(dim=1)  # (b, 4): reads all positions
            s = self.side(x[:, -1])
            z = torch.tanh(self.mix(torch.cat([h, s], -1)))
            return self.head(z)

    model = Seq()
    x = torch.randn(64, 4, 3, dtype=torch.float64)
    layers = [{"name": "hidden", "modules": ["mix"]}, {"name": "z", "modules": ["head"]}, "output"]
    B = degeneracy.interaction_basis(model, x, layers, progress=False)
    assert B["hidden"].width == 7
    # a node layer reading only the side path is not a cut for what follows
    with pytest.raises(ValueError, match="not a cut"):
        degeneracy.interaction_basis(
            model, x, [{"name": "h", "modules": ["side"], "read": "output"}, "head", "output"], progress=False
        )


def test_save_load_roundtrip(tmp_path, tanh_mlp, inputs) -> None:
    B = degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, progress=False)
    path = tmp_path / "basis.safetensors"
    B.save(path)
    C = degeneracy.load_basis(path)
    assert C.names == B.names and C.config == B.config
    for name in B:
        torch.testing.assert_close(C[name].C, B[name].C, rtol=0, atol=0)
        torch.testing.assert_close(C[name].eigenvalues, B[name].eigenvalues, rtol=0, atol=0)
        acts = torch.randn(3, B[name].width - 1, dtype=torch.float64)
        torch.testing.assert_close(C.transform(name, acts), B.transform(name, acts), rtol=0, atol=0)
    (tmp_path / "partial.safetensors").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable"):
        degeneracy.load_basis(tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="no such file"):
        degeneracy.load_basis(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------- bad input


def test_unknown_node_layer_lists_valid_names(tanh_mlp, inputs) -> None:
    with pytest.raises(ValueError, match=r"unknown node layer module\(s\) \['fc9'\].*'fc0', 'act0', 'fc1'"):
        degeneracy.interaction_basis(tanh_mlp, inputs, ["fc1", "fc9", "output"], progress=False)


def test_not_a_cut(inputs) -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 5).double()
            self.b = nn.Linear(5, 5).double()
            self.c = nn.Linear(5, 2).double()

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.c(torch.tanh(self.b(h)) + x)  # skip path around b's input

    with pytest.raises(ValueError, match="'b' is not a cut"):
        degeneracy.interaction_basis(Skip(), inputs, ["b", "c", "output"], progress=False)


def test_nan_names_the_layer(tanh_mlp, inputs) -> None:
    with torch.no_grad():
        tanh_mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN in activations of node layer 'fc2'"):
        degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, progress=False)


def test_empty_data(tanh_mlp) -> None:
    with pytest.raises(ValueError, match="empty"):
        degeneracy.interaction_basis(tanh_mlp, torch.zeros(0, 5, dtype=torch.float64), LAYERS, progress=False)
    with pytest.raises(ValueError, match="empty"):
        degeneracy.interaction_basis(tanh_mlp, [], LAYERS, progress=False)


def test_mismatched_dtypes(tanh_mlp, inputs) -> None:
    with pytest.raises(ValueError, match=r"dtype torch.float32 but the model computes in torch.float64"):
        degeneracy.interaction_basis(tanh_mlp, inputs.float(), LAYERS, progress=False)
    B = degeneracy.interaction_basis(tanh_mlp.float(), inputs, LAYERS, dtype="float64", progress=False)
    assert B["fc1"].C.dtype == torch.float64


def test_bad_options(tanh_mlp, inputs, unchecked) -> None:
    with unchecked(), pytest.raises(ValueError, match="unknown basis method"):
        degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, method="ica", progress=False)
    with unchecked(), pytest.raises(ValueError, match="integration rule"):
        degeneracy.interaction_basis(tanh_mlp, inputs, LAYERS, integration_rule="simpson", progress=False)


def test_out_of_range_positions_name_the_node_layer() -> None:
    model = mlp([3, 4, 2])
    x = torch.randn(8, 5, 3, dtype=torch.float64)  # 5 positions
    layers = [{"name": "hidden", "module": "act0", "positions": 7}, "output"]
    with pytest.raises(ValueError, match=r"node layer 'hidden' selects positions \[7\].*5 position"):
        degeneracy.interaction_basis(model, x, layers, progress=False)
