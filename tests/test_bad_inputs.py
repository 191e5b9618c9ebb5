"""Bad inputs get a clear error raised by degeneracy, naming the problem, before any long computation.

Each case is one call (library) or one command line (CLI, in process through typer's CliRunner) that a
new user could plausibly make; the test asserts the error type (library) or the exit code 2 and the
``error:`` line (CLI), and that the message names the problem (a regular expression), never a traceback
from deep inside torch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import degeneracy
from degeneracy.ablation import edge_ablation, node_ablation_curve, node_ablation_curves
from degeneracy.basis import BasisConfig
from degeneracy.behavioral import BehavioralProblem, check_kind
from degeneracy.checks import check_module
from degeneracy.commands import app
from degeneracy.fingerprint import ModelMismatchError
from degeneracy.io import ResultFileError, load_json, save_json
from degeneracy.run import resolve_dtype
from tests.conftest import mlp

LAYERS = ["fc1", "fc2", "output"]


def _model(seed: int = 0, widths: tuple[int, ...] = (4, 6, 5, 3)) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp(list(widths))


def _x(n: int = 24, width: int = 4) -> torch.Tensor:
    return torch.randn(n, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Any]:
    """One tiny model, its data, bases and graph, built once for every library case."""
    model, x = _model(), _x()
    basis = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    pca = degeneracy.interaction_basis(model, x, LAYERS, method="pca", progress=False)
    graph = degeneracy.interaction_graph(model, x, basis, progress=False)
    folder = tmp_path_factory.mktemp("files")
    basis_file = basis.save(folder / "basis.safetensors")
    graph_file = graph.save(folder / "graph.safetensors")
    damaged = folder / "damaged.safetensors"
    raw = bytearray(basis_file.read_bytes())
    raw[-3] ^= 0xFF  # one byte of the last tensor
    damaged.write_bytes(bytes(raw))
    text = folder / "notes.safetensors"
    text.write_text("not a tensor file")
    json_file = save_json(folder / "graph.json", "graph", {"x": 1})
    labels = model(x).argmax(-1)
    return dict(
        model=model, x=x, basis=basis, pca=pca, graph=graph, labels=labels, basis_file=basis_file,
        graph_file=graph_file, damaged=damaged, text=text, json_file=json_file, folder=folder,
    )


def _basis(m: dict[str, Any], **kw: Any) -> Callable[[], Any]:
    return lambda: degeneracy.interaction_basis(m["model"], kw.pop("data", m["x"]), kw.pop("layers", LAYERS),
                                               progress=False, **kw)


# (id, call taking the fixture dict, expected error type, regex the message must match)
LIBRARY: list[tuple[str, Callable[[dict[str, Any]], Any], type[Exception], str]] = [
    # --- data that does not fit the model (interaction_basis) ---
    ("basis-integer-inputs", lambda m: _basis(m, data=torch.randint(0, 3, (24, 4)))(), ValueError,
     r"integer inputs .* computes in torch.float64"),
    ("basis-no-batch-dim", lambda m: _basis(m, data=m["x"][0])(), ValueError, r"no batch dimension"),
    ("basis-wrong-width", lambda m: _basis(m, data=_x(width=5))(), ValueError,
     r"shape \(24, 5\) do not fit the model.*Linear\(4 -> 6\)"),
    ("basis-float32-inputs", lambda m: _basis(m, data=m["x"].float())(), ValueError,
     r"dtype torch.float32 .* dtype='float64'"),
    ("basis-scalar-data", lambda m: _basis(m, data=torch.tensor(1.0, dtype=torch.float64))(), ValueError,
     r"empty|single number"),
    ("basis-empty-data", lambda m: _basis(m, data=m["x"][:0])(), ValueError, r"empty"),
    ("basis-nan-data", lambda m: _basis(m, data=m["x"] * float("nan"))(), ValueError, r"NaN"),
    ("basis-inputs-and-labels-as-data", lambda m: _basis(m, data=(m["x"], m["labels"]))(), ValueError,
     r"batch 1 of the data .* \(inputs, labels\) pair"),
    ("basis-batches-of-different-widths", lambda m: _basis(m, data=[m["x"], _x(width=5)])(), ValueError,
     r"batch 1 of the data has inputs of shape \(24, 5\)"),
    ("basis-strings-as-data", lambda m: _basis(m, data=["a", "b"])(), TypeError, r"cannot read a batch"),
    ("model-not-a-module", lambda m: check_module(lambda z: z), TypeError, r"torch.nn.Module"),
    # --- options ---
    ("basis-unknown-method", lambda m: BasisConfig(method="lob"), ValueError, r"unknown basis method 'lob'"),
    ("basis-unknown-node-layer", lambda m: _basis(m, layers=["fc9", "output"])(), ValueError,
     r"unknown node layer.*fc9"),
    ("basis-no-node-layers", lambda m: _basis(m, layers=[])(), ValueError, r"no node layers"),
    ("basis-batch-size-zero", lambda m: _basis(m, batch_size=0)(), ValueError,
     r"batch_size must be positive"),
    ("basis-negative-threshold", lambda m: _basis(m, gram_threshold=-1.0)(), ValueError,
     r"thresholds must be >= 0"),
    ("basis-unknown-integration-rule", lambda m: _basis(m, integration_rule="simpson")(), ValueError,
     r"unknown integration rule 'simpson'"),
    ("basis-center-without-constant", lambda m: _basis(m, constant_coordinate=False)(), ValueError,
     r"constant_coordinate"),
    ("basis-unknown-dtype", lambda m: _basis(m, dtype="float8")(), ValueError, r"dtype must be one of"),
    ("basis-positions-out-of-range",
     lambda m: _basis(m, layers=[{"name": "h", "module": "fc1", "positions": 3}, "output"])(), ValueError,
     r"positions"),
    # --- interaction_graph ---
    ("graph-integer-inputs", lambda m: degeneracy.interaction_graph(
        m["model"], torch.randint(0, 3, (24, 4)), m["basis"], progress=False), ValueError, r"integer inputs"),
    ("graph-no-batch-dim", lambda m: degeneracy.interaction_graph(
        m["model"], m["x"][0], m["basis"], progress=False), ValueError, r"no batch dimension"),
    ("graph-wrong-width", lambda m: degeneracy.interaction_graph(
        m["model"], _x(width=7), m["basis"], progress=False), ValueError, r"do not fit the model"),
    ("graph-basis-of-another-model", lambda m: degeneracy.interaction_graph(
        _model(seed=5), m["x"], m["basis"], progress=False), ModelMismatchError,
     r"built on another model.*allow_other_model=True"),
    ("graph-basis-widths-do-not-fit", lambda m: degeneracy.interaction_graph(
        _model(widths=(4, 7, 5, 3)), m["x"], m["basis"], progress=False, allow_other_model=True),
     ValueError, r"node layer 'fc1' has width 7 in the model, 6 in the basis"),
    ("graph-basis-not-a-basis", lambda m: degeneracy.interaction_graph(
        m["model"], m["x"], {"fc1": torch.eye(2)}, progress=False), TypeError, r"basis must be a Basis"),
    ("graph-float32-inputs", lambda m: degeneracy.interaction_graph(
        m["model"], m["x"].float(), m["basis"], progress=False), ValueError, r"dtype torch.float32"),
    # --- ablations ---
    ("node-ablation-another-model", lambda m: node_ablation_curves(
        _model(seed=5), m["x"], m["basis"], labels=m["labels"]), ModelMismatchError, r"another model"),
    ("node-ablation-wrong-width", lambda m: node_ablation_curves(
        m["model"], _x(width=3), m["basis"], labels=m["labels"]), ValueError, r"do not fit the model"),
    ("node-ablation-num-kept-out-of-range", lambda m: node_ablation_curve(
        m["model"], m["x"], m["basis"], "fc1", labels=m["labels"], num_kept=[0, 99]), ValueError,
     r"num_kept must lie in \[0, \d+\]"),
    ("node-ablation-no-labels", lambda m: node_ablation_curves(m["model"], m["x"], m["basis"]), ValueError,
     r"need labels"),
    ("edge-ablation-negative-delta", lambda m: edge_ablation(
        m["model"], m["x"], m["basis"], m["graph"], labels=m["labels"], delta=-0.1), ValueError,
     r"delta must be >= 0"),
    ("edge-ablation-graph-of-another-basis", lambda m: edge_ablation(
        m["model"], m["x"], m["pca"], m["graph"], labels=m["labels"]), ModelMismatchError, r"another basis"),
    ("edge-ablation-another-model", lambda m: edge_ablation(
        _model(seed=5), m["x"], m["basis"], m["graph"], labels=m["labels"]), ModelMismatchError,
     r"another model"),
    ("edge-ablation-graph-other-layers", lambda m: edge_ablation(
        m["model"], m["x"], m["basis"], m["graph"].subgraph("fc2", "output"), labels=m["labels"]),
     ValueError, r"different node layers"),
    # --- modules ---
    ("modules-negative-epsilon", lambda m: degeneracy.find_modules(m["graph"], epsilon=-1.0), ValueError,
     r"epsilon .* positive finite"),
    # --- degeneracy accounting ---
    ("report-negative-epsilon", lambda m: degeneracy.degeneracy_report(m["model"], m["x"], epsilon=-1.0),
     ValueError, r"epsilon must be a finite number >= 0"),
    ("report-nan-epsilon", lambda m: degeneracy.degeneracy_report(
        m["model"], m["x"], epsilon=float("nan")), ValueError, r"epsilon must be a finite number"),
    ("report-integer-inputs", lambda m: degeneracy.degeneracy_report(
        m["model"], torch.randint(0, 3, (24, 4)), hessian=None), ValueError, r"integer inputs"),
    ("report-wrong-width", lambda m: degeneracy.degeneracy_report(m["model"], _x(width=5), hessian=None),
     ValueError, r"do not fit the model"),
    ("report-no-batch-dim", lambda m: degeneracy.degeneracy_report(m["model"], m["x"][0], hessian=None),
     ValueError, r"no batch dimension"),
    # --- behavioral loss ---
    ("behavioral-unknown-kind", lambda m: check_kind("mae"), ValueError, r"mae"),
    ("behavioral-wrong-width", lambda m: BehavioralProblem(m["model"], _x(width=5)), ValueError,
     r"do not fit the model"),
    ("behavioral-integer-inputs", lambda m: BehavioralProblem(m["model"], torch.randint(0, 3, (8, 4))),
     ValueError, r"integer inputs"),
    ("unknown-dtype-name", lambda m: resolve_dtype("float12"), ValueError, r"float12"),
    # --- learning coefficient ---
    ("llc-wrong-width", lambda m: degeneracy.estimate_llc(m["model"], _x(width=5), num_chains=1, num_draws=2),
     ValueError, r"do not fit the model"),
    ("llc-cross-entropy-wrong-width", lambda m: degeneracy.estimate_llc(
        m["model"], (_x(width=5), torch.arange(24) % 3), loss="cross_entropy", num_chains=1, num_draws=2),
     ValueError, r"do not fit the model"),
    # --- result files ---
    ("load-basis-missing-file", lambda m: degeneracy.load_basis(m["folder"] / "nope.safetensors"),
     ResultFileError, r"no such file"),
    ("load-basis-not-a-tensor-file", lambda m: degeneracy.load_basis(m["text"]), ResultFileError,
     r"not a readable degeneracy basis file"),
    ("load-basis-of-a-graph-file", lambda m: degeneracy.load_basis(m["graph_file"]), ResultFileError,
     r"holds a 'graph' result, expected 'basis'"),
    ("load-graph-of-a-basis-file", lambda m: degeneracy.load_graph(m["basis_file"]), ResultFileError,
     r"holds a 'basis' result, expected 'graph'"),
    ("load-damaged-basis", lambda m: degeneracy.load_basis(m["damaged"]), ResultFileError,
     r"damaged basis file"),
    ("load-json-of-another-kind", lambda m: load_json(m["json_file"], kind="modules"), ResultFileError,
     r"holds a 'graph' result, expected 'modules'"),
    ("basis-unknown-layer-name", lambda m: m["basis"]["fc9"], KeyError, r"no node layer 'fc9'"),
]


@pytest.mark.parametrize(("call", "error", "pattern"), [c[1:] for c in LIBRARY], ids=[c[0] for c in LIBRARY])
def test_library_bad_input(made, call, error, pattern) -> None:
    with pytest.raises(error) as info:
        call(made)
    assert re.search(pattern, str(info.value), re.S), str(info.value)
    assert info.type.__module__.startswith(("degeneracy", "builtins")), info.type


# ---------------------------------------------------------------------------------------------------
# the command line


def tiny_factory():
    """``model: {name: 'tests.test_bad_inputs:tiny_factory'}``: a float64 MLP and float inputs."""
    return _model(), _x()


def integer_factory():
    """A float MLP with integer inputs (a mistake)."""
    return _model(), torch.randint(0, 3, (24, 4))


def wide_factory():
    """A float MLP with inputs of the wrong width (a mistake)."""
    return _model(), _x(width=9)


def not_a_pair():
    """A factory that returns a model only (a mistake)."""
    return _model()


FACTORY = "model: {name: 'tests.test_bad_inputs:tiny_factory'}\n"
INTEGER = "model: {name: 'tests.test_bad_inputs:integer_factory'}\n"
WIDE = "model: {name: 'tests.test_bad_inputs:wide_factory'}\n"
LAYERS_YAML = "node_layers: [fc1, fc2, output]\n"

CLI: list[tuple[str, str, str | None, str]] = [
    # (id, command, config text (None: no file), regex on the output)
    ("basis-missing-config", "basis", None, r"no such config file"),
    ("basis-empty-config", "basis", "", r"config file is empty"),
    ("basis-config-is-a-list", "basis", "- lib\n- pca\n", r"a config is a mapping of fields, not a list"),
    ("basis-invalid-yaml", "basis", "model: {name: modadd\n", r"not valid YAML"),
    ("basis-unknown-field", "basis", "methds: [lib]\n", r"methds\s+Extra inputs are not permitted"),
    ("basis-unknown-method", "basis", FACTORY + LAYERS_YAML + "methods: [lib, lob]\n", r"lob"),
    ("basis-unknown-model", "basis", "model: {name: resnet}\n", r"unknown model 'resnet'"),
    ("basis-factory-not-importable", "basis", "model: {name: 'no_such_module:make'}\n" + LAYERS_YAML,
     r"cannot load model factory 'no_such_module:make'"),
    ("basis-bad-split", "basis", "model: {name: modadd, split: validation}\n", r"split"),
    ("basis-zero-limit", "basis", "model: {name: modadd, limit: 0}\n", r"limit"),
    ("basis-bad-dtype", "basis", "model: {name: modadd, dtype: float16}\n", r"dtype"),
    ("basis-unknown-option", "basis", FACTORY + LAYERS_YAML + "options: {centre: true}\n", r"centre"),
    ("basis-command-owned-option", "basis", FACTORY + LAYERS_YAML + "options: {method: pca}\n", r"method"),
    ("basis-no-node-layers-for-own-model", "basis", FACTORY, r"node_layers must be given"),
    ("basis-unknown-node-layer", "basis", FACTORY + "node_layers: [fc9, output]\n", r"fc9"),
    ("basis-integer-inputs", "basis", INTEGER + LAYERS_YAML, r"integer inputs"),
    ("basis-wrong-width", "basis", WIDE + LAYERS_YAML, r"do not fit the model"),
    ("graph-unknown-method", "graph", FACTORY + LAYERS_YAML + "methods: [pcaa]\n", r"pcaa"),
    ("graph-bad-modules-epsilon", "graph", FACTORY + LAYERS_YAML + "modules: {epsilon: tiny}\n",
     r"invalid config"),
    ("graph-unknown-edges-option", "graph", FACTORY + LAYERS_YAML + "edges: {batchsize: 8}\n", r"batchsize"),
    ("graph-unknown-ablation-field", "graph", FACTORY + LAYERS_YAML + "ablation: {delt: 0.1}\n", r"delt"),
    ("graph-integer-inputs", "graph", INTEGER + LAYERS_YAML, r"integer inputs"),
    ("degeneracy-negative-epsilon", "degeneracy", FACTORY + "epsilon: -1.0\n", r"epsilon"),
    ("degeneracy-unknown-field", "degeneracy", FACTORY + "hesian: exact\n", r"hesian"),
    ("degeneracy-wrong-width", "degeneracy", WIDE, r"do not fit the model"),
    ("basis-factory-returns-a-model-only", "basis", "model: {name: 'tests.test_bad_inputs:not_a_pair'}\n"
     + LAYERS_YAML, r"\(model, data\)"),
    ("llc-unknown-field", "llc", FACTORY + "los: kl\n", r"los"),
    ("llc-bad-sampler-field", "llc", FACTORY + "sampler: {num_chain: 2}\n", r"num_chain"),
    ("basis-option-of-the-wrong-type", "basis", FACTORY + LAYERS_YAML + "options: {center: maybe}\n",
     r"option 'center' of interaction_basis must be bool, got 'maybe'"),
    ("basis-option-out-of-range", "basis", FACTORY + LAYERS_YAML + "options: {batch_size: 0}\n",
     r"batch_size must be positive"),
    ("graph-basis-option-of-the-wrong-type", "graph", FACTORY + LAYERS_YAML
     + "basis: {gram_threshold: tiny}\n",
     r"option 'gram_threshold' of interaction_basis must be float"),
    ("graph-edges-option-out-of-range", "graph", FACTORY + LAYERS_YAML + "edges: {batch_size: -3}\n",
     r"edges options: batch_size must be positive"),
    ("graph-edges-unknown-integration-rule", "graph", FACTORY + LAYERS_YAML
     + "edges: {integration_rule: simpson}\n", r"unknown integration rule 'simpson'"),
    ("llc-volume-method-on-too-many-parameters", "llc", FACTORY + "method: volume\nepsilons: [0.1]\n",
     r"method: volume handles at most 12 parameters, this model has 83"),
    ("llc-volume-option-of-the-wrong-type", "llc", FACTORY + "method: volume\nepsilons: [0.1]\n"
     "params: [fc2.bias]\nvolume_options: {num_points: many}\n", r"'num_points' of volume_llc must be int"),
    ("llc-unknown-volume-option", "llc", FACTORY + "method: volume\nepsilons: [0.1]\n"
     "params: [fc2.bias]\nvolume_options: {num_point: 9}\n", r"unknown volume_options \['num_point'\]"),
    ("graph-basis-file-of-another-method", "graph", FACTORY + LAYERS_YAML + "methods: [lib]\n"
     "basis_files: {pca: x.safetensors}\n", r"not among methods"),
]


@pytest.mark.parametrize(("command", "text", "pattern"), [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_bad_input(tmp_path: Path, command: str, text: str | None, pattern: str) -> None:
    config = tmp_path / f"{command}.yaml"
    if text is not None:
        config.write_text(text)
    result = CliRunner().invoke(app, [command, str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert re.search(r"^error: ", result.output, re.M), result.output
    assert "finished in" not in result.output  # found before any stage ran
    assert "Traceback" not in result.output
    assert re.search(pattern, result.output, re.S), result.output


def test_cli_fails_before_any_stage_runs(tmp_path: Path) -> None:
    """A bad option of the second method is found before the first basis is built."""
    config = tmp_path / "basis.yaml"
    config.write_text(FACTORY + LAYERS_YAML + "methods: [pca, lib, lob]\n")
    result = CliRunner().invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "lob" in result.output
    assert not (tmp_path / "run" / "stages").exists()


def test_the_suite_has_at_least_sixty_cases() -> None:
    assert len(LIBRARY) + len(CLI) >= 60, len(LIBRARY) + len(CLI)


def test_json_results_never_hold_nan_tokens(tmp_path: Path) -> None:
    path = save_json(tmp_path / "r.json", "example", {"llc": [1.0, float("nan")], "beta": float("-inf")})
    text = path.read_text()
    assert not re.search(r"\bNaN\b|Infinity", text)
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    loaded = load_json(path, kind="example")
    assert loaded["llc"][0] == 1.0 and loaded["beta"] == -float("inf")
    assert loaded["llc"][1] != loaded["llc"][1]  # NaN


def test_cli_exits_1_when_a_stage_has_no_valid_result(tmp_path: Path, monkeypatch) -> None:
    """A summary with NaN (a stage without a valid number) exits 1, its JSON holds null, not NaN."""
    import degeneracy.commands.basis as basis_command

    def broken(cfg, out, **_):  # a stage whose result came out NaN
        return {}, {"lib": {"dims": {"fc1": 3}, "seconds": float("nan")}}

    monkeypatch.setattr(basis_command, "build_bases", broken)
    config = tmp_path / "basis.yaml"
    config.write_text(FACTORY + LAYERS_YAML)
    result = CliRunner().invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert "1 of its results are not finite numbers" in result.output and "lib/seconds (nan)" in result.output
    printed = result.output[result.output.index("{") : result.output.rindex("}") + 1]
    assert json.loads(printed)["lib"]["seconds"] is None and "NaN" not in printed


def test_cli_exits_0_on_a_valid_run(tmp_path: Path) -> None:
    config = tmp_path / "basis.yaml"
    config.write_text(FACTORY + LAYERS_YAML + "methods: [pca]\n")
    result = CliRunner().invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
