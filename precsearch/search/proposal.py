"""A model-based proposal: predict a plan's error and latency from per-unit numbers, calibrate
the prediction on the measured trials, and solve the constrained choice exactly.

Error (squared errors add): independent rounding errors add in quadrature, so
``error(plan) ~ sqrt(sum over lowered choices of (gain[d] * e[c, d])^2)``, where ``e[c, d]`` is
the choice's sensitivity (root-sum-square of its units') and ``gain[d]`` is fitted per dtype as
the median measured / predicted ratio of the trials that lower only that dtype.

Latency (relative to FP32): ``1 - sum over lowered choices of (alpha[d] * flops_share[c] +
beta[d] * bytes_share[c]) + gamma * boundaries / (choices + 1)``, where the boundaries are the
dtype changes along the choices in execution order (the model's FP32 inputs and outputs at the
ends). The coefficients are a ridge least-squares fit on the measured trials, pulled towards the
probe's all-low latency.

The choice is then a multi-choice knapsack: minimise predicted latency subject to predicted
squared error <= limit^2. ``solve`` does it exactly by dynamic programming over the choices in
execution order, with the error budget in ``resolution`` steps (each weight rounded up, so every
answer keeps its predicted error within the budget) and the previous choice's dtype as state
(so the boundary price is exact along the chain).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence

import numpy as np

from precsearch.runtime.precisions import FP32

RESOLUTION = 1000                         # steps of the discretised error budget
FRONT = (0.5, 0.7, 0.85, 1.0)             # fractions of limit^2 proposed for measurement
RIDGE = 0.05                              # pull of the latency fit towards its prior


@dataclasses.dataclass(frozen=True)
class Option:
    """One dtype a choice can take: its squared predicted error and its predicted latency saving."""

    dtype: str
    weight: float
    saving: float


@dataclasses.dataclass(frozen=True)
class Observation:
    """A measured plan: each choice's dtype, its error and its latency relative to FP32."""

    by_choice: dict[str, str]
    error: float
    relative_latency: float


def solve(items: Sequence[Sequence[Option]], capacity: float, boundary_price: float = 0.0,
          resolution: int = RESOLUTION) -> tuple[list[str], float]:
    """The option per item minimising ``1 - sum saving + boundary_price * dtype changes`` (FP32
    before the first item and after the last) subject to ``sum weight <= capacity``.

    Exact on the discretised budget (weights rounded up to ``capacity / resolution`` steps).
    Returns the dtypes and the predicted relative latency; ValueError when nothing fits.
    """
    step = capacity / resolution if capacity > 0 else 1.0
    budget = resolution if capacity > 0 else 0
    states: list[str] = [FP32]
    cost = {FP32: _reachable_at_zero(budget)}
    back: list[dict[str, tuple[list[str], int, np.ndarray]]] = []  # per item: dtype -> (previous states, weight, origin)
    for options in items:
        new_cost, new_back = {}, {}
        for option in options:
            if not option.weight <= capacity:  # over the budget alone, infinite (an overflow) or unknown
                continue
            weight = 0 if option.weight <= 0 else min(math.ceil(option.weight / step - 1e-9), budget)
            best, best_from = _best_predecessor(cost, states, option.dtype, boundary_price)
            shifted = np.full(budget + 1, np.inf)
            shifted[weight:] = best[:budget + 1 - weight] - option.saving
            origin = np.zeros(budget + 1, dtype=np.int64)
            origin[weight:] = best_from[:budget + 1 - weight]
            new_cost[option.dtype], new_back[option.dtype] = shifted, (states, weight, origin)
        if not new_cost:
            raise ValueError("an item has no option within the budget")
        states, cost = list(new_cost), new_cost
        back.append(new_back)
    final, final_from = _best_predecessor(cost, states, FP32, boundary_price)
    used = int(np.argmin(final))
    if not math.isfinite(final[used]):
        raise ValueError("no option fits the budget for every item")
    return _trace(back, states[int(final_from[used])], used), 1.0 + float(final[used])


def _reachable_at_zero(budget: int) -> np.ndarray:
    cost = np.full(budget + 1, np.inf)
    cost[0] = 0.0
    return cost


def _best_predecessor(cost: dict[str, np.ndarray], states: list[str], dtype: str,
                      boundary_price: float) -> tuple[np.ndarray, np.ndarray]:
    """Per budget used, the cheapest previous state for entering ``dtype``, and its index."""
    stacked = np.stack([cost[s] + (boundary_price if s != dtype else 0.0) for s in states])
    return stacked.min(axis=0), stacked.argmin(axis=0)


def _trace(back: list[dict], last: str, used: int) -> list[str]:
    dtypes, state = [], last
    for step in reversed(back):
        states, weight, origin = step[state]
        dtypes.append(state)
        previous = int(origin[used])
        used -= weight
        state = states[previous]
    return dtypes[::-1]


@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """``error = sqrt(sum (gain[d] * errors[d][choice])^2)`` over the lowered choices."""

    errors: dict[str, dict[str, float]]
    gains: dict[str, float]

    def weight(self, choice: str, dtype: str) -> float:
        """The squared predicted error lowering ``choice`` to ``dtype`` adds."""
        return 0.0 if dtype == FP32 else (self.gains.get(dtype, 1.0) * self.errors[dtype][choice]) ** 2

    def predict(self, by_choice: dict[str, str]) -> float:
        return math.sqrt(sum(self.weight(c, d) for c, d in by_choice.items()))

    def calibrated(self, observations: Sequence[Observation]) -> ErrorModel:
        """Each dtype's gain: the median measured / predicted ratio of the trials that lower only
        it (the prior gain where none did)."""
        gains = dict(self.gains)
        for dtype in self.errors:
            ratios = [o.error / raw for o in observations
                      if set(o.by_choice.values()) == {dtype} | ({FP32} & set(o.by_choice.values()))
                      and math.isfinite(o.error)
                      for raw in [ErrorModel(self.errors, {}).predict(o.by_choice)] if 0 < raw < math.inf]
            if ratios:
                gains[dtype] = statistics.median(ratios)
        return ErrorModel(self.errors, gains)


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """``relative latency = 1 - sum (alpha[d] flops + beta[d] bytes) + gamma * boundary share``."""

    flops: dict[str, float]       # each choice's share of the model's FLOPs
    bytes: dict[str, float]       # each choice's share of the parameters the model reads whole per call
    order: list[str]              # choices in execution order
    alpha: dict[str, float]
    beta: dict[str, float]
    gamma: float = 0.0

    def saving(self, choice: str, dtype: str) -> float:
        if dtype == FP32:
            return 0.0
        return self.alpha.get(dtype, 0.0) * self.flops[choice] + self.beta.get(dtype, 0.0) * self.bytes[choice]

    @property
    def boundary_price(self) -> float:
        return self.gamma / (len(self.order) + 1)

    def boundaries(self, by_choice: dict[str, str]) -> int:
        chain = [FP32, *(by_choice.get(c, FP32) for c in self.order), FP32]
        return sum(a != b for a, b in itertools.pairwise(chain))

    def predict(self, by_choice: dict[str, str]) -> float:
        return (1.0 - sum(self.saving(c, d) for c, d in by_choice.items())
                + self.boundary_price * self.boundaries(by_choice))

    def _features(self, by_choice: dict[str, str], dtypes: list[str]) -> list[float]:
        flops = [sum(self.flops[c] for c, d in by_choice.items() if d == dtype) for dtype in dtypes]
        bytes_ = [sum(self.bytes[c] for c, d in by_choice.items() if d == dtype) for dtype in dtypes]
        return [*flops, *bytes_, -self.boundaries(by_choice) / (len(self.order) + 1)]

    def calibrated(self, observations: Sequence[Observation]) -> LatencyModel:
        """A ridge least-squares fit of the savings on the measured trials, towards this model."""
        usable = [o for o in observations if math.isfinite(o.relative_latency)]
        if not usable:
            return self
        dtypes = sorted(self.alpha)
        prior = np.array([*(self.alpha[d] for d in dtypes), *(self.beta.get(d, 0.0) for d in dtypes), self.gamma])
        features = np.array([self._features(o.by_choice, dtypes) for o in usable])
        saved = np.array([1.0 - o.relative_latency for o in usable])
        ridge = RIDGE * np.eye(len(prior))
        fitted = np.linalg.solve(features.T @ features + ridge, features.T @ saved + ridge @ prior)
        k = len(dtypes)
        return dataclasses.replace(self, alpha=dict(zip(dtypes, fitted[:k].tolist())),
                                   beta=dict(zip(dtypes, fitted[k:2 * k].tolist())), gamma=max(float(fitted[-1]), 0.0))


@dataclasses.dataclass(frozen=True)
class Proposal:
    """The two models over the search's choices, and the plans they propose."""

    options: dict[str, tuple[str, ...]]   # choice -> its dtypes, in execution order
    error: ErrorModel
    latency: LatencyModel

    def predict(self, by_choice: dict[str, str]) -> tuple[float, float]:
        """(predicted error, predicted speedup over FP32)."""
        relative = self.latency.predict(by_choice)
        return self.error.predict(by_choice), 1.0 / relative if relative > 0 else math.inf

    def calibrated(self, observations: Sequence[Observation]) -> Proposal:
        return dataclasses.replace(self, error=self.error.calibrated(observations),
                                   latency=self.latency.calibrated(observations))

    def best(self, capacity: float) -> dict[str, str]:
        """The plan of least predicted latency whose squared predicted error is within ``capacity``."""
        items = [[Option(d, self.error.weight(c, d), self.latency.saving(c, d)) for d in dtypes]
                 for c, dtypes in self.options.items()]
        dtypes, _ = solve(items, capacity, self.latency.boundary_price)
        return dict(zip(self.options, dtypes))

    def front(self, limit: float, fractions: Sequence[float] = FRONT) -> list[dict[str, str]]:
        """The best plans for error budgets ``limit^2 * fraction``, distinct, tightest first."""
        plans: list[dict[str, str]] = []
        for fraction in fractions:
            plan = self.best(limit * limit * fraction)
            if plan not in plans:
                plans.append(plan)
        return plans
