"""Memory limits beside the accuracy limit (``optimize --max-weight-mb``, ``--max-peak-mb``).

``LIMITS`` holds one entry per limit; the config, the command line, the trial loop, the
selection, the plan's ``constraint`` section and the report all read it. MB means 2**20 bytes,
as in every ``*_mb`` metric.

>>> budget = MemoryBudget(max_weight_mb=40.0)
>>> budget.constraints(MemoryUse(weight_mb=50.0))
{'weight_mb': 0.25}
>>> budget.describe(), budget.text()
({'max_weight_mb': 40.0}, 'weight memory <= 40 MB')
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from precsearch.runtime.errors import InputError

if TYPE_CHECKING:
    from precsearch.runtime.plan_sections import Constraint

UNMEASURED = 1e9   # the constraint value of a limit whose quantity was not measured: infeasible


@dataclasses.dataclass(frozen=True)
class Limit:
    """One memory limit: where it is stored, what it bounds, how users set it."""

    key: str                 # in a plan's / a study's constraint: ``max_weight_mb``
    measured: str            # the quantity bounded, as Measurement, TrialRecord and plan metrics name it
    flag: str                # the command-line flag
    label: str               # in messages and the report
    devices: tuple[str, ...] | None = None   # device types that measure it (None: every one)


LIMITS = (
    Limit("max_weight_mb", "weight_mb", "--max-weight-mb", "weight memory"),
    Limit("max_peak_mb", "peak_memory_mb", "--max-peak-mb", "peak memory", devices=("cuda",)),
)


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """The quantities the limits bound, where no Measurement or TrialRecord (which have them) is at hand."""

    weight_mb: float | None = None
    peak_memory_mb: float | None = None


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """The memory limits of a search, each None when not set. A plan is within the budget when
    each set limit bounds its measured quantity (``weight_mb``: the model's weights while the
    plan is applied; ``peak_memory_mb``: the device's peak while it runs, CUDA only)."""

    max_weight_mb: float | None = None
    max_peak_mb: float | None = None

    def __post_init__(self) -> None:
        for limit in LIMITS:
            value = getattr(self, limit.key)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and math.isfinite(value) and value > 0):
                raise InputError(f"{limit.flag} {value!r}: must be a positive finite number of MB (2**20 bytes)")

    @classmethod
    def of(cls, constraint: Constraint | None) -> MemoryBudget:
        """The budget a plan's or a study's ``constraint`` records (none in plans made before it)."""
        return cls(**{limit.key: getattr(constraint, limit.key, None) for limit in LIMITS})

    def limits(self) -> list[tuple[Limit, float]]:
        """The limits that are set, with their values."""
        return [(limit, getattr(self, limit.key)) for limit in LIMITS if getattr(self, limit.key) is not None]

    def __bool__(self) -> bool:
        return bool(self.limits())

    def describe(self) -> dict[str, float]:
        """The fields a plan's and a study's ``constraint`` gain (none without a budget, so that
        studies made before keep their fingerprint)."""
        return {limit.key: float(value) for limit, value in self.limits()}

    def text(self) -> str:
        """``weight memory <= 40 MB``; "" without a budget."""
        return ", ".join(f"{limit.label} <= {value:g} MB" for limit, value in self.limits())

    def flags(self) -> str:
        """``--max-weight-mb 40``; "" without a budget."""
        return " ".join(f"{limit.flag} {value:g}" for limit, value in self.limits())

    def check_device(self, device_type: str) -> None:
        """A limit the device cannot measure is bad input."""
        for limit, _ in self.limits():
            if limit.devices is not None and device_type not in limit.devices:
                raise InputError(f"{limit.flag}: the {device_type} device does not report {limit.label} "
                                 f"(measured on {', '.join(limit.devices)} only); drop {limit.flag}")

    def constraints(self, measured: Any) -> dict[str, float]:
        """Optuna constraint values of ``measured`` (feasible at <= 0): per set limit, the share by
        which the quantity exceeds it (``weight_mb / max_weight_mb - 1``), comparable across
        models and with the error's; ``UNMEASURED`` when the quantity is unknown."""
        values = {}
        for limit, value in self.limits():
            quantity = getattr(measured, limit.measured, None)
            values[limit.measured] = UNMEASURED if quantity is None else min(quantity / value - 1, UNMEASURED)
        return values

    def allows(self, measured: Any) -> bool:
        return all(value <= 0 for value in self.constraints(measured).values())

    def violations(self, measured: Any) -> list[str]:
        """``["weight memory 50.1 MB > 40 MB"]``: each limit ``measured`` exceeds."""
        found = []
        for limit, value in self.limits():
            quantity = getattr(measured, limit.measured, None)
            if quantity is None or quantity > value:
                shown = "not measured" if quantity is None else f"{quantity:.4g} MB"
                found.append(f"{limit.label} {shown} > {value:g} MB")
        return found


def label_of(constraint: str) -> str:
    """A trial constraint's name for people: ``weight_mb`` -> ``weight memory``; ``error`` stays."""
    return next((limit.label for limit in LIMITS if limit.measured == constraint), constraint)
