"""Tables for the terminal (and, later, report files)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


def human(number: float | int | None) -> str:
    """``1234567`` -> ``'1.23M'``; None -> ``'-'``."""
    if number is None:
        return "-"
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= threshold:
            return f"{number / threshold:.3g}{suffix}"
    return f"{number:.3g}" if isinstance(number, float) else str(number)


def format_table(rows: Sequence[dict[str, Any]], max_width: int = 100, max_rows: int = 60) -> str:
    """Left-aligned text columns, right-aligned numbers; long tables keep their head and tail."""
    if not rows:
        return "(empty)"
    columns = list(rows[0])
    if len(rows) > max_rows:
        half = max_rows // 2
        rows = [*rows[:half], {column: "..." for column in columns}, *rows[-half:]]
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    numeric = [all(_is_number(row.get(column)) or row.get(column) in ("...", None) for row in rows)
               for column in columns]
    widths = [max(len(str(column)), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]

    def render(values: list[str]) -> str:
        parts = [value.rjust(width) if right else value.ljust(width)
                 for value, width, right in zip(values, widths, numeric)]
        line = "  ".join(parts).rstrip()
        return line if len(line) <= max_width else line[: max_width - 1] + "…"

    header = render([str(column) for column in columns])
    rule = render(["-" * width for width in widths])
    return "\n".join([header, rule, *(render(line) for line in cells)])


def _is_number(value: Any) -> bool:
    if isinstance(value, str):  # numbers already made human: "1.2M", "0.5x"
        return re.fullmatch(r"-?[\d.]+(e[+-]?\d+)?[kMGT%x]?", value) is not None
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
