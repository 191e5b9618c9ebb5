"""The ``device`` option: in the library (``interaction_basis``/``interaction_graph``/``ModelRun``) and in the
run configs of the basis, graph and degeneracy commands (validated, defaulting to ``cuda:LOCAL_RANK``
under ``torchrun`` with CUDA). No GPU is needed: the plumbing is checked on the CPU."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

import degeneracy
from degeneracy.commands import app
from degeneracy.commands.config import BasisRunConfig, DegeneracyRunConfig, GraphRunConfig
from degeneracy.commands.placement import place, run_device
from degeneracy.run import ModelRun, available_devices, resolve_device
from tests.conftest import mlp

LAYERS = ["fc1", "fc2", "output"]


def _problem():
    torch.manual_seed(0)
    return mlp([5, 8, 7, 3]), torch.randn(16, 5, dtype=torch.float64)


def test_library_device_cpu_gives_the_same_results_and_bad_devices_are_named() -> None:
    model, x = _problem()
    B = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    Bc = degeneracy.interaction_basis(model, x, LAYERS, device="cpu", progress=False)
    G = degeneracy.interaction_graph(model, x, B, progress=False)
    Gc = degeneracy.interaction_graph(model, x, Bc, device=torch.device("cpu"), progress=False)
    for name in LAYERS:
        assert torch.equal(Bc[name].C, B[name].C) and Bc[name].C.device.type == "cpu"
    for pair in G.pairs:
        assert torch.equal(Gc.edges[pair], G.edges[pair])
    with pytest.raises(ValueError, match=r"unknown device 'gpu': use one of \['cpu'"):
        degeneracy.interaction_basis(model, x, LAYERS, device="gpu", progress=False)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        degeneracy.interaction_graph(model, x, B, device="tpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            resolve_device("cuda:0")
    assert resolve_device("cpu:0") == torch.device("cpu") and available_devices()[0] == "cpu"


def test_model_run_moves_a_copy_only_when_asked() -> None:
    model, x = _problem()
    same = ModelRun(model, x, device="cpu")
    assert same.model is model and same.device == torch.device("cpu")  # already there: no copy
    cast = ModelRun(model, x.float(), dtype="float32", device="cpu")
    assert cast.model is not model and next(model.parameters()).dtype == torch.float64  # caller's intact
    assert next(cast.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("config", [BasisRunConfig, GraphRunConfig, DegeneracyRunConfig])
def test_run_configs_validate_the_device(config) -> None:
    assert config.model_validate({"device": "cpu"}).device == "cpu"
    assert config.model_validate({}).device is None
    with pytest.raises(ValidationError, match=r"unknown device 'gpu': use one of \['cpu'"):
        config.model_validate({"device": "gpu"})


def test_default_device_is_the_local_rank_gpu_under_torchrun(monkeypatch) -> None:
    """No ``device``: ``cuda:LOCAL_RANK`` when torchrun set LOCAL_RANK and CUDA is available; the model's
    own device (``None``) otherwise; an explicit device wins."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_device(None) is None and run_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_device(None) is None  # no CUDA: where the model is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert run_device(None) == torch.device("cuda", 1)
    assert run_device("cpu") == torch.device("cpu")


def test_place_moves_the_model_and_every_tensor_of_the_data() -> None:
    model, x = _problem()
    labels = torch.zeros(16, dtype=torch.long)
    moved, data = place(model, (x, {"mask": labels}), torch.device("cpu"))
    assert moved is model and torch.equal(data[0], x) and torch.equal(data[1]["mask"], labels)
    assert place(model, x, None) == (model, x)


def test_commands_take_a_device_and_it_is_not_part_of_the_stage_config(tmp_path) -> None:
    """``device: cpu`` runs; a bad device fails before any work; a finished degeneracy stage is reused
    when only the device changes (where it runs does not change what it computes)."""
    runner = CliRunner()
    config = tmp_path / "basis.yaml"
    config.write_text("model: {name: 'tests.test_cli:tiny_factory'}\nnode_layers: [fc1, fc2, output]\n"
                      "methods: [pca]\ndevice: cpu\n")  # fmt: skip
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "basis")])
    assert result.exit_code == 0, result.output
    config.write_text(config.read_text().replace("device: cpu", "device: gpu"))
    result = runner.invoke(app, ["basis", str(config), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "unknown device 'gpu'" in result.output
    assert not (tmp_path / "bad").exists()
    config = tmp_path / "deg.yaml"
    text = "model: {name: 'tests.test_cli:tiny_factory'}\nhessian: none\nsparsify: false\n"
    config.write_text(text + "device: cpu\n")
    first = runner.invoke(app, ["degeneracy", str(config), "--out", str(tmp_path / "deg")])
    assert first.exit_code == 0, first.output
    config.write_text(text)
    again = runner.invoke(app, ["degeneracy", str(config), "--out", str(tmp_path / "deg")])
    assert again.exit_code == 0 and "[degeneracy] done before with the same config" in again.output


def test_model_run_casts_a_hooked_transformer_copy():
    """``dtype=`` (and ``device=``) copy a TransformerLens model too, whose ``.to`` takes no ``dtype=``
    keyword; the caller's model is left as it was."""
    pytest.importorskip("transformer_lens")
    from degeneracy.models import load_modadd, modadd_all_inputs

    model = load_modadd()
    inputs, _ = modadd_all_inputs()
    run = ModelRun(model, inputs[:4], dtype="float64", device="cpu")
    assert next(run.model.parameters()).dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32
