"""The HTML report (issue 12): sections for what a run folder holds, numbers traceable to its files, no
network reference, and the interactive graph checked in a real headless Chromium (the page's script
runs; the test fails if it breaks). Also the plain and notebook displays of the result classes.

The run folder is built in a second from a small float64 MLP in the demo's layout (``bases/``,
``graph/graphs``, ``graph/modules``, ``graph/fourier``, ``degeneracy/``, ``llc/``).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from chromium import Chromium, find_browser
from typer.testing import CliRunner

import degeneracy
from degeneracy.commands import app
from degeneracy.llc import sample_sgld
from degeneracy.report.html import write_html_report

LAYERS = ["fc0", "fc1", "fc2", "output"]


def mlp(widths: list[int], act: type[torch.nn.Module]) -> torch.nn.Sequential:
    """fc0, act0, fc1, ... (no activation after the last layer), float64."""
    parts: dict[str, torch.nn.Module] = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        parts[f"fc{i}"] = torch.nn.Linear(a, b)
        if i < len(widths) - 2:
            parts[f"act{i}"] = act()
    return torch.nn.Sequential(OrderedDict(parts)).double()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    model = mlp([6, 16, 16, 5], act=torch.nn.Tanh)
    x = torch.randn(256, 6, dtype=torch.float64)
    basis = degeneracy.interaction_basis(model, x, LAYERS, progress=False)
    basis.save(run / "bases" / "lib.safetensors")
    graph = degeneracy.interaction_graph(model, x, basis, progress=False)
    graph.save(run / "graph" / "graphs" / "lib.safetensors")
    modules = degeneracy.find_modules(graph, epsilon=1e-4, seed=0)
    modules.save(run / "graph" / "modules" / "lib.json")
    # the graph command's fourier/METHOD.json format: a made-up frequency per feature
    fourier = {
        "layers": {
            name: {"frequency": [i % 7 for i in range(d)], "fraction": [0.75] * d}
            for name, d in graph.dims.items()
        },
        "rows": [],
        "alignment": {"ami_active": 0.5, "num_active": 10, "ami": 0.25, "num_features": 40},
    }
    (run / "graph" / "fourier").mkdir()
    (run / "graph" / "fourier" / "lib.json").write_text(json.dumps(fourier))
    small = mlp([3, 4, 2], act=torch.nn.ReLU)
    report = degeneracy.degeneracy_report(small, torch.randn(64, 3, dtype=torch.float64))
    report.save(run / "degeneracy" / "degeneracy_report.json")
    result = sample_sgld(
        lambda w, _: w.square().sum(),
        torch.zeros(2, dtype=torch.float64),
        nbeta=100.0,
        step_size=1e-3,
        num_chains=2,
        num_draws=40,
        warn=False,
    )
    result.save(run / "llc" / "llc.safetensors")
    write_html_report(run)
    return run


@pytest.fixture(scope="module")
def page(run_dir: Path) -> str:
    return (run_dir / "report.html").read_text()


def _payload(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S)
    assert match, "the page carries no graph data"
    return json.loads(match.group(1).replace("<\\/", "</"))


def test_sections_for_what_the_run_holds_and_their_sources(run_dir: Path, page: str) -> None:
    ids = re.findall(r'<section id="([a-z]+)">', page)
    assert ids == ["bases", "graph", "modules", "accounting", "llc"]  # no ablations were saved
    for source in (
        "bases/lib.safetensors",
        "graph/graphs/lib.safetensors",
        "graph/modules/lib.json",
        "graph/fourier/lib.json",
        "degeneracy/degeneracy_report.json",
        "llc/llc.safetensors",
    ):
        assert f"<code>{source}</code>" in page, source
    assert "<th></th>" not in page and "<th> </th>" not in page  # every column has a header
    # numbers are the saved ones: d̂ per layer, the modularity, the Hessian-free counts, λ̂
    basis = degeneracy.load_basis(run_dir / "bases" / "lib.safetensors")
    bases_section = page.split('<section id="bases">')[1].split("</section>")[0]
    for name in LAYERS:
        assert re.search(rf"<td>{name}</td><td class=\"num\">{basis[name].width}</td>", bases_section), name
        assert f'<td class="num">{basis[name].dim}</td>' in bases_section
    modules = degeneracy.load_modules(run_dir / "graph" / "modules" / "lib.json")
    assert f"<b>{modules.modularity:.4g}</b><span>modularity Q</span>" in page
    report = degeneracy.load_degeneracy_report(run_dir / "degeneracy" / "degeneracy_report.json")
    assert f"<b>{report.num_parameters:,}</b><span>parameters N</span>" in page
    llc = degeneracy.load_llc(run_dir / "llc" / "llc.safetensors")
    assert f"<b>{llc.mean:.4g}</b>" in page


def test_graph_payload_is_the_saved_graph(run_dir: Path, page: str) -> None:
    data = _payload(page)
    graph = degeneracy.load_graph(run_dir / "graph" / "graphs" / "lib.safetensors")
    modules = degeneracy.load_modules(run_dir / "graph" / "modules" / "lib.json")
    # the constant direction (feature 0) is left out, as find_modules leaves it out
    assert len(data["nodes"]) == sum(d - 1 for d in graph.dims.values())
    nonzero = sum(int((e[1:, 1:] > 0).sum()) for e in graph.edges.values())
    assert len(data["edges"]) == nonzero and data["edges_left_out"] == 0
    strongest = max(float(e[1:, 1:].max()) for e in graph.edges.values())
    assert max(e[2] for e in data["edges"]) == pytest.approx(strongest, rel=1e-5)
    assert data["epsilon"] == pytest.approx([modules.epsilon[p] for p in graph.pairs], rel=1e-5)
    for node in data["nodes"]:
        name = LAYERS[node["layer"]]
        assert node["module"] == modules.labels.get((name, node["index"]), -1)
        assert node["eigenvalue"] == pytest.approx(float(graph.eigenvalues[name][node["index"]]), rel=1e-5)
        assert node["frequency"] == node["index"] % 7


def test_no_remote_reference(page: str) -> None:
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", page, re.I)
    assert "@import" not in page
    svgs = re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", page)
    assert svgs, "expected inline SVG figures"
    for svg in (base64.b64decode(s).decode() for s in svgs):
        # only namespace names (xmlns, RDF metadata) may be URLs: they are never fetched
        remote = set(re.findall(r"""([\w:-]+)=["'](?:https?:)?//""", svg))
        assert remote <= {"xmlns", "xmlns:xlink", "xmlns:dc", "xmlns:cc", "xmlns:rdf", "rdf:resource"}, remote
        assert "<image" not in svg and "<script" not in svg


def test_report_command_and_bad_folder(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "run" / "modules").mkdir(parents=True)  # a graph command's folder holding only modules
    (tmp_path / "run" / "graph_summary.json").write_text("{}")
    saved = (run_dir / "graph" / "modules" / "lib.json").read_text()
    (tmp_path / "run" / "modules" / "lib.json").write_text(saved)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "page.html")])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "page.html").read_text()
    assert re.findall(r'<section id="([a-z]+)">', written) == ["modules"]
    assert "<code>modules/lib.json</code>" in written
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


def _browser() -> str:
    binary = find_browser()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium-headless-shell is not installed (.ci/run installs it)")
        pytest.skip("no headless Chromium (apt-get install chromium-headless-shell); CI runs this test")
    return binary


FRAME = "new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => done(true))))"


def _move_slider(browser: Chromium, value: float) -> int:
    browser.evaluate(
        f"(() => {{ const s = document.getElementById('eps-slider'); s.value = {value}; "
        "s.dispatchEvent(new Event('input', {bubbles: true})); })()"
    )
    browser.evaluate_async(FRAME)
    return int(browser.evaluate("document.getElementById('graph-stats').dataset.edgesShown"))


def _expected_shown(data: dict, t: float) -> int:
    nodes = data["nodes"]
    return sum(1 for s, _, e in data["edges"] if e >= data["epsilon"][nodes[s]["layer"]] * 10**t)


def test_interactive_graph_in_headless_chromium(run_dir: Path, page: str) -> None:
    data = _payload(page)
    with Chromium(_browser()) as browser:
        browser.open((run_dir / "report.html").resolve().as_uri())
        stats = browser.evaluate("Object.assign({}, document.getElementById('graph-stats').dataset)")
        assert stats, "the graph script did not run"
        assert int(stats["nodes"]) == len(data["nodes"])
        assert int(stats["edgesShown"]) == _expected_shown(data, 0.0) > 0
        # the canvas really has the drawing: count non-white pixels
        inked = browser.evaluate(
            "(() => { const c = document.querySelector('#graph-view canvas');"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
            " for (let i = 0; i < d.length; i += 4) { if (d[i] < 250 || d[i+1] < 250 || d[i+2] < 250) n++; }"
            " return n; })()"
        )
        assert inked > 1000
        # the slider (a real input event) changes the edges shown, exactly as the thresholds say
        low, high = (
            float(browser.evaluate(f"document.getElementById('eps-slider').{k}")) for k in ("min", "max")
        )
        assert _move_slider(browser, low) == len(data["edges"])
        middle = round((low + high) / 2 / 0.05) * 0.05
        shown = _move_slider(browser, middle)
        assert shown == _expected_shown(data, middle)
        assert _move_slider(browser, high) == 0 < shown < len(data["edges"])
        _move_slider(browser, 0.0)
        # hover a feature: the tooltip names its layer, index, eigenvalue, module and frequency
        node_id = max(range(len(data["nodes"])), key=lambda k: data["nodes"][k]["eigenvalue"])
        node = data["nodes"][node_id]
        browser.evaluate("document.getElementById('graph').scrollIntoView()")
        x, y = browser.evaluate(
            f"(() => {{ const r = document.querySelector('#graph-view canvas').getBoundingClientRect();"
            f" const p = window.degeneracyGraph.nodePosition({node_id});"
            " return [r.left + p[0], r.top + p[1]]; })()"
        )
        browser.mouse("mouseMoved", x, y)
        tip = browser.evaluate(
            "(() => { const t = document.getElementById('graph-tooltip');"
            " return t.hidden ? null : t.innerText; })()"
        )
        assert tip is not None, "no tooltip on hover"
        assert f"layer: {LAYERS[node['layer']]}" in tip and f"feature index: {node['index']}" in tip
        assert f"module (saved): {node['module']}" in tip or node["module"] < 0
        assert f"dominant frequency: {node['frequency']}" in tip
        # click it: its incoming and outgoing edges at this ε are highlighted and counted
        browser.mouse("mousePressed", x, y)
        browser.mouse("mouseReleased", x, y)
        stats = browser.evaluate("Object.assign({}, document.getElementById('graph-stats').dataset)")
        nodes = data["nodes"]
        shown = [(s, t) for s, t, e in data["edges"] if e >= data["epsilon"][nodes[s]["layer"]]]
        assert int(stats["selectedIn"]) == sum(1 for _, t in shown if t == node_id)
        assert int(stats["selectedOut"]) == sum(1 for s, _ in shown if s == node_id)
        # colour by connected components: recomputed in the page, counted here by union-find
        browser.evaluate("document.querySelector('input[name=colour-by][value=components]').click()")
        parent = list(range(len(nodes)))

        def root(a: int) -> int:
            while parent[a] != a:
                a = parent[a]
            return a

        for s, t in shown:
            parent[root(s)] = root(t)
        sizes: dict[int, int] = {}
        for k in range(len(nodes)):
            sizes[root(k)] = sizes.get(root(k), 0) + 1
        groups = browser.evaluate("document.getElementById('graph-stats').dataset.groups")
        assert int(groups) == sum(1 for n in sizes.values() if n > 1) > 0
        assert browser.errors() == []
        remote = [u for u in browser.requests() if not u.startswith(("file:", "data:"))]
        assert remote == []


def test_plain_and_notebook_displays(run_dir: Path) -> None:
    basis = degeneracy.load_basis(run_dir / "bases" / "lib.safetensors")
    graph = degeneracy.load_graph(run_dir / "graph" / "graphs" / "lib.safetensors")
    modules = degeneracy.load_modules(run_dir / "graph" / "modules" / "lib.json")
    report = degeneracy.load_degeneracy_report(run_dir / "degeneracy" / "degeneracy_report.json")
    llc = degeneracy.load_llc(run_dir / "llc" / "llc.safetensors")
    for result in (basis, basis["fc1"], graph, modules, report, llc):
        text = repr(result)
        assert "tensor(" not in text and len(text.splitlines()) <= 25, type(result).__name__
    assert all(f"  {name} " in repr(basis) for name in LAYERS)
    assert f"{basis['fc1'].dim} of {basis['fc1'].width} directions" in repr(basis["fc1"])
    for result in (basis, graph, modules, report, llc):
        html = result._repr_html_()
        assert html.startswith('<div class="degeneracy-summary"') and "<table" in html and "<th" in html
    assert re.search(r"<td[^>]*>fc1</td><td[^>]*>" + str(basis["fc1"].dim) + "</td>", basis._repr_html_())
    assert f"Modules: {modules.num_modules} (Leiden" in modules._repr_html_()
    assert f">{report.num_parameters:,}</td>" in report._repr_html_()
