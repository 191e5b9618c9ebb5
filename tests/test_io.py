"""Result files: atomic, checksummed (a damaged file is refused), ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

import degeneracy
from degeneracy.io import ResultFileError, atomic_write_text, load_tensors, save_tensors


def _flip_byte(path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_tensor_is_refused(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.arange(6, dtype=torch.float64)}, {"kind": "example"})
    load_tensors(path, kind="example")  # intact: loads
    _flip_byte(path, 3)  # inside the last float64 of the data section
    with pytest.raises(ResultFileError, match="damaged example file"):
        load_tensors(path, kind="example")


def test_a_damaged_saved_basis_is_refused(tmp_path, tanh_mlp, inputs) -> None:
    basis = degeneracy.interaction_basis(tanh_mlp, inputs, ["fc1", "fc2", "output"], progress=False)
    path = basis.save(tmp_path / "b.safetensors")
    _flip_byte(path, 1)
    with pytest.raises(ResultFileError, match="damaged"):
        degeneracy.load_basis(path)


def test_changed_metadata_is_refused(tmp_path) -> None:
    """Metadata rewritten by hand (tensors kept) no longer matches the checksum either."""
    path = tmp_path / "x.safetensors"
    tensors = {"a": torch.ones(3)}
    save_tensors(path, tensors, {"kind": "example", "note": "original"})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    header["degeneracy"] = json.dumps({"kind": "example", "note": "edited"})
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(ResultFileError, match="checksum"):
        load_tensors(path, kind="example")


def test_files_without_a_checksum_still_load(tmp_path) -> None:
    path = tmp_path / "old.safetensors"
    save_file({"a": torch.ones(2)}, str(path), metadata={"degeneracy": json.dumps({"kind": "example"})})
    tensors, meta = load_tensors(path, kind="example")
    assert meta["kind"] == "example" and tensors["a"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_result_files_follow_the_umask(tmp_path, mask) -> None:
    previous = os.umask(mask)
    try:
        save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(1)}, {"kind": "example"})
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(previous)
    for name in ("t.safetensors", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
