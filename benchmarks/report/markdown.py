"""Markdown for reports: numbers as recorded (rounded for display only), tables, and a generic renderer that lays
out any JSON value: scalars as key/value tables, dicts of dicts and lists of dicts as tables (one row each),
long numeric lists as a count and their first/last/min/max, multi-line strings as code blocks."""

from __future__ import annotations

import math
import re
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LIST_INLINE = 8  # numeric lists longer than this are summarised


def num(x: Any) -> str:
    """A recorded value for display: ints in full with separators; floats to 4 significant digits (from 1000 up:
    to the unit, with separators); booleans yes/no; None as a dash."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x == 0:
            return "0"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    return cell_text(str(x))


def ratio(x: Any) -> str:
    return f"{x:.2f}x" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def percent(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def cell_text(text: str) -> str:
    return _ANSI.sub("", text).replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table; cells that are not strings go through `num`."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        out.append("| " + " | ".join(c if isinstance(c, str) else num(c) for c in row) + " |")
    return out + [""]


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) and not (isinstance(v, str) and "\n" in v)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def summary(v: Any) -> str:
    """A list (or small dict) in one cell."""
    if isinstance(v, list):
        if not v:
            return "[]"
        if _numbers(v) and len(v) > _LIST_INLINE:
            return f"{len(v)} values: first {num(v[0])}, last {num(v[-1])}, min {num(min(v))}, max {num(max(v))}"
        if all(_scalar(x) for x in v):
            shown = ", ".join(num(x) for x in v[:_LIST_INLINE])
            return f"[{shown}" + (f", ... ({len(v)} in all)]" if len(v) > _LIST_INLINE else "]")
        return f"{len(v)} entries"
    if isinstance(v, dict):
        return ", ".join(f"{k} {summary(x) if not _scalar(x) else num(x)}" for k, x in v.items())
    return num(v)


def _flat(d: dict[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Scalar and list leaves of a dict, nested dicts flattened to `a.b` keys (up to `depth` levels)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 1 and v:
            out.update(_flat(v, key + ".", depth - 1))
        else:
            out[key] = v
    return out


def _row_table(rows: dict[str, dict[str, Any]], first: str) -> list[str]:
    flat = {name: _flat(r) for name, r in rows.items()}
    columns: list[str] = []
    for r in flat.values():
        columns += [c for c in r if c not in columns]
    # a field that is a dict in some rows and None in others: its flattened columns say it all
    columns = [c for c in columns if not any(d.startswith(c + ".") for d in columns)]
    return table(
        [first, *columns], [[cell_text(str(name)), *(_cell(r.get(c, "")) for c in columns)] for name, r in flat.items()]
    )


def _cell(v: Any) -> str:
    return num(v) if _scalar(v) and v != "" else (summary(v) if v != "" else "")


def _flat_enough(v: Any) -> bool:
    """Fits one table cell (or a few flattened columns): a scalar, a list of scalars, a dict of scalars."""
    return (
        _scalar(v)
        or isinstance(v, (list, dict))
        and all(_scalar(x) for x in (v.values() if isinstance(v, dict) else v))
    )


def render_value(title: str, value: Any, level: int = 3) -> list[str]:
    """Any JSON value as markdown under a heading of `level` (deeper values get deeper headings, up to 6)."""
    head = ["#" * min(level, 6) + " " + title, ""] if title else []
    if _scalar(value) or _numbers(value) or (isinstance(value, list) and all(_scalar(x) for x in value)):
        return head + [summary(value) if isinstance(value, list) else num(value), ""]
    if isinstance(value, str):
        return head + ["```", _ANSI.sub("", value).rstrip(), "```", ""]
    if isinstance(value, list):
        if all(isinstance(x, dict) and all(_flat_enough(y) for y in x.values()) for x in value):
            return head + _row_table({str(i): x for i, x in enumerate(value)}, "#")
        out = list(head)
        for i, x in enumerate(value):
            out += render_value(f"{title}[{i}]", x, level + 1)
        return out
    if (
        isinstance(value, dict)
        and value
        and all(isinstance(x, dict) for x in value.values())
        and all(all(_flat_enough(y) for y in x.values()) for x in value.values())
    ):
        return head + _row_table(value, "")
    out = list(head)
    scalars = {
        k: v
        for k, v in value.items()
        if _scalar(v) or _numbers(v) or isinstance(v, list) and all(_scalar(x) for x in v)
    }
    if scalars:
        out += table(
            ["", "value"],
            [[cell_text(k), _cell(v) if not isinstance(v, list) else summary(v)] for k, v in scalars.items()],
        )
    for k, v in value.items():
        if k not in scalars:
            out += render_value(f"{title}.{k}" if title else k, v, level + 1)
    return out


def columns(
    rows: dict[str, dict[str, Any]] | list[dict[str, Any]], first: str, cols: list[tuple[str, str, Any]]
) -> list[str]:
    """A table of chosen fields: `cols` = (header, dotted key, formatter or None for `num`); missing: blank."""
    items = rows.items() if isinstance(rows, dict) else ((None, r) for r in rows)
    out = []
    for name, r in items:
        flat = _flat(r, depth=3)
        cells = [] if name is None else [cell_text(str(name))]
        for _, key, fmt in cols:
            v = flat.get(key)
            cells.append("" if key not in flat else (fmt(v) if fmt else _cell(v)))
        out.append(cells)
    return table(([first] if isinstance(rows, dict) else []) + [h for h, _, _ in cols], out)
