"""JSON written by the package never holds NaN/Infinity tokens (standard JSON: ``null``), also where a
result is not a finite number: the demo's LLC summary and the HTML report's graph data (read by the
browser's JSON.parse, which rejects NaN)."""

from __future__ import annotations

import json
import re

import torch

import degeneracy
import degeneracy.commands.llc as llc_command
from degeneracy.llc import LLCCurve, sample_sgld
from degeneracy.report.html import write_html_report
from tests.conftest import mlp


def _strict(text: str):
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_demo_llc_summary_has_null_for_a_diverged_sweep(tmp_path, monkeypatch) -> None:
    result = sample_sgld(
        lambda w, _: w.square().sum(), torch.zeros(1, dtype=torch.float64), nbeta=10.0, step_size=1e-3,
        num_chains=1, num_draws=5, warn=False,
    )  # fmt: skip
    nan = torch.full((3,), float("nan"), dtype=torch.float64)
    nbetas = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    curve = LLCCurve(nbetas, nan, nan, nan, nan, nan, results=(result,))  # every chain diverged
    monkeypatch.setattr(llc_command, "llc_curve", lambda *a, **k: curve)
    monkeypatch.setattr(llc_command, "_plots", lambda *a, **k: {})
    summary = llc_command.llc_demo_section(torch.nn.Linear(2, 1), torch.zeros(4, 2), tmp_path)
    text = (tmp_path / "llc" / "summary.json").read_text()
    assert "NaN" not in text and _strict(text)["llc"] == [None, None, None]
    assert all(v != v for v in summary["llc"])  # the returned summary keeps the NaN


def test_html_graph_data_is_standard_json_when_an_edge_is_nan(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp([4, 6, 5, 3])
    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    basis = degeneracy.interaction_basis(model, x, ["fc1", "fc2", "output"], progress=False)
    graph = degeneracy.interaction_graph(model, x, basis, progress=False)
    pair = graph.pairs[0]
    graph.edges[pair][0, 0] = float("nan")
    graph.eigenvalues["fc1"][0] = float("nan")
    graph.save(tmp_path / "graph" / "graphs" / "lib.safetensors")
    page = write_html_report(tmp_path).read_text()
    match = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S)
    assert match, "the page carries no graph data"
    _strict(match.group(1).replace("<\\/", "</"))
