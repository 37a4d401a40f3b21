"""One measurement path: ``bench.race`` and the helpers every timing shares (runners, MB, speedup
text, one-line failures). Timed against a fake clock that only the runners advance."""

import math
import types
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from precsearch.runtime.accuracy import Fidelity
from precsearch.runtime.batches import forward_runner
from precsearch.runtime.errors import InputError, PlanError, failures_as
from precsearch.runtime.plan import Plan, Runtime
from precsearch.runtime.weights import MB, weight_bytes, weight_mb
from precsearch.runtime.workload import Workload
from precsearch.search import bench
from precsearch.search.bench import RaceResult, Speedup, clearly_faster, format_interval, format_speedup, race
from precsearch.search.evaluate import Evaluator, eager_runners


@pytest.fixture
def clock(monkeypatch):
    state = {"now": 0.0}
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: state["now"]))

    def runner(durations_ms):
        steps = iter(durations_ms)

        def run():
            state["now"] += next(steps) / 1e3
        return run
    return runner


def test_a_race_gives_timings_speedups_over_its_baseline_and_paired_verdicts(clock):
    rounds = 6
    result = race({"fp32": clock([10.0] * 8), "fast": clock([5.0] * 8), "close": clock([5.2, 4.9] * 4)},
                  baseline="fp32", repeats=rounds, warmup=2)
    assert isinstance(result, RaceResult) and result.baseline == "fp32" and result.baseline_ms == pytest.approx(10.0)
    assert list(result.timings) == ["fp32", "fast", "close"]
    assert all(len(timing.samples_ms) == rounds for timing in result.timings.values())
    assert result.speedups["fp32"].median == pytest.approx(1.0)
    assert result.speedups["fast"].median == pytest.approx(2.0)
    assert result.speedups["fast"] == bench.speedup(result.timings["fp32"].samples_ms,
                                                    result.timings["fast"].samples_ms)
    assert result.speedup("fast", over="close") == bench.speedup(result.timings["close"].samples_ms,
                                                                 result.timings["fast"].samples_ms)
    assert result.clearly_faster("fast", "fp32") and not result.clearly_faster("fp32", "fast")
    assert result.clearly_faster("fast", "close") == clearly_faster(result.timings["fast"].samples_ms,
                                                                    result.timings["close"].samples_ms)
    assert result.generation == {}   # no runner generates


def test_a_race_times_only_the_run_of_a_runner_with_a_context(clock):
    entered = []

    @contextmanager
    def applied():
        entered.append(1)
        yield

    result = race({"fp32": clock([4.0] * 4), "plan": (applied, clock([2.0] * 4))}, baseline="fp32", repeats=2,
                  warmup=2)
    assert len(entered) == 4 and result.speedups["plan"].median == pytest.approx(2.0)


def test_a_race_needs_its_baseline_among_the_runners():
    with pytest.raises(ValueError, match="'fp32' is not one of the runners"):
        race({"a": lambda: None}, baseline="fp32")


def test_the_eager_runners_prepare_the_fp32_turn_as_each_plans_and_build_it_first():
    made, built = [], []

    class Handle:
        def __init__(self, plan):
            self.plan = plan

        def __enter__(self):
            made.append(f"apply {self.plan}")
            return self

        def __exit__(self, *exc):
            made.append(f"remove {self.plan}")

        @contextmanager
        def suspended(self):
            made.append(f"suspend {self.plan}")
            yield

    runners = eager_runners({"a": "A", "b": "B"}, "F", Handle, lambda plan: built.append(plan) or (lambda: None),
                            fp32_name="fp32 baseline")
    assert list(runners) == ["fp32 baseline", "a", "b"] and built == [None, "A", "B"]
    context, _ = runners["fp32 baseline"]
    with context():
        assert made == ["apply F", "suspend F"]
    with runners["a"][0]():
        assert made[-1] == "apply A"


def test_an_evaluators_step_runs_the_plans_workload(monkeypatch):
    torch.manual_seed(0)
    model, batch = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    evaluator = Evaluator(model, [batch], Fidelity.builtin(model, [batch]), "cpu")
    plan = Plan(runtime=Runtime(workload="generate", new_tokens=2))
    seen = []
    monkeypatch.setattr(Workload, "runner", lambda self, model, batch: seen.append(self))
    evaluator.step(None)
    evaluator.step(plan)
    assert seen == [evaluator.workload, plan.resolved_runtime.run] and seen[0] != seen[1]


def test_a_forward_runner_calls_the_model_on_the_batch_without_grad():
    seen = []

    def model(*args, **kwargs):
        seen.append((args, kwargs, torch.is_grad_enabled()))
        return torch.ones(1)

    x = torch.zeros(2)
    assert forward_runner(model, {"input_ids": x})() is None
    forward_runner(model, (x, x))()
    assert [(len(a), list(k), grad) for a, k, grad in seen] == [(0, ["input_ids"], False), (2, [], False)]


def test_weight_mb_counts_each_distinct_weight_once_in_mb():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = model[0].weight   # tied: one tensor
    assert weight_mb(model) == pytest.approx(sum(weight_bytes(model).values()) / 2**20)
    assert weight_mb(model) * MB == (64 + 8 + 8) * 4


def test_speedup_text_comes_from_one_formatter():
    assert str(Speedup(1.234, 1.1, 1.4, 9)) == format_speedup(1.234, 1.1, 1.4) == "1.23x [1.10, 1.40]"
    assert format_speedup(1.5) == "1.50x" and format_speedup(None) == format_speedup(math.nan) == "-"
    assert format_interval(0.9, 1.25) == "[0.90, 1.25]" and format_interval(None, 1.0) is None


def test_failures_as_gives_one_line_and_lets_the_kept_ones_through():
    with pytest.raises(InputError, match=r"^stage: RuntimeError: first line$") as caught, \
            failures_as(InputError, "stage: "):
        raise RuntimeError("first line\nsecond line")
    assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(PlanError, match="^as it was$"), failures_as(InputError, "stage: ", keep=PlanError):
        raise PlanError("as it was")
