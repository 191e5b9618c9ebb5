"""Doctests (``--doctest-modules`` over src/degeneracy) write their files under pytest's own temporary
directories, which pytest rotates, so examples that call ``tempfile`` leave nothing behind in /tmp."""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(autouse=True)
def _doctest_files_in_pytest_tmp(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.setattr(tempfile, "tempdir", str(request.getfixturevalue("tmp_path")))
