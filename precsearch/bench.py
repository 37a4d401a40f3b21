"""Latency (and, on CUDA, peak memory) measured on the real device, as estimates with an
uncertainty.

Candidates are timed interleaved (A B A B ...) so that a noisy neighbour slows all of them
alike. A speedup is the median of the per-round ratios baseline / candidate, with a
distribution-free confidence interval for that median from order statistics (the ranks a
binomial(n, 1/2) gives; no assumption about the noise's shape). Timing can stop early through
``until``, once the intervals say enough.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    samples_ms: tuple[float, ...]
    peak_memory_mb: float | None  # measured on CUDA only; None elsewhere


def _synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


Candidate = Callable[[], Any] | tuple[Callable[[], AbstractContextManager], Callable[[], Any]]


def time_interleaved(candidates: dict[str, Candidate], *, device_type: str = "cpu", repeats: int = 15,
                     warmup: int = 2, max_seconds: float | None = None, min_repeats: int = 3,
                     until: Callable[[dict[str, list[float]]], bool] | None = None) -> dict[str, Timing]:
    """Median latency of each candidate, measured round-robin in one run.

    A candidate is a zero-argument callable, or ``(context_factory, run)``: the context (e.g.
    applying a plan) is entered around each turn but only ``run()`` is timed. At most
    ``repeats`` rounds; after ``min_repeats``, stops early once ``max_seconds`` are spent or
    ``until(samples)`` says the samples so far settle the question.
    """
    turns = {name: c if isinstance(c, tuple) else (nullcontext, c) for name, c in candidates.items()}
    cuda = device_type == "cuda"
    samples: dict[str, list[float]] = {name: [] for name in turns}
    peaks: dict[str, float] = {}
    started = time.perf_counter()
    for index in range(-warmup, repeats):
        for name, (context, run) in turns.items():
            with context():
                if cuda and index == 0:
                    torch.cuda.reset_peak_memory_stats()
                _synchronize(device_type)
                begin = time.perf_counter()
                run()
                _synchronize(device_type)
                elapsed = (time.perf_counter() - begin) * 1e3
            if index >= 0:
                samples[name].append(elapsed)
            if cuda and index == 0:
                peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        if index + 1 >= min_repeats and (
                (max_seconds is not None and time.perf_counter() - started > max_seconds)
                or (until is not None and until(samples))):
            break
    return {name: Timing(statistics.median(values), tuple(values), peaks.get(name))
            for name, values in samples.items()}


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
        return self.low > other.high

    def __str__(self) -> str:
        return f"{self.median:.2f}x [{self.low:.2f}, {self.high:.2f}]"


def speedup(baseline_ms: Sequence[float], candidate_ms: Sequence[float], confidence: float = CONFIDENCE) -> Speedup:
    """The speedup of a candidate over the baseline timed in the same rounds."""
    ratios = sorted(b / c for b, c in zip(baseline_ms, candidate_ms, strict=True) if c > 0)
    if not ratios:
        return Speedup(math.nan, math.nan, math.nan, 0)
    low, high = median_interval(ratios, confidence)
    return Speedup(statistics.median(ratios), low, high, len(ratios))


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
