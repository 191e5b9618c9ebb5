"""`degeneracy COMMAND --help` lists every config field of each command, nested ones included
(``sampler.num_chains``, ``ablation.delta``), each with its type and default."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from degeneracy.commands import app
from degeneracy.commands.config import BasisRunConfig, DegeneracyRunConfig, GraphRunConfig, LLCRunConfig


def _leaves(config: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, default) of every leaf field, walked independently of the help code."""
    found = []
    for name, info in config.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found += _leaves(info.annotation, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", info.get_default(call_default_factory=True)))
    return found


def _flat(text: str) -> str:
    return re.sub(r"[\s│]+", "", text)  # rich wraps the help text in a box: compare without it


@pytest.mark.parametrize(
    ("command", "config"),
    [("basis", BasisRunConfig), ("graph", GraphRunConfig), ("degeneracy", DegeneracyRunConfig),
     ("llc", LLCRunConfig)],
)
def test_help_lists_every_field_with_its_type_and_default(command, config) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    shown = _flat(result.output)
    leaves = _leaves(config)
    assert len(leaves) >= 10
    for name, default in leaves:
        match = re.search(re.escape(name) + r"\(([^;]+);default(.+?)\)[,.]", shown)
        assert match is not None, (name, shown[:300])
        assert match.group(1), name  # a type
        assert match.group(2).startswith(_flat(repr(default))), (name, match.group(2), default)
