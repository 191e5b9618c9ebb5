"""The ``degeneracy`` command line: every command, its config models and the demo, in one package.

Commands: ``demo`` (the whole pipeline on the bundled models, writing a report), ``basis``, ``graph``,
``degeneracy`` and ``llc`` (one run each, from a YAML config; see :mod:`degeneracy.commands.config`),
``report`` (the HTML report of a run folder).
Every stage stores its config next to its result (:func:`degeneracy.commands.resume.run_stage`); a
rerun skips the stages finished with the same config, ``--force`` redoes them.

Layout: ``config`` (pydantic configs, model resolution), ``resume`` (the one resume helper),
``errors`` (user errors as one line and exit code 2), one module per command (``basis``, ``graph``,
``degeneracy``, ``llc``, ``demo``). The library never imports this package; figures and markdown come
from :mod:`degeneracy.report`, which takes results only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections.abc import Callable
from typing import Any

import typer
from pydantic import BaseModel

from degeneracy.commands.basis import basis_command
from degeneracy.commands.config import BasisRunConfig, DegeneracyRunConfig, GraphRunConfig, LLCRunConfig
from degeneracy.commands.degeneracy import degeneracy_command
from degeneracy.commands.demo import demo_command
from degeneracy.commands.graph import graph_command
from degeneracy.commands.llc import llc_command
from degeneracy.commands.report import report_command
from degeneracy.distributed import is_main, main_writes, process_group_from_env

__all__ = ["app"]

HELP = (
    "Find the computationally relevant structure of a network. demo: the whole pipeline on the bundled "
    "models; basis, graph, degeneracy, llc: one run each from a YAML config; report: the HTML report of a "
    "run folder. A rerun skips the stages finished with the same config; --force redoes them."
)


def command_help(command: Callable[..., Any], config: type[BaseModel] | None = None) -> str:
    """A command's ``--help`` text: its docstring up to the examples, then the fields its YAML config
    takes (each with its type and default).

    >>> text = command_help(basis_command, BasisRunConfig)
    >>> ">>>" in text, "methods" in text, ":class:" in text, text.split(";")[0]
    (False, True, False, 'Build interaction bases from a config file (a BasisRunConfig')
    """
    doc = inspect.getdoc(command) or ""
    text = doc.split(">>>", 1)[0].strip()
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")  # Sphinx roles read as plain text
    if config is not None:
        fields = ", ".join(config_fields(config))
        text += f"\n\nConfig fields ({config.__name__}; unknown fields are errors): {fields}."
    return text


def config_fields(config: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of a config as ``name (type; default ...)``, the fields of a nested config as
    ``outer.name`` (each with its own type and default).

    >>> config_fields(GraphRunConfig)[:2]
    ["model.name (str; default 'modadd')", "model.split (Literal['train', 'test', 'all']; default 'train')"]
    """
    fields = []
    for name, info in config.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields += config_fields(annotation, f"{prefix}{name}.")
            continue
        plain = getattr(annotation, "__args__", None) is None and hasattr(annotation, "__name__")
        kind = annotation.__name__ if plain else str(annotation).replace("typing.", "")
        value = None if info.is_required() else info.get_default(call_default_factory=True)
        default = "required" if info.is_required() else f"default {value!r}"
        fields.append(f"{prefix}{name} ({kind}; {default})")
    return fields


def main_rank_writes(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` for ``torchrun``: in the process group it asks for
    (:func:`degeneracy.distributed.process_group_from_env`), every rank computes (the library shards
    the data and combines the ranks' sums) and only rank 0 writes files and prints the summary.

    >>> main_rank_writes(lambda x: x + 1)(2)
    3
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        with process_group_from_env(), main_writes():
            if is_main():
                return command(*args, **kwargs)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return command(*args, **kwargs)

    return run


app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
for _name, _command, _config in (
    ("demo", demo_command, None),
    ("basis", basis_command, BasisRunConfig),
    ("graph", graph_command, GraphRunConfig),
    ("degeneracy", degeneracy_command, DegeneracyRunConfig),
    ("llc", llc_command, LLCRunConfig),
    ("report", report_command, None),
):
    app.command(_name, help=command_help(_command, _config))(main_rank_writes(_command))
