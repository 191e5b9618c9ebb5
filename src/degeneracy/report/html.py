"""The self-contained HTML report of a run folder: ``degeneracy report RUN_DIR`` writes ``report.html``.

One file that opens offline: the style sheet, the script of the interactive interaction graph
(``assets/``, plain JavaScript written for this report) and every figure (SVG where it stays small,
PNG otherwise, as ``data:`` URIs) are inside it; nothing refers to the network. Sections appear for
what the run folder holds (:func:`find_results`): bases, the interaction graph, ablations, modules and
their Fourier alignment, the degeneracy accounting, the learning coefficient. Under every section
the page names the files its numbers were read from.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     page = html_report(tmp)
>>> page.startswith("<!DOCTYPE html>"), "nothing to report" in page
(True, True)
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

from degeneracy.display import escape
from degeneracy.io import atomic_write_text
from degeneracy.report.html_sections import SECTIONS

__all__ = ["html_report", "write_html_report", "find_results", "mixed_models", "ASSETS"]

ASSETS = Path(__file__).resolve().parent / "assets"
"""The style sheet and script inlined into every report."""


def _first_dir(run_dir: Path, names: tuple[str, ...], marker: Callable[[Path], bool]) -> Path | None:
    for name in names:
        folder = run_dir / name if name else run_dir
        if folder.is_dir() and marker(folder):
            return folder
    return None


def find_results(run_dir: str | Path) -> dict[str, Path]:
    """The result folders a run folder holds: ``bases``, ``graph``, ``degeneracy``, ``llc`` (a
    folder of the demo, or the run folder itself when one command wrote it); absent ones are left out.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "llc").mkdir()
    ...     _ = (Path(tmp) / "llc" / "llc.safetensors").write_bytes(b"")
    ...     sorted(find_results(tmp))
    ['llc']
    """
    run_dir = Path(run_dir)
    found = {
        "bases": _first_dir(run_dir, ("bases",), lambda f: any(f.glob("*.safetensors"))),
        "graph": _first_dir(
            run_dir, ("graph", ""), lambda f: (f / "graph_summary.json").exists() or (f / "graphs").is_dir()
        ),
        "degeneracy": _first_dir(
            run_dir, ("degeneracy", ""), lambda f: (f / "degeneracy_report.json").exists()
        ),
        "llc": _first_dir(
            run_dir,
            ("llc", ""),
            lambda f: any(
                (f / n).exists() for n in ("llc.safetensors", "llc_curve.safetensors", "n_eff.safetensors")
            ),
        ),
    }
    return {key: folder for key, folder in found.items() if folder is not None}


def mixed_models(run_dir: str | Path) -> str:
    """A warning (HTML) when a result folder of ``run_dir`` holds stages run on different models (the
    model fingerprints their stage records name): a command wrote into a folder holding another run's
    results, which the page then shows side by side. ``""`` when every folder holds one model.

    >>> import json, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     (Path(tmp) / "stages").mkdir()
    ...     for name, model in (("basis.lib", "a" * 64), ("basis.pca", "b" * 64)):
    ...         record = {"config": {"fingerprint": {"model": model}}}
    ...         _ = (Path(tmp) / "stages" / f"{name}.json").write_text(json.dumps(record))
    ...     text = mixed_models(tmp)
    >>> "2 different models" in text, "model aaaaaaaa: basis.lib; model bbbbbbbb: basis.pca" in text
    (True, True)
    """
    import json

    lines = []
    for stages in sorted(Path(run_dir).rglob("stages")):
        models: dict[str, list[str]] = {}
        for record in sorted(stages.glob("*.json")):
            try:
                config = json.loads(record.read_text(encoding="utf-8")).get("config", {})
            except (OSError, ValueError, AttributeError):
                continue
            for model in _model_fingerprints(config):
                models.setdefault(model, []).append(record.stem)
        if len(models) > 1:
            groups = "; ".join(f"model {m[:8]}: {', '.join(names)}" for m, names in models.items())
            where = stages.parent.relative_to(run_dir).as_posix()
            where = "the run folder" if where == "." else where
            lines.append(
                f'<p class="note"><b>warning:</b> this folder holds the results of {len(models)} different '
                f"models ({escape(where)}, stages by model fingerprint: "
                f"{escape(groups)}): a run wrote into a folder that held another run's results, and the "
                "sections below show them side by side. Rerun into an empty --out folder.</p>"
            )
    return "".join(lines)


def _model_fingerprints(config: object) -> set[str]:
    """Every model fingerprint a stage config names (``...fingerprint.model``, at any depth)."""
    found: set[str] = set()
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "fingerprint" and isinstance(value, dict) and isinstance(value.get("model"), str):
                found.add(value["model"])
            else:
                found |= _model_fingerprints(value)
    elif isinstance(config, list):
        for value in config:
            found |= _model_fingerprints(value)
    return found


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def html_report(run_dir: str | Path) -> str:
    """The report of ``run_dir`` as one HTML page (sections for what the folder holds).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     page = html_report(tmp)
    >>> "<script" in page, "http://" in page or "https://" in page  # no graph here: no script
    (False, False)
    """
    from degeneracy import __version__

    run_dir = Path(run_dir).resolve()
    found = find_results(run_dir)
    parts: list[tuple[str, str, str]] = []
    for key, title, render in SECTIONS:
        body = render(run_dir, found)
        if body:
            parts.append((key, title, body))
    interactive = any('id="graph-view"' in body for _, _, body in parts)
    scripts = f"<script>\n{_asset('graph.js')}\n</script>" if interactive else ""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in parts)
    sections = "".join(
        f'<section id="{key}"><h2>{escape(title)}</h2>{body}</section>' for key, title, body in parts
    )
    empty = (
        "<p>This folder holds nothing to report: no bases, graph, degeneracy or llc results "
        "(run <code>degeneracy demo</code> or another command with <code>--out</code> this folder).</p>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>degeneracy report · {escape(run_dir.name)}</title>"
        f"<style>\n{_asset('report.css')}\n</style></head><body><main>"
        f"<header><h1>degeneracy report</h1><p>Run folder <code>{escape(run_dir.name)}</code> · written "
        f"{when} by degeneracy {escape(__version__)}. Every number on this page is read from the result "
        "files named under its section (paths relative to the run folder).</p></header>"
        f"<nav>{nav}</nav>{mixed_models(run_dir)}{sections if parts else empty}"
        "<footer>Self-contained: styles, script and figures are inside this file; it makes no network "
        "request.</footer>"
        f"</main>{scripts}</body></html>\n"
    )


def write_html_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write :func:`html_report` of ``run_dir`` to ``path`` (default ``run_dir/report.html``),
    atomically; returns the path.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     write_html_report(tmp).name
    'report.html'
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        why = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise ValueError(f"run folder {str(run_dir)!r} {why}: pass the --out folder of a degeneracy run")
    target = Path(path) if path is not None else run_dir / "report.html"
    atomic_write_text(target, html_report(run_dir))
    return target
