"""The one resume helper: a stage runs once per config, and a rerun with the same config skips it.

A stage has a name, a config (a JSON-able dict: everything that determines its result — the stage's
config model dump, the method, the model spec, the configs of the stages it builds on) and a function
that computes its result. :func:`run_stage` stores ``{"config": ..., "result": ...}`` atomically in
``FOLDER/stages/NAME.json`` after the stage finished; on a rerun it skips the stage only when the stored
config equals the new one, and recomputes (saying why) when the config changed, when the record is
partial or foreign, or when the files the record points to cannot be read back. ``force=True``
recomputes regardless.

Stages whose result is an object with its own file (a basis, a graph, an LLC estimate) pass ``save``
(write the object's file atomically, return a JSON-able record of it) and ``load`` (read the object back
from that record; raise ``ValueError`` or ``OSError`` when it cannot)::

    basis = run_stage(
        out, "basis.lib", {"method": "lib", "options": options},
        lambda: interaction_basis(model, data, layers, method="lib"),
        save=lambda b: (b.save(out / "bases/lib.safetensors"), {"file": "bases/lib.safetensors"})[1],
        load=lambda record: load_basis(out / record["file"]),
    )
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from degeneracy.distributed import barrier
from degeneracy.io import atomic_write_text, json_text, kill_point, remove_stale_temporaries

__all__ = ["run_stage", "stage_path", "jsonable", "StageLog"]

T = TypeVar("T")
StageLog = Callable[[str], None]
RECORD_FORMAT = "degeneracy-stage/1"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists, other objects their ``str``), so that a config
    compares equal to itself after a round trip through a stage file.

    >>> jsonable({"dims": (3, 2), "folder": Path("runs/graph"), "center": True})
    {'center': True, 'dims': [3, 2], 'folder': 'runs/graph'}
    """
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def stage_path(folder: str | Path, name: str) -> Path:
    """Where the record of stage ``name`` lives: ``folder/stages/NAME.json``.

    >>> stage_path("runs/graph", "basis.lib").as_posix()
    'runs/graph/stages/basis.lib.json'
    >>> stage_path("runs/graph", "basis/lib")
    Traceback (most recent call last):
    ...
    ValueError: stage name 'basis/lib': use letters, digits, '_', '-' and '.' only
    """
    if not _NAME.match(name):
        raise ValueError(f"stage name {name!r}: use letters, digits, '_', '-' and '.' only")
    return Path(folder) / "stages" / f"{name}.json"


def _read_record(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The stored record, or ``None`` and why it cannot be used."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"its stage file {path} is unreadable ({err.__class__.__name__})"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None, f"{path} is not a stage record of this program"
    if "config" not in record or "result" not in record:
        return None, f"its stage file {path} is incomplete"
    return record, ""


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the entries that differ between two configs (``options.center``)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix] if prefix and old != new else []
    keys = sorted({*old, *new}, key=str)
    return [path for k in keys for path in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]


def run_stage(
    folder: str | Path,
    name: str,
    config: Mapping[str, Any],
    run: Callable[[], T],
    *,
    save: Callable[[T], Any] | None = None,
    load: Callable[[Any], T] | None = None,
    force: bool = False,
    log: StageLog | None = print,
) -> Any:
    """Run stage ``name`` unless ``folder/stages/NAME.json`` records a finished run with the same config.

    Args:
        folder: the output folder of the run; the record goes to ``folder/stages/NAME.json``.
        name: the stage's name (letters, digits, ``_-.``), unique within ``folder``.
        config: everything that determines the result (JSON-able; compared after a JSON round trip).
        run: computes the result.
        save: turns the result into the JSON-able record stored with the config, writing the result's
            own files (atomically) on the way; default: the result itself is JSON-able and is stored.
        load: turns a stored record back into the result; may raise ``ValueError``/``OSError``/
            ``KeyError`` when the record's files are missing or broken, and the stage is recomputed.
            Default: the stored record is the result.
        force: recompute even when the stored config matches.
        log: receives one line per stage (skipped, recomputed and why, finished); ``None`` is silent.

    Returns:
        Without ``load``: the stored JSON record (the same on the first run and on a rerun). With
        ``load``: the result, computed now or read back.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     first = run_stage(folder, "square", {"x": 3}, lambda: {"y": 9}, log=None)
    ...     again = run_stage(folder, "square", {"x": 3}, lambda: 1 / 0)  # same config: not run again
    [square] done before with the same config, skipping (--force redoes it)
    >>> first, again
    ({'y': 9}, {'y': 9})
    """
    say = log or (lambda _: None)
    barrier()  # under torchrun every rank reads the records rank 0 wrote, and decides alike
    path = stage_path(folder, name)
    wanted = jsonable(dict(config))
    why = "running"
    if force and path.exists():
        why = "recomputing (--force)"
    elif path.exists():
        record, problem = _read_record(path)
        if record is None:
            why = f"recomputing: {problem}"
        elif record["config"] != wanted:
            keys = _changed_keys(record["config"], wanted)
            shown = ", ".join(k.rstrip(".") for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
            why = "recomputing: its config changed" + (f" ({shown})" if keys else "")
            if keys and all(".fingerprint." in f".{k}" for k in keys):  # same config, other weights or data
                why += ": the model or data differ from the last run's (unseeded random draws in a factory?)"
        else:
            try:
                value = load(record["result"]) if load is not None else record["result"]
            except (ValueError, OSError, KeyError, TypeError) as err:
                why = f"recomputing: its stored result cannot be read ({err})"
            else:
                say(f"[{name}] done before with the same config, skipping (--force redoes it)")
                return value
    say(f"[{name}] {why} ...")
    for stale in remove_stale_temporaries(folder):  # left by a run killed while writing
        say(f"[{name}] removed {stale}, a partial file of an interrupted run")
    kill_point(f"{name}@start")
    start = time.perf_counter()
    value = run()
    seconds = time.perf_counter() - start
    stored = save(value) if save is not None else value
    kill_point(f"{name}@saved")
    from degeneracy import __version__

    record = {
        "format": RECORD_FORMAT,
        "stage": name,
        "version": __version__,
        "seconds": round(seconds, 3),
        "config": wanted,
        "result": jsonable(stored),
    }
    atomic_write_text(path, json_text(record, indent=2))
    say(f"[{name}] finished in {seconds:.1f} s")
    kill_point(f"{name}@done")
    return value if load is not None else record["result"]
