"""Reference strategies the Optuna search is measured against.

- ``exhaustive``: every plan; the true optimum for models small enough (3**units plans).
- ``greedy``: all low precision, then the most sensitive units back to FP32 one at a time
  until the limit holds (the error-ordered approach of Intel Neural Compressor's tuning).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from precsearch.search import Evaluator, Measurement


@dataclasses.dataclass(frozen=True)
class Found:
    layers: dict[str, str]
    measurement: Measurement | None   # None when nothing met the limit
    evaluations: int                  # accuracy evaluations of the whole model


def exhaustive(evaluator: Evaluator, units: list[str], dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32"),
               repeats: int = 3, finalists: int = 5) -> Found:
    """Error of every plan; latency of every feasible one; the fastest few re-timed longer."""
    feasible = []
    for combo in itertools.product(dtypes, repeat=len(units)):
        layers = dict(zip(units, combo))
        if evaluator.error(layers) <= evaluator.fidelity.limit:
            feasible.append(layers)
    evaluations = len(dtypes) ** len(units)
    if not feasible:
        return Found({}, None, evaluations)
    timed = sorted(((evaluator.measure(layers, repeats=repeats), layers) for layers in feasible),
                   key=lambda pair: pair[0].latency_ms / pair[0].baseline_ms)
    final = [(evaluator.measure(layers, repeats=5 * repeats), layers) for _, layers in timed[:finalists]]
    measurement, layers = min(final, key=lambda pair: pair[0].latency_ms / pair[0].baseline_ms)
    return Found(layers, measurement, evaluations)


def greedy(evaluator: Evaluator, units: list[str], sensitivity: dict[str, dict[str, float | None]],
           dtype: str = "bf16") -> Found:
    """All ``dtype``, then units back to FP32, most sensitive first, until the limit holds."""
    def risk(unit: str) -> float:
        value = sensitivity.get(unit, {}).get(dtype)
        return math.inf if value is None else value

    layers = {unit: dtype for unit in units}
    evaluations = 0
    for unit in [None, *sorted(units, key=risk, reverse=True)]:
        if unit is not None:
            layers[unit] = "fp32"
        evaluations += 1
        if evaluator.error(layers) <= evaluator.fidelity.limit:
            return Found(dict(layers), evaluator.measure(layers), evaluations)
    return Found({}, None, evaluations)
