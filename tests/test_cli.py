"""The command line: config validation, a basis build from a config file, and the resume helper."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import degeneracy
from degeneracy.commands import app
from degeneracy.commands.resume import run_stage, stage_path
from tests.conftest import mlp

runner = CliRunner()


def tiny_factory():
    """A model factory for configs: ``model: {name: tests.test_cli:tiny_factory}``."""
    torch.manual_seed(0)
    return mlp([5, 8, 7, 3]), torch.randn(64, 5, dtype=torch.float64)


def test_basis_command_builds_and_saves(tmp_path) -> None:
    config = tmp_path / "basis.yaml"
    config.write_text(
        "model: {name: 'tests.test_cli:tiny_factory'}\n"
        "node_layers: [fc1, fc2, output]\n"
        "methods: [lib, pca]\n"
        "options: {center: true, progress: false}\n"
    )
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lib = degeneracy.load_basis(tmp_path / "run" / "bases" / "lib.safetensors")
    assert lib.names == ["fc1", "fc2", "output"]
    assert (tmp_path / "run" / "figures" / "spectra.png").stat().st_size > 1000


def test_config_rejects_unknown_fields(tmp_path) -> None:
    config = tmp_path / "basis.yaml"
    config.write_text("model: {name: modadd}\nmethod: [lib]\n")
    result = runner.invoke(app, ["basis", str(config)])
    assert result.exit_code == 2
    assert "Extra inputs are not permitted" in result.output
    assert "method" in result.output


def test_missing_config_and_bad_model(tmp_path) -> None:
    result = runner.invoke(app, ["basis", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such config file" in result.output
    config = tmp_path / "basis.yaml"
    config.write_text("model: {name: not_a_model}\nnode_layers: [a]\n")
    result = runner.invoke(app, ["basis", str(config)])
    assert result.exit_code == 2 and "unknown model 'not_a_model'" in result.output


def test_basis_rerun_skips_finished_bases_and_reruns_on_a_changed_config(tmp_path) -> None:
    config = tmp_path / "basis.yaml"
    text = (
        "model: {name: 'tests.test_cli:tiny_factory'}\n"
        "node_layers: [fc1, fc2, output]\n"
        "methods: [lib, pca]\n"
        "options: {center: true, progress: false}\n"
    )
    config.write_text(text)
    out = tmp_path / "run"
    assert runner.invoke(app, ["basis", str(config), "--out", str(out)]).exit_code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "bases").glob("*.safetensors")}
    again = runner.invoke(app, ["basis", str(config), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "[basis.lib] done before with the same config, skipping" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "bases").glob("*.safetensors")} == stamps
    # a changed option rebuilds (and says which key changed); --force rebuilds too
    config.write_text(text.replace("[lib, pca]", "[lib]").replace("center: true", "gram_threshold: 1.0e-6"))
    changed = runner.invoke(app, ["basis", str(config), "--out", str(out)])
    assert changed.exit_code == 0
    assert "[basis.lib] recomputing: its config changed (options.center, options.gram_threshold)" in (
        changed.output
    )
    assert (out / "bases" / "lib.safetensors").stat().st_mtime_ns != stamps["lib.safetensors"]
    forced = runner.invoke(app, ["basis", str(config), "--out", str(out), "--force"])
    assert forced.exit_code == 0 and "[basis.lib] recomputing (--force)" in forced.output
    # a basis file gone behind the record's back is rebuilt, not a traceback
    (out / "bases" / "lib.safetensors").write_bytes(b"not a safetensors file")
    broken = runner.invoke(app, ["basis", str(config), "--out", str(out)])
    assert broken.exit_code == 0 and "its stored result cannot be read" in broken.output
    assert degeneracy.load_basis(out / "bases" / "lib.safetensors").names == ["fc1", "fc2", "output"]


# --- the resume helper ---------------------------------------------------------------------------------


class Calls:
    """A stage function that counts its calls."""

    def __init__(self, value):
        self.value, self.n = value, 0

    def __call__(self):
        self.n += 1
        return self.value


def test_resume_skips_a_stage_with_the_same_config(tmp_path) -> None:
    lines: list[str] = []
    run = Calls({"y": [1, 2]})
    first = run_stage(tmp_path, "square", {"x": (1, 2), "opts": {"a": 1}}, run, log=lines.append)
    again = run_stage(tmp_path, "square", {"opts": {"a": 1}, "x": [1, 2]}, run, log=lines.append)
    assert run.n == 1 and first == again == {"y": [1, 2]}
    assert "skipping" in lines[-1]
    record = json.loads(stage_path(tmp_path, "square").read_text())
    assert record["config"] == {"opts": {"a": 1}, "x": [1, 2]} and record["result"] == {"y": [1, 2]}
    assert run_stage(tmp_path, "square", {"x": [1, 2], "opts": {"a": 1}}, run, force=True, log=None)
    assert run.n == 2


def test_resume_reruns_a_stage_whose_config_changed(tmp_path) -> None:
    lines: list[str] = []
    run_stage(tmp_path, "s", {"x": 1, "y": 2}, Calls({"v": 1}), log=None)
    run = Calls({"v": 2})
    assert run_stage(tmp_path, "s", {"x": 1, "y": 3}, run, log=lines.append) == {"v": 2}
    assert run.n == 1 and "its config changed (y)" in lines[0]
    assert json.loads(stage_path(tmp_path, "s").read_text())["config"] == {"x": 1, "y": 3}


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"format": "degeneracy-stage/1", "config": {"x"', "unreadable"),  # cut off mid-write
        ("[1, 2, 3]", "not a stage record"),  # someone else's JSON
        ('{"format": "degeneracy-stage/1", "result": {}}', "incomplete"),
        (b"\xff\xfe\x00binary", "unreadable"),
    ],
)
def test_resume_recomputes_a_partial_or_foreign_stage_file(tmp_path, content, reason) -> None:
    path = stage_path(tmp_path, "s")
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    lines: list[str] = []
    run = Calls({"v": 1})
    assert run_stage(tmp_path, "s", {"x": 1}, run, log=lines.append) == {"v": 1}
    assert run.n == 1 and reason in lines[0]
    assert run_stage(tmp_path, "s", {"x": 1}, run, log=None) == {"v": 1} and run.n == 1  # now resumable


def test_resume_with_result_files_reloads_them_and_recomputes_when_they_break(tmp_path) -> None:
    def save(value):
        (tmp_path / "value.txt").write_text(str(value))
        return {"file": "value.txt"}

    def load(record):
        text = (tmp_path / record["file"]).read_text()
        if not text.isdigit():
            raise ValueError("not a number")
        return int(text)

    run = Calls(41)
    assert run_stage(tmp_path, "n", {"k": 1}, run, save=save, load=load, log=None) == 41
    assert run_stage(tmp_path, "n", {"k": 1}, run, save=save, load=load, log=None) == 41 and run.n == 1
    (tmp_path / "value.txt").write_text("garbage")
    assert run_stage(tmp_path, "n", {"k": 1}, run, save=save, load=load, log=None) == 41 and run.n == 2
    (tmp_path / "value.txt").unlink()
    assert run_stage(tmp_path, "n", {"k": 1}, run, save=save, load=load, log=None) == 41 and run.n == 3
    with pytest.raises(ValueError, match="stage name"):
        run_stage(tmp_path, "../escape", {}, run, log=None)


def test_no_library_module_imports_the_commands_and_report_takes_results_only() -> None:
    """commands -> report -> library, never back: no cycle, and ``import degeneracy`` stays light."""
    root = Path(degeneracy.__file__).parent
    for path in root.rglob("*.py"):
        if "commands" in path.relative_to(root).parts or path.name == "__main__.py":
            continue
        text = path.read_text()
        assert "degeneracy.commands" not in text, path
        assert "degeneracy.cli" not in text and "runconfig" not in text, path
    code = "import sys, degeneracy, degeneracy.report.markdown; print('degeneracy.commands' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "degeneracy", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo", "basis", "graph", "degeneracy", "llc"):
        assert command in out.stdout


def test_degeneracy_command_rerun_skips_and_a_changed_epsilon_reruns(tmp_path) -> None:
    config = tmp_path / "deg.yaml"
    config.write_text("model: {name: 'tests.test_cli:tiny_factory'}\nhessian: exact\nsparsify: false\n")
    out = tmp_path / "run"
    first = runner.invoke(app, ["degeneracy", str(config), "--out", str(out)])
    assert first.exit_code == 0, first.output
    stamp = (out / "degeneracy_report.json").stat().st_mtime_ns
    again = runner.invoke(app, ["degeneracy", str(config), "--out", str(out)])
    assert again.exit_code == 0 and "[degeneracy] done before with the same config" in again.output
    assert "Hessian nullity (exact)" in again.output  # the stored summary prints the same table
    assert (out / "degeneracy_report.json").stat().st_mtime_ns == stamp
    config.write_text(config.read_text() + "epsilon: 1.0e-8\n")
    changed = runner.invoke(app, ["degeneracy", str(config), "--out", str(out)])
    assert changed.exit_code == 0 and "its config changed (epsilon)" in changed.output


def test_graph_reuses_bases_only_when_their_config_matches(tmp_path) -> None:
    """The graph command's bases are stages too: a basis built with other options is rebuilt, and every
    stage built on it (edges, modules) follows."""
    config = tmp_path / "graph.yaml"
    text = (
        "model: {name: 'tests.test_cli:tiny_factory'}\n"
        "node_layers: [fc1, fc2, output]\n"
        "methods: [lib]\n"
        "basis: {progress: false}\n"
        "modules: {epsilon: relative, methods: []}\n"
    )
    config.write_text(text)
    out = tmp_path / "run"
    assert runner.invoke(app, ["graph", str(config), "--out", str(out)]).exit_code == 0
    again = runner.invoke(app, ["graph", str(config), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "[basis.lib] done before" in again.output and "[edges.lib] done before" in again.output
    config.write_text(text.replace("{progress: false}", "{progress: false, gram_threshold: 1.0e-6}"))
    changed = runner.invoke(app, ["graph", str(config), "--out", str(out)])
    assert changed.exit_code == 0, changed.output
    assert "[basis.lib] recomputing: its config changed (options.gram_threshold)" in changed.output
    assert "[edges.lib] recomputing: its config changed (basis.options.gram_threshold)" in changed.output


@pytest.mark.parametrize(
    ("command", "field"),
    [("basis", "methods"), ("graph", "ablation.delta"), ("degeneracy", "hessian_k"), ("llc", "epsilons")],
)
def test_command_help_lists_the_config_fields(command: str, field: str) -> None:
    """``degeneracy COMMAND --help`` names the config class and its fields (and shows no doctest)."""
    from typer.testing import CliRunner

    from degeneracy.commands import app

    result = CliRunner().invoke(app, [command, "--help"])
    text = " ".join(result.output.split())  # the help is wrapped to the terminal
    assert result.exit_code == 0
    assert "Config fields (" in text and f"{field} (" in text
    assert ">>>" not in text


@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        ("basis", "", "config file is empty"),
        ("basis", "methods: [lib, pac]\n", "unknown basis method 'pac'"),
        ("basis", "options: {centre: true}\n", "unknown option 'centre' of interaction_basis"),
        ("graph", "edges: {integration_rul: trapezoid}\n", "unknown option 'integration_rul'"),
        ("graph", "basis: {method: pca}\n", "set by the command"),
    ],
)
def test_config_mistakes_fail_before_any_work(tmp_path, command: str, text: str, message: str) -> None:
    """An empty config, a misspelled method or option: one clear line and exit code 2, before any model
    is loaded (the model named here does not exist, so reaching it would fail differently)."""
    config = tmp_path / "run.yaml"
    config.write_text(text + ("model: {name: no.such.module:factory}\n" if text else ""))
    result = CliRunner().invoke(app, [command, str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()
