"""Interleaved timing: the order of turns, contexts around them, warmup and the time budget.

Timed against a fake clock that only the candidates advance, so the medians are exact and no
test depends on how fast this machine is.
"""

import types
from contextlib import contextmanager

import pytest

from precsearch import bench
from precsearch.bench import Timing, time_interleaved


@pytest.fixture
def clock(monkeypatch):
    """A fake ``time.perf_counter`` for bench; ``clock.advance(seconds)`` moves it."""
    state = {"now": 100.0}

    def advance(seconds):
        state["now"] += seconds

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: state["now"]))
    return types.SimpleNamespace(advance=advance)


def test_candidates_run_round_robin_including_warmup():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = time_interleaved(candidates, repeats=3, warmup=2)
    assert calls == ["a", "b", "c"] * 5
    assert list(timings) == ["a", "b", "c"]
    assert all(isinstance(t, Timing) and t.peak_memory_mb is None for t in timings.values())


def test_context_factory_is_entered_around_each_turn():
    events = []

    def factory(name):
        @contextmanager
        def context():
            events.append(f"enter {name}")
            yield
            events.append(f"exit {name}")
        return context

    candidates = {"plain": lambda: events.append("run plain"),
                  "planned": (factory("planned"), lambda: events.append("run planned"))}
    time_interleaved(candidates, repeats=2, warmup=1)
    turn = ["run plain", "enter planned", "run planned", "exit planned"]
    assert events == turn * 3


def test_medians_time_only_the_run_and_skip_warmup(clock):
    durations = {"a": iter([1, 2, 3, 4, 5]), "b": iter([10, 20, 30, 40, 50])}  # ms, warmup first

    def run(name):
        return lambda: clock.advance(next(durations[name]) / 1e3)

    @contextmanager
    def slow_context():
        clock.advance(7.0)  # entering the context is not timed
        yield
        clock.advance(7.0)

    timings = time_interleaved({"a": run("a"), "b": (slow_context, run("b"))}, repeats=3, warmup=2)
    # Counted: the last three turns. With the two warmup turns counted the medians would be 3 and 30.
    assert timings["a"].median_ms == pytest.approx(4.0)
    assert timings["b"].median_ms == pytest.approx(40.0)
    assert all(next(d, None) is None for d in durations.values())  # every turn ran


def test_no_warmup_counts_every_turn(clock):
    durations = iter([1, 2, 6])
    timings = time_interleaved({"a": lambda: clock.advance(next(durations) / 1e3)}, repeats=3, warmup=0)
    assert timings["a"].median_ms == pytest.approx(2.0)


def test_max_seconds_stops_early_after_at_least_three_repeats(clock):
    calls = []

    def run(name):
        def turn():
            calls.append(name)
            clock.advance(1.0)  # every turn takes a second: the budget is spent after the first
        return turn

    timings = time_interleaved({"a": run("a"), "b": run("b")}, repeats=50, warmup=2, max_seconds=0.5)
    assert calls == ["a", "b"] * (2 + 3)
    assert timings["a"].median_ms == pytest.approx(1000.0)


def test_max_seconds_not_reached_runs_every_repeat(clock):
    calls = []

    def turn():
        calls.append(1)
        clock.advance(1e-3)

    time_interleaved({"a": turn}, repeats=10, warmup=1, max_seconds=60.0)
    assert len(calls) == 11
    calls.clear()
    time_interleaved({"a": turn}, repeats=10, warmup=1, max_seconds=None)
    assert len(calls) == 11


def test_real_clock_gives_positive_finite_medians():
    timings = time_interleaved({"sum": lambda: sum(range(100))}, repeats=3, warmup=0)
    assert 0 <= timings["sum"].median_ms < float("inf")


def test_settings_record_threads_and_torch():
    import torch

    recorded = bench.settings()
    assert recorded["threads"] == torch.get_num_threads()
    assert recorded["torch"] == torch.__version__


# -- estimates with an uncertainty ------------------------------------------------------------------
def test_the_median_interval_covers_the_true_median_at_its_nominal_level():
    import random

    from precsearch.bench import median_interval

    rng = random.Random(0)
    for rounds in (6, 9, 15, 30):
        draws = 2000
        covered = sum(low <= 1.0 <= high for low, high in (
            median_interval([rng.lognormvariate(0.0, 0.3) for _ in range(rounds)]) for _ in range(draws)))
        assert 0.93 <= covered / draws <= 0.995, (rounds, covered / draws)


def test_speedup_is_the_median_of_per_round_ratios():
    from precsearch.bench import speedup

    estimate = speedup([10.0, 20.0, 10.0, 10.0, 10.0, 10.0], [5.0, 10.0, 5.0, 5.0, 4.0, 6.0])
    assert estimate.median == 2.0 and estimate.low <= 2.0 <= estimate.high and estimate.rounds == 6


def _noisy(clock, rng, ms, spread):
    """A candidate that takes ``ms`` times a lognormal factor, on the fake clock."""
    return lambda: clock.advance(ms * rng.lognormvariate(0.0, spread) / 1e3)


def test_racing_drops_a_clear_loser_after_few_rounds(clock):
    import random

    from precsearch.evaluate import decided

    rng = random.Random(1)
    candidates = {"fp32": _noisy(clock, rng, 10.0, 0.05), "fast": _noisy(clock, rng, 5.0, 0.05),
                  "slow": _noisy(clock, rng, 9.0, 0.05)}
    timings = time_interleaved(candidates, repeats=40, warmup=0, min_repeats=5, until=decided)
    assert len(timings["fast"].samples_ms) <= 8


def test_racing_keeps_two_close_candidates_to_the_end(clock):
    import random

    from precsearch.evaluate import decided

    rng = random.Random(2)
    candidates = {"fp32": _noisy(clock, rng, 10.0, 0.05), "a": _noisy(clock, rng, 5.0, 0.05),
                  "b": _noisy(clock, rng, 5.02, 0.05)}
    timings = time_interleaved(candidates, repeats=40, warmup=0, min_repeats=5, until=decided)
    assert len(timings["a"].samples_ms) == 40


def test_a_measurement_stops_once_clearly_slower_than_the_incumbent(clock):
    import random

    from precsearch.bench import Speedup
    from precsearch.evaluate import settled

    rng = random.Random(3)
    incumbent = Speedup(2.0, 1.9, 2.1, 15)
    candidates = {"baseline": _noisy(clock, rng, 10.0, 0.2), "candidate": _noisy(clock, rng, 9.0, 0.2)}
    timings = time_interleaved(candidates, repeats=40, warmup=0, min_repeats=5,
                               until=lambda samples: settled(samples, incumbent))
    assert len(timings["candidate"].samples_ms) == 5   # clearly slower than 1.9x from the first check
    loose = time_interleaved(candidates, repeats=40, warmup=0, min_repeats=5,
                             until=lambda samples: settled(samples, None))
    assert len(loose["candidate"].samples_ms) > 5       # alone, +-20% noise needs more rounds
