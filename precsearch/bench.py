"""Latency (and, on CUDA, peak memory) measured on the real device.

Candidates are timed interleaved (A B A B ...) so that a noisy neighbour slows all of them
alike; each reports the median of its repeats, and ratios are ratios of medians.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    peak_memory_mb: float | None  # measured on CUDA only; None elsewhere


def _synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


Candidate = Callable[[], Any] | tuple[Callable[[], AbstractContextManager], Callable[[], Any]]


def time_interleaved(candidates: dict[str, Candidate], *, device_type: str = "cpu", repeats: int = 15,
                     warmup: int = 2, max_seconds: float | None = None) -> dict[str, Timing]:
    """Median latency of each candidate, measured round-robin in one run.

    A candidate is a zero-argument callable, or ``(context_factory, run)``: the context (e.g.
    applying a plan) is entered around each turn but only ``run()`` is timed. Stops early (with
    at least 3 repeats) once ``max_seconds`` are spent.
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
        if max_seconds is not None and index >= 2 and time.perf_counter() - started > max_seconds:
            break
    return {name: Timing(statistics.median(values), peaks.get(name))
            for name, values in samples.items()}


def settings() -> dict[str, Any]:
    """What the numbers depend on, recorded next to them."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__}
