"""Plans under torch.compile: the applier adds no graph break, and compiled timings are compiled."""

import json

import pytest
import torch
from conftest import build_bert, token_batches
from torch import nn

from precsearch import Plan, apply_plan, walk
from precsearch.search.compiled import time_compiled


@pytest.mark.slow
def test_a_sparse_plan_adds_no_graph_break_to_bert():
    model, batch = build_bert(), token_batches(1)[0]
    units = walk(model, batch).units
    plan = Plan(default="bf16", layers={unit: "fp32" for unit in units[::3]})
    torch._dynamo.reset()
    plain = torch._dynamo.explain(model)(**batch)
    with apply_plan(model, plan, example_inputs=batch), torch.no_grad():
        torch._dynamo.reset()
        planned = torch._dynamo.explain(model)(**batch)
    torch._dynamo.reset()
    assert planned.graph_break_count == plain.graph_break_count
    assert planned.graph_count == plain.graph_count


def test_compiled_timings_cover_every_plan_and_both_fp32_forms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    batch = torch.randn(8, 16)
    plans = {"bf16": Plan(default="bf16"), "mixed": Plan(default="bf16", layers={"2": "fp32"})}
    times = time_compiled(model, batch, plans, "cpu", repeats=3)
    assert set(times.ms) == set(plans) == set(times.compile_s)
    assert set(times.timings) == {*plans, "fp32 compiled", "fp32 eager"}
    assert all(t.median_ms > 0 and len(t.samples_ms) >= 3 for t in times.timings.values())  # whole pairs of rounds
    assert not hasattr(model, "_precsearch_plan_handle") or model.__dict__.get("_precsearch_plan_handle") is None


@pytest.mark.slow
def test_check_compile_reports_the_compiled_error_within_the_plan_limit(tmp_path, capsys):
    from precsearch.cli import main

    plan = Plan(default="bf16", layers={"shift": "fp32"}, constraint={"metric": "rel_l2", "limit": 0.01})
    plan.save(tmp_path / "plan.yaml")
    assert main(["check", "--plan", str(tmp_path / "plan.yaml"), "--compile", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    compiled = result["compiled"]
    assert result["ok"] and compiled["within_limit"] and compiled["compiled_error"] <= 0.01
    assert compiled["compiled_error"] == pytest.approx(compiled["eager_error"], rel=0.5, abs=1e-4)


@pytest.mark.slow
def test_compare_compile_remeasures_compiled(tmp_path, capsys):
    import json

    from precsearch.cli import main

    a = Plan(default="bf16", layers={"shift": "fp32"}).save(tmp_path / "a.yaml")
    b = Plan(default="fp32", layers={"stem": "bf16"}).save(tmp_path / "b.yaml")
    assert main(["compare", str(a), str(b), "--compile", "--json", "--model", "precsearch.examples.demo:small_model",
                 "--data", "precsearch.examples.demo:data"]) == 0
    rows = json.loads(capsys.readouterr().out)["remeasured"]
    assert [row["plan"] for row in rows] == ["fp32 baseline", "a.yaml", "b.yaml"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["rel_l2"] == 0.0
    for row in rows[1:]:   # compiled: a speedup inside its own interval, the error within a bf16 plan's
        low, high = (float(x) for x in row["interval"].strip("[]").split(","))
        assert low - 0.005 <= row["speedup"] <= high + 0.005 and 0 < row["rel_l2"] < 0.05, row   # 2 decimals


# -- the limit holds in the deployed form ------------------------------------------------------------
import warnings  # noqa: E402

from test_selection import batches, choose_among  # noqa: E402

from precsearch.runtime.accuracy import Fidelity  # noqa: E402
from precsearch.search.compiled import check_compiled, compiled_error  # noqa: E402


class ExplicitRounding(nn.Module):
    """Rounds its input to BF16 itself, as quantisation-aware and mixed-dtype models do. Eager keeps
    that rounding; inductor elides the round trip when it fuses it into the next op (its
    ``emulate_precision_casts`` is off by default), unless a BF16 unit's own cast redoes it. So the
    compiled error of a plan with ``a`` in FP32 is higher than its eager error."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x).to(torch.bfloat16).float() * 2
        return self.b(torch.relu(self.a(x)))


def explicit_rounding() -> nn.Module:
    torch.manual_seed(0)
    return ExplicitRounding().eval()


def explicit_rounding_data() -> list[torch.Tensor]:
    return batches(2)


def errors(model, plan, data, fidelity):
    """A plan's (eager, compiled) error."""
    with apply_plan(model, plan):
        eager = fidelity.error(model)
    return eager, compiled_error(model, plan, data[0], "cpu", fidelity)


@pytest.mark.slow
def test_a_finalist_over_the_limit_compiled_is_dropped():
    model, data = explicit_rounding(), explicit_rounding_data()
    fidelity = Fidelity.builtin(model, data, "rel_l2", 1.0)
    edge, safe = Plan(default="fp32", layers={"b": "bf16"}), Plan(default="fp32", layers={"a": "bf16"})
    edge_eager, edge_compiled = errors(model, edge, data, fidelity)
    safe_eager, safe_compiled = errors(model, safe, data, fidelity)
    fp32_compiled = compiled_error(model, Plan(default="fp32"), data[0], "cpu", fidelity)
    below = max(edge_eager, safe_eager, safe_compiled, fp32_compiled)
    assert below < edge_compiled   # measured here: 0.00267 eager, 0.00334 compiled; the others <= 0.0022
    limit = (below + edge_compiled) / 2
    trials = {"ff": (0.0, 1.0), "fb": (edge_eager, 0.40), "bf": (safe_eager, 0.42)}  # the edge plan is fastest
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, pareto = choose_among(model, data, trials, limit, compile=True)
    assert any("finalist fb dropped" in str(w.message) for w in caught)
    assert plan.layers != {"b": "bf16"} and plan.resolved_runtime.compile
    assert plan.metrics.compiled_error <= limit and plan.metrics.compile_s >= 0
    assert all(p.layers != {"b": "bf16"} for p in pareto)


def test_a_compiled_race_that_fails_gives_an_eager_plan_and_one_warning(monkeypatch):
    import precsearch.search.compiled

    def cannot_compile(*args, **kwargs):
        raise RuntimeError("dynamo says no\nsecond line")

    monkeypatch.setattr(precsearch.search.compiled, "compiled_replica", cannot_compile)
    model, data = explicit_rounding(), explicit_rounding_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, pareto = choose_among(model, data, {"ff": (0.0, 1.0), "bf": (0.002, 0.5)}, 0.01, compile=True)
    failures = [str(w.message) for w in caught if "compiled final race failed" in str(w.message)]
    assert len(failures) == 1 and "\n" not in failures[0] and "runtime.compile: false" in failures[0]
    assert not plan.resolved_runtime.compile and plan.metrics.compiled_error is None
    assert all(not p.resolved_runtime.compile for p in pareto)


@pytest.mark.slow
def test_check_compile_exits_1_over_the_plans_limit(tmp_path, capsys):
    from precsearch.cli import main

    model, data = explicit_rounding(), explicit_rounding_data()
    fidelity = Fidelity.builtin(model, data, "rel_l2", 1.0)
    plan = Plan(default="fp32", layers={"b": "bf16"})
    eager, compiled = errors(model, plan, data, fidelity)
    argv = ["check", "--model", "test_compiled:explicit_rounding", "--data", "test_compiled:explicit_rounding_data",
            "--compile"]
    for limit, code, word in (((eager + compiled) / 2, 1, "FAILED"), (compiled * 1.5, 0, "ok")):
        path = Plan(default="fp32", layers={"b": "bf16"}, constraint={"metric": "rel_l2", "limit": limit}
                    ).save(tmp_path / f"plan-{code}.yaml")
        assert main([*argv, "--plan", str(path)]) == code
        line = capsys.readouterr().out.splitlines()[-1]
        assert line.startswith(f"compiled: {word}") and f"{compiled:.4g}" in line


class Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(16, 16), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return Dropout()   # in train mode, as a factory may well return it


@pytest.mark.slow
def test_check_compile_runs_a_dropout_model_in_eval_mode(tmp_path, capsys):
    from precsearch.cli import main

    path = Plan(default="bf16", constraint={"metric": "rel_l2", "limit": 0.01}).save(tmp_path / "plan.yaml")
    assert main(["check", "--plan", str(path), "--model", "test_compiled:dropout_model", "--data",
                 "test_compiled:explicit_rounding_data", "--compile", "--json"]) == 0
    compiled = json.loads(capsys.readouterr().out)["compiled"]
    assert compiled["eager_error"] < 0.01 and compiled["compiled_error"] < 0.01
    model = dropout_model()
    check_compiled(model, Plan(default="bf16"), explicit_rounding_data(), "cpu")
    assert model.training and model.drop.training   # the caller's modes are restored


class Sine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.fc(x)) * 1.7182818 + 0.5772156   # constants no cached graph shares


def sine_model() -> nn.Module:
    torch.manual_seed(0)
    return Sine().eval()


@pytest.mark.slow
def test_a_model_that_cannot_compile_fails_check_in_one_line(tmp_path, capsys):
    from precsearch.cli import main

    path = Plan(default="bf16", constraint={"metric": "rel_l2", "limit": 0.01}).save(tmp_path / "plan.yaml")
    with torch._inductor.config.patch({"cpp.cxx": ("/no/such/compiler",)}):   # inductor cannot build a kernel
        code = main(["check", "--plan", str(path), "--model", "test_compiled:sine_model", "--data",
                     "test_compiled:explicit_rounding_data", "--compile"])
    out, err = capsys.readouterr()
    assert code == 1 and "internal error" not in err
    assert out.splitlines()[-1].startswith("compiled: FAILED, --compile: the model cannot run compiled")


@pytest.mark.slow
def test_a_model_that_cannot_compile_is_bad_input_for_compare_compile(tmp_path, capsys):
    from precsearch.cli import main

    a = Plan(default="bf16").save(tmp_path / "a.yaml")
    b = Plan(default="fp32", layers={"fc": "bf16"}).save(tmp_path / "b.yaml")
    with torch._inductor.config.patch({"cpp.cxx": ("/no/such/compiler",)}):
        code = main(["compare", str(a), str(b), "--compile", "--model", "test_compiled:sine_model", "--data",
                     "test_compiled:explicit_rounding_data"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "internal error" not in err
    assert err.startswith("precsearch: error: --compile: the FP32 model cannot run compiled with torch.compile")
