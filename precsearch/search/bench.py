"""Latency (and, on CUDA, peak memory) measured on the real device, as estimates with an
uncertainty.

Candidates are timed interleaved, in rounds (A B, B A, ...), so that a noisy neighbour slows
all of them alike and no candidate owns the first or last place of a round. A speedup is the
median of the per-round ratios baseline / candidate, with a distribution-free confidence
interval for that median from order statistics (the ranks a binomial(n, 1/2) gives; no
assumption about the noise's shape). Timing can stop early through ``until``, once the
intervals say enough. ``time_against_itself`` is the A/A check of all this: its truth is 1.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from precsearch.runtime.weights import MB
from precsearch.runtime.workload import GenerationStats, stats_of

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    samples_ms: tuple[float, ...]
    peak_memory_mb: float | None  # measured on CUDA only; None elsewhere


def _synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


Runner = Callable[[], Any] | tuple[Callable[[], AbstractContextManager], Callable[[], Any]]
"""What one turn runs: a zero-argument callable, or ``(context_factory, run)`` (only ``run`` is timed)."""


def time_interleaved(candidates: Mapping[str, Runner], *, device_type: str = "cpu", repeats: int = 15,
                     warmup: int = 2, max_seconds: float | None = None, min_repeats: int = 3,
                     until: Callable[[dict[str, list[float]]], bool] | None = None,
                     seed: int = 0) -> dict[str, Timing]:
    """Median latency of each candidate, measured in rounds: every candidate once per round.

    A candidate is a zero-argument callable, or ``(context_factory, run)``: the context (e.g.
    applying a plan) is entered around each turn but only ``run()`` is timed. At most
    ``repeats`` rounds (rounded up to whole pairs); after ``min_repeats``, stops early once
    ``max_seconds`` are spent or ``until(samples)`` says the samples so far settle the question.

    No candidate owns a place in the round: the order is drawn (``seed``) for each pair of
    rounds and reversed in the pair's second round (``round_orders``), and the rounds stop on
    whole pairs, so every candidate runs first as often as last. The garbage collector is
    paused while a run is timed, so that garbage one turn's context made (e.g. applying a
    plan) is not collected on another turn's clock.
    """
    turns: dict[str, tuple[Callable[[], AbstractContextManager[Any]], Callable[[], Any]]] = {
        name: c if isinstance(c, tuple) else (nullcontext, c) for name, c in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in turns}
    peaks: dict[str, float] = {}
    orders = round_orders(list(turns), seed)
    for _ in range(warmup):
        for name in next(orders):
            _timed_turn(*turns[name], device_type)
    orders = round_orders(list(turns), seed + 1)  # the timed rounds start with a whole pair
    pair = 2 if len(turns) > 1 else 1
    started = time.perf_counter()
    for done in range(1, -(-repeats // pair) * pair + 1):
        for name in next(orders):
            elapsed, peak = _timed_turn(*turns[name], device_type, peak=done == 1 and device_type == "cuda")
            samples[name].append(elapsed)
            if peak is not None:
                peaks[name] = peak
        if done >= min_repeats and done % pair == 0 and (
                (max_seconds is not None and time.perf_counter() - started > max_seconds)
                or (until is not None and until(samples))):
            break
    return {name: Timing(statistics.median(values), tuple(values), peaks.get(name))
            for name, values in samples.items()}


def round_orders(names: list[str], seed: int = 0) -> Iterator[list[str]]:
    """The order of each round: a permutation drawn with ``seed``, then its reverse, in pairs.

    Over a pair every candidate's mean place is the middle, so a place that is faster or slower
    (the first turn after the bookkeeping between rounds) moves every candidate alike. What ran
    just before a turn matters too (a turn after one of its own kind finds warm caches): with two
    candidates the one order is kept (A B, B A, A B, ...), so that each follows itself and the
    other equally often; with more, each pair draws its own order, balanced on average."""
    rng = random.Random(seed)
    order = rng.sample(names, len(names))
    while True:
        yield order
        yield order[::-1]
        if len(names) > 2:
            order = rng.sample(names, len(names))


def _timed_turn(context: Callable[[], AbstractContextManager], run: Callable[[], Any], device_type: str,
                peak: bool = False) -> tuple[float, float | None]:
    """One turn: enter the context, time ``run()`` alone with the garbage collector paused.
    ``(milliseconds, peak CUDA memory in MB if asked, else None)``."""
    with context():
        if peak:
            torch.cuda.reset_peak_memory_stats()
        collecting = gc.isenabled()
        gc.disable()
        try:
            _synchronize(device_type)
            begin = time.perf_counter()
            run()
            _synchronize(device_type)
            elapsed = (time.perf_counter() - begin) * 1e3
        finally:
            if collecting:
                gc.enable()
        return elapsed, torch.cuda.max_memory_allocated() / MB if peak else None


@dataclasses.dataclass(frozen=True)
class Speedup:
    """Median of per-round speedups with its confidence interval ``[low, high]``."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def half_width(self) -> float:
        """Half the interval, relative to the median (0.02: the speedup is known to about ±2%)."""
        return (self.high - self.low) / 2 / self.median if self.median > 0 else math.inf

    def clearly_faster_than(self, other: Speedup) -> bool:
        """Unpaired: the intervals do not overlap (``clearly_faster`` uses the rounds' pairing)."""
        return self.low > other.high

    def __str__(self) -> str:
        return format_speedup(self.median, self.low, self.high)


def speedup(baseline_ms: Sequence[float], candidate_ms: Sequence[float], confidence: float = CONFIDENCE) -> Speedup:
    """The speedup of a candidate over the baseline timed in the same rounds."""
    ratios = sorted(b / c for b, c in zip(baseline_ms, candidate_ms, strict=True) if c > 0)
    if not ratios:
        return Speedup(math.nan, math.nan, math.nan, 0)
    low, high = median_interval(ratios, confidence)
    return Speedup(ratio_median(ratios), low, high, len(ratios))


def clearly_faster(a_ms: Sequence[float], b_ms: Sequence[float], confidence: float = CONFIDENCE) -> bool:
    """``a`` is clearly faster than ``b``, timed in the same rounds: the interval of the per-round
    ratios b / a lies above 1. Pairing the rounds cancels the noise they share, which two
    intervals against a common baseline cannot: plans 9% apart can both overlap FP32's noise."""
    return speedup(b_ms, a_ms, confidence).low > 1.0


def ratio_median(ratios: Sequence[float]) -> float:
    """The median of ratios; of an even count, the geometric mean of the middle two, so that
    swapping baseline and candidate gives exactly the inverse (and rounds 1.3 and 1 / 1.3 give 1)."""
    ordered = sorted(ratios)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else math.sqrt(ordered[middle - 1] * ordered[middle])


@dataclasses.dataclass(frozen=True)
class RaceResult:
    """Named runners timed in the same rounds: each one's ``Timing``, its speedup over the
    ``baseline`` runner (the baseline's own is 1), and the stats of those that generate.

    Round i of every runner is the same round, so any two compare round by round:
    ``clearly_faster(a, b)``, or ``speedup(a, over=b)``.
    """

    baseline: str
    timings: dict[str, Timing]
    speedups: dict[str, Speedup]
    generation: dict[str, GenerationStats] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, timings: dict[str, Timing], baseline: str,
           generation: dict[str, GenerationStats] | None = None) -> RaceResult:
        base = timings[baseline].samples_ms
        return cls(baseline, timings, {name: speedup(base, timing.samples_ms) for name, timing in timings.items()},
                   generation or {})

    @property
    def baseline_ms(self) -> float:
        return self.timings[self.baseline].median_ms

    def speedup(self, name: str, over: str | None = None) -> Speedup:
        """``name``'s speedup over ``over`` (default: the baseline), round by round."""
        if over is None or over == self.baseline:
            return self.speedups[name]
        return speedup(self.timings[over].samples_ms, self.timings[name].samples_ms)

    def clearly_faster(self, a: str, b: str) -> bool:
        """``a`` is clearly faster than ``b`` (``bench.clearly_faster``, on their rounds)."""
        return clearly_faster(self.timings[a].samples_ms, self.timings[b].samples_ms)


def race(runners: Mapping[str, Runner], *, baseline: str, device_type: str = "cpu", repeats: int = 15,
         warmup: int = 2, max_seconds: float | None = None, min_repeats: int = 3,
         until: Callable[[dict[str, list[float]]], bool] | None = None, seed: int = 0) -> RaceResult:
    """``runners`` timed interleaved (``time_interleaved``, whose options these are), with every
    runner's speedup over ``baseline``, one of them.

    >>> result = race({"fp32": run_fp32, "bf16": (apply_bf16, run_bf16)}, baseline="fp32")  # doctest: +SKIP
    >>> str(result.speedups["bf16"])                                                       # doctest: +SKIP
    '1.31x [1.24, 1.37]'
    """
    if baseline not in runners:
        raise ValueError(f"the baseline {baseline!r} is not one of the runners {sorted(runners)}")
    timings = time_interleaved(runners, device_type=device_type, repeats=repeats, warmup=warmup,
                               max_seconds=max_seconds, min_repeats=min_repeats, until=until, seed=seed)
    generation = {name: stats for name, runner in runners.items()
                  if (stats := stats_of(_run_of(runner), len(timings[name].samples_ms))) is not None}
    return RaceResult.of(timings, baseline, generation)


def _run_of(runner: Runner) -> Callable[[], Any]:
    """The timed part of a runner."""
    return runner[1] if isinstance(runner, tuple) else runner


def time_against_itself(run: Callable[[], Any], *, device_type: str = "cpu", repeats: int = 16,
                        warmup: int = 2, seed: int = 0) -> tuple[Speedup, float]:
    """An A/A measurement: ``run`` timed as two candidates in the same rounds. The truth is 1.0,
    so the interval's width is how well this machine can rank plans now, and an interval that
    misses 1 more often than 5% of the time betrays a bias of the harness.
    ``(speedup of the copy over the original, median ms)``."""
    result = race({"a": run, "a again": run}, baseline="a", device_type=device_type, repeats=repeats,
                  warmup=warmup, seed=seed)
    both = result.timings["a"].samples_ms + result.timings["a again"].samples_ms
    return result.speedups["a again"], statistics.median(both)


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties share their mean
    rank); None when either side is constant."""
    import pandas as pd

    value = pd.Series(list(a)).rank().corr(pd.Series(list(b)).rank())
    return None if math.isnan(value) else float(value)


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free confidence interval for the median: ``[x_(k), x_(n+1-k)]`` of the
    sorted values, with the largest ``k`` whose binomial(n, 1/2) coverage is still at least
    ``confidence`` (below 6 values no interval reaches 95%: it is then the whole range)."""
    ordered = sorted(values)
    n = len(ordered)
    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * _binomial_cdf(k + 1, n) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k]


def _binomial_cdf(k: int, n: int) -> float:
    """P(X <= k - 1) for X ~ binomial(n, 1/2): the chance the k-th order statistic is above the median."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


def settings() -> dict[str, Any]:
    """What the numbers depend on, recorded next to them."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__}


def format_speedup(median: float | None, low: float | None = None, high: float | None = None) -> str:
    """``1.24x [1.15, 1.33]``: a speedup with its 95% confidence interval, when there is one."""
    if median is None or not math.isfinite(median):
        return "-"
    interval = format_interval(low, high)
    return f"{median:.2f}x" + (f" {interval}" if interval else "")


def format_interval(low: float | None, high: float | None) -> str | None:
    """``[1.15, 1.33]``: a speedup's 95% confidence interval; None without one."""
    return f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else None
