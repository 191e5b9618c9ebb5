"""Results that cannot be mixed up: a basis or graph records the fingerprint of the model, node layers and
data it was built on; using it with another model is a clear error unless explicitly allowed."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from typer.testing import CliRunner

import degeneracy
from degeneracy.ablation import edge_ablation, node_ablation_curves
from degeneracy.commands import app
from degeneracy.fingerprint import (
    ModelMismatchError,
    data_fingerprint,
    fingerprint,
    layers_fingerprint,
    model_fingerprint,
)
from tests.conftest import mlp

LAYERS = ["fc1", "fc2", "output"]


def fingerprint_model(seed: int) -> torch.nn.Module:
    """A small float64 MLP (4 -> 6 -> 5 -> 3) seeded by ``seed``."""
    torch.manual_seed(seed)
    return mlp([4, 6, 5, 3])


def fingerprint_data(seed: int = 0, n: int = 40) -> torch.Tensor:
    """``n`` float64 inputs of width 4 seeded by ``seed``."""
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built():
    model, x = fingerprint_model(0), fingerprint_data()
    basis = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    graph = degeneracy.interaction_graph(model, x, basis, progress=False)
    return model, x, basis, graph


def test_basis_and_graph_record_model_layers_and_data(built) -> None:
    model, x, basis, graph = built
    fp = basis.info["fingerprint"]
    assert fp == fingerprint(model, x, basis.layers)  # recomputed independently: same hashes
    assert fp["model"] == model_fingerprint(fingerprint_model(0))  # an identical model built again
    assert fp["model"] != model_fingerprint(fingerprint_model(1))
    assert fp["data"] == data_fingerprint(x.clone()) and fp["data"] != data_fingerprint(fingerprint_data(1))
    assert fp["node_layers"] == layers_fingerprint(basis.layers)
    assert fp["node_layers"] != layers_fingerprint(basis.layers[:2])
    assert graph.info["fingerprint"]["model"] == fp["model"] and "basis" in graph.info["fingerprint"]


def test_fingerprint_ignores_dtype_but_not_structure_or_buffers() -> None:
    a = fingerprint_model(0)
    # float32 -> float64 is exact
    assert model_fingerprint(a) == model_fingerprint(fingerprint_model(0).float())
    b = fingerprint_model(0)
    b.act0 = torch.nn.ReLU()  # same parameters, another activation: another model
    assert model_fingerprint(a) != model_fingerprint(b)
    c = fingerprint_model(0)
    c.register_buffer("scale", torch.ones(1))
    assert model_fingerprint(a) != model_fingerprint(c)


def test_fingerprint_survives_save_and_load(built, tmp_path) -> None:
    _, _, basis, graph = built
    assert degeneracy.load_basis(basis.save(tmp_path / "b.safetensors")).info["fingerprint"] == basis.info[
        "fingerprint"
    ]
    loaded = degeneracy.load_graph(graph.save(tmp_path / "g.safetensors"))
    assert loaded.info["fingerprint"] == graph.info["fingerprint"]


def test_a_basis_of_another_model_with_the_same_widths_is_refused(built, tmp_path) -> None:
    _, x, basis, _ = built
    other = fingerprint_model(1)
    loaded = degeneracy.load_basis(basis.save(tmp_path / "b.safetensors"))
    for used in (basis, loaded):
        with pytest.raises(ModelMismatchError, match="built on another model.*allow_other_model=True"):
            degeneracy.interaction_graph(other, x, used, progress=False)
    with pytest.warns(UserWarning, match="another model"):
        graph = degeneracy.interaction_graph(other, x, basis, progress=False, allow_other_model=True)
    assert graph.names == basis.names


def test_ablations_refuse_another_model_or_a_graph_of_another_basis(built) -> None:
    model, x, basis, graph = built
    labels = model(x).argmax(-1)
    with pytest.raises(ModelMismatchError, match="another model"):
        node_ablation_curves(fingerprint_model(1), x, basis, labels=labels, num_points=2)
    with pytest.raises(ModelMismatchError, match="another model"):
        edge_ablation(fingerprint_model(1), x, basis, graph, labels=labels)
    pca = degeneracy.interaction_basis(model, x, LAYERS, method="pca", progress=False)
    with pytest.raises(ModelMismatchError, match="another basis"):
        edge_ablation(model, x, pca, graph, labels=labels)


def test_old_files_without_a_fingerprint_load_and_warn_when_used(built, tmp_path) -> None:
    model, x, basis, _ = built
    old = degeneracy.Basis(basis.layers, basis.bases, basis.config, {"timings": basis.info["timings"]})
    loaded = degeneracy.load_basis(old.save(tmp_path / "old.safetensors"))  # loads silently
    assert "fingerprint" not in loaded.info
    with pytest.warns(UserWarning, match="no model fingerprint"):
        graph = degeneracy.interaction_graph(model, x, loaded, progress=False)
    new = degeneracy.interaction_graph(model, x, basis, progress=False)
    for pair in graph.pairs:
        torch.testing.assert_close(graph[pair], new[pair], rtol=0, atol=0)


def test_data_read_once_has_no_data_fingerprint_and_is_not_consumed() -> None:
    batches = iter([fingerprint_data()[:20], fingerprint_data()[20:]])
    assert data_fingerprint(batches) is None
    assert len(list(batches)) == 2


def factory():
    """A model factory whose weights change with ``DEGENERACY_TEST_SEED`` (same name, another model)."""
    return fingerprint_model(int(os.environ.get("DEGENERACY_TEST_SEED", "0"))), fingerprint_data()


def test_cli_rerun_on_changed_weights_under_the_same_name_recomputes(tmp_path, monkeypatch) -> None:
    config = tmp_path / "basis.yaml"
    config.write_text(
        "model: {name: 'tests.test_fingerprint:factory'}\nmethods: [pca]\nnode_layers: [fc1, fc2, output]\n"
    )
    out = tmp_path / "run"
    runner = CliRunner()
    monkeypatch.setenv("DEGENERACY_TEST_SEED", "0")
    assert runner.invoke(app, ["basis", str(config), "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["basis", str(config), "--out", str(out)])
    assert "skipping" in again.output
    monkeypatch.setenv("DEGENERACY_TEST_SEED", "1")
    changed = runner.invoke(app, ["basis", str(config), "--out", str(out)])
    assert changed.exit_code == 0, changed.output
    assert "config changed (fingerprint.model)" in changed.output
    basis = degeneracy.load_basis(out / "bases" / "pca.safetensors")
    assert basis.info["fingerprint"]["model"] == model_fingerprint(fingerprint_model(1))



def test_cli_graph_refuses_saved_bases_of_another_model_unless_allowed(tmp_path, monkeypatch) -> None:
    """`graph` with basis_files: a basis saved from another model is refused (exit 2, the message names
    it, nothing computed); --allow-other-model (or allow_other_model: true) uses it with a warning, through
    the edges and the ablation stages; a basis of the same model is used silently."""
    runner = CliRunner()
    monkeypatch.setenv("DEGENERACY_TEST_SEED", "0")
    (tmp_path / "basis.yaml").write_text(
        "model: {name: 'tests.test_fingerprint:factory'}\nmethods: [pca]\nnode_layers: [fc1, fc2, output]\n"
    )
    made = runner.invoke(app, ["basis", str(tmp_path / "basis.yaml"), "--out", str(tmp_path / "b")])
    assert made.exit_code == 0, made.output
    saved = tmp_path / "b" / "bases" / "pca.safetensors"
    config = tmp_path / "graph.yaml"
    config.write_text(
        "model: {name: 'tests.test_fingerprint:factory'}\nmethods: [pca]\n"
        f"basis_files: {{pca: '{saved}'}}\n"
        "ablation: {metrics: mse, node_points: 2, edges: false, limit: 16}\n"
        "modules: {methods: [pca], epsilon: quantile}\n"
    )
    monkeypatch.setenv("DEGENERACY_TEST_SEED", "1")  # another model under the same name
    refused = runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "g1")])
    assert refused.exit_code == 2, refused.output
    assert "basis_files.pca" in refused.output and "built on another model" in refused.output
    assert "--allow-other-model" in refused.output
    assert not (tmp_path / "g1" / "stages").exists()  # refused before any stage
    with pytest.warns(UserWarning, match="allowed by allow_other_model"):
        allowed = runner.invoke(
            app, ["graph", str(config), "--out", str(tmp_path / "g1"), "--allow-other-model"]
        )
    assert allowed.exit_code == 0, allowed.output
    graph = degeneracy.load_graph(tmp_path / "g1" / "graphs" / "pca.safetensors")
    assert graph.info["fingerprint"]["model"] == model_fingerprint(fingerprint_model(1))
    assert (tmp_path / "g1" / "ablation" / "pca_nodes.json").exists()
    record = (tmp_path / "g1" / "stages" / "edges.pca.json").read_text()
    assert model_fingerprint(fingerprint_model(0)) in record  # the stage records what the basis was built on
    config.write_text(config.read_text() + "allow_other_model: true\n")  # the config field does the same
    with pytest.warns(UserWarning, match="allowed by allow_other_model"):
        assert runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "g2")]).exit_code == 0
    monkeypatch.setenv("DEGENERACY_TEST_SEED", "0")  # the model the basis was built on: no flag needed
    config.write_text(config.read_text().replace("allow_other_model: true\n", ""))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*another model")
        same = runner.invoke(app, ["graph", str(config), "--out", str(tmp_path / "g3")])
    assert same.exit_code == 0, same.output


@pytest.mark.parametrize(
    ("files", "message"),
    [("{lib: x.safetensors}", "not among methods"), ("{pca: missing.safetensors}", "no such file"),
     ("{pac: x.safetensors}", "unknown basis method 'pac'")],
)
def test_cli_graph_basis_files_are_checked_before_the_model_loads(tmp_path, files, message) -> None:
    config = tmp_path / "graph.yaml"
    config.write_text(f"model: {{name: 'no_such_module:make'}}\nmethods: [pca]\nbasis_files: {files}\n")
    result = CliRunner().invoke(app, ["graph", str(config), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and message in result.output, result.output
