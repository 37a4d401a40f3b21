"""Live progress of a search: a progress bar on a terminal (trials done of the budget, the best
feasible speedup with its interval, elapsed and remaining time), one line per new best elsewhere."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO

import optuna

from precsearch.search.trials import TrialRecord, is_feasible


class Progress:
    """An Optuna callback; ``close()`` when the study stops. ``units``: the study's, in execution order."""

    def __init__(self, budget: int, done: int, limit: float, units: Sequence[str],
                 stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.limit, self.units = limit, units
        self.best: TrialRecord | None = None
        self.bar = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=budget, initial=done, unit="trial", file=self.stream, dynamic_ncols=True,
                            desc="precsearch")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        record = TrialRecord.of(trial, self.units)
        improved = (record is not None and record.error is not None and is_feasible(trial)  # memory budget too
                    and record.speedup is not None
                    and (self.best is None or record.speedup > (self.best.speedup or 0.0)))
        if improved:
            self.best = record
        if self.bar is not None:
            self.bar.update(1)
            if self.best is not None:
                self.bar.set_postfix_str(f"best {describe(self.best)}", refresh=False)
        elif improved and record is not None:
            print(f"precsearch: trial {trial.number}: new best {describe(record)}, error {record.error:.3g}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe(record: TrialRecord) -> str:
    from precsearch.search.bench import format_speedup

    return format_speedup(record.speedup, record.speedup_low, record.speedup_high)
