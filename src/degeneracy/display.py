"""How results show themselves: a readable plain ``repr`` and a compact HTML table for notebooks.

Every result class (bases, graphs, modules, degeneracy reports, LLC results) describes itself as a
title, a few ``(quantity, value)`` facts and at most one table; :func:`text_summary` renders that as
plain text (``repr``/``print``) and :func:`html_summary` as HTML (Jupyter's ``_repr_html_``). The HTML
report (:mod:`degeneracy.report.html`) uses the same :func:`html_table` and :func:`format_value`.
Pure Python, no dependency: the lowest layer.

>>> print(text_summary("Basis (lib)", [("node layers", 2)], ["layer", "d̂"], [["a", 3], ["b", 12]]))
Basis (lib)
  node layers: 2
  layer  d̂
  a       3
  b      12
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["format_value", "html_table", "html_summary", "text_summary", "escape"]

MAX_ROWS = 12
"""Tables in a ``repr`` or a notebook cell show at most this many rows (then a "… n more" line)."""

_STYLE_TABLE = "border-collapse:collapse;font-size:0.9em;margin:0.2em 0"
_STYLE_CELL = "padding:0.15em 0.6em;border-bottom:1px solid #ddd"


def escape(text: Any) -> str:
    """``text`` as HTML-safe text (``&``, ``<``, ``>`` and quotes escaped).

    >>> escape("a<b & 'c'")
    'a&lt;b &amp; &#x27;c&#x27;'
    """
    return html.escape(str(text), quote=True)


def format_value(value: Any) -> str:
    """A number as people read it: integers with thousands separators, other floats with 4
    significant digits, None and NaN as ``–``; sequences joined by commas; anything else ``str``.

    >>> format_value(3466), format_value(2742.0), format_value(0.0123456), format_value(None)
    ('3,466', '2,742', '0.01235', '–')
    >>> format_value([1.5, 2]), format_value(True)
    ('1.5, 2', 'True')
    """
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    caption: str | None = None,
    max_rows: int | None = None,
    style: bool = False,
) -> str:
    """An HTML table with a header row; numbers are formatted by :func:`format_value` and
    right-aligned (class ``num``), text is escaped. ``max_rows`` cuts long tables with a "… n more
    rows" line; ``style=True`` inlines a minimal style (for notebooks, which drop page styles).

    >>> out = html_table(["layer", "d̂"], [["a<1>", 3]])
    >>> head, body = out.split("<tbody>")
    >>> head
    '<table><thead><tr><th>layer</th><th>d̂</th></tr></thead>'
    >>> body
    '<tr><td>a&lt;1&gt;</td><td class="num">3</td></tr></tbody></table>'
    >>> "2 more rows" in html_table(["i"], [[1], [2], [3]], max_rows=1)
    True
    """
    table = f' style="{_STYLE_TABLE}"' if style else ""
    cell = f' style="{_STYLE_CELL}"' if style else ""
    num = f' style="{_STYLE_CELL};text-align:right"' if style else ""
    parts = [f"<table{table}>"]
    if caption:
        parts.append(f"<caption>{escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th{cell}>{escape(h)}</th>" for h in headers) + "</tr></thead>")
    parts.append("<tbody>")
    shown = rows if max_rows is None else rows[:max_rows]
    for row in shown:
        cells = []
        for value in row:
            if _is_number(value):
                cells.append(f'<td class="num"{num}>{escape(format_value(value))}</td>')
            else:
                cells.append(f"<td{cell}>{escape(format_value(value))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    if len(shown) < len(rows):
        parts.append(f'<tr><td colspan="{len(headers)}"{cell}>… {len(rows) - len(shown)} more rows</td></tr>')
    parts.append("</tbody></table>")
    return "".join(parts)


def html_summary(
    title: str,
    facts: Sequence[tuple[str, Any]],
    headers: Sequence[str] | None = None,
    rows: Sequence[Sequence[Any]] | None = None,
) -> str:
    """A result's notebook display: its title, a ``quantity | value`` table of ``facts`` and, when
    given, one more table (at most :data:`MAX_ROWS` rows). Self-styled: notebooks show it as is.

    >>> out = html_summary("Modules", [("modules", 4), ("modularity Q", 0.3453)])
    >>> out.startswith('<div class="degeneracy-summary"'), "<th" in out, "0.3453" in out
    (True, True, True)
    """
    parts = [
        '<div class="degeneracy-summary" style="font-family:sans-serif">',
        f'<div style="font-weight:bold;margin-bottom:0.2em">{escape(title)}</div>',
    ]
    if facts:
        parts.append(html_table(["quantity", "value"], [list(f) for f in facts], style=True))
    if headers is not None and rows:
        parts.append(html_table(headers, rows, max_rows=MAX_ROWS, style=True))
    parts.append("</div>")
    return "".join(parts)


def text_summary(
    title: str,
    facts: Sequence[tuple[str, Any]],
    headers: Sequence[str] | None = None,
    rows: Sequence[Sequence[Any]] | None = None,
) -> str:
    """The plain-text form of :func:`html_summary`: the title, one ``quantity: value`` line per fact
    and the table with aligned columns (numbers right-aligned; at most :data:`MAX_ROWS` rows).

    >>> print(text_summary("Graph", [("edges", 12000)], ["pair", "edges"], [["a → b", 5], ["b → c", 7]]))
    Graph
      edges: 12,000
      pair   edges
      a → b      5
      b → c      7
    """
    lines = [title, *(f"  {name}: {format_value(value)}" for name, value in facts)]
    if headers is not None and rows:
        shown = list(rows[:MAX_ROWS])
        cells = [[format_value(v) for v in row] for row in shown]
        widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        numeric = [all(_is_number(row[i]) for row in shown) for i in range(len(headers))]

        def line(values: Sequence[str]) -> str:
            return (
                "  "
                + "  ".join(
                    v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
                ).rstrip()
            )

        lines.append(line([str(h) for h in headers]))
        lines += [line(r) for r in cells]
        if len(rows) > len(shown):
            lines.append(f"  … {len(rows) - len(shown)} more rows")
    return "\n".join(lines)
