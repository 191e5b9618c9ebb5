"""Atomic, pickle-free result files: tensors in safetensors, everything else as JSON metadata.

Files are written to a temporary file and moved into place (never half-written), get the permissions
the umask gives a new file, and a tensor file carries a SHA-256 checksum of its tensors and metadata,
so that a damaged file is refused on load instead of read as wrong numbers.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from degeneracy.distributed import writes_enabled

__all__ = [
    "atomic_write_text",
    "save_tensors",
    "load_tensors",
    "save_json",
    "load_json",
    "finite_json",
    "json_text",
    "NON_FINITE_KEY",
    "JsonResult",
    "ResultFileError",
    "kill_point",
    "remove_stale_temporaries",
    "KILL_ENV",
]

_META_KEY = "degeneracy"
_CHECKSUM_KEY = "degeneracy_sha256"


class ResultFileError(ValueError):
    """A result file is missing, unreadable, of the wrong kind, or incomplete.

    >>> try:
    ...     load_tensors("no/such/file.safetensors", kind="basis")
    ... except ResultFileError as err:
    ...     print(err)
    no/such/file.safetensors: no such file
    """


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


KILL_ENV = "DEGENERACY_TEST_KILL"
"""For tests of resume after ``kill -9``: a glob such as ``edges.lib@start`` or ``lib.safetensors@write``;
the process SIGKILLs itself when it reaches a matching point (:func:`kill_point`)."""


def kill_point(label: str) -> None:
    """SIGKILL this process if the environment variable ``DEGENERACY_TEST_KILL`` matches ``label``
    (a glob): a test hook that lets tests kill a run at a known point; unset, it does nothing.

    Points: ``STAGE@start`` (a stage about to compute), ``STAGE@saved`` (its result files written, its
    record not yet), ``STAGE@done`` (its record written) and ``FILE@write`` (a file's temporary copy
    written, not yet moved into place).

    >>> kill_point("basis.lib@start")  # DEGENERACY_TEST_KILL unset: nothing happens
    """
    wanted = os.environ.get(KILL_ENV)
    if wanted and fnmatch.fnmatchcase(label, wanted):
        os.kill(os.getpid(), signal.SIGKILL)


STARTED = time.time()
"""When this process imported the module: temporary files older than this are leftovers of a killed run."""


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write_text` and :func:`save_tensors` left under
    ``folder`` when a run was killed before moving them into place (those older than this process);
    returns them.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / ".r.json.abc.tmp").write_text("{")
    >>> os.utime(folder / ".r.json.abc.tmp", (STARTED - 10, STARTED - 10))
    >>> [p.name for p in remove_stale_temporaries(folder)], list(folder.iterdir())
    (['.r.json.abc.tmp'], [])
    """
    removed = []
    for tmp in Path(folder).rglob(".*.tmp"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < STARTED:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue
    return removed


def _atomic(path: Path, write: Any) -> None:
    if not writes_enabled():  # a rank > 0 under main_writes(): rank 0 writes the same result
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        kill_point(f"{path.name}@write")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never a half-written file).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "note.txt"
    >>> atomic_write_text(path, "hello"); path.read_text()
    'hello'
    """
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_tensors(path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Save tensors and a JSON-serialisable ``meta`` dict atomically to one safetensors file.

    Tensors that share storage (the same tensor under two names, or views of one) are saved as copies.

    >>> import tempfile, torch
    >>> z = torch.zeros(2)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "x.safetensors"
    ...     save_tensors(path, {"a": z, "b": z}, {"kind": "example"})
    ...     sorted(load_tensors(path, kind="example")[0])
    ['a', 'b']
    """
    payload: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        payload[k] = t
    text = json.dumps(meta)
    header = {_META_KEY: text, _CHECKSUM_KEY: _checksum(payload, text)}
    _atomic(Path(path), lambda tmp: save_file(payload, tmp, metadata=header))


def _checksum(tensors: Mapping[str, Tensor], meta_text: str) -> str:
    """SHA-256 of the metadata text and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(meta_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_tensors(
    path: str | Path, *, kind: str, required: Iterable[str] = ()
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`, checking its ``kind`` and ``required`` tensors.

    Floating tensors come back in float64; a missing, unreadable, foreign or incomplete file raises
    :class:`ResultFileError` (see :func:`save_tensors` for an example).

    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder) / "x.safetensors"
    ...     save_tensors(path, {"a": torch.ones(2)}, {"kind": "example", "note": "hi"})
    ...     tensors, meta = load_tensors(path, kind="example", required=["a"])
    >>> tensors["a"].dtype, meta["note"]
    (torch.float64, 'hi')
    """
    path = Path(path)
    if not path.exists():
        raise ResultFileError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        meta = json.loads(header[_META_KEY])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise ResultFileError(f"{path}: not a readable degeneracy {kind} file ({err})") from err
    stored = header.get(_CHECKSUM_KEY)  # files written before checksums were stored have none
    if stored is not None and stored != _checksum(tensors, header[_META_KEY]):
        raise ResultFileError(
            f"{path}: damaged {kind} file: its tensors or metadata do not match the checksum written with "
            "them; recompute it (a rerun of the command recomputes a damaged stage)"
        )
    if meta.get("kind") != kind:
        raise ResultFileError(f"{path}: holds a {meta.get('kind')!r} result, expected {kind!r}")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ResultFileError(f"{path}: incomplete {kind} file, missing tensors {missing}")
    return {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in tensors.items()}, meta


NON_FINITE_KEY = "non_finite"
"""Where :func:`save_json` lists the values it wrote as ``null`` because they were NaN or ±inf."""


def finite_json(value: Any) -> tuple[Any, dict[str, str]]:
    """``value`` with every NaN/±inf float replaced by ``None`` (JSON ``null``), and where they were:
    ``{"a/0/b": "nan" | "inf" | "-inf"}`` (keys and list indices joined by ``/``).

    Standard JSON has no NaN or Infinity; Python's ``json`` writes them as bare tokens that other
    readers reject, so result files never contain them.

    >>> finite_json({"llc": [1.5, float("nan")], "beta": float("inf")})
    ({'llc': [1.5, None], 'beta': None}, {'llc/1': 'nan', 'beta': 'inf'})
    """
    where: dict[str, str] = {}

    def walk(v: Any, at: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            where[at] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            return None
        if isinstance(v, Mapping):
            return {k: walk(x, f"{at}/{k}" if at else str(k)) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x, f"{at}/{i}" if at else str(i)) for i, x in enumerate(v)]
        return v

    return walk(value, ""), where


def json_text(value: Any, **kwargs: Any) -> str:
    """``json.dumps(value, **kwargs)`` in standard JSON: NaN and ±inf become ``null`` (:func:`finite_json`).

    >>> json_text({"llc": float("nan"), "n": 2})
    '{"llc": null, "n": 2}'
    """
    if "default" in kwargs:  # apply it first, so that NaN inside converted objects is caught too
        value = json.loads(json.dumps(value, default=kwargs.pop("default")))
    return json.dumps(finite_json(value)[0], allow_nan=False, **kwargs)


def _restore_non_finite(data: Any, where: Mapping[str, str]) -> None:
    for at, token in where.items():
        *parents, last = at.split("/")
        node = data
        try:
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            if isinstance(node, list):
                node[int(last)] = float(token)
            elif isinstance(node, dict) and last in node:
                node[last] = float(token)
        except (KeyError, IndexError, ValueError, TypeError):
            continue  # a list that does not match the file (edited by hand): leave the null


def save_json(path: str | Path, kind: str, payload: Mapping[str, Any]) -> Path:
    """Write ``{"result": kind, **payload}`` as JSON atomically; returns the path.

    The file is standard JSON: NaN and ±inf values are written as ``null`` and listed under
    ``"non_finite"`` (see :func:`finite_json`), and :func:`load_json` gives them back as floats.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_json(Path(folder) / "r.json", "example", {"value": 1, "llc": [float("nan")]})
    ...     "NaN" in path.read_text(), load_json(path, kind="example")
    (False, {'value': 1, 'llc': [nan]})
    """
    path = Path(path)
    clean, where = finite_json({"result": kind, **payload})
    if where:
        clean[NON_FINITE_KEY] = where
    atomic_write_text(path, json.dumps(clean, indent=2, allow_nan=False))
    return path


def load_json(path: str | Path, *, kind: str) -> dict[str, Any]:
    """The payload of a file written by :func:`save_json`, its kind checked (files written before the
    kind was stored load too); :class:`ResultFileError` for a missing, unreadable or foreign file.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_json(Path(folder) / "r.json", "graph", {})
    ...     try:
    ...         load_json(path, kind="basis")
    ...     except ResultFileError as err:
    ...         print(str(err).split(": ", 1)[1])
    holds a 'graph' result, expected 'basis'
    """
    path = Path(path)
    if not path.exists():
        raise ResultFileError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultFileError(f"{path}: not a readable degeneracy {kind} file ({err})") from err
    if not isinstance(data, dict):
        raise ResultFileError(f"{path}: not a degeneracy {kind} file (a JSON object was expected)")
    found = data.pop("result", kind)
    if found != kind:
        raise ResultFileError(f"{path}: holds a {found!r} result, expected {kind!r}")
    where = data.pop(NON_FINITE_KEY, None)
    if isinstance(where, dict):
        _restore_non_finite(data, where)
    return data


class JsonResult:
    """Results kept in one JSON file: a subclass sets ``KIND`` and defines ``to_dict()`` and the
    classmethod ``from_dict(d)``; ``save(path)`` and ``load(path)`` follow (kind checked).

    >>> import tempfile
    >>> class Count(JsonResult):
    ...     KIND = "count"
    ...     def __init__(self, n): self.n = n
    ...     def to_dict(self): return {"n": self.n}
    ...     @classmethod
    ...     def from_dict(cls, d): return cls(d["n"])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     Count.load(Count(3).save(Path(folder) / "c.json")).n
    3
    """

    KIND: str

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON atomically (temporary file + ``os.replace``); returns the path."""
        return save_json(path, self.KIND, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read a result written by :meth:`save` (:class:`ResultFileError` for another kind of file)."""
        data = load_json(path, kind=cls.KIND)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise ResultFileError(f"{path}: incomplete degeneracy {cls.KIND} file ({err})") from err
