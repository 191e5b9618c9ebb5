"""How commands talk to the user: errors as one red line and exit code 2 (never a traceback), progress on
stderr, and the arguments every config command shares (CONFIG, `--out`, `--force`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from degeneracy.distributed import is_main

__all__ = ["USER_ERRORS", "ConfigArgument", "OutOption", "ForceOption", "user_errors", "echo_err"]

USER_ERRORS = (ValueError, FileNotFoundError, ImportError, KeyError)

ConfigArgument = Annotated[
    Path, typer.Argument(help="YAML config of the run (its fields are listed above)")
]
"""The CONFIG argument of the ``basis``, ``graph``, ``degeneracy`` and ``llc`` commands."""

OutOption = Annotated[Path, typer.Option(help="output directory")]
"""The ``--out`` option of every command (each command gives its own default folder)."""

ForceOption = Annotated[
    bool, typer.Option("--force", help="recompute stages that already finished with the same config")
]
"""The ``--force`` flag of every command (``False`` also when a command function is called directly)."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a config, data or result-file error raised inside the block into ``error: ...`` and exit 2.

    >>> try:
    ...     with user_errors():
    ...         raise ValueError("graph.yaml: no such config file")  # printed in red on stderr
    ... except typer.Exit as done:
    ...     print(done.exit_code)
    2
    """
    try:
        yield
    except USER_ERRORS as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from err


def echo_err(message: str) -> None:
    """Progress lines of a command go to stderr, so that its stdout is only the JSON summary (under
    ``torchrun``: from rank 0 only).

    >>> import contextlib, io
    >>> out, err = io.StringIO(), io.StringIO()
    >>> with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    ...     echo_err("[basis.lib] running ...")
    >>> out.getvalue(), err.getvalue().splitlines()
    ('', ['[basis.lib] running ...'])
    """
    if is_main():
        typer.echo(message, err=True)
