"""Resume after ``kill -9``: every command, killed at several points, leaves no partial file, and a rerun
skips the finished stages, recomputes the unfinished ones and those whose config changed, and says which;
``--force`` redoes all.

Each run is a subprocess (``python -m degeneracy``) that SIGKILLs itself at a chosen point through the
``DEGENERACY_TEST_KILL`` hook (:func:`degeneracy.io.kill_point`): ``STAGE@start``, ``STAGE@saved`` (result
files written, record not), ``STAGE@done`` or ``FILE@write`` (temporary copy written, not moved).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import degeneracy
from degeneracy.io import KILL_ENV
from tests.conftest import mlp

pytestmark = pytest.mark.slow  # each subprocess imports torch: several seconds apiece

ROOT = Path(__file__).resolve().parents[1]


def factory():
    """``model: {name: 'tests.test_resume_kill:factory'}``: a tiny MLP, inputs and labels."""
    torch.manual_seed(0)
    model = mlp([4, 6, 5, 3])
    x = torch.randn(48, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, (x, model(x).argmax(-1))


def inputs_factory():
    """The same model and inputs, without labels (for the basis command)."""
    model, (x, _) = factory()
    return model, x


MODEL = "model: {name: 'tests.test_resume_kill:inputs_factory'}\nnode_layers: [fc1, fc2, output]\n"
GRAPH = MODEL.replace("inputs_factory", "factory") + (
    "methods: [lib]\nablation: {node_points: 3, delta: 0.01}\nmodules: {epsilon: ablation}\n"
)
GRAPH_STAGES = ["basis.lib", "edges.lib", "node_ablation.lib", "edge_ablation.lib", "modules.lib"]


def run(command: str, config: Path, out: Path, kill: str | None = None, *extra: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.pop(KILL_ENV, None)
    if kill:
        env[KILL_ENV] = kill
    done = subprocess.run(
        [sys.executable, "-m", "degeneracy", command, str(config), "--out", str(out), *extra],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    return done.returncode, done.stderr


def said(log: str) -> dict[str, str]:
    """What the run said of each stage: ``skipping``, ``running``, ``recomputing...``."""
    found = {}
    for name, line in re.findall(r"^\[([\w.\-]+)\] (.*)$", log, re.M):
        if line.startswith("done before"):
            found.setdefault(name, "skipping")
        elif line.startswith(("running", "recomputing")):
            found.setdefault(name, line.removesuffix(" ..."))
    return found


def partial_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def check_result_files(out: Path) -> None:
    """Every result file that exists is complete (loads, checksum and all)."""
    for path in out.rglob("*.safetensors"):
        (degeneracy.load_graph if path.parent.name == "graphs" else degeneracy.load_basis)(path)
    for path in (out / "stages").glob("*.json"):
        assert path.read_text().rstrip().endswith("}")


@pytest.mark.parametrize(
    ("kill", "finished"),
    [
        ("edges.lib@start", ["basis.lib"]),
        ("edges.lib@saved", ["basis.lib"]),  # the graph file is there, its record is not: redone
        ("node_ablation.lib@done", ["basis.lib", "edges.lib", "node_ablation.lib"]),
        ("lib.safetensors@write", []),  # killed while writing the first basis file
    ],
)
def test_graph_killed_then_resumed(tmp_path: Path, kill: str, finished: list[str]) -> None:
    config, out = tmp_path / "graph.yaml", tmp_path / "run"
    config.write_text(GRAPH)
    code, log = run("graph", config, out, kill)
    assert code == -signal.SIGKILL, log
    check_result_files(out)
    if kill.endswith("@write"):
        assert partial_files(out) and not (out / "bases" / "lib.safetensors").exists()  # never half a file
    code, log = run("graph", config, out)
    assert code == 0, log
    assert not partial_files(out), partial_files(out)
    stages = said(log)
    assert [s for s in GRAPH_STAGES if stages[s] == "skipping"] == finished, log
    assert all(stages[s] == "running" for s in GRAPH_STAGES if s not in finished), log
    check_result_files(out)


def test_graph_changed_config_recomputes_only_what_depends_on_it_and_force_redoes_all(tmp_path) -> None:
    config, out = tmp_path / "graph.yaml", tmp_path / "run"
    config.write_text(GRAPH)
    assert run("graph", config, out)[0] == 0
    config.write_text(GRAPH.replace("delta: 0.01", "delta: 0.02"))
    code, log = run("graph", config, out)
    stages = said(log)
    assert code == 0 and [s for s in GRAPH_STAGES if stages[s] == "skipping"] == GRAPH_STAGES[:3], log
    assert stages["edge_ablation.lib"] == "recomputing: its config changed (delta)", log
    assert stages["modules.lib"].startswith("recomputing: its config changed"), log
    code, log = run("graph", config, out, None, "--force")
    assert code == 0 and all(said(log)[s] == "recomputing (--force)" for s in GRAPH_STAGES), log


def test_basis_killed_between_methods_resumes_with_the_unfinished_one(tmp_path) -> None:
    config, out = tmp_path / "basis.yaml", tmp_path / "run"
    config.write_text(MODEL + "methods: [lib, pca, global]\n")
    code, _ = run("basis", config, out, "basis.pca@start")
    assert code == -signal.SIGKILL
    assert (out / "bases" / "lib.safetensors").exists() and not (out / "bases" / "pca.safetensors").exists()
    code, log = run("basis", config, out)
    assert code == 0, log
    assert said(log) == {"basis.lib": "skipping", "basis.pca": "running", "basis.global": "running"}, log
    config.write_text(MODEL + "methods: [lib, pca, global]\noptions: {center: false}\n")
    code, log = run("basis", config, out)
    assert code == 0 and set(said(log).values()) == {"recomputing: its config changed (options.center)"}, log


def test_degeneracy_killed_then_resumed(tmp_path) -> None:
    config, out = tmp_path / "deg.yaml", tmp_path / "run"
    config.write_text("model: {name: 'tests.test_cli:tiny_factory'}\nhessian: exact\nsparsify: false\n")
    code, _ = run("degeneracy", config, out, "degeneracy@start")
    assert code == -signal.SIGKILL and not (out / "stages" / "degeneracy.json").exists()
    code, log = run("degeneracy", config, out, "degeneracy@saved")  # computed, record not written
    assert code == -signal.SIGKILL and said(log) == {"degeneracy": "running"}
    code, log = run("degeneracy", config, out)
    assert code == 0 and said(log) == {"degeneracy": "running"}, log
    code, log = run("degeneracy", config, out)
    assert code == 0 and said(log) == {"degeneracy": "skipping"}, log
    assert not partial_files(out)


def test_llc_killed_then_resumed(tmp_path) -> None:
    config, out = tmp_path / "llc.yaml", tmp_path / "run"
    config.write_text(
        "model: {name: digits_mlp, split: test, limit: 200, dtype: float32}\nloss: behavioral\nsampler: "
        "{nbeta: 50, localization: 100, num_chains: 2, num_draws: 40, num_burnin: 10, batch_size: 64}\n"
        "nbetas: [20, 200]\nepsilons: [0.1]\nprogress: false\n"
    )
    code, _ = run("llc", config, out, "llc_curve@start")
    assert code == -signal.SIGKILL and (out / "stages" / "llc.json").exists()
    assert not (out / "stages" / "llc_curve.json").exists()
    code, log = run("llc", config, out)
    assert code == 0, log
    assert said(log) == {"llc": "skipping", "llc_curve": "running", "n_eff": "running"}, log
    assert not partial_files(out)


def test_demo_killed_then_resumed(tmp_path) -> None:
    """The demo (no config: its sections are stages) killed as its degeneracy section starts: a rerun
    skips the finished bases and graph sections and runs the rest; no partial file; a third run skips all."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}

    def demo(kill: str | None = None) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "degeneracy", "demo", "--out", str(out)],
            capture_output=True, text=True, cwd=ROOT, timeout=1800,
            env={**env, KILL_ENV: kill} if kill else {k: v for k, v in env.items() if k != KILL_ENV},
        )  # fmt: skip
        return done.returncode, done.stderr

    code, log = demo("degeneracy@start")
    assert code == -signal.SIGKILL, log
    assert not (out / "report.md").exists() and not partial_files(out)
    code, log = demo()
    assert code == 0, log
    sections = {k: v for k, v in said(log).items() if k in ("bases", "graph", "degeneracy", "llc")}
    want = {"bases": "skipping", "graph": "skipping", "degeneracy": "running", "llc": "running"}
    assert sections == want, log
    assert (out / "report.md").exists() and not partial_files(out)
    code, log = demo()
    assert code == 0 and set(said(log).values()) == {"skipping"}, log
