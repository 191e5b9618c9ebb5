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


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or shutil.which("torchrun") is None, reason="no torchrun")
def test_graph_command_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    config = tmp_path / "graph.yaml"
    config.write_text(CONFIG)
    one = CliRunner().invoke(app, ["graph", str(config), "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    two = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "degeneracy", "graph", str(config),
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    printed = json.loads(two.stdout)  # rank 0 alone prints the summary (one JSON document)
    assert printed["n_examples"] == 150

    files = sorted(p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*"))
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

    again = subprocess.run(  # a rerun with the same config: every rank skips every stage alike
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "degeneracy", "graph", str(config),
         "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done before with the same config") == 2 * 5  # 5 stages on 2 ranks
