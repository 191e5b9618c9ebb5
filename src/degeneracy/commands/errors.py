"""How commands talk to the user: errors as one red line and exit code 2 (never a traceback), progress on
stderr, and the arguments every config command shares (CONFIG, `--out`, `--force`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from degeneracy.distributed import is_main

__all__ = [
    "USER_ERRORS", "ConfigArgument", "OutOption", "ForceOption", "AllowOtherModelOption", "user_errors",
    "echo_err", "exit_if_invalid", "raised_by_degeneracy", "PACKAGE",
]

USER_ERRORS = (ValueError, FileNotFoundError, ImportError, KeyError)

ConfigArgument = Annotated[
    Path, typer.Argument(help="YAML config of the run (its fields are listed above)")
]
"""The CONFIG argument of the ``basis``, ``graph``, ``degeneracy`` and ``llc`` commands."""



def check_out(out: Path) -> Path:
    """The ``--out`` folder, checked before the run: a file there (or in its path) is an error now, not
    a traceback after the first stage has been computed.

    >>> check_out(Path("runs/basis"))
    PosixPath('runs/basis')
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as file:
    ...     try:
    ...         check_out(Path(file.name) / "run")
    ...     except typer.BadParameter as err:
    ...         print(str(err).replace(file.name, "FILE"))
    FILE is a file, not a folder: name a folder for the results (it is created when missing)
    """
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise typer.BadParameter(
                    f"{folder} is a file, not a folder: name a folder for the results (it is created when "
                    "missing)"
                )
            break
    return out


OutOption = Annotated[Path, typer.Option(help="output directory", callback=check_out)]
"""The ``--out`` option of every command (each command gives its own default folder)."""

ForceOption = Annotated[
    bool, typer.Option("--force", help="recompute stages that already finished with the same config")
]
"""The ``--force`` flag of every command (``False`` also when a command function is called directly)."""

AllowOtherModelOption = Annotated[
    bool,
    typer.Option(
        "--allow-other-model",
        help="use saved bases (basis_files) built on another model than this one (a warning instead of "
        "an error; the same as allow_other_model: true in the config)",
    ),
]
"""The ``--allow-other-model`` flag of the ``graph`` command."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a config, data or result-file error raised inside the block into ``error: ...`` and exit 2;
    Ctrl-C into a line saying how to resume, and exit 130.

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
    except TypeError as err:  # the library's own "bad input" TypeErrors; any other is a bug: its traceback
        if not raised_by_degeneracy(err):
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from err
    except KeyboardInterrupt as err:  # Ctrl-C: say what is kept (every finished stage) and how to go on
        typer.secho(
            "interrupted: the stages that finished are saved (no partial file is left); rerun the same "
            "command to resume from there",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(code=130) from err


def raised_by_degeneracy(err: BaseException) -> bool:
    """Whether ``err`` was raised by a ``raise`` statement of the degeneracy package (a check of its
    input, whose message names the problem), not inside torch or by a call gone wrong.

    >>> import torch
    >>> from degeneracy.capture import as_node_layers
    >>> try:
    ...     as_node_layers(torch.nn.Linear(2, 2), [["fc1", "fc2"]])
    ... except TypeError as err:
    ...     print(raised_by_degeneracy(err), raised_by_degeneracy(TypeError("not raised")))
    True False
    """
    import linecache

    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not path.is_relative_to(PACKAGE):
        return False
    return linecache.getline(str(path), tb.tb_lineno).strip().startswith("raise ")


PACKAGE = Path(__file__).resolve().parents[1]
"""The folder of the degeneracy package."""


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


def exit_if_invalid(summary: Any, command: str) -> None:
    """Exit with code 1 when a run's ``summary`` holds NaN or ±inf (a stage that produced no valid
    number; the JSON files hold ``null`` there), naming the entries; nothing when every number is finite.

    >>> exit_if_invalid({"dims": {"lib": [3, 2]}}, "basis")  # all finite: nothing happens
    >>> try:
    ...     exit_if_invalid({"completeness": {"lib": float("nan")}}, "graph")  # printed on stderr
    ... except typer.Exit as done:
    ...     print(done.exit_code)
    1
    """
    from degeneracy.io import finite_json

    _, where = finite_json(jsonable_numbers(summary))
    if where:
        shown = ", ".join(f"{k} ({v})" for k, v in list(where.items())[:8])
        shown += " ..." if len(where) > 8 else ""
        typer.secho(
            f"error: the {command} run finished, but {len(where)} of its results are not finite numbers "
            f"(null in its JSON files): {shown}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)


def jsonable_numbers(value: Any) -> Any:
    """``value`` with tuples as lists and other objects as strings (as the JSON files have it).

    >>> jsonable_numbers({"a": (1.0, Path("x"))})
    {'a': [1.0, 'x']}
    """
    if isinstance(value, dict):
        return {str(k): jsonable_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable_numbers(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
