"""Where a search's results go: ``plan.yaml``, ``pareto/``, ``trials.csv`` and the report, in one
output directory (written atomically, file by file)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from precsearch.runtime.errors import InputError
from precsearch.report.summary import write_report

if TYPE_CHECKING:
    from precsearch.search.loop import SearchResult

PLAN, PARETO = "plan.yaml", "pareto"


def check_writable(out: Path) -> None:
    """Fail before any work if ``out`` cannot become the output directory."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"--out {out}: {existing} exists and is not a directory; give a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {existing} is not writable; give a directory you can write to")


@contextmanager
def output_directory(out: Path) -> Iterator[Path]:
    """``out``, created if needed; a directory this run created is removed again if the run
    fails before writing its results (nothing half-made is left behind)."""
    check_writable(out)
    created = None if out.exists() else next(p for p in reversed((out, *out.parents)) if not p.exists())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--out {out}: cannot create ({error.strerror})") from None
    try:
        yield out
    except BaseException as error:
        if created is not None and not isinstance(error, KeyboardInterrupt):  # an interrupted study resumes
            shutil.rmtree(created, ignore_errors=True)
        raise


def write_results(out: Path, result: SearchResult) -> dict[str, Path]:
    """Write the chosen plan, the other Pareto plans and the report; returns the files by kind.

    Without a feasible plan, a stale ``plan.yaml`` from an earlier run is removed: it must not
    pass for this one.
    """
    plan_path = out / PLAN
    pareto = out / PARETO
    for stale in pareto.glob("plan-*.yaml"):
        stale.unlink()
    if result.plan is None:
        plan_path.unlink(missing_ok=True)
    else:
        result.plan.save(plan_path)
        for index, plan in enumerate(result.pareto, start=1):
            plan.save(pareto / f"plan-{index:03d}.yaml")
    files = write_report(out, result.study)
    if result.plan is not None:
        files["plan"], files["pareto"] = plan_path, pareto
    return files
