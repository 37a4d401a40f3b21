"""Search strategies (``precsearch optimize --strategy``): Optuna's seeded TPE, and the reference
strategies it is compared with. ``STRATEGIES`` is the registry the CLI and the search read.

The procedural ones are generators: it yields per-unit plans and receives their measurements, and stops when
it has its answer. The study runs them like any other trials, so their plans, trials.csv and
report come out the same way.

- ``global``: one dtype for the whole model, the faster feasible of all-FP16 and all-BF16 (what
  ``torch.autocast`` around the model gives), else FP32.
- ``greedy``: all low precision, then units back to FP32 one at a time, most sensitive first,
  until the limit holds (Intel Neural Compressor's mixed-precision tuning).
- ``bisect``: bisection over the units in graph order for those that must stay FP32
  (Polygraphy's ``debug precision``, ONNX Runtime's ``auto_mixed_precision``).

``random`` (random plans) and ``optuna`` are samplers, not generators; ``exhaustive`` tries every
plan of a small model to establish the true optimum for benchmarks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Generator

import optuna

from precsearch.decisions import Decisions
from precsearch.evaluate import Evaluator, Measurement
from precsearch.precisions import AUTOCAST

Proposer = Generator[dict[str, str], Measurement, None]


def global_plans(decisions: Decisions, limit: float) -> Proposer:
    feasible = False
    for dtype in decisions.low:
        measured = yield decisions.expand({c.name: dtype for c in decisions.choices if dtype in c.dtypes})
        feasible |= measured.error <= limit
    if not feasible:
        yield decisions.expand({})


def greedy_plans(decisions: Decisions, limit: float) -> Proposer:
    dtype = decisions.preferred_low
    if dtype is None:
        yield decisions.expand({})
        return
    lowered = [c for c in decisions.choices if dtype in c.dtypes and len(c.dtypes) > 1]
    riskiest_first = sorted(lowered, key=lambda c: -decisions.errors[dtype][c.name])
    measured = yield decisions.expand({c.name: dtype for c in lowered})
    for choice in riskiest_first:
        if measured.error <= limit:
            return
        lowered.remove(choice)
        measured = yield decisions.expand({c.name: dtype for c in lowered})


def bisect_plans(decisions: Decisions, limit: float) -> Proposer:
    dtype = decisions.preferred_low
    if dtype is None:
        yield decisions.expand({})
        return
    lowered: list[str] = []

    def plan(names: list[str]) -> dict[str, str]:
        return decisions.expand({name: dtype for name in names})

    def must_keep(group: list[str]) -> Generator[dict[str, str], Measurement, list[str]]:
        measured = yield plan(lowered + group)
        if measured.error <= limit:
            lowered.extend(group)
            return []
        if len(group) == 1:
            return group
        half = len(group) // 2
        first = yield from must_keep(group[:half])
        second = yield from must_keep(group[half:])
        return first + second

    yield from must_keep([c.name for c in decisions.choices if dtype in c.dtypes and len(c.dtypes) > 1])


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a strategy picks the next plan: a sampler's trial parameters, or a proposer's plans."""

    name: str
    help: str
    sampler: Callable[[int], optuna.samplers.BaseSampler] = lambda seed: optuna.samplers.RandomSampler(seed=seed)
    proposer: Callable[[Decisions, float], Proposer] | None = None
    seeded: bool = False    # the study starts from sensitivity-seeded plans (and may use the ranked parametrisation)

    @property
    def sampler_name(self) -> str:
        return f"{self.name} (no sampler)" if self.proposer else type(self.sampler(0)).__name__


def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("optuna", "seeded TPE (default)", sampler=_tpe, seeded=True),
    Strategy("random", "random plans"),
    Strategy("global", "one dtype for the whole model", proposer=global_plans),
    Strategy("greedy", "all low, then back to fp32 by sensitivity", proposer=greedy_plans),
    Strategy("bisect", "bisection in graph order", proposer=bisect_plans),
)}


@dataclasses.dataclass(frozen=True)
class Found:
    layers: dict[str, str]
    measurement: Measurement | None   # None when nothing met the limit
    evaluations: int                  # accuracy evaluations of the whole model
    relative: dict[tuple, float] = dataclasses.field(default_factory=dict)  # feasible plan -> latency / FP32


def exhaustive(evaluator: Evaluator, units: list[str], dtypes: tuple[str, ...] = AUTOCAST,
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
    measurement, layers = min(final, key=lambda pair: relative_latency(pair[0]))
    table = {tuple(layers.values()): relative_latency(m) for m, layers in timed}
    table.update({tuple(layers.values()): relative_latency(m) for m, layers in final})
    return Found(layers, measurement, evaluations, table)


def relative_latency(measurement: Measurement) -> float:
    return measurement.latency_ms / measurement.baseline_ms if measurement.baseline_ms else math.inf
