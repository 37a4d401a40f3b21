"""Interleaved timing: the order of turns, contexts around them, warmup, the time budget and the
garbage collector.

Timed against a fake clock that only the candidates advance, so the medians are exact and no
test depends on how fast this machine is.
"""

import types
from contextlib import contextmanager

import pytest

from precsearch.search import bench
from precsearch.search.bench import Timing, time_interleaved


@pytest.fixture
def clock(monkeypatch):
    """A fake ``time.perf_counter`` for bench; ``clock.advance(seconds)`` moves it."""
    state = {"now": 100.0}

    def advance(seconds):
        state["now"] += seconds

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: state["now"]))
    return types.SimpleNamespace(advance=advance)


def _rounds(calls, size):
    return [calls[i:i + size] for i in range(0, len(calls), size)]


def test_every_round_runs_each_candidate_once_in_pairs_of_reversed_orders():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = time_interleaved(candidates, repeats=4, warmup=2)
    rounds = _rounds(calls, 3)
    assert len(rounds) == 2 + 4 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert all(second == first[::-1] for first, second in zip(rounds[::2], rounds[1::2]))
    assert list(timings) == ["a", "b", "c"]
    assert all(isinstance(t, Timing) and t.peak_memory_mb is None for t in timings.values())


def test_round_orders_are_seeded_and_every_place_is_shared_alike():
    from collections import Counter

    from precsearch.search.bench import round_orders

    def orders(seed, count=40):
        generator = round_orders(["a", "b", "c", "d"], seed)
        return [next(generator) for _ in range(count)]

    assert orders(0) == orders(0) and orders(0) != orders(1)
    first = Counter(order[0] for order in orders(0, 400))
    assert set(first) == set("abcd") and min(first.values()) > 60   # no candidate owns the first place
    for pair in zip(orders(3)[::2], orders(3)[1::2]):            # each pair: every mean place is the middle
        assert all(pair[0].index(n) + pair[1].index(n) == 3 for n in "abcd")


def test_two_candidates_each_follow_itself_and_the_other_equally_often():
    import itertools
    from collections import Counter

    from precsearch.search.bench import round_orders

    for seed in range(5):
        generator = round_orders(["baseline", "candidate"], seed)
        stream = [name for _ in range(16) for name in next(generator)]
        follows = Counter(itertools.pairwise(stream))
        assert len(follows) == 4 and max(follows.values()) - min(follows.values()) <= 1, follows


def test_repeats_are_rounded_up_to_whole_pairs_for_several_candidates():
    calls = []
    time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=0)
    assert len(calls) == 2 * 4
    calls.clear()
    time_interleaved({"a": lambda: calls.append("a")}, repeats=3, warmup=0)
    assert len(calls) == 3


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
    planned = ["enter planned", "run planned", "exit planned"]
    turns = [e for e in events if e == "run plain" or e == "enter planned"]
    assert len(turns) == 2 * 3 and turns.count("run plain") == 3
    at = 0
    for turn in turns:                         # each planned turn runs inside its own context
        if turn == "run plain":
            assert events[at] == "run plain"
            at += 1
        else:
            assert events[at:at + 3] == planned
            at += 3


def test_medians_time_only_the_run_and_skip_warmup(clock):
    durations = {"a": iter([1, 2, 3, 4, 5, 6]), "b": iter([10, 20, 30, 40, 50, 60])}  # ms, warmup first

    def run(name):
        return lambda: clock.advance(next(durations[name]) / 1e3)

    @contextmanager
    def slow_context():
        clock.advance(7.0)  # entering the context is not timed
        yield
        clock.advance(7.0)

    timings = time_interleaved({"a": run("a"), "b": (slow_context, run("b"))}, repeats=4, warmup=2)
    # Counted: the last four turns. With the two warmup turns counted the medians would be 3.5 and 35.
    assert timings["a"].median_ms == pytest.approx(4.5)
    assert timings["b"].median_ms == pytest.approx(45.0)
    assert all(next(d, None) is None for d in durations.values())  # every turn ran


def test_no_warmup_counts_every_turn(clock):
    durations = iter([1, 2, 6])
    timings = time_interleaved({"a": lambda: clock.advance(next(durations) / 1e3)}, repeats=3, warmup=0)
    assert timings["a"].median_ms == pytest.approx(2.0)


def test_max_seconds_stops_early_after_at_least_three_repeats_on_a_whole_pair(clock):
    calls = []

    def run(name):
        def turn():
            calls.append(name)
            clock.advance(1.0)  # every turn takes a second: the budget is spent after the first
        return turn

    timings = time_interleaved({"a": run("a"), "b": run("b")}, repeats=50, warmup=2, max_seconds=0.5)
    assert len(calls) == 2 * (2 + 4) and all(sorted(r) == ["a", "b"] for r in _rounds(calls, 2))
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


def test_the_garbage_collector_is_paused_only_while_a_run_is_timed():
    import gc

    seen = []

    @contextmanager
    def context():
        seen.append(("context", gc.isenabled()))
        yield

    time_interleaved({"a": (context, lambda: seen.append(("run", gc.isenabled())))}, repeats=2, warmup=1)
    assert seen == [("context", True), ("run", False)] * 3 and gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        time_interleaved({"a": lambda: 1 / 0}, repeats=1, warmup=0)
    assert gc.isenabled()


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

    from precsearch.search.bench import median_interval

    rng = random.Random(0)
    for rounds in (6, 9, 15, 30):
        draws = 2000
        covered = sum(low <= 1.0 <= high for low, high in (
            median_interval([rng.lognormvariate(0.0, 0.3) for _ in range(rounds)]) for _ in range(draws)))
        assert 0.93 <= covered / draws <= 0.995, (rounds, covered / draws)


def test_speedup_is_the_median_of_per_round_ratios():
    from precsearch.search.bench import speedup

    estimate = speedup([10.0, 20.0, 10.0, 10.0, 10.0, 10.0], [5.0, 10.0, 5.0, 5.0, 4.0, 6.0])
    assert estimate.median == 2.0 and estimate.low <= 2.0 <= estimate.high and estimate.rounds == 6


def test_swapping_baseline_and_candidate_inverts_the_speedup_exactly():
    import random

    from precsearch.search.bench import speedup

    rng = random.Random(4)
    for rounds in (5, 6, 15, 16):
        a = [rng.uniform(9, 11) for _ in range(rounds)]
        b = [rng.uniform(9, 11) for _ in range(rounds)]
        forward, backward = speedup(a, b), speedup(b, a)
        assert forward.median * backward.median == pytest.approx(1.0)
        assert forward.low * backward.high == pytest.approx(1.0) and forward.high * backward.low == pytest.approx(1.0)


def _noisy(clock, rng, ms, spread):
    """A candidate that takes ``ms`` times a lognormal factor, on the fake clock."""
    return lambda: clock.advance(ms * rng.lognormvariate(0.0, spread) / 1e3)


def test_racing_drops_a_clear_loser_after_few_rounds(clock):
    import random

    from precsearch.search.evaluate import decided

    rng = random.Random(1)
    candidates = {"fp32": _noisy(clock, rng, 10.0, 0.05), "fast": _noisy(clock, rng, 5.0, 0.05),
                  "slow": _noisy(clock, rng, 9.0, 0.05)}
    timings = time_interleaved(candidates, repeats=40, warmup=0, min_repeats=5, until=decided)
    assert len(timings["fast"].samples_ms) <= 8


def test_racing_keeps_two_close_candidates_to_the_end(clock):
    import random

    from precsearch.search.evaluate import decided

    rng = random.Random(2)
    candidates = {"fp32": _noisy(clock, rng, 10.0, 0.05), "a": _noisy(clock, rng, 5.0, 0.05),
                  "b": _noisy(clock, rng, 5.02, 0.05)}
    timings = time_interleaved(candidates, repeats=40, warmup=0, min_repeats=5, until=decided)
    assert len(timings["a"].samples_ms) == 40


def test_a_measurement_stops_once_clearly_slower_than_the_incumbent(clock):
    import random

    from precsearch.search.bench import Speedup
    from precsearch.search.evaluate import settled

    rng = random.Random(3)
    incumbent = Speedup(2.0, 1.9, 2.1, 15)
    candidates = {"baseline": _noisy(clock, rng, 10.0, 0.2), "candidate": _noisy(clock, rng, 9.0, 0.2)}
    timings = time_interleaved(candidates, repeats=40, warmup=0, min_repeats=5,
                               until=lambda samples: settled(samples, incumbent))
    assert len(timings["candidate"].samples_ms) == 6   # clearly slower than 1.9x from the first check
    loose = time_interleaved(candidates, repeats=40, warmup=0, min_repeats=5,
                             until=lambda samples: settled(samples, None))
    assert len(loose["candidate"].samples_ms) > 6       # alone, +-20% noise needs more rounds
