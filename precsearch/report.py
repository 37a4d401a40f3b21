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


def trials_frame(study: Any) -> Any:
    """One row per trial: per-dtype unit counts, the plan, objectives, constraint, feasibility."""
    import pandas as pd

    rows = []
    for trial in study.get_trials(deepcopy=False):
        if not trial.state.is_finished() and trial.state.name != "RUNNING":
            continue  # enqueued seeds not reached within the budget
        attrs = trial.user_attrs
        code = attrs.get("plan", "")
        constraint = trial.constraints.get("error")
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        rows.append({
            "trial": trial.number, "state": trial.state.name,
            "fp16": code.count("h"), "bf16": code.count("b"), "fp32": code.count("f"), "plan": code,
            "latency_ms": trial.value, "measured_ms": attrs.get("latency_ms"),
            "baseline_ms": attrs.get("baseline_ms"),
            "speedup": attrs["baseline_ms"] / attrs["latency_ms"] if attrs.get("latency_ms") else None,
            "error": attrs.get("error", float("inf") if code else None), "constraint": constraint,
            "feasible": constraint is not None and constraint <= 0 and trial.state.name == "COMPLETE",
            "peak_memory_mb": attrs.get("peak_memory_mb"), "duration_s": duration,
            "failure": attrs.get("failure"),
        })
    return pd.DataFrame(rows)
