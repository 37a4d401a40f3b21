"""Plans under torch.compile: the applier adds no graph break, and compiled timings are compiled."""

import pytest
import torch
from conftest import build_bert, token_batches
from torch import nn

from precsearch import Plan, apply_plan, walk
from precsearch.compiled import time_compiled


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
    assert all(t.median_ms > 0 and len(t.samples_ms) == 3 for t in times.timings.values())
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
    assert all(row["speedup"] > 0 for row in rows)
