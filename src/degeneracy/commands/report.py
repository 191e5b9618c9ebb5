"""``degeneracy report RUN_DIR``: the self-contained HTML report of a finished run folder.

The report reads the results a run wrote (no stage is run again) and writes ``RUN_DIR/report.html``
(or ``--out``); it is rendered by :func:`degeneracy.report.html.write_html_report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from degeneracy.commands.errors import user_errors

__all__ = ["report_command"]

RunDirArgument = Annotated[Path, typer.Argument(help="folder a degeneracy command wrote (its --out)")]
ReportOption = Annotated[
    Optional[Path], typer.Option("--out", help="where to write the page (default RUN_DIR/report.html)")  # noqa: UP045
]


def report_command(run_dir: RunDirArgument, out: ReportOption = None) -> None:
    """Write the HTML report of RUN_DIR (the --out folder of demo, basis, graph, degeneracy or llc):
    one self-contained page with tables, figures and the interactive interaction graph, opening
    offline in any browser.

    >>> import tempfile
    >>> from typer.testing import CliRunner
    >>> from degeneracy.commands import app
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     result = CliRunner().invoke(app, ["report", tmp])
    ...     written = (Path(tmp) / "report.html").exists()
    >>> result.exit_code, written
    (0, True)
    >>> CliRunner().invoke(app, ["report", "no/such/folder"]).exit_code
    2
    """
    from degeneracy.report.html import write_html_report

    with user_errors():
        path = write_html_report(run_dir, out)
    typer.echo(f"report written to {path}")
