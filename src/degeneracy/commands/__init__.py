"""The ``degeneracy`` command line: every command, its config models and the demo, in one package.

Commands: ``demo`` (the whole pipeline on the bundled models, writing a report), ``basis``, ``graph``,
``degeneracy`` and ``llc`` (one run each, from a YAML config; see :mod:`degeneracy.commands.config`).
Every stage stores its config next to its result (:func:`degeneracy.commands.resume.run_stage`); a
rerun skips the stages finished with the same config, ``--force`` redoes them.

Layout: ``config`` (pydantic configs, model resolution), ``resume`` (the one resume helper),
``errors`` (user errors as one line and exit code 2), one module per command (``basis``, ``graph``,
``degeneracy``, ``llc``, ``demo``). The library never imports this package; figures and markdown come
from :mod:`degeneracy.report`, which takes results only.
"""

from __future__ import annotations

import typer

from degeneracy.commands.basis import basis_command
from degeneracy.commands.degeneracy import degeneracy_command
from degeneracy.commands.demo import demo_command
from degeneracy.commands.graph import graph_command
from degeneracy.commands.llc import llc_command

__all__ = ["app"]

HELP = (
    "Find the computationally relevant structure of a network. demo: the whole pipeline on the bundled "
    "models; basis, graph, degeneracy, llc: one run each from a YAML config. A rerun skips the stages "
    "finished with the same config; --force redoes them."
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
app.command("demo")(demo_command)
app.command("basis")(basis_command)
app.command("graph")(graph_command)
app.command("degeneracy")(degeneracy_command)
app.command("llc")(llc_command)
