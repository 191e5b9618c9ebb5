"""Pieces of the HTML report's sections: figures inlined as SVG or PNG ``data:`` URIs, and the line that
names the files a section's numbers were read from.

>>> source_line(Path("/run"), Path("/run/llc/llc.safetensors"))
'<p class="source">Numbers from <code>llc/llc.safetensors</code></p>'
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from degeneracy.display import escape

__all__ = ["embed_figure", "source_line", "ablation_note", "SVG_LIMIT", "SCORES"]

SVG_LIMIT = 250_000
"""A figure whose SVG is larger than this many bytes is embedded as PNG instead."""


def source_line(run_dir: Path, *paths: Path) -> str:
    """The "Source:" line under a section: the files (relative to the run folder) its numbers come from.

    >>> source_line(Path("/run"), Path("/run/graph/graph_summary.json"))
    '<p class="source">Numbers from <code>graph/graph_summary.json</code></p>'
    """
    names = []
    for path in paths:
        try:
            names.append(str(Path(path).relative_to(run_dir)))
        except ValueError:
            names.append(str(path))
    return '<p class="source">Numbers from ' + ", ".join(f"<code>{escape(n)}</code>" for n in names) + "</p>"


def embed_figure(plot: Callable[[Path], Any], alt: str, caption: str = "") -> str:
    """A ``<figure>`` with the plot inline: ``plot(path)`` writes the figure to ``path`` (the
    ``plot_*`` functions of :mod:`degeneracy.report`); SVG with text kept as text when it is under
    :data:`SVG_LIMIT` bytes, else PNG. Without matplotlib, a note says the figure was left out.

    >>> def line(path):
    ...     from degeneracy.report.figure import pyplot, save_figure
    ...     fig, ax = pyplot().subplots(figsize=(2, 1.5)); ax.plot([0, 1], [1, 0])
    ...     return save_figure(fig, path)
    >>> html = embed_figure(line, "a line")
    >>> html.startswith("<figure><img"), "data:image/svg+xml;base64," in html
    (True, True)
    """
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib missing
        return f'<p class="note">(figure "{escape(alt)}" left out: matplotlib is not installed)</p>'
    from degeneracy.report.figure import pyplot

    with tempfile.TemporaryDirectory() as tmp:
        svg = Path(tmp) / "figure.svg"
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "degeneracy"}):
            plot(svg)
        pyplot().close("all")
        if svg.stat().st_size <= SVG_LIMIT:
            uri = "data:image/svg+xml;base64," + base64.b64encode(svg.read_bytes()).decode()
        else:
            png = Path(tmp) / "figure.png"
            plot(png)
            pyplot().close("all")
            uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{escape(alt)}">{cap}</figure>'


SCORES = {
    "embedding": "the cosine similarity of the mean-pooled output embedding with the unablated model's, and "
    "“loss” its squared error",
    "mse": "minus the mean squared error of the output (against the labels, or the unablated model's "
    "output when the data have none), and “loss” that error",
}
"""What the ablations' “accuracy” and “loss” are for each ``ablation.metrics`` but classification."""


def ablation_note(graph_folder: Path) -> str:
    """A note (HTML) saying what “accuracy” means in the ablation tables and figures when the run's
    ablations used ``metrics: embedding`` or ``mse`` (read from the ablation stages' configs); ``""``
    for classification.

    >>> import json, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "stages").mkdir()
    ...     record = {"config": {"metrics": "embedding"}}
    ...     _ = (Path(tmp) / "stages" / "edge_ablation.lib.json").write_text(json.dumps(record))
    ...     note = ablation_note(Path(tmp))
    >>> "<code>embedding</code>: “accuracy” below is the cosine similarity" in note
    True
    """
    import json

    found = set()
    for record in sorted((Path(graph_folder) / "stages").glob("*_ablation.*.json")):
        try:
            found.add(json.loads(record.read_text(encoding="utf-8")).get("config", {}).get("metrics"))
        except (OSError, ValueError, AttributeError):
            continue
    return "".join(
        f'<p class="note">Ablation metrics <code>{escape(m)}</code>: “accuracy” below is '
        f"{escape(SCORES[m])}.</p>"
        for m in sorted(found & set(SCORES))
    )
