"""Screenshots of the HTML report of a demo run, taken in headless Chromium (docs for README/issue 12).

    degeneracy demo --out demo-report
    python benchmarks/report_screenshot.py demo-report

writes ``demo-report/report.html`` (``degeneracy report``), then ``benchmarks/report_graph.png`` (the
interactive graph, a feature hovered) and ``demo-report/report_page.png`` (the whole page), and
prints the page size and the time the graph takes to redraw when the slider moves.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from chromium import Chromium, find_browser  # noqa: E402

from degeneracy.report.html import write_html_report  # noqa: E402


def main(run_dir: Path) -> None:
    start = time.perf_counter()
    page = write_html_report(run_dir)
    seconds = time.perf_counter() - start
    print(f"{page}: {page.stat().st_size / 1e6:.2f} MB, written in {seconds:.1f} s; load {os.getloadavg()}")
    binary = find_browser()
    if binary is None:
        raise SystemExit("no headless Chromium: apt-get install chromium-headless-shell")
    with Chromium(binary, width=1280, height=900) as browser:
        browser.open(page.resolve().as_uri())
        browser.evaluate("document.getElementById('graph').scrollIntoView()")
        # the redraw time of the slider (recompute + draw), median of 20, at the lowest threshold (all edges)
        low = browser.evaluate("Number(document.getElementById('eps-slider').min)")
        times = browser.evaluate(
            "(() => { const g = window.degeneracyGraph, out = [];"
            " for (let i = 0; i < 20; i++) { const t = performance.now();"
            f" g.setThreshold(i % 2 ? 0 : {low});"
            " out.push(performance.now() - t); } g.setThreshold(0); return out; })()"
        )
        edges = browser.evaluate("window.degeneracyGraph.setThreshold(" + str(low) + ")")
        browser.evaluate("window.degeneracyGraph.setThreshold(0)")
        print(f"slider redraw: median {statistics.median(times):.1f} ms (all {edges} edges every other move)")
        nodes = browser.evaluate("window.degeneracyGraph.state.drawnNodes")
        # hover the strongest feature of the second layer so the tooltip shows in the picture
        target = browser.evaluate(
            "(() => { const d = JSON.parse(document.getElementById('graph-data').textContent); let best = -1;"
            " d.nodes.forEach((n, i) => {"
            " if (n.layer === 1 && (best < 0 || n.eigenvalue > d.nodes[best].eigenvalue))"
            " best = i; }); return best; })()"
        )
        x, y = browser.evaluate(
            "(() => { const r = document.querySelector('#graph-view canvas').getBoundingClientRect();"
            f" const p = window.degeneracyGraph.nodePosition({target});"
            " return [r.left + p[0], r.top + p[1]]; })()"
        )
        browser.mouse("mouseMoved", x, y)
        time.sleep(0.2)
        browser.screenshot(HERE / "report_graph.png", full_page=False)
        browser.mouse("mouseMoved", 1, 1)
        browser.evaluate("window.scrollTo(0, 0)")
        browser.screenshot(run_dir / "report_page.png", full_page=True)
        print(f"{nodes} features; screenshots {HERE / 'report_graph.png'}, {run_dir / 'report_page.png'}")
        print(f"script errors: {browser.errors() or 'none'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-report"))
