"""The command line: config validation and a basis build from a config file."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import degeneracy
from degeneracy.cli import app
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
