import os
import time

import pytest
import yaml

from precsearch import LossScaling, Plan, PlanError, load_plan, model_fingerprint
from precsearch.examples import demo
from precsearch.runtime.plan import mask_password


def test_round_trip_keeps_every_field(tmp_path):
    plan = Plan(default="bf16", layers={"stem": "fp32", "shift": "fp16"}, mode="training",
                model={"name": "m:f", "fingerprint": "sha256:abc", "units": 10},
                target={"device": "cpu", "device_name": "x", "torch": "2.13.0"},
                loss_scaling=LossScaling(init_scale=1024.0), constraint={"metric": "rel_l2", "limit": 0.01},
                metrics={"latency_ms": 1.5, "speedup": 2.0}, search={"space": "default", "trials": 5})
    path = plan.save(tmp_path / "plan.yaml")
    assert load_plan(path) == plan
    text = path.read_text()
    assert text.startswith("format: precsearch-plan/2\n")
    assert list(yaml.safe_load(text)) == ["format", "created", "model", "target", "mode", "default", "layers",
                                          "runtime", "loss_scaling", "constraint", "metrics", "search"]


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
    ("format: precsearch-plan/3\n", "format 'precsearch-plan/3' is not supported"),
    ("format: something\n", "format must be 'precsearch-plan/2'"),
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


# -- bad input that never hurts: the safe loader and typed fields ---------------------------------
@pytest.mark.parametrize("text,message", [
    ("format: precsearch-plan/1\ndefault: fp32\nlayers: {}\ndefault: bf16\n",
     "duplicate key 'default' at line 4 (first at line 2)"),
    ("format: precsearch-plan/1\nlayers: {stem: bf16, stem: fp32}\n", "duplicate key 'stem' at line 2"),
    ("format: precsearch-plan/1\nlayers:\n  stem: bf16\n  head: fp32\n  stem: fp32\n",
     "duplicate key 'stem' at line 5 (first at line 3)"),
    ("format: precsearch-plan/1\nlayers: {stem: &d bf16, head: *d}\n", "YAML anchor or alias &d at line 2"),
    ("format: precsearch-plan/1\nmodel: {name: a, name: b}\n", "duplicate key 'name' at line 2"),
])
def test_duplicate_keys_and_aliases_are_refused(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_alias_bomb_in_created_fails_fast(tmp_path):
    lines = ['  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = _write(tmp_path, "format: precsearch-plan/1\ncreated:\n" + "\n".join(lines) + "\n")
    assert path.stat().st_size < 1024
    started = time.perf_counter()
    with pytest.raises(PlanError, match="YAML anchor or alias &l0 at line 3"):
        load_plan(path)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("field,text,message", [
    ("model.fingerprint", "model: {fingerprint: 12345}",
     "model.fingerprint: expected a string 'sha256:...', found int 12345"),
    ("model.fingerprint", "model: {fingerprint: 'md5:abc'}", "model.fingerprint: expected a string 'sha256:...'"),
    ("model.name", "model: {name: [a, b]}", "model.name: expected a string, found list ['a', 'b']"),
    ("model.units", "model: {units: '13'}", "model.units: expected an integer >= 0, found string '13'"),
    ("model.units", "model: {units: true}", "model.units: expected an integer >= 0, found boolean True"),
    ("model", "model: {1: x}", "model: field name int 1 must be a string"),
    ("model", "model: [a]", "model: must be a mapping"),
    ("target.torch", "target: {torch: 2.1}", "target.torch: expected a string, found float 2.1"),
    ("constraint.limit", "constraint: {metric: rel_l2, limit: .inf}", "constraint.limit: expected a finite number"),
    ("constraint.limit", "constraint: {metric: rel_l2, limit: -1}", "constraint.limit: expected a finite number >= 0"),
    ("constraint.limit", "constraint: {metric: rel_l2}", "constraint.limit: missing"),
    ("constraint.metric", "constraint: {metric: 3, limit: 0.1}", "constraint.metric: expected a string, found int 3"),
    ("constraint", "constraint: {metric: a, limit: 1, unit: x}", "constraint: unknown field 'unit'"),
    ("metrics.speedup", "metrics: {speedup: fast}", "metrics.speedup: expected a number or null, found string"),
    ("metrics.error", "metrics: {error: [1]}", "metrics.error: expected a number or null"),
    ("search.trials", "search: {trials: many}", "search.trials: expected an integer >= 0"),
    ("search.storage", "search: {storage: 5}", "search.storage: expected a storage URL string or null"),
    ("search.space", "search: {space: {a: 1}}", "search.space: expected a string, found mapping"),
    ("created", "created: 12345", "created: expected a time string such as '2026-11-28T12:00:00Z', found int"),
    ("created", "created: [a]", "created: expected a time string"),
    ("layers", "layers: []", "layers: must be a mapping"),
    ("loss_scaling", "loss_scaling: 5", "loss_scaling: expected a mapping or null, found int 5"),
    ("loss_scaling.init_scale", "loss_scaling: {init_scale: .inf}", "loss_scaling.init_scale"),
    ("loss_scaling", "loss_scaling: {1: 2, scale: 3}", "loss_scaling: unknown field 1"),
])
def test_mistyped_fields_name_the_field(tmp_path, field, text, message):
    path = _write(tmp_path, f"format: precsearch-plan/1\n{text}\n")
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert str(caught.value).startswith(f"{path}: {field}")
    assert message in str(caught.value)


def test_wrong_fingerprint_type_is_caught_before_validate_for():
    with pytest.raises(PlanError, match="model.fingerprint: expected a string 'sha256:...', found int 12345"):
        Plan(model={"fingerprint": 12345})


@pytest.mark.parametrize("written,stored", [
    ("2026-11-28T12:00:00Z", "2026-11-28T12:00:00Z"),
    ("2026-11-28 14:30:05+02:00", "2026-11-28T12:30:05Z"),
    ("2026-11-28", "2026-11-28T00:00:00Z"),
    ("'made by hand'", "made by hand"),
    ("null", ""),
])
def test_created_timestamps_become_iso_strings(tmp_path, written, stored):
    plan = load_plan(_write(tmp_path, f"format: precsearch-plan/1\ncreated: {written}\n"))
    assert plan.created == stored
    assert load_plan(plan.save(tmp_path / "again.yaml")).created == stored


def test_cli_check_refuses_duplicate_keys_in_one_line(tmp_path, capsys):
    from precsearch.cli import main

    path = _write(tmp_path, "format: precsearch-plan/1\ndefault: fp32\nlayers: {stem: bf16, stem: fp32}\n")
    code = main(["check", "--plan", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"precsearch: error: {path}: duplicate key 'stem' at line 3")
