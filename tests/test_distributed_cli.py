"""The ``graph`` command under ``torchrun`` (2 processes, gloo) writes the single-process results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

import degeneracy
from degeneracy.commands import app

CONFIG = "model: {name: digits_mlp, limit: 150}\nmethods: [lib]\nablation: {node_points: 3}\n"
needs_torchrun = pytest.mark.skipif(
    not dist.is_available() or shutil.which("torchrun") is None, reason="no torchrun"
)


def torchrun(command: str, config: Path, out: Path) -> subprocess.CompletedProcess:
    """``python -m degeneracy COMMAND CONFIG --out OUT`` under torchrun (2 processes, one thread each),
    asserted to succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "degeneracy", command, str(config),
         "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_and_two_processes(tmp_path: Path, command: str, config_text: str) -> subprocess.CompletedProcess:
    """Run ``command`` on ``config_text`` in this process (into tmp_path/one) and under torchrun (into
    tmp_path/two); assert both succeed and write the same files; return the torchrun run."""
    config = tmp_path / f"{command}.yaml"
    config.write_text(config_text)
    one = CliRunner().invoke(app, [command, str(config), "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = torchrun(command, config, tmp_path / "two")
    files = sorted(p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*"))
    return two


@pytest.mark.slow
@needs_torchrun
def test_graph_command_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    two = one_and_two_processes(tmp_path, "graph", CONFIG)
    printed = json.loads(two.stdout)  # rank 0 alone prints the summary (one JSON document)
    assert printed["n_examples"] == 150

    g1 = degeneracy.load_graph(tmp_path / "one/graphs/lib.safetensors")
    g2 = degeneracy.load_graph(tmp_path / "two/graphs/lib.safetensors")
    for pair in g1.pairs:
        scale = float(g1.edges[pair].abs().max())
        torch.testing.assert_close(g2.edges[pair], g1.edges[pair], rtol=0.0, atol=1e-10 * scale)
    e1 = json.loads((tmp_path / "one/ablation/lib_edges.json").read_text())
    e2 = json.loads((tmp_path / "two/ablation/lib_edges.json").read_text())
    assert [r["num_needed"] for r in e2] == [r["num_needed"] for r in e1] and e1[0]["num_needed"] > 0
    n1 = json.loads((tmp_path / "one/ablation/lib_nodes.json").read_text())
    n2 = json.loads((tmp_path / "two/ablation/lib_nodes.json").read_text())
    assert {k: v["accuracy"] for k, v in n2.items()} == {k: v["accuracy"] for k, v in n1.items()}

    again = torchrun("graph", tmp_path / "graph.yaml", tmp_path / "two")  # a rerun: every rank skips alike
    assert again.stderr.count("done before with the same config") == 5  # 5 stages, said by rank 0 alone


@pytest.mark.slow
@needs_torchrun
def test_degeneracy_command_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    from degeneracy.accounting import load_degeneracy_report, load_hessian_spectrum

    one_and_two_processes(tmp_path, "degeneracy", "model: {name: digits_mlp, limit: 150}\nhessian: exact\n")
    r1 = load_degeneracy_report(tmp_path / "one/degeneracy_report.json")
    r2 = load_degeneracy_report(tmp_path / "two/degeneracy_report.json")
    assert r2.num_examples == r1.num_examples == 150 and r2.union == r1.union
    assert [(r.layer, r.source, r.count) for r in r2.rows] == [(r.layer, r.source, r.count) for r in r1.rows]
    assert (r2.hessian_rank, r2.hessian_nullity) == (r1.hessian_rank, r1.hessian_nullity)
    h1 = load_hessian_spectrum(tmp_path / "one/hessian_spectrum.json")
    h2 = load_hessian_spectrum(tmp_path / "two/hessian_spectrum.json")
    assert h1.gram_side == h2.gram_side == "outputs"  # the gathered Jacobian rows (n·rows < N)
    scale = float(h1.eigenvalues.abs().max())
    torch.testing.assert_close(h2.eigenvalues, h1.eigenvalues, rtol=0.0, atol=1e-10 * scale)
