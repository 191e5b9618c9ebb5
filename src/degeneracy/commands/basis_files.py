"""Saved bases a graph config names (``basis_files: {lib: runs/basis/bases/lib.safetensors}``): checked
when the config is read (known methods among the run's, files that exist), loaded and checked against
the model before any stage runs (a basis built on another model is refused unless ``allow_other_model``
or ``--allow-other-model``), and described in the stage configs of the stages that use them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["check_basis_files", "load_basis_files", "basis_file_config"]


def check_basis_files(files: Mapping[str, str], methods: list[str], known: tuple[str, ...]) -> None:
    """Each method of ``files`` is a known basis method among the run's ``methods``, its file exists.

    >>> check_basis_files({}, ["lib"], ("lib", "pca"))
    >>> check_basis_files({"pca": "missing.safetensors"}, ["lib"], ("lib", "pca"))
    Traceback (most recent call last):
    ...
    ValueError: basis_files names method 'pca', which is not among methods ['lib']; add it to methods
    """
    for method, file in files.items():
        if method not in known:
            raise ValueError(f"basis_files: unknown basis method {method!r}; choose from {known}")
        if method not in methods:
            raise ValueError(
                f"basis_files names method {method!r}, which is not among methods {methods}; "
                "add it to methods"
            )
        if not Path(file).is_file():
            raise ValueError(
                f"basis_files.{method}: no such file {file!r} "
                "(a basis saved by `degeneracy basis` or Basis.save)"
            )


def load_basis_files(
    files: Mapping[str, str], model: Any, *, allow_other_model: bool = False
) -> dict[str, Any]:
    """The saved bases of ``files`` (method → path), each checked to be built on ``model``
    (:func:`degeneracy.fingerprint.check_model`: a ``ModelMismatchError`` unless ``allow_other_model``).

    >>> import tempfile, torch, degeneracy
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    >>> x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> path = Path(tempfile.mkdtemp()) / "pca.safetensors"
    >>> _ = degeneracy.interaction_basis(model, x, ["1", "output"], method="pca", progress=False).save(path)
    >>> list(load_basis_files({"pca": str(path)}, model)["pca"].dims)
    ['1', 'output']
    """
    import degeneracy
    from degeneracy.fingerprint import check_model

    bases = {}
    for method, file in files.items():
        basis = degeneracy.load_basis(file)
        try:
            check_model(basis, model, allow_other_model=allow_other_model)
        except ValueError as err:
            raise ValueError(f"basis_files.{method} ({file}): {err}") from err
        bases[method] = basis
    return bases


def basis_file_config(basis: Any, file: str, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """What determines the stages that use a saved basis: the file, its matrices' fingerprint, the model
    it records, and the fingerprint of this run's model and data.

    >>> import types, torch
    >>> b = types.SimpleNamespace(names=["h"], bases={"h": types.SimpleNamespace(C=torch.eye(2))}, info={})
    >>> sorted(basis_file_config(b, "lib.safetensors", {"model": "ab"}))
    ['basis', 'built_on', 'file', 'fingerprint']
    """
    from degeneracy.fingerprint import basis_fingerprint, recorded_fingerprint

    recorded = recorded_fingerprint(basis) or {}
    return {
        "file": str(file),
        "basis": basis_fingerprint(basis),
        "built_on": recorded.get("model"),
        "fingerprint": dict(fingerprint),
    }
