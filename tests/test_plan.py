import os

import pytest
import yaml

from precsearch import LossScaling, Plan, PlanError, load_plan, model_fingerprint
from precsearch.examples import demo
from precsearch.plan import mask_password


def test_round_trip_keeps_every_field(tmp_path):
    plan = Plan(default="bf16", layers={"stem": "fp32", "shift": "fp16"}, mode="training",
                model={"name": "m:f", "fingerprint": "sha256:abc", "units": 10},
                target={"device": "cpu", "device_name": "x", "torch": "2.13.0"},
                loss_scaling=LossScaling(init_scale=1024.0), constraint={"metric": "rel_l2", "limit": 0.01},
                metrics={"latency_ms": 1.5, "speedup": 2.0}, search={"space": "default", "trials": 5})
    path = plan.save(tmp_path / "plan.yaml")
    assert load_plan(path) == plan
    text = path.read_text()
    assert text.startswith("format: precsearch-plan/1\n")
    assert list(yaml.safe_load(text)) == ["format", "created", "model", "target", "mode", "default", "layers",
                                          "loss_scaling", "constraint", "metrics", "search"]


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = Plan(default="bf16").save(tmp_path / "plan.yaml")
    original = path.read_text()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        Plan(default="fp16").save(path)
    assert path.read_text() == original
    assert os.listdir(tmp_path) == ["plan.yaml"]


def test_storage_password_is_masked():
    plan = Plan(search={"storage": "postgresql://user:s3cret@db:5432/optuna"})
    assert "s3cret" not in plan.dumps()
    assert mask_password("sqlite:///x.db") == "sqlite:///x.db"


def _write(tmp_path, text):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("format: precsearch-plan/1\nlayers: {stem: int8}\n", "layers.stem: unknown dtype 'int8'"),
    ("format: precsearch-plan/1\ndefault: fp64\n", "default: unknown dtype 'fp64'"),
    ("format: precsearch-plan/2\n", "format 'precsearch-plan/2' is not supported"),
    ("format: something\n", "format must be 'precsearch-plan/1'"),
    ("- a\n- b\n", "not a precsearch plan"),
    ("format: precsearch-plan/1\nlayers: [1, 2]\n", "layers: must be a mapping"),
    ("format: precsearch-plan/1\nmode: serving\n", "mode: 'serving'"),
    ("format: precsearch-plan/1\nextra: 1\n", "unknown field 'extra'"),
    ("format: precsearch-plan/1\nloss_scaling: {init_scale: -1}\n", "loss_scaling.init_scale"),
    ("format: precsearch-plan/1\nloss_scaling: {backoff_factor: 2}\n", "loss_scaling.backoff_factor"),
    ("format: [unclosed\n", "not valid YAML at line"),
])
def test_invalid_plans_name_the_field(tmp_path, text, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_plan(_write(tmp_path, text))


def test_python_tags_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"format: precsearch-plan/1\nlayers: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(PlanError, match="not valid YAML"):
        load_plan(_write(tmp_path, text))
    assert not marker.exists()


def test_unreadable_plan(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(tmp_path / "missing.yaml")


def test_fingerprint_changes_with_the_model_and_is_checked():
    model = demo.model()
    fingerprint = model_fingerprint(model)
    assert fingerprint == model_fingerprint(demo.model(seed=5))  # weights do not matter, structure does
    assert fingerprint != model_fingerprint(demo.TrapNet(width=128))
    Plan(model={"fingerprint": fingerprint}).validate_for(model)
    wrong = Plan(model={"fingerprint": "sha256:" + "0" * 64})
    with pytest.raises(PlanError, match="model.fingerprint"):
        wrong.validate_for(model)
    with pytest.warns(UserWarning, match="model.fingerprint"):
        wrong.validate_for(model, fingerprint_mismatch="warn")


def test_unknown_layer_suggests_the_closest_name():
    with pytest.raises(PlanError, match=r"did you mean 'blocks.0.fc1'"):
        Plan(layers={"blocks.0.fc_1": "bf16"}).validate_for(demo.model())


def test_precision_lookup_and_counts():
    plan = Plan(default="bf16", layers={"a": "fp32"})
    assert plan.precision("a") == "fp32" and plan.precision("b") == "bf16"
    assert plan.counts(["a", "b", "c"]) == {"bf16": 2, "fp32": 1}


def test_compact_lists_only_what_differs_from_the_most_common_dtype():
    plan = Plan.compact({"a": "bf16", "b": "bf16", "c": "fp32"}, mode="training")
    assert plan.default == "bf16" and plan.layers == {"c": "fp32"} and plan.mode == "training"
    assert Plan.compact({"a": "bf16", "b": "fp32"}).default == "fp32"  # ties go to fp32
    assert Plan.compact({}).default == "fp32"
