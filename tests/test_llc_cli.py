"""The ``llc`` command, its config, resumable stages, plots and the demo section."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import typer
from typer.testing import CliRunner

from degeneracy.commands.config import LLCRunConfig, ModelSpec, load_yaml, resolve_model
from degeneracy.commands.llc import llc_command, llc_demo_section, run_llc
from degeneracy.llc import EffectiveParameterCount, LLCCurve, LLCResult

pytestmark = pytest.mark.usefixtures("one_thread")


CONFIG = """
model: {name: digits_mlp, split: test, limit: 200, dtype: float32}
loss: behavioral
sampler: {nbeta: 50, localization: 100, num_chains: 2, num_draws: 40, num_burnin: 10, batch_size: 64}
nbetas: [20, 200]
epsilons: [0.1]
progress: false
"""


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("llc")(llc_command)
    app.command("noop")(lambda: None)  # two commands: typer then dispatches on the name
    return app


def test_llc_command_writes_results_and_resumes(tmp_path) -> None:
    config = tmp_path / "llc.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    runner = CliRunner()
    first = runner.invoke(_app(), ["llc", str(config), "--out", str(out)])
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimate"]["num_parameters"] == 3466 and summary["estimate"]["engine"] == "batched"
    assert len(summary["curve"]["llc"]) == 2 and len(summary["n_eff"]["n_eff"]) == 1
    result = LLCResult.load(out / "llc.safetensors")
    assert result.nbeta == 50.0 and result.loss_traces.shape == (2, 40)
    LLCCurve.load(out / "llc_curve.safetensors")
    EffectiveParameterCount.load(out / "n_eff.safetensors")
    assert (out / "figures" / "llc_traces.png").stat().st_size > 0
    assert (out / "figures" / "llc_n_eff.png").stat().st_size > 0
    # a rerun with the same config skips the finished stages (files untouched)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    second = runner.invoke(_app(), ["llc", str(config), "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == stamps
    # a changed setting reruns
    config.write_text(CONFIG.replace("num_draws: 40", "num_draws: 30"))
    assert runner.invoke(_app(), ["llc", str(config), "--out", str(out)]).exit_code == 0
    assert LLCResult.load(out / "llc.safetensors").loss_traces.shape == (2, 30)


def test_invalid_config_is_rejected_with_the_field_named(tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.replace("num_chains: 2", "num_chain: 2"))
    with pytest.raises(ValueError, match="num_chain"):
        load_yaml(config, LLCRunConfig)
    result = CliRunner().invoke(_app(), ["llc", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "num_chain" in result.output
    config.write_text(CONFIG.replace("loss: behavioral", "loss: hinge"))
    with pytest.raises(ValueError, match="loss"):
        load_yaml(config, LLCRunConfig)


def test_last_position_volume_method_and_factory_models(tmp_path) -> None:
    """A model factory 'module:function' returning (model, data); a sequence output reduced to its last
    position; the volume method for a model with few parameters."""
    module = tmp_path / "tiny_llc_factory.py"
    module.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Seq(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(2, 1)

                def forward(self, x):  # (batch, pos, 2) -> (batch, pos, 1)
                    return self.fc(x)

            def make():
                torch.manual_seed(0)
                return Seq(), torch.randn(16, 3, 2, generator=torch.Generator().manual_seed(0))
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        cfg = LLCRunConfig(
            model=ModelSpec(name="tiny_llc_factory:make", dtype="float64"),
            positions="last",
            sampler={
                "nbeta": 100.0,
                "localization": 0.0,
                "num_chains": 4,
                "num_draws": 400,
                "num_burnin": 100,
            },
            epsilons=[1e-4, 1e-2],
            method="volume",
            volume_options={"num_points": 500, "num_repeats": 2},
            plots=False,
            progress=False,
        )
        model, data, _ = resolve_model(cfg.model)
        summary = run_llc(cfg, model, data, tmp_path / "out")
    finally:
        sys.path.remove(str(tmp_path))
    # a linear layer with 3 parameters is regular: λ = 3/2 at every scale, by SGLD and by volume
    assert summary["estimate"]["llc"] == pytest.approx(1.5, rel=0.1)
    assert summary["n_eff"]["method"] == "volume"
    assert summary["n_eff"]["n_eff"] == pytest.approx([3.0, 3.0], rel=0.1)


def test_demo_section_is_quick_and_complete(tmp_path) -> None:
    model, data, _ = resolve_model(ModelSpec(name="digits_mlp", split="train", dtype="float32"))
    summary = llc_demo_section(model, data, tmp_path)
    assert summary["seconds"] < 30
    assert len(summary["n_eff"]) == 3 and all(v > 0 for v in summary["n_eff"])
    assert summary["n_eff"] == sorted(summary["n_eff"])  # more directions resolved at smaller ε
    assert not summary["warnings"]  # stationary chains at these settings
    assert summary["epsilons"] == sorted(summary["epsilons"], reverse=True)
    assert (tmp_path / "figures" / "llc_n_eff.png").exists()
    assert (tmp_path / "llc" / "summary.json").exists()


def test_core_import_does_not_pull_matplotlib() -> None:
    code = "import sys, degeneracy.llc, degeneracy.commands.llc; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_all_chains_diverged_exits_1_and_json_has_null_not_nan(tmp_path) -> None:
    """Issue 11: a stage with no valid estimate is an error (exit 1, a clear message) and the JSON on
    stdout and in summary.json holds null where the numbers are missing (never a bare NaN token)."""
    config = tmp_path / "llc.yaml"
    config.write_text(
        CONFIG.replace("localization: 100,", "localization: 100, step_size: 10.0,")
        .replace("nbetas: [20, 200]\n", "")
        .replace("epsilons: [0.1]\n", "")
        + "plots: false\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(_app(), ["llc", str(config), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "no valid estimate, every chain was excluded" in result.output and "step_size" in result.output

    def no_nan(token: str) -> float:
        raise AssertionError(f"bare {token} in the JSON")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_nan)
    assert summary["estimate"]["llc"] is None and summary["estimate"]["n_eff"] is None
    assert summary["errors"] and LLCResult.load(out / "llc.safetensors").num_good_chains == 0
    # the result file's JSON header too: null for the NaN estimate, read back as NaN
    raw = (out / "llc.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    texts = [t for t in header["__metadata__"].values() if '"kind"' in t]
    meta = json.loads(texts[0], parse_constant=no_nan)
    assert meta["mean"] is None and meta["std"] is None
    loaded = LLCResult.load(out / "llc.safetensors")
    assert math.isnan(loaded.mean) and math.isnan(loaded.std)


def test_progress_bar_ticks_per_step_with_an_eta_and_is_quiet_off_a_terminal(monkeypatch) -> None:
    import io

    import torch

    from degeneracy.llc.sgld import ParamLayout, SGLDConfig, run_sgld_chains

    def sample() -> None:
        config = SGLDConfig(nbeta=10.0, localization=0.0, step_size=1e-3, num_chains=2, num_draws=30)
        layout = ParamLayout(("w",), ((1,),))
        center = torch.zeros(1, dtype=torch.float64)
        loss = lambda v, _: v["w"].square().sum(1)  # noqa: E731
        run_sgld_chains(loss, layout, center, iter([None] * 30), config, progress=True)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        sample()
        text = stream.getvalue()
        assert bool(text) == shown
    assert "/30 [" in text and "step/s" in text and "<" in text  # counted in steps, with rate and ETA


def test_llc_command_estimates_the_training_loss_on_the_bundled_labels(tmp_path) -> None:
    """loss: cross_entropy takes the digits' labels: the same chains as estimate_llc on (inputs, labels)."""
    import torch

    from degeneracy.llc import estimate_llc
    from degeneracy.models import digits_dataset

    config = tmp_path / "llc.yaml"
    config.write_text(
        """
model: {name: digits_mlp, split: test, limit: 120, dtype: float64}
loss: cross_entropy
sampler: {nbeta: 50, localization: 100, step_size: 1e-4, num_chains: 2, num_draws: 20, num_burnin: 0,
          batch_size: 40}
plots: false
progress: false
"""
    )
    cfg = load_yaml(config, LLCRunConfig)
    model, data, _ = resolve_model(cfg.model)
    summary = run_llc(cfg, model, data, tmp_path / "out", log=None)
    _, _, x, y = digits_dataset(dtype=torch.float64)
    direct = estimate_llc(model, (x[:120], y[:120]), loss="cross_entropy", **cfg.sampler.model_dump())
    assert summary["estimate"]["llc"] == pytest.approx(direct.mean, rel=1e-12)
    assert LLCResult.load(tmp_path / "out" / "llc.safetensors").config["loss"] == "cross_entropy"


def test_llc_supervised_loss_without_labels_is_a_clear_error() -> None:
    import torch

    from degeneracy.commands.llc import labelled_data

    with pytest.raises(ValueError, match="need labels"):
        labelled_data(ModelSpec(name="toy:make"), torch.zeros(8, 2))
    pair = (torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
    assert labelled_data(ModelSpec(name="toy:make"), pair) is pair
