"""Comparing plans: distinctness, provenance, recorded summaries, per-unit differences, and a
re-measurement of all of them in one run (structure and errors only: no timing asserts)."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from precsearch import InputError, Plan, model_fingerprint
from precsearch.report import compare
from precsearch.cli import main
from precsearch.report.compare import (
    all_units, check_distinct, provenance_warnings, remeasure, summary_rows, unit_differences,
)
from precsearch.examples import demo

UNITS = ["a", "b", "c"]


def plan_one(**fields):
    return Plan(default="fp32", layers={"a": "bf16"},
                target={"device": "cpu", "device_name": "Xeon", "torch": "2.13.0"},
                model={"fingerprint": "sha256:aaa"},
                metrics={"speedup": 1.5, "latency_ms": 2.0, "error": 0.001},
                constraint={"metric": "rel_l2", "limit": 0.01}, **fields)


def plan_two(**fields):
    return Plan(default="bf16", layers={"b": "fp32", "x": "fp16"},
                target={"device": "cpu", "device_name": "Xeon", "torch": "2.13.0"},
                model={"fingerprint": "sha256:aaa"}, **fields)


# -- check_distinct -----------------------------------------------------------------------------
def test_check_distinct_accepts_different_plans(tmp_path):
    check_distinct([tmp_path / "one.yaml", tmp_path / "two.yaml"], [plan_one(), plan_two()])
    check_distinct([tmp_path / "1", tmp_path / "2", tmp_path / "3"], [plan_one(), plan_two(), Plan()])


def test_check_distinct_needs_two_plans(tmp_path):
    with pytest.raises(InputError, match="at least two plans"):
        check_distinct([tmp_path / "one.yaml"], [plan_one()])
    with pytest.raises(InputError, match="at least two plans"):
        check_distinct([], [])


def test_check_distinct_rejects_the_same_file_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    same = [tmp_path / "plan.yaml", tmp_path / "sub" / ".." / "plan.yaml"]
    with pytest.raises(InputError, match="compares a plan with itself"):
        check_distinct(same, [plan_one(), plan_two()])


def test_check_distinct_rejects_equal_plans_made_at_different_times(tmp_path):
    first, second = plan_one(created="2026-01-01T00:00:00Z"), plan_one(created="2026-06-01T12:00:00Z")
    with pytest.raises(InputError, match=r"two.yaml: compares a plan with itself \(.*one.yaml\)"):
        check_distinct([tmp_path / "one.yaml", tmp_path / "two.yaml"], [first, second])
    different = plan_one(created="2026-06-01T12:00:00Z", mode="training")
    check_distinct([tmp_path / "one.yaml", tmp_path / "two.yaml"], [first, different])


# -- provenance_warnings ------------------------------------------------------------------------
def test_no_provenance_warnings_for_comparable_plans():
    assert provenance_warnings(["one", "two"], [plan_one(), plan_two()]) == []
    assert provenance_warnings(["one", "two"], [Plan(), plan_two()]) == []   # unknown values are not conflicts


def test_provenance_warnings_name_each_difference():
    other = Plan(target={"device": "cuda", "device_name": "H200", "torch": "2.14.0"},
                 model={"fingerprint": "sha256:bbb"})
    messages = provenance_warnings(["one", "two"], [plan_one(), other])
    assert len(messages) == 3
    assert messages[0] == "plans were made on different devices: one=Xeon, two=H200"
    assert messages[1] == "plans were made on different torch versions: one=2.13.0, two=2.14.0"
    assert messages[2].startswith("plans were made on different model fingerprints: one=sha256:aaa")


def test_provenance_falls_back_to_the_device_type_and_shortens_values():
    a = Plan(target={"device": "cpu"}, model={"fingerprint": "sha256:" + "a" * 64})
    b = Plan(target={"device": "cuda"}, model={"fingerprint": "sha256:" + "b" * 64})
    devices, fingerprints = provenance_warnings(["a", "b"], [a, b])
    assert devices == "plans were made on different devices: a=cpu, b=cuda"
    assert f"a=sha256:{'a' * 17}," in fingerprints and "a" * 18 not in fingerprints


# -- summary_rows, unit_differences, all_units --------------------------------------------------
def test_summary_rows():
    rows = summary_rows(["one", "two"], [plan_one(), plan_two()], UNITS)
    assert rows[0] == {"plan": "one", "default": "fp32", "fp8": 0, "fp16": 0, "bf16": 1, "fp32": 2, "speedup": 1.5,
                       "interval": None, "latency_ms": 2.0, "error": 0.001, "weight_mb": None, "limit": "rel_l2<=0.01", "device": "cpu"}
    assert rows[1] == {"plan": "two", "default": "bf16", "fp8": 0, "fp16": 0, "bf16": 2, "fp32": 1, "speedup": None,
                       "interval": None, "latency_ms": None, "error": None, "weight_mb": None, "limit": "-<=-", "device": "cpu"}
    assert summary_rows(["bare"], [Plan()], UNITS)[0]["device"] == "-"


def test_unit_differences():
    assert unit_differences(["one", "two"], [plan_one(), plan_two()], UNITS) == [
        {"unit": "c", "one": "fp32", "two": "bf16"}]
    three = Plan(default="fp16")
    assert unit_differences(["one", "two", "three"], [plan_one(), plan_two(), three], ["", "a", "b"]) == [
        {"unit": "<root>", "one": "fp32", "two": "bf16", "three": "fp16"},
        {"unit": "a", "one": "bf16", "two": "bf16", "three": "fp16"},
        {"unit": "b", "one": "fp32", "two": "fp32", "three": "fp16"}]
    assert unit_differences(["one", "again"], [plan_one(), plan_one()], UNITS) == []


def test_all_units():
    assert all_units([plan_one(), plan_two()]) == ["a", "b", "x"]
    assert all_units([plan_two(), plan_one()]) == ["b", "x", "a"]
    assert all_units([Plan(), Plan()]) == []
    assert all_units([plan_one()], known=["z", "a"]) == ["z", "a"]
    assert all_units([plan_one()], known=[]) == []


# -- remeasure ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_case():
    return demo.small_model(), demo.data(batches=2, batch_size=8)


def test_remeasure_rows(demo_case):
    model, batches = demo_case
    names = ["bf16", "fp16", "trap"]
    plans = [Plan(default="bf16", layers={"shift": "fp32"}),
             Plan(default="fp16", layers={"amplify": "fp32"}),
             Plan(layers={"amplify": "fp16"})]                      # overflows: inf, not a crash
    before = [p.data_ptr() for p in model.parameters()]
    rows = remeasure(model, batches, names, plans, repeats=3)
    assert [row["plan"] for row in rows] == ["fp32 baseline", *names]
    assert all(set(row) == {"plan", "latency_ms", "speedup", "interval", "rel_l2", "weight_mb", "peak_memory_mb"}
               for row in rows)
    baseline = rows[0]
    assert baseline["speedup"] == 1.0 and baseline["rel_l2"] == 0.0 and baseline["peak_memory_mb"] is None
    for row in rows[1:]:   # each speedup is the median of its rounds' ratios, inside its own interval
        low, high = (float(x) for x in row["interval"].strip("[]").split(","))
        assert 0 < low - 0.005 <= row["speedup"] <= high + 0.005 and row["latency_ms"] > 0, row   # 2 decimals
    assert rows[1]["weight_mb"] < baseline["weight_mb"]   # the bf16 units hold their weights low
    assert all(0 < row["rel_l2"] < 0.05 for row in rows[1:3])
    assert rows[3]["rel_l2"] == math.inf
    # the model is left as it was: no plan applied, the same weights
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert [p.data_ptr() for p in model.parameters()] == before


def test_remeasure_uses_the_plans_metric_and_warns_on_another_model(demo_case):
    model, batches = demo_case
    foreign = Plan(default="bf16", layers={"shift": "fp32"}, model={"fingerprint": "sha256:other"},
                   constraint={"metric": "cosine", "limit": 0.01})
    own = Plan(default="bf16", model={"fingerprint": model_fingerprint(model)})
    with pytest.warns(UserWarning, match="another model") as record:
        rows = remeasure(model, batches, ["foreign", "own"], [foreign, own], repeats=3)
    assert len(record) == 1                                            # once, and only for the foreign plan
    assert all("cosine" in row and "rel_l2" not in row for row in rows)
    assert rows[0]["cosine"] == 0.0 and all(0 <= row["cosine"] < 0.01 for row in rows[1:])


def test_remeasure_rejects_a_plan_for_missing_units(demo_case):
    model, batches = demo_case
    from precsearch import PlanError

    with pytest.raises(PlanError, match="layers.nope"):
        remeasure(model, batches, ["bad", "ok"], [Plan(layers={"nope": "bf16"}), Plan()], repeats=3)
    assert torch.isfinite(model(batches[0])).all()


# -- the command: units unknown without a model, eval mode, warnings no filter hides -------------
def test_differences_line():
    assert compare.differences_line([], ["a", "b"], units_known=True) == "0 of 2 units differ"
    assert compare.differences_line([], [], units_known=False) == "units unknown without --model: the plans name no unit"
    assert compare.differences_line([{"unit": "a"}], ["a", "b"], units_known=False) == \
        "units unknown without --model: 1 of the 2 units the plans name differ"


def test_compare_without_a_model_says_its_units_are_unknown(tmp_path, capsys):
    a = Plan(default="bf16").save(tmp_path / "a.yaml")
    b = Plan(default="fp32").save(tmp_path / "b.yaml")
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "units unknown without --model" in out and "0 of 0" not in out
    assert "a.yaml bf16, b.yaml fp32" in out
    assert main(["compare", str(a), str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["units_known"] is False


DROPOUT_FACTORIES = '''
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 4)).train()

def data():
    return [torch.randn(8, 16, generator=torch.Generator().manual_seed(0))]
'''


def test_compare_measures_the_model_in_eval_mode(tmp_path, monkeypatch, capsys):
    (tmp_path / "dropnets.py").write_text(DROPOUT_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    a = Plan(default="fp32").save(tmp_path / "a.yaml")
    b = Plan(default="bf16").save(tmp_path / "b.yaml")
    code = main(["compare", str(a), str(b), "--json", "--model", "dropnets:model", "--data", "dropnets:data"])
    rows = json.loads(capsys.readouterr().out)["remeasured"]
    assert code == 0
    assert rows[1]["plan"] == "a.yaml" and rows[1]["rel_l2"] == 0.0    # FP32 is FP32: no dropout noise
    assert 0 < rows[2]["rel_l2"] < 0.05


def _device_plans(tmp_path):
    a = Plan(default="bf16", target={"device": "cpu", "device_name": "A"}).save(tmp_path / "a.yaml")
    b = Plan(default="fp32", target={"device": "cuda", "device_name": "B"}).save(tmp_path / "b.yaml")
    return [str(a), str(b)]


@pytest.mark.parametrize("action", ["ignore", "error"])
def test_warnings_filters_do_not_silence_the_clis_warnings(tmp_path, capsys, action):
    with warnings.catch_warnings():
        warnings.simplefilter(action)
        assert main(["compare", *_device_plans(tmp_path)]) == 0
    assert "precsearch: warning: plans were made on different devices: a.yaml=A, b.yaml=B" in capsys.readouterr().err


def test_a_library_warning_reaches_stderr_under_pythonwarnings_ignore(tmp_path, capsys, demo_case):
    foreign = Plan(default="bf16", model={"fingerprint": "sha256:other"}).save(tmp_path / "a.yaml")
    own = Plan(default="fp32").save(tmp_path / "b.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["compare", str(foreign), str(own), "--json", "--model", "precsearch.examples.demo:small_model",
                     "--data", "precsearch.examples.demo:data"]) == 0
    err = capsys.readouterr().err
    assert "precsearch: warning:" in err and "another model" in err


def test_pythonwarnings_ignore_in_the_environment_keeps_the_warning(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "precsearch", "compare", *_device_plans(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "precsearch: warning: plans were made on different devices" in done.stderr


def test_compare_plans_from_python_names_the_differences_and_repeated_file_names(tmp_path):
    for folder, plan in (("one", plan_one()), ("two", plan_two())):
        (tmp_path / folder).mkdir()
        plan.save(tmp_path / folder / "plan.yaml")
    result = compare.compare_plans([tmp_path / "one" / "plan.yaml", tmp_path / "two" / "plan.yaml"])
    assert result.names == ["one/plan.yaml", "two/plan.yaml"] and not result.units_known
    assert result.defaults == {"one/plan.yaml": "fp32", "two/plan.yaml": "bf16"}
    assert [row["unit"] for row in result.differences] == ["x"]   # a: bf16 in both, b: fp32 in both
    assert result.remeasured is None and json.loads(json.dumps(result.to_dict()))["units_known"] is False
