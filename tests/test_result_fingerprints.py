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


SAMPLER = {"num_chains": 1, "num_draws": 5, "num_burnin": 0, "warn": False}


def test_llc_curve_and_effective_parameter_count_record_and_check_their_model(tmp_path) -> None:
    """LLCCurve and EffectiveParameterCount (both methods) record the model + data fingerprint; the
    loaders given a model refuse one made on another model unless allow_other_model=True."""
    from degeneracy.llc import effective_parameter_count, llc_curve, load_effective_parameter_count
    from degeneracy.llc.curve import load_llc_curve

    model, x = fingerprint_model(0), fingerprint_data()
    curve = llc_curve(model, x, nbetas=[5.0, 10.0], step_size=1e-4, **SAMPLER)
    sgld = effective_parameter_count(model, x, [1.0], max_iter=1, step_size=1e-4, **SAMPLER)
    torch.manual_seed(2)
    small = torch.nn.Linear(4, 1, bias=False).double()  # few parameters, for the volume method
    volume = effective_parameter_count(
        small, x, [1.0], method="volume", radius=1e-3,
        volume_kwargs={"num_points": 20, "num_repeats": 1, "num_mcmc_steps": 1},
    )  # fmt: skip
    big = (model, fingerprint_model(0), fingerprint_model(1))  # the model, a rebuilt copy, another
    torch.manual_seed(2)
    copy = torch.nn.Linear(4, 1, bias=False).double()
    for result, load, what, (used, rebuilt, other) in [
        (curve, load_llc_curve, "LLC curve", big),
        (sgld, load_effective_parameter_count, "effective parameter count", big),
        (volume, load_effective_parameter_count, "effective parameter count", (small, copy, model)),
        (curve.results[0], degeneracy.load_llc, "LLC estimate", big),
    ]:
        fp = result.config["fingerprint"]
        assert (fp["model"], fp["data"]) == _expected(rebuilt, x)
        path = result.save(tmp_path / f"{type(result).__name__}.safetensors")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load(path, used).config["fingerprint"] == fp  # the same model: nothing to say
        with pytest.raises(ModelMismatchError, match=f"this {what} was built on another model"):
            load(path, other)
        with pytest.warns(UserWarning, match="allowed by allow_other_model"):
            assert load(path, other, allow_other_model=True).config["fingerprint"] == fp
        assert load(path).config["fingerprint"] == fp  # no model: nothing checked


def test_llc_command_recomputes_for_another_model_and_a_stored_result_of_another_model(tmp_path) -> None:
    """The llc command's stage configs hold the model + data fingerprint: the same config on changed
    weights recomputes (saying why); a stored file made on another model under an unchanged record is
    not loaded but recomputed."""
    from degeneracy.commands.config import LLCRunConfig
    from degeneracy.commands.llc import run_llc

    cfg = LLCRunConfig.model_validate(
        {"sampler": {"num_chains": 1, "num_draws": 5, "num_burnin": 0, "step_size": 1e-4},
         "plots": False, "progress": False}
    )  # fmt: skip
    x = fingerprint_data()
    first, other = fingerprint_model(0), fingerprint_model(1)
    lines: list[str] = []
    run_llc(cfg, first, x, tmp_path, log=lines.append)
    assert degeneracy.load_llc(tmp_path / "llc.safetensors", first).config["fingerprint"]["model"] == (
        model_fingerprint(first)
    )
    run_llc(cfg, other, x, tmp_path, log=lines.append)
    assert any("recomputing: its config changed (fingerprint.model)" in line for line in lines), lines
    assert degeneracy.load_llc(tmp_path / "llc.safetensors").config["fingerprint"]["model"] == (
        model_fingerprint(other)
    )
    # a file of the first model put in place of the second's, its stage record unchanged
    degeneracy.estimate_llc(first, x, step_size=1e-4, **SAMPLER).save(tmp_path / "llc.safetensors")
    lines.clear()
    run_llc(cfg, other, x, tmp_path, log=lines.append)
    assert any("recomputing" in line and "another model" in line for line in lines), lines
    degeneracy.load_llc(tmp_path / "llc.safetensors", other)  # recomputed on this model
