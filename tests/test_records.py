import math

import optuna
import pytest

from precsearch.search.trials import (
    Settings,
    StudySetup,
    TrialRecord,
    claim_setup,
    is_surplus,
    mark_surplus,
    pareto_front,
    setup_owner,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SETTINGS = Settings(model="m:f", space="default", mode="inference", constraint={"metric": "rel_l2", "limit": 0.01},
                    device="cpu", device_name="cpu", torch="2.13.0", trials=4, seed=0, strategy="optuna",
                    sampler="TPESampler", parametrisation="categorical", weights="low")


def _setup() -> StudySetup:
    return StudySetup(settings=SETTINGS, fingerprint="sha256:0", units=[{"name": "a", "type": "Linear",
                      "params": 1, "flops": 2}], edges=[], sensitivity={"a": {"bf16": 0.1}},
                      dtype_probe={"bf16": {"relative_latency": 0.8, "error_gain": None}}, baseline_ms=2.0,
                      data="sha256:1")


def test_a_setup_stored_before_weights_and_data_were_recorded_loads_with_none():
    study = optuna.create_study()
    _setup().save(study)
    settings = dict(study.user_attrs["settings"])
    settings.pop("weights")                      # an older study's settings have no weights
    study.set_user_attr("settings", settings)
    study.set_user_attr("data", None)
    loaded = StudySetup.load(study)
    assert loaded.data is None and loaded.settings.weights is None


def test_a_setup_is_invisible_until_saved_whole_then_round_trips():
    study = optuna.create_study()
    claim_setup(study, "host:1")
    assert StudySetup.load(study) is None and setup_owner(study) == "host:1"
    _setup().save(study)
    assert StudySetup.load(study) == _setup()
    assert "rel_l2 <= 0.01" in StudySetup.load(study).settings.describe()


def test_trial_records_round_trip_and_unmeasured_trials_have_none():
    study = optuna.create_study()
    record = TrialRecord({"a": "bf16", "b": "fp32"}, 0.004, 1.0, 2.0, None, None)

    def objective(trial):
        if trial.number == 0:
            record.save(trial)
        else:
            mark_surplus(trial)
        return 1.0

    study.optimize(objective, n_trials=2)
    first, second = study.trials
    assert TrialRecord.of(first, ["a", "b"]) == record and record.speedup == 2.0
    assert first.user_attrs["plan"] == record.code == "bf"   # stored as one letter per unit
    assert TrialRecord.of(second, ["a", "b"]) is None and is_surplus(second) and not is_surplus(first)


def test_a_trial_record_holds_each_units_dtype_and_stores_the_plan_code():
    units = ["stem", "head", "tail"]
    stored = {"plan": "bfh", "error": 0.002, "latency_ms": 1.0, "baseline_ms": 1.5, "retry_of": 3}  # an older study
    trial = optuna.trial.create_trial(value=1.0, user_attrs=stored)
    record = TrialRecord.of(trial, units)
    assert record.layers == {"stem": "bf16", "head": "fp32", "tail": "fp16"} and list(record.layers) == units
    assert record.code == "bfh" and record.user_attrs() == {k: v for k, v in stored.items() if k != "retry_of"}
    with pytest.raises(ValueError):
        TrialRecord.of(trial, units[:2])   # a code is read over the study's own units


def test_speedup_is_none_for_a_candidate_that_could_not_run():
    assert TrialRecord({"a": "bf16"}, None, math.nan, math.nan).speedup is None


@pytest.mark.parametrize("points", [
    [(1.0, 0.5), (2.0, 0.1), (3.0, 0.0), (2.5, 0.2), (1.5, 0.5), (1.0, 0.6)],
    [(1.0, 0.0)], [], [(2.0, 0.1), (2.0, 0.1), (1.0, 0.3)],
])
def test_pareto_front_keeps_exactly_the_non_dominated_points(points):
    front = pareto_front(points, key=lambda p: p)
    dominated = [p for p in points if any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]
    assert {p for p in points if p not in dominated} == set(front)
    assert front == sorted(front)                 # fastest first
    assert len(front) == len(set(front))          # equal points once
