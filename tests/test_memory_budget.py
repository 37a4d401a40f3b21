"""The memory budget (``--max-weight-mb``, ``--max-peak-mb``): a second constraint beside the
accuracy limit, validated at the edge, recorded in the plan, respected by the selection, shown by
the report and ``check``, and fixed for the life of a study."""

from __future__ import annotations

import math
import sys
import textwrap

import optuna
import pytest
import torch
from torch import nn

from precsearch import Plan, load_plan
from precsearch.cli import main
from precsearch.search.config import SearchConfig
from precsearch.runtime.errors import InputError
from precsearch.runtime.memory import UNMEASURED, MemoryBudget, MemoryUse
from precsearch.search.decisions import decode
from precsearch.search.trials import DtypeProbe, Settings, TrialRecord, is_feasible
from precsearch.search.loop import optimize

optuna.logging.set_verbosity(optuna.logging.WARNING)

MB = 2**20
BIG, SMALL = "0", "2"   # the units of ``model()``: holding BIG low is what fits the budget


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 8)).eval()


def batches() -> list[torch.Tensor]:
    return [torch.randn(16, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def fp32_mb() -> float:
    return sum(p.numel() * 4 for p in model().parameters()) / MB


def budget_between() -> float:
    """Below FP32's weights, above those of every plan that holds BIG in bf16."""
    big = sum(p.numel() * 4 for p in model()[0].parameters()) / MB
    return round(fp32_mb() - 0.4 * big, 4)


def search(tmp_path, **fields):
    fields = {"space": "bf16_only", "max_error": 0.5, "trials": 6, "progress": False, "repeats": 2,
              "storage": f"sqlite:///{tmp_path / 'study.db'}", "study_name": "budget", **fields}
    return optimize(model(), batches(), SearchConfig.from_names(**fields))


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("max_weight_mb", 0), ("max_weight_mb", -1.0), ("max_weight_mb", math.inf), ("max_weight_mb", math.nan),
    ("max_weight_mb", "40"), ("max_weight_mb", True), ("max_peak_mb", 0.0), ("max_peak_mb", -5),
])
def test_config_refuses_a_budget_that_is_not_a_positive_finite_number(field, value):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(InputError, match=f"^{flag} .*positive finite number") as error:
        SearchConfig(**{field: value})
    assert "\n" not in str(error.value)


def test_config_refuses_a_weight_budget_where_every_plan_holds_fp32_weights():
    for fields in ({"weights": "fp32"}, {"mode": "training"}):
        with pytest.raises(InputError, match="--max-weight-mb 10: with FP32 weights"):
            SearchConfig(max_weight_mb=10, **fields)


def test_config_records_the_budget_beside_the_accuracy_limit():
    from precsearch.runtime.accuracy import Fidelity

    fidelity = Fidelity("rel_l2", 0.01, lambda m: 0.0)
    assert SearchConfig().constraint(fidelity).to_dict() == {"metric": "rel_l2", "limit": 0.01}   # unchanged without one
    config = SearchConfig(max_weight_mb=40, max_peak_mb=100.5)
    assert config.constraint(fidelity).to_dict() == {"metric": "rel_l2", "limit": 0.01, "max_weight_mb": 40.0,
                                                     "max_peak_mb": 100.5}
    assert config.memory.text() == "weight memory <= 40 MB, peak memory <= 100.5 MB"


def test_budget_constraint_values_are_shares_over_the_budget():
    budget = MemoryBudget(max_weight_mb=40.0, max_peak_mb=100.0)
    assert budget.constraints(MemoryUse(30.0, 150.0)) == {"weight_mb": -0.25, "peak_memory_mb": 0.5}
    assert budget.constraints(MemoryUse(30.0, None))["peak_memory_mb"] == UNMEASURED   # unknown: infeasible
    assert budget.violations(MemoryUse(50.0, 90.0)) == ["weight memory 50 MB > 40 MB"]
    assert not MemoryBudget() and MemoryBudget().constraints(MemoryUse(1e9, 1e9)) == {}
    with pytest.raises(InputError, match="--max-peak-mb: the cpu device does not report peak memory"):
        MemoryBudget(max_peak_mb=10).check_device("cpu")
    MemoryBudget(max_peak_mb=10).check_device("cuda")
    MemoryBudget(max_weight_mb=10).check_device("cpu")


def test_the_final_race_drops_plans_over_the_budget():
    """The race's own peak memory (CUDA) and the trials' weights decide; FP32's weights for the FP32 plan."""
    from precsearch.search.bench import Speedup
    from precsearch.search.evaluate import Raced
    from precsearch.search.selection import FeasiblePlan, Race, _within_budget

    def candidate(plan, weight_mb):
        return FeasiblePlan(0, TrialRecord(decode(plan, ["a", "b"]), 0.001, 1.0, 2.0, peak_memory_mb=None,
                                           weight_mb=weight_mb))

    by_code = {"bb": candidate("bb", 5.0), "bf": candidate("bf", 7.0)}
    race = Race({"bb": Raced(Speedup(2.0, 1.9, 2.1, 0), 2.0, 50.0), "bf": Raced(Speedup(1.5, 1.4, 1.6, 0), 2.0, 90.0),
                 "ff": Raced(Speedup(1.0, 1.0, 1.0, 0), 2.0, 60.0)})
    kept = _within_budget(race, MemoryBudget(max_peak_mb=80.0), by_code, 10.0)
    assert set(kept.estimates) == {"bb", "ff"} and kept.over_budget == ["bf: peak memory 90 MB > 80 MB"]
    kept = _within_budget(race, MemoryBudget(max_weight_mb=6.0), by_code, 10.0)
    assert set(kept.estimates) == {"bb"}
    assert _within_budget(race, MemoryBudget(), by_code, 10.0) is race


def test_under_a_weight_budget_the_fastest_slow_low_precision_stays():
    from precsearch.search.space import Choice
    from precsearch.search.study_setup import without_slow_dtypes

    choices = [Choice("a", ("a",), ("fp16", "bf16", "fp32"))]
    slow = {"fp16": DtypeProbe(relative_latency=3.0, speedup_high=0.4),
            "bf16": DtypeProbe(relative_latency=1.3, speedup_high=0.8)}
    assert without_slow_dtypes(choices, slow, "cpu", announce=False)[0].dtypes == ("fp32",)
    assert without_slow_dtypes(choices, slow, "cpu", announce=False, keep_one=True)[0].dtypes == ("bf16", "fp32")
    fast = {**slow, "bf16": DtypeProbe(relative_latency=0.5, speedup_high=2.1)}   # one is fast: the slow one goes
    assert without_slow_dtypes(choices, fast, "cpu", announce=False, keep_one=True)[0].dtypes == ("bf16", "fp32")


def test_under_a_weight_budget_greedy_returns_the_most_error_per_weight_to_fp32_first():
    from precsearch.search.decisions import Decisions
    from precsearch.search.space import Choice
    from precsearch.search.strategies import Lead

    units = ["embed", "small"]   # embed: a little more error, far more weight
    decisions = Decisions([Choice(u, (u,), ("bf16", "fp32")) for u in units],
                          {"embed": {"bf16": 0.02}, "small": {"bf16": 0.01}}, {"embed": 1, "small": 1},
                          ranked=False, limit=0.015, calibration={"bf16": 1.0}, speed={"bf16": 0.5})
    plain = Lead(decisions, {u: 1 for u in units}, 0.015, units)
    light = Lead(decisions, {u: 1 for u in units}, 0.015, units, held={"embed": 1000, "small": 10})
    assert plain.greedy[1] == {"embed": "fp32", "small": "bf16"}
    assert light.greedy[1] == {"embed": "bf16", "small": "fp32"}


# -- plans --------------------------------------------------------------------------------------
def test_plan_records_the_budget_and_older_plans_still_load(tmp_path):
    plan = Plan(constraint={"metric": "rel_l2", "limit": 0.01, "max_weight_mb": 40.0})
    loaded = load_plan(plan.save(tmp_path / "plan.yaml"))
    assert loaded.constraint.max_weight_mb == 40.0 and MemoryBudget.of(loaded.constraint).max_weight_mb == 40.0
    older = Plan(constraint={"metric": "rel_l2", "limit": 0.01})
    assert MemoryBudget.of(load_plan(older.save(tmp_path / "old.yaml")).constraint) == MemoryBudget()
    from precsearch.runtime.errors import PlanError

    with pytest.raises(PlanError, match="constraint.max_weight_mb: expected a finite number > 0"):
        Plan(constraint={"metric": "rel_l2", "limit": 0.01, "max_weight_mb": -1})


def test_settings_of_older_studies_describe_no_budget():
    settings = Settings(model="m", space="default", mode="inference", constraint={"metric": "rel_l2", "limit": 0.01},
                        device="cpu", device_name="cpu", torch="2.13.0", trials=2, seed=0, strategy="optuna",
                        sampler="TPESampler", parametrisation="categorical")
    assert "memory" not in settings.describe()
    budgeted = Settings(**{**settings.__dict__, "constraint": {"metric": "rel_l2", "limit": 0.01, "max_weight_mb": 4}})
    assert "weight memory <= 4 MB" in budgeted.describe()


# -- the search ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_over_budget_plan_is_never_chosen_and_trials_over_it_are_infeasible(tmp_path):
    budget = budget_between()
    result = search(tmp_path, max_weight_mb=budget)
    plan = result.plan
    assert plan is not None and plan.precision(BIG) == "bf16"
    assert plan.metrics.weight_mb <= budget and plan.constraint.max_weight_mb == budget
    assert all(p.metrics.weight_mb <= budget and p.precision(BIG) == "bf16" for p in result.pareto)
    over = [t for t in result.study.trials
            if t.state.name == "COMPLETE" and TrialRecord.of(t, result.graph.units).layers[BIG] == "fp32"]
    assert over, "the seeds include plans holding BIG in fp32"
    for trial in over:
        assert trial.constraints["error"] <= 0 < trial.constraints["weight_mb"] and not is_feasible(trial)

    from precsearch.report.summary import trials_frame, write_report

    frame = trials_frame(result.study)
    assert set(frame[frame["plan"].str[0] == "f"]["violates"]) == {"weight memory"}
    plan.save(tmp_path / "plan.yaml")
    markdown = write_report(tmp_path, result.study)["md"].read_text()
    assert f"weight memory <= {budget:g} MB" in markdown and "| memory budget |" in markdown
    assert "trials within the accuracy limit were over the budget, so infeasible" in markdown

    # resuming: the same budget goes on; another budget, or none, is refused in one line naming both
    again = search(tmp_path, max_weight_mb=budget, trials=7)
    assert len([t for t in again.study.trials if t.state.name == "COMPLETE"]) == 7
    with pytest.raises(InputError, match=f"searched with --max-weight-mb {budget:g}, this search is with "
                                         f"--max-weight-mb 1") as error:
        search(tmp_path, max_weight_mb=1.0, trials=8)
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="this search is without a memory budget"):
        search(tmp_path, trials=8)


@pytest.mark.slow
def test_no_plan_within_the_budget_says_the_budget_failed(tmp_path):
    result = search(tmp_path, max_weight_mb=0.01)   # below even the all-bf16 weights
    assert result.plan is None and result.pareto == []
    why = result.shortfall()
    assert why.startswith("6 trials met the accuracy limit, each over the memory budget (the lightest: "
                          "weight memory ") and "raise --max-weight-mb" in why
    from precsearch.report.summary import write_report

    markdown = write_report(tmp_path, result.study)["md"].read_text()
    assert "No plan met rel_l2 <= 0.5 and weight memory <= 0.01 MB. 6 trials met the accuracy limit" in markdown


# -- the command line ---------------------------------------------------------------------------
FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 8))

    def data():
        return [torch.randn(16, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
''')
GOOD = ["--model", "budget_nets:model", "--data", "budget_nets:data"]   # its own module name: no cached "nets"


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "budget_nets.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("budget_nets", None)


@pytest.mark.parametrize("argv,word", [
    (["--max-weight-mb", "0"], "--max-weight-mb: '0' must be a positive number"),
    (["--max-weight-mb", "-1"], "--max-weight-mb"),
    (["--max-weight-mb", "abc"], "--max-weight-mb"),
    (["--max-weight-mb", "inf"], "--max-weight-mb"),
    (["--max-weight-mb", "nan"], "--max-weight-mb"),
    (["--max-weight-mb", "1", "--weights", "fp32"], "--weights low"),
    (["--max-peak-mb", "100"], "the cpu device does not report peak memory"),
])
def test_bad_budgets_exit_2_with_one_line_and_leave_nothing(nets, capsys, argv, word):
    before = sorted(p.name for p in nets.iterdir())
    code = main(["optimize", *GOOD, "--device", "cpu", "--trials", "2", *argv])
    err = capsys.readouterr().err
    lines = err.splitlines()   # the error alone: nothing is searched, not even announced
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("precsearch: error: ") and word in lines[0], err
    assert sorted(p.name for p in nets.iterdir() if p.name != "__pycache__") == \
        [name for name in before if name != "__pycache__"]


@pytest.mark.slow
def test_cli_budget_end_to_end_plan_check_and_unmet_budget(nets, capsys):
    budget = budget_between()
    common = ["optimize", *GOOD, "--device", "cpu", "--space", "bf16_only", "--max-error", "0.5", "--trials", "5"]
    assert main([*common, "--max-weight-mb", f"{budget}", "--out", "run"]) == 0
    err = capsys.readouterr().err
    assert f"weight memory <= {budget:g} MB" in err.splitlines()[0]
    plan = load_plan(nets / "run" / "plan.yaml")
    assert plan.constraint.max_weight_mb == budget and plan.metrics.weight_mb <= budget
    assert main(["check", "--plan", "run/plan.yaml", *GOOD, "--device", "cpu"]) == 0
    assert f"within the plan's memory budget of {budget:g} MB" in capsys.readouterr().out

    tight = Plan.from_dict({**plan.to_dict(), "constraint": {**plan.constraint.to_dict(), "max_weight_mb": 0.01}})
    tight.save(nets / "tight.yaml")
    assert main(["check", "--plan", "tight.yaml", *GOOD, "--device", "cpu"]) == 1   # a violated constraint
    assert "OVER the plan's memory budget of 0.01 MB" in capsys.readouterr().out

    assert main([*common, "--max-weight-mb", "0.01", "--out", "none"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("precsearch: no plan meets rel_l2 <= 0.5, weight memory <= 0.01 MB in 5 trials; 5 "
                           "trials met the accuracy limit, each over the memory budget"), last
