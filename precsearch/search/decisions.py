"""The search's decisions: which dtype each choice gets, as Optuna parameters (one categorical
per choice, or a ranked parametrisation for many choices) and as seed plans ordered by
cost-aware sensitivity."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import optuna

from precsearch.runtime.precisions import FP32, PRECISIONS, by_code, low_precisions
from precsearch.search.sensitivity import choice_error
from precsearch.search.space import Choice


def encode(layers: Mapping[str, str], units: list[str], default: str = FP32) -> str:
    """A plan as one letter per unit (``Precision.code``: h=fp16, b=bf16, f=fp32), in unit order."""
    return "".join(PRECISIONS[layers.get(unit, default)].code for unit in units)


def decode(code: str, units: list[str]) -> dict[str, str]:
    return {unit: by_code(char) for unit, char in zip(units, code, strict=True)}


@dataclasses.dataclass
class Decisions:
    """Maps Optuna parameters to per-unit dtypes, per-choice or ranked by cost-aware sensitivity."""

    choices: list[Choice]
    sensitivity: dict[str, dict[str, float | None]]
    flops: dict[str, int]
    ranked: bool
    limit: float = math.inf
    calibration: dict[str, float] = dataclasses.field(default_factory=dict)  # metric error per unit of sensitivity
    speed: dict[str, float] = dataclasses.field(default_factory=dict)        # all-low latency / FP32 latency

    def __post_init__(self) -> None:
        self.low = [p.name for p in sorted(low_precisions(), key=lambda p: p.preference)
                    if any(p.name in c.dtypes for c in self.choices)]
        known = [v for per in self.sensitivity.values() for v in per.values() if v is not None and math.isfinite(v)]
        unknown = sorted(known)[len(known) // 2] if known else 0.0
        self.order: dict[str, list[Choice]] = {}
        for dtype in self.low:
            candidates = [c for c in self.choices if dtype in c.dtypes and len(c.dtypes) > 1]
            # Cost-aware: squared error spent per FLOP saved, cheapest first; unsafe ones last.
            self.order[dtype] = sorted(candidates, key=lambda c: (
                choice_error(self.sensitivity, c.units, dtype, unknown) ** 2 / max(self._flops(c), 1)))
        self.errors = {d: {c.name: choice_error(self.sensitivity, c.units, d, unknown) for c in self.choices}
                       for d in self.low}

    @property
    def preferred_low(self) -> str | None:
        """The low precision that ran the whole model fastest (by ``preference`` when unmeasured)."""
        return min(self.low, key=lambda d: (self.speed.get(d, math.inf), PRECISIONS[d].preference)) \
            if self.low else None

    def _flops(self, choice: Choice) -> int:
        return sum(self.flops.get(unit, 0) for unit in choice.units)

    @staticmethod
    def param(choice: Choice) -> str:
        return choice.name or "<root>"

    def suggest(self, trial: optuna.Trial) -> dict[str, str]:
        if not self.ranked:
            return self.expand({c.name: trial.suggest_categorical(self.param(c), list(c.dtypes))
                                 if len(c.dtypes) > 1 else c.dtypes[0] for c in self.choices})
        if not self.low:
            return self.expand({})
        dtype = trial.suggest_categorical("dtype", self.low)
        fraction = trial.suggest_float("fraction", 0.0, 1.0)
        return self.expand(self._prefix(dtype, round(fraction * len(self.order[dtype]))))

    def by_choice(self, layers: Mapping[str, str]) -> dict[str, str]:
        """Per-unit dtypes as one dtype per choice (its first unit's)."""
        return {c.name: layers.get(c.units[0], FP32) for c in self.choices}

    def params_for(self, layers: dict[str, str]) -> dict[str, Any]:
        """Optuna params for a plan: exact per choice; ranked, the nearest point (its most used
        low dtype, and the share of that dtype's order it lowers)."""
        chosen = self.by_choice(layers)
        if not self.ranked:
            return {self.param(c): chosen[c.name] for c in self.choices if len(c.dtypes) > 1}
        if not self.low:
            return {}
        dtype = max(self.low, key=lambda d: sum(v == d for v in chosen.values()))
        order = self.order[dtype]
        return {"dtype": dtype, "fraction": sum(chosen[c.name] == dtype for c in order) / max(len(order), 1)}

    def _prefix(self, dtype: str, k: int) -> dict[str, str]:
        return {c.name: dtype for c in self.order[dtype][:k]}

    def expand(self, by_choice: dict[str, str]) -> dict[str, str]:
        """Per-unit dtypes; choices not named keep fp32 (or their only dtype)."""
        layers = {}
        for choice in self.choices:
            dtype = by_choice.get(choice.name, FP32 if FP32 in choice.dtypes else choice.dtypes[-1])
            layers.update({unit: dtype for unit in choice.units})
        return layers

    def predicted_prefix(self, dtype: str) -> int:
        """The longest cost-aware prefix whose predicted error (root-sum-square of the units'
        errors, scaled by the calibration) stays within the limit."""
        gain = self.calibration.get(dtype, 1.0)
        total, k = 0.0, 0
        for choice in self.order[dtype]:
            total += self.errors[dtype][choice.name] ** 2
            if gain * math.sqrt(total) > self.limit:
                break
            k += 1
        return k

    def seeds(self) -> list[dict[str, Any]]:
        """Optuna params for the baseline, all-low plans and cost-aware prefixes: around the
        predicted longest feasible prefix, and at fixed fractions."""
        seeds: list[dict[str, Any]] = []
        for dtype in [FP32, *self.low]:
            n = len(self.order.get(dtype, []))
            best = self.predicted_prefix(dtype) if dtype != FP32 else 0
            sizes = [0] if dtype == FP32 else [n, *sorted(
                ({best, best - 1, best + 1, best - 2, best + 2, best - 4, best + 4}
                 | {n - 1, math.ceil(3 * n / 4), math.ceil(n / 2), math.ceil(n / 4)}) & set(range(1, n)),
                key=lambda k: (abs(k - best), -k))]
            for k in sizes:
                if self.ranked and not self.low:
                    seeds.append({})
                elif self.ranked:
                    seeds.append({"dtype": self.low[0] if dtype == FP32 else dtype,
                                  "fraction": 0.0 if dtype == FP32 else k / n})
                else:
                    chosen = self._prefix(dtype, k) if dtype != FP32 else {}
                    seeds.append({self.param(c): chosen.get(c.name, FP32 if FP32 in c.dtypes else c.dtypes[-1])
                                  for c in self.choices if len(c.dtypes) > 1})
        unique = []
        for seed in seeds:
            if seed not in unique:
                unique.append(seed)
        return unique

    def most_sensitive(self, count: int = 5) -> list[tuple[str, str, float]]:
        """(choice, dtype, estimated error) of the riskiest decisions."""
        rows = [(name, dtype, error) for dtype, per in self.errors.items() for name, error in per.items()]
        return sorted(rows, key=lambda row: -row[2])[:count]
