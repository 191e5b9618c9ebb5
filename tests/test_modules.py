"""Modules (METHOD §5): log strengths, ε choices, and planted modules recovered by Leiden."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import degeneracy
from degeneracy.modules import log_strengths, resolve_epsilon

pytest.importorskip("leidenalg")

WIDTHS_A = [4, 7, 6, 4]
WIDTHS_B = [4, 6, 7, 4]


def _orthogonal(n: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q


def _block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(a, b)


def planted_network() -> tuple[nn.Sequential, torch.Tensor, list[torch.Tensor]]:
    """Two independent tanh sub-networks whose node layers are mixed by random rotations Q_l.

    Node layer l holds Q_l [h_A; h_B]; the next weights undo the rotation, so the function is the
    block-diagonal one. Data are the Cartesian product of the two sub-networks' inputs, so that any
    function of one block is exactly uncorrelated with any function of the other.
    """
    sub_a = [nn.Linear(i, o).double() for i, o in zip(WIDTHS_A[:-1], WIDTHS_A[1:], strict=True)]
    sub_b = [nn.Linear(i, o).double() for i, o in zip(WIDTHS_B[:-1], WIDTHS_B[1:], strict=True)]
    widths = [a + b for a, b in zip(WIDTHS_A, WIDTHS_B, strict=True)]
    rotations = [_orthogonal(w) for w in widths[:-1]]
    parts: list[tuple[str, nn.Module]] = []
    for l, (la, lb) in enumerate(zip(sub_a, sub_b, strict=True)):
        fc = nn.Linear(widths[l], widths[l + 1]).double()
        with torch.no_grad():
            fc.weight.copy_(_block(la.weight, lb.weight) @ rotations[l].T)
            fc.bias.copy_(torch.cat([la.bias, lb.bias]))
        parts.append((f"fc{l}", fc))
        if l < len(sub_a) - 1:
            parts.append((f"act{l}", nn.Tanh()))
            mix = nn.Linear(widths[l + 1], widths[l + 1], bias=False).double()
            with torch.no_grad():
                mix.weight.copy_(rotations[l + 1])
            parts.append((f"mix{l + 1}", mix))
    model = nn.Sequential(OrderedDict(parts))
    xa = torch.randn(24, WIDTHS_A[0], dtype=torch.float64)
    xb = torch.randn(20, WIDTHS_B[0], dtype=torch.float64)
    grid = torch.cat([xa.repeat_interleave(20, 0), xb.repeat(24, 1)], dim=1)
    inputs = grid @ rotations[0].T  # the input node layer is mixed too
    return model, inputs, rotations


def _block_of_features(basis, name: str, rotation: torch.Tensor, width_a: int) -> list[int]:
    """0 for features reading block A only, 1 for block B (checked to be clean)."""
    b = basis[name]
    start = 1 if b.has_constant else 0
    d = rotation.shape[0]
    weights = b.C[start:, :d] @ rotation  # features in the un-mixed coordinates [h_A; h_B]
    on_a = weights[:, :width_a].norm(dim=1)
    on_b = weights[:, width_a:].norm(dim=1)
    assert float(torch.minimum(on_a, on_b).max()) < 1e-8 * float(torch.maximum(on_a, on_b).min())
    return (on_b > on_a).long().tolist()


@pytest.mark.parametrize("epsilon", [None, "relative"])  # the default rule, and an explicit ε
def test_planted_modules_are_recovered(epsilon) -> None:
    model, inputs, rotations = planted_network()
    layers = ["fc0", "fc1", "fc2", "output"]
    with torch.no_grad():
        assert torch.allclose(model(inputs)[:, :4].std(0), model(inputs)[:, :4].std(0))
    basis = degeneracy.interaction_basis(model, inputs, layers, progress=False)
    graph = degeneracy.interaction_graph(model, inputs, basis, progress=False)
    eps = None
    if epsilon == "relative":
        eps = {pair: 1e-12 * float(graph.edges[pair].max()) for pair in graph.pairs}
    modules = degeneracy.find_modules(graph, epsilon=eps, seed=0)
    assert modules.num_modules == 2
    assert modules.inter_module_strength == 0.0
    assert modules.modularity > 0.3
    truth = {}
    for name, rotation in zip(layers[:-1], rotations, strict=True):
        width_a = WIDTHS_A[layers.index(name)]
        for j, block in enumerate(_block_of_features(basis, name, rotation, width_a)):
            truth[(name, j + 1)] = block
    for j in range(1, basis["output"].dim):  # output: PCA of [out_A; out_B], unrotated
        w = basis["output"].C[j, :-1]
        truth[("output", j)] = int(w[4:].norm() > w[:4].norm())
    assert set(modules.labels) == set(truth)  # every non-constant feature has a label
    assert modules.constant_nodes == [(name, 0) for name in layers]
    same = {(truth[n], modules.labels[n]) for n in truth}
    assert len(same) == 2 and len({m for _, m in same}) == 2  # a bijection between blocks and modules


def test_log_strengths_and_epsilon_choices() -> None:
    e = torch.tensor([[1.0, 1e-3], [1e-6, 0.0]], dtype=torch.float64)
    s = log_strengths(e, 1e-3)
    torch.testing.assert_close(s, torch.tensor([[6.907755278982137, 0.0], [0.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        log_strengths(e, 0.0)

    model, inputs, _ = planted_network()
    basis = degeneracy.interaction_basis(model, inputs, ["fc0", "fc1", "output"], progress=False)
    graph = degeneracy.interaction_graph(model, inputs, basis, progress=False)
    pair = graph.pairs[0]
    q = resolve_epsilon(graph, None, quantile=0.75)[pair]
    positive = graph.edges[pair][1:, 1:].flatten()
    positive = positive[positive > 0]
    assert q == pytest.approx(float(torch.quantile(positive, 0.75)), rel=1e-12)
    assert resolve_epsilon(graph, 0.5) == dict.fromkeys(graph.pairs, 0.5)
    top = float(graph.edges[pair][1:, 1:].max())
    assert resolve_epsilon(graph)[pair] == pytest.approx(1e-9 * top, rel=1e-12)
    assert resolve_epsilon(graph, epsilon_fraction=1e-3)[pair] == pytest.approx(1e-3 * top, rel=1e-12)
    with pytest.warns(DeprecationWarning, match="epsilon_fraction"):  # the former keyword still works
        assert resolve_epsilon(graph, relative=1e-3) == resolve_epsilon(graph, epsilon_fraction=1e-3)

    class Ablated:  # what an EdgeAblationResult offers
        threshold = 0.25

    assert resolve_epsilon(graph, dict.fromkeys(graph.pairs, Ablated()))[pair] == 0.25
    with pytest.raises(ValueError, match="no entry"):
        resolve_epsilon(graph, {})
    with pytest.raises(ValueError, match="not both"):
        resolve_epsilon(graph, 0.5, quantile=0.5)


def test_resolution_and_seed() -> None:
    model, inputs, _ = planted_network()
    layers = ["fc0", "fc1", "fc2", "output"]
    basis = degeneracy.interaction_basis(model, inputs, layers, progress=False)
    graph = degeneracy.interaction_graph(model, inputs, basis, progress=False)
    a = degeneracy.find_modules(graph, seed=3)
    b = degeneracy.find_modules(graph, seed=3)
    assert a.labels == b.labels
    fine = degeneracy.find_modules(graph, resolution=20.0, seed=3)
    assert fine.num_modules > a.num_modules
    # every inter-module strength is the sum of s over edges that cross modules
    eps = fine.epsilon
    total = 0.0
    for pair in graph.pairs:
        s = log_strengths(graph.edges[pair][1:, 1:], eps[pair])
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                if fine.labels[(pair[0], j + 1)] != fine.labels[(pair[1], i + 1)]:
                    total += float(s[i, j])
    assert fine.inter_module_strength == pytest.approx(total, rel=1e-12)


def planted_factory() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A ``package.module:function`` model factory for the graph command: (model, (inputs, labels))."""
    torch.manual_seed(0)
    model, inputs, _ = planted_network()
    with torch.no_grad():
        labels = model(inputs).argmax(-1)
    return model, (inputs, labels)


def test_graph_command_end_to_end(tmp_path) -> None:
    """The ``degeneracy graph`` pipeline on the planted network: files, tables, modules; reruns resume."""
    import json

    import typer

    from degeneracy.commands.graph import graph_command

    config = tmp_path / "graph.yaml"
    config.write_text(
        "model: {name: 'tests.test_modules:planted_factory'}\n"
        "node_layers: [fc0, fc1, fc2, output]\n"
        "methods: [lib, pca]\n"
        "edge_limit: 200\n"
        "ablation: {delta: 0.01, node_points: 3, limit: 200, edge_methods: [lib]}\n"
        "modules: {epsilon: relative, relative: 1.0e-12, methods: [lib, pca]}\n"
    )
    out = tmp_path / "run"
    graph_command(config, out)
    summary = json.loads((out / "graph_summary.json").read_text())
    assert set(summary["edges_needed"]) == {"lib"} and set(summary["sparsity"]) == {"lib", "pca"}
    assert summary["modules"]["lib"]["num_modules"] == 2
    for name in ("graph_lib.png", "graph_pca.png", "node_ablation.png", "edge_ablation.png"):  # non-empty
        assert (out / "figures" / name).stat().st_size > 0
    report = (out / "graph_report.md").read_text()
    assert "Edges needed" in report and "Sparsity" in report
    stamp = (out / "graphs" / "lib.safetensors").stat().st_mtime_ns
    graph_command(config, out)  # resumes: nothing recomputed
    assert (out / "graphs" / "lib.safetensors").stat().st_mtime_ns == stamp
    config.write_text("model: {name: 'tests.test_modules:planted_factory'}\nmethod: [lib]\n")
    with pytest.raises(typer.Exit):
        graph_command(config, out)


def test_num_modules_and_old_module_files() -> None:
    from degeneracy.commands.graph import modules_from_json
    from degeneracy.modules import Modules
    from degeneracy.report.markdown import graph_report_markdown

    members = [[("fc1", 1)], [("fc2", 2)]]
    found = Modules({("fc1", 1): 0, ("fc2", 2): 1}, members, {("fc1", "fc2"): 0.1}, 0.0, 1.0, 0.0, 1.0, 0)
    saved = found.to_dict()
    assert saved["num_modules"] == found.num_modules == 2 and "n_modules" not in saved
    old = {("n_modules" if k == "num_modules" else k): v for k, v in saved.items()}
    assert modules_from_json(old) == found
    with pytest.warns(DeprecationWarning, match="num_modules"):
        assert found.n_modules == 2
    # a graph summary written before the rename renders too
    row = {"n_modules": 2, "sizes": [1, 1], "modularity": 0.0, "inter_module_strength": 0.0}
    summary = {"modules": {"lib": row}}
    assert "2 modules" in graph_report_markdown(summary)
