"""Every result records the fingerprint of the model and data it was computed on (node ablation curves,
edge ablation results, modules, the degeneracy report, LLC estimates); it is saved and loaded, files
written without it load, and modules refuse an edge-ablation epsilon of another model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import degeneracy
from degeneracy.ablation import EdgeAblationResult, NodeAblationCurve, edge_ablation, node_ablation_curves
from degeneracy.fingerprint import (
    ModelMismatchError,
    basis_fingerprint,
    data_fingerprint,
    model_fingerprint,
)
from degeneracy.modules import Modules, find_modules
from tests.test_fingerprint import fingerprint_data, fingerprint_model

LAYERS = ["fc1", "fc2", "output"]


@pytest.fixture(scope="module")
def built():
    model, x = fingerprint_model(0), fingerprint_data()
    basis = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    graph = degeneracy.interaction_graph(model, x, basis, progress=False)
    labels = model(x).argmax(-1)
    edges = edge_ablation(model, x, basis, graph, labels=labels)
    return model, x, basis, graph, labels, edges


def _expected(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, str | None]:
    """Hashes recomputed independently, on a model built again from its seed and a copy of the data."""
    return model_fingerprint(model), data_fingerprint(x.clone())


def test_ablations_record_model_data_and_basis_and_keep_them_through_json(built) -> None:
    model, x, basis, graph, labels, edges = built
    want_model, want_data = _expected(fingerprint_model(0), x)
    curves = node_ablation_curves(model, x, basis, labels=labels, num_points=2)
    for result, cls in [*((c, NodeAblationCurve) for c in curves.values()),
                        *((e, EdgeAblationResult) for e in edges.values())]:
        fp = result.info["fingerprint"]
        assert (fp["model"], fp["data"]) == (want_model, want_data)
        assert fp["basis"] == basis_fingerprint(basis) == graph.info["fingerprint"]["basis"]
        back = cls.from_dict(json.loads(json.dumps(result.to_dict())))
        assert back.info["fingerprint"] == fp
    with pytest.warns(UserWarning, match="another model"):
        other = node_ablation_curves(
            fingerprint_model(1), x, basis, labels=labels, num_points=2, allow_other_model=True
        )
    recorded = next(iter(other.values())).info["fingerprint"]["model"]
    assert recorded == model_fingerprint(fingerprint_model(1)) != want_model


def test_modules_record_the_graph_fingerprint_and_old_files_load(built, tmp_path) -> None:
    model, x, basis, graph, labels, edges = built
    modules = find_modules(graph, epsilon=edges)
    fp = modules.info["fingerprint"]
    assert (fp["model"], fp["data"]) == _expected(fingerprint_model(0), x)
    assert fp["graph"] != find_modules(
        degeneracy.interaction_graph(model, fingerprint_data(1), basis, progress=False), epsilon=1e-3
    ).info["fingerprint"]["graph"]  # another graph, another hash
    path = modules.save(tmp_path / "modules.json")
    assert degeneracy.load_modules(path).info == modules.info
    old = modules.to_dict()
    del old["info"]  # written before fingerprints
    assert Modules.from_dict(old).info == {} and Modules.from_dict(old).modules == modules.modules


def test_modules_refuse_an_edge_ablation_epsilon_of_another_model(built) -> None:
    model, x, basis, graph, labels, edges = built
    other = fingerprint_model(1)
    other_basis = degeneracy.interaction_basis(other, x, LAYERS, progress=False)
    other_graph = degeneracy.interaction_graph(other, x, other_basis, progress=False)
    with pytest.raises(ModelMismatchError, match="different models"):
        find_modules(other_graph, epsilon=edges)
    with pytest.warns(UserWarning, match="different models"):
        allowed = find_modules(other_graph, epsilon=edges, allow_other_model=True)
    assert allowed.epsilon == {pair: r.threshold for pair, r in edges.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_modules(graph, epsilon=edges)  # the same model and basis: nothing to say
    stripped = {p: EdgeAblationResult.from_dict({**r.to_dict(), "info": {}}) for p, r in edges.items()}
    find_modules(other_graph, epsilon=stripped)  # old results without a fingerprint: not checked


def test_report_and_llc_record_model_and_data_and_keep_them_on_disk(tmp_path) -> None:
    model, x = fingerprint_model(0), fingerprint_data()
    report = degeneracy.degeneracy_report(model, x, hessian=None)
    want = _expected(fingerprint_model(0), x)
    fp = report.config["fingerprint"]
    assert (fp["model"], fp["data"]) == want
    loaded = degeneracy.load_degeneracy_report(report.save(tmp_path / "report.json"))
    assert loaded.config["fingerprint"] == fp
    llc = degeneracy.estimate_llc(model, x, num_chains=1, num_draws=5, num_burnin=0, warn=False)
    assert (llc.config["fingerprint"]["model"], llc.config["fingerprint"]["data"]) == want
    assert degeneracy.load_llc(llc.save(tmp_path / "llc.safetensors")).config["fingerprint"] == llc.config[
        "fingerprint"
    ]
    other = degeneracy.degeneracy_report(fingerprint_model(1), x, hessian=None).config["fingerprint"]["model"]
    assert other != fp["model"]


def test_node_ablation_by_edges_refuses_a_graph_of_another_basis(built) -> None:
    model, x, basis, graph, labels, edges = built
    pca = degeneracy.interaction_basis(model, x, LAYERS, method="pca", progress=False)
    options = {"labels": labels, "importance": "edges", "graph": graph, "num_points": 2}
    with pytest.raises(ModelMismatchError, match="another basis"):
        node_ablation_curves(model, x, pca, **options)
    curves = node_ablation_curves(model, x, basis, **options)
    assert all(c.importance == "edges" for c in curves.values())
