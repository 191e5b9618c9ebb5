"""The one way accounting results become plain dicts (for JSON): a dataclass's fields, then its derived
properties.

>>> from dataclasses import dataclass
>>> @dataclass
... class Pair:
...     a: int
...     b: int
...     @property
...     def total(self) -> int:
...         return self.a + self.b
>>> record(Pair(1, 2), derived=("total",), omit=("b",))
{'a': 1, 'total': 3}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any

__all__ = ["record"]


def record(obj: Any, *, derived: Iterable[str] = (), omit: Iterable[str] = ()) -> dict[str, Any]:
    """The dataclass ``obj`` as a dict: its fields in declaration order (values as they are, not
    copied; ``omit`` left out), then the attributes named in ``derived`` (properties).

    >>> from degeneracy.accounting.rows import SourceRow
    >>> record(SourceRow("fc1", "activation rank", 2), omit=("details",))["count"]
    2
    """
    skip = set(omit)
    out = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in skip}
    out.update((name, getattr(obj, name)) for name in derived)
    return out
