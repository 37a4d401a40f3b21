"""Typed plan sections and study records: parsed once where read, plain data only where written."""

import dataclasses
from pathlib import Path

import optuna
import pytest

from precsearch import Plan, PlanError, load_plan
from precsearch.runtime.accuracy import builtin_metric
from precsearch.runtime.memory import LIMITS, MemoryBudget
from precsearch.runtime.plan_sections import Constraint, PlanMetrics
from precsearch.runtime.training import Diagnostics
from precsearch.search.compiled import CompiledCheck, verdict
from precsearch.search.trials import DtypeProbe, Settings, StudySetup, load_diagnostics, save_diagnostics

CURRENT = Path(__file__).parent / "data" / "plan_v2_current.yaml"


def test_a_plan_in_todays_format_loads_typed_and_saves_back_to_the_same_text(tmp_path):
    plan = load_plan(CURRENT)
    assert plan.constraint == Constraint(metric="grad_rel_l2", limit=0.01, max_weight_mb=40.0)
    assert plan.metrics.latency_ms == 3.7171 and plan.metrics.trial == 4 and plan.metrics.speedup_low is None
    assert plan.metrics.holdout_batches == 2 and plan.metrics.compiled_rank_agreement is None
    assert plan.metrics.extra == {"a_future_metric": 7}      # a key this version does not know survives
    assert MemoryBudget.of(plan.constraint).max_weight_mb == 40.0
    assert plan.loss_scaling is not None and plan.search["margin"] == 0.2
    assert plan.save(tmp_path / "again.yaml").read_text() == CURRENT.read_text()


def test_omitted_and_null_metrics_stay_as_they_were_written():
    given = {"speedup": 2.0, "latency_ms": 1.5, "trial": None}
    metrics = PlanMetrics.from_dict(given)
    assert metrics.to_dict() == given and list(metrics.to_dict()) == list(given)
    assert "error" not in metrics.to_dict()


def test_metrics_set_later_are_written_after_the_others_even_when_null():
    metrics = PlanMetrics(latency_ms=1.0).with_values(holdout_error=None, holdout_batches=2)
    assert metrics.to_dict() == {"latency_ms": 1.0, "holdout_error": None, "holdout_batches": 2}
    assert dataclasses.replace(metrics, error=0.1).to_dict()["error"] == 0.1


def test_a_plan_given_mappings_holds_records_and_checks_them_as_before():
    plan = Plan(constraint={"metric": "rel_l2", "limit": 0.01}, metrics={"latency_ms": 1.5})
    assert isinstance(plan.constraint, Constraint) and isinstance(plan.metrics, PlanMetrics)
    assert Plan(constraint=plan.constraint, metrics=plan.metrics) == plan
    with pytest.raises(PlanError, match="metrics.latency_ms: expected a number or null"):
        Plan(metrics={"latency_ms": "fast"})
    with pytest.raises(PlanError, match="constraint.limit: expected a finite number >= 0"):
        Plan(constraint=Constraint(metric="rel_l2", limit=-1))


def test_a_constraint_has_a_field_per_memory_limit():
    fields = {field.name for field in dataclasses.fields(Constraint)}
    assert {limit.key for limit in LIMITS} <= fields


def test_the_builtin_metric_of_a_constraint():
    assert builtin_metric(Constraint(metric="cosine", limit=0.01)) == "cosine"
    assert builtin_metric(Constraint(metric="my_accuracy", limit=0.01)) is None
    assert builtin_metric(None) is None


def _setup(probe: dict) -> StudySetup:
    settings = Settings(model="m:f", space="default", mode="inference", constraint={"metric": "rel_l2", "limit": 0.01},
                        device="cpu", device_name="cpu", torch="2.13.0", trials=4, seed=0, strategy="optuna",
                        sampler="TPESampler", parametrisation="categorical", weights="low")
    return StudySetup(settings=settings, fingerprint="sha256:0", units=[], edges=[], sensitivity={},
                      dtype_probe=probe, baseline_ms=2.0)


def test_the_setup_stores_plain_data_and_loads_records():
    study = optuna.create_study()
    _setup({"bf16": DtypeProbe(relative_latency=0.8, speedup_low=1.1, speedup_high=1.4, error_gain=2.0)}).save(study)
    assert study.user_attrs["settings"]["constraint"] == {"metric": "rel_l2", "limit": 0.01}
    assert study.user_attrs["dtype_probe"] == {"bf16": {"relative_latency": 0.8, "speedup_low": 1.1,
                                                        "speedup_high": 1.4, "error_gain": 2.0}}
    loaded = StudySetup.load(study)
    assert loaded.settings.constraint == Constraint(metric="rel_l2", limit=0.01)
    assert loaded.dtype_probe["bf16"].error_gain == 2.0


def test_a_probe_stored_before_the_speedup_interval_loads_without_one():
    probe = _setup({"bf16": {"relative_latency": 0.8, "error_gain": None}}).dtype_probe["bf16"]
    assert probe == DtypeProbe(relative_latency=0.8)


def test_training_diagnostics_read_back_typed():
    study = optuna.create_study()
    assert load_diagnostics(study) is None
    diagnostics = Diagnostics(underflow={"a": 0.5}, overflow=["b"], scales=[1024.0, 512.0], skipped=1)
    save_diagnostics(study, diagnostics)
    assert load_diagnostics(study) == diagnostics


@pytest.mark.parametrize("fields,line", [
    ({"within_limit": True},
     "compiled: ok, rel_l2 0.004 against FP32 (eager 0.003; compile 1.5 s) within the limit 0.01"),
    ({"within_limit": False, "compiled_error": 0.02}, "compiled: FAILED, rel_l2 0.02 against FP32"),
    ({"within_limit": None, "limit": None}, "the plan states no rel_l2 limit to check"),
    ({"within_limit": False, "compiled_error": None, "failure": "graph break"}, "compiled: FAILED, graph break"),
])
def test_the_compiled_check_verdict(fields, line):
    check = CompiledCheck(**{"metric": "rel_l2", "eager_error": 0.003, "compiled_error": 0.004, "limit": 0.01,
                             "compile_s": 1.5, "failure": None, **fields})
    assert line in verdict(check)
    assert check.to_dict()["within_limit"] == fields["within_limit"]


def test_one_loss_scaled_step_serves_the_trainer_and_the_timed_step():
    import torch

    from precsearch.runtime.training import backward_and_step

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    backward_and_step((weight * torch.tensor([1.0, float("inf")])).sum(), optimizer, scaler)
    assert torch.equal(weight.detach(), torch.ones(2)) and scaler.get_scale() == 4.0   # skipped, backed off
    optimizer.zero_grad()
    clipped = []
    backward_and_step(weight.sum(), optimizer, scaler, clip=lambda: clipped.append(weight.grad.clone()))
    assert torch.equal(clipped[0], torch.ones(2))                                     # clip sees unscaled grads
    assert torch.allclose(weight.detach(), torch.full((2,), 0.9))
