"""Node and edge ablations against a direct re-implementation on the model's own submodules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import degeneracy
from degeneracy.ablation import default_schedule, edge_ablation, edge_mask, node_ablation_curve
from tests.conftest import mlp

LAYERS = ["fc1", "fc2", "output"]


@pytest.fixture
def classifier() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    model = mlp([5, 9, 8, 4])  # fc0 act0 fc1 act1 fc2
    x = torch.randn(300, 5, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(-1)
    flip = torch.rand(300) < 0.1  # a model that is not perfect, so the loss is informative
    labels[flip] = torch.randint(0, 4, (int(flip.sum()),))
    return model, x, labels


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    acc = float((logits.argmax(-1) == labels).double().mean())
    loss = float(nn.functional.cross_entropy(logits, labels))
    return acc, loss


def _features(basis, name: str, h: torch.Tensor) -> torch.Tensor:
    return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1) @ basis[name].C.T


def _back(basis, name: str, f: torch.Tensor) -> torch.Tensor:
    z = f @ basis[name].C_pinv.T
    return z[:, :-1] / z[:, -1:]


@pytest.mark.parametrize("method", ["lib", "pca", "neuron"])
def test_node_ablation_matches_direct_computation(classifier, method: str) -> None:
    model, x, labels = classifier
    basis = degeneracy.interaction_basis(model, x, LAYERS, method=method, progress=False)
    num_kept = [0, 2, basis["fc2"].dim - 1]
    curve = node_ablation_curve(model, x, basis, "fc2", labels=labels, num_kept=num_kept, batch_size=128)
    with torch.no_grad():
        h = model.act1(model.fc1(model.act0(model.fc0(x))))  # input of fc2
        f = _features(basis, "fc2", h)
        mean = f.mean(0)
        scores = basis["fc2"].eigenvalues[1:]
        order = 1 + torch.argsort(scores, descending=True)
        for k, acc, loss in zip(curve.num_kept, curve.accuracy, curve.loss, strict=True):
            keep = torch.zeros(f.shape[1], dtype=torch.bool)
            keep[0] = True
            keep[order[:k]] = True
            g = torch.where(keep, f, mean)
            want_acc, want_loss = _metrics(model.fc2(_back(basis, "fc2", g)), labels)
            assert acc == pytest.approx(want_acc, abs=1e-12)
            assert loss == pytest.approx(want_loss, rel=1e-10)
        assert (curve.base_accuracy, curve.base_loss) == pytest.approx(_metrics(model(x), labels))


def test_keeping_every_feature_of_an_untruncated_basis_is_the_model(classifier) -> None:
    model, x, labels = classifier
    basis = degeneracy.interaction_basis(model, x, LAYERS, method="pca", progress=False)
    assert basis["fc1"].dim == 10  # 9 + constant: nothing truncated
    curve = node_ablation_curve(model, x, basis, "fc1", labels=labels, num_kept=[9])
    assert curve.accuracy[0] == pytest.approx(curve.base_accuracy, abs=1e-12)
    assert curve.loss[0] == pytest.approx(curve.base_loss, rel=1e-10)


def _direct_edge_ablation(model, basis, x, mask: torch.Tensor) -> torch.Tensor:
    """Logits when output feature i of fc2's input only receives the kept edges from fc1's input."""
    with torch.no_grad():
        h = model.act0(model.fc0(x))  # input of fc1
        f = _features(basis, "fc1", h)
        mean = f.mean(0)
        out = torch.zeros(x.shape[0], basis["fc2"].dim, dtype=torch.float64)
        for i in range(mask.shape[0]):
            g = torch.where(mask[i], f, mean)
            y = model.act1(model.fc1(_back(basis, "fc1", g)))
            out[:, i] = _features(basis, "fc2", y)[:, i]
        return model.fc2(_back(basis, "fc2", out))


def test_edge_ablation_matches_direct_computation_and_bisects(classifier) -> None:
    model, x, labels = classifier
    basis = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    graph = degeneracy.interaction_graph(model, x, basis, progress=False)
    pair = ("fc1", "fc2")
    delta = 0.02
    result = edge_ablation(model, x, basis, graph, labels=labels, delta=delta, pairs=[pair], batch_size=100)[
        pair
    ]
    E = graph.edges[pair]
    assert result.num_edges == E[:, 1:].numel()
    base_acc, _ = _metrics(model(x).detach(), labels)
    assert result.base_accuracy == pytest.approx(base_acc)
    for n, acc in result.evaluations.items():
        mask = edge_mask(E, n, keep_constant=True)
        want, _ = _metrics(_direct_edge_ablation(model, basis, x, mask), labels)
        if n < result.num_edges:
            assert acc == pytest.approx(want, abs=1e-12)
    n = result.num_needed
    assert result.evaluations[n] >= base_acc - delta - 1e-12
    if n > 0:  # the bisection brackets the answer: one edge fewer was evaluated and fell short
        assert n - 1 in result.evaluations and result.evaluations[n - 1] < base_acc - delta
    ordered = E[:, 1:].flatten().sort(descending=True).values
    assert result.threshold == float(ordered[n - 1])


def test_edge_mask_and_schedule() -> None:
    e = torch.tensor([[9.0, 0.1, 0.3], [9.0, 0.2, 0.0]])
    m = edge_mask(e, 2, keep_constant=True)
    assert m.tolist() == [[True, False, True], [True, True, False]]
    assert edge_mask(e, 0, keep_constant=False).sum() == 0
    with pytest.raises(ValueError):
        edge_mask(e, 5, keep_constant=True)
    s = default_schedule(100, 10)
    assert s[0] == 0 and s[-1] == 100 and s == sorted(set(s))
    assert default_schedule(5) == [0, 1, 2, 3, 4, 5]


def test_ablation_needs_labels(classifier) -> None:
    model, x, _ = classifier
    basis = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    with pytest.raises(ValueError, match="labels"):
        node_ablation_curve(model, x, basis, "fc1", num_kept=[1])


def test_former_count_names_warn_and_old_dicts_load() -> None:
    from degeneracy.ablation import EdgeAblationResult, NodeAblationCurve
    from degeneracy.commands.graph import edge_result_from_dict, node_curves_from_json

    evaluations, losses = {0: 0.5, 2: 1.0}, {0: 1.0, 2: 0.0}
    edge = EdgeAblationResult(("a", "b"), "lib", 6, 2, 0.5, 0.01, 1.0, 0.99, evaluations, losses)
    saved = edge.to_dict()
    assert saved["num_edges"] == 6 and saved["num_needed"] == 2 and "n_edges" not in saved
    former = {"num_edges": "n_edges", "num_needed": "n_needed"}
    old = {former.get(k, k): v for k, v in saved.items()}
    old["evaluations"] = {str(k): v for k, v in old["evaluations"].items()}  # as JSON writes them
    old["losses"] = {str(k): v for k, v in old["losses"].items()}
    assert edge_result_from_dict(old) == edge == EdgeAblationResult.from_dict(saved)
    with pytest.warns(DeprecationWarning, match="num_edges"):
        assert edge.n_edges == 6
    with pytest.warns(DeprecationWarning, match="num_needed"):
        assert edge.n_needed == 2
    with pytest.warns(DeprecationWarning, match="num_needed"):
        again = EdgeAblationResult(
            ("a", "b"), "lib", 6, n_needed=2, threshold=0.5, delta=0.01, base_accuracy=1.0, target=0.99,
            evaluations=evaluations, losses=losses,
        )
    assert again == edge

    curve = NodeAblationCurve("fc1", "lib", "eigenvalues", 3, [0, 3], [0.5, 1.0], [1.0, 0.0], 1.0, 0.0)
    saved = curve.to_dict()
    assert saved["num_features"] == 3 and saved["num_kept"] == [0, 3] and "n_kept" not in saved
    former = {"num_features": "n_features", "num_kept": "n_kept"}
    old = {former.get(k, k): v for k, v in saved.items()}
    assert node_curves_from_json({"fc1": old}) == {"fc1": curve}
    with pytest.warns(DeprecationWarning, match="num_kept"):
        assert curve.n_kept == [0, 3]
    with pytest.warns(DeprecationWarning, match="num_features"):
        assert curve.n_features == 3


def test_former_keywords_warn(classifier) -> None:
    model, x, labels = classifier
    basis = degeneracy.interaction_basis(model, x, LAYERS, method="pca", progress=False)
    with pytest.warns(DeprecationWarning, match="num_kept"):
        curve = node_ablation_curve(model, x, basis, "fc1", labels=labels, n_kept=[9])
    assert curve.num_kept == [9]
    e = torch.tensor([[9.0, 0.1, 0.3], [9.0, 0.2, 0.0]])
    with pytest.warns(DeprecationWarning, match="num_kept"):
        assert torch.equal(edge_mask(e, n_kept=2, keep_constant=True), edge_mask(e, 2, keep_constant=True))
    from degeneracy.ablation import bisect_edges

    with pytest.warns(DeprecationWarning, match="num_total"):
        assert bisect_edges(lambda n: {"accuracy": float(n >= 3)}, n_total=10, target=1.0)[0] == 3
