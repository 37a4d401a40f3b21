import json

import optuna
import pandas as pd
import pytest

from precsearch import Plan, load_plan
from precsearch.cli import main
from precsearch.report.compare import unit_differences
from precsearch.search.decisions import encode
from precsearch.search.trials import StudySetup, TrialRecord, pareto_front


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["optimize", "--trials", "10", "--out", str(out), "--model", "precsearch.examples.demo:small_model",
                 "--data", "precsearch.examples.demo:data"]) == 0
    return out


def _study(out):
    return optuna.load_study(study_name="demo-small_model", storage=f"sqlite:///{out / 'study.db'}")


def test_trials_csv_matches_the_study(run_dir):
    study = _study(run_dir)
    frame = pd.read_csv(run_dir / "trials.csv")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert list(frame["trial"]) == [t.number for t in finished]
    for trial, row in zip(finished, frame.itertuples()):
        assert row.latency_ms == pytest.approx(trial.value)
        assert row.plan == TrialRecord.of(trial, StudySetup.load(study).unit_names).code
        assert row.feasible == (trial.constraints["error"] <= 0)
        assert row.bf16 + row.fp16 + row.fp32 == 6


def test_saved_plans_are_the_pareto_front(run_dir):
    units = [row["name"] for row in StudySetup.load(_study(run_dir)).units]
    chosen = load_plan(run_dir / "plan.yaml")
    others = [load_plan(p) for p in sorted((run_dir / "pareto").glob("*.yaml"))]
    frame = pd.read_csv(run_dir / "trials.csv")
    fastest = frame[frame["feasible"]].sort_values("latency_ms").drop_duplicates("plan")
    front = pareto_front(list(fastest.itertuples()), key=lambda row: (row.latency_ms, row.error))
    # pareto/ holds the front of the trials, less the FP32 plan (nothing to deploy) and the chosen plan
    expected = {row.plan for row in front} - {encode({}, units), _code(chosen, units)}
    assert [_code(plan, units) for plan in others] == [row.plan for row in front if row.plan in expected]
    # each carries its own trial's numbers, on the study's one latency basis
    for plan in others:
        row = frame[frame["trial"] == plan.metrics.trial].iloc[0]
        assert plan.metrics.speedup == pytest.approx(row.speedup, rel=1e-3)
        assert plan.metrics.latency_ms == pytest.approx(row.latency_ms, rel=1e-3)


def _code(plan, units):
    return encode({unit: plan.precision(unit) for unit in units}, units)


def test_report_files_hold_the_numbers(run_dir):
    plan = load_plan(run_dir / "plan.yaml")
    markdown = (run_dir / "report.md").read_text()
    assert "rel_l2 <= 0.01" in markdown and "precsearch.examples.demo:small_model" in markdown
    assert f"{plan.metrics.speedup:.2f}x" in markdown
    for unit in ("stem", "blocks.0.fc1", "blocks.0.fc2", "amplify", "shift", "head"):
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {unit} |"))
        assert row.rstrip(" |").endswith(plan.precision(unit))
    for image in ("tradeoff.png", "progress.png", "units.png"):
        assert (run_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({image})" in markdown
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and 'src="http' not in page


def test_report_command_rebuilds_from_the_directory(run_dir, capsys):
    before = (run_dir / "report.md").read_text()
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == before
    assert "report.html" in capsys.readouterr().out


def test_report_without_a_study_is_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no study here" in capsys.readouterr().err


def test_unit_differences_lists_only_differing_units():
    a = Plan(default="bf16", layers={"x": "fp32"})
    b = Plan(default="bf16", layers={"y": "fp16"})
    rows = unit_differences(["a", "b"], [a, b], ["w", "x", "y", "z"])
    assert rows == [{"unit": "x", "a": "fp32", "b": "bf16"}, {"unit": "y", "a": "bf16", "b": "fp16"}]


def test_compare_json_and_remeasure(tmp_path, capsys):
    a = Plan(default="bf16", layers={"shift": "fp32"}, target={"torch": "2.13.0"}).save(tmp_path / "a.yaml")
    b = Plan(default="fp32", layers={"blocks.0.fc1": "bf16"}, target={"torch": "2.4.0"}).save(tmp_path / "b.yaml")
    code = main(["compare", str(a), str(b), "--json", "--model", "precsearch.examples.demo:small_model",
                 "--data", "precsearch.examples.demo:data"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [row["plan"] for row in result["remeasured"]] == ["fp32 baseline", "a.yaml", "b.yaml"]
    assert result["remeasured"][0]["rel_l2"] == 0 and result["remeasured"][2]["rel_l2"] > 0
    # a: all bf16 but shift; b: all fp32 but blocks.0.fc1 -> they agree on shift and blocks.0.fc1
    assert {row["unit"] for row in result["differences"]} == {"stem", "blocks.0.fc2", "amplify", "head"}
    assert [row["bf16"] for row in result["plans"]] == [5, 1]
    assert any("torch versions" in note for note in result["warnings"])


def test_compare_warns_in_one_line_per_difference(tmp_path, capsys):
    a = Plan(default="bf16", target={"device": "cpu", "device_name": "A"}).save(tmp_path / "a.yaml")
    b = Plan(default="fp32", target={"device": "cuda", "device_name": "B"}).save(tmp_path / "b.yaml")
    assert main(["compare", str(a), str(b)]) == 0
    captured = capsys.readouterr()
    assert "precsearch: warning: plans were made on different devices" in captured.err
    assert "defaults differ (units a plan does not name run in its default): a.yaml bf16, b.yaml fp32" \
        in captured.out and "units unknown without --model: the plans name no unit" in captured.out


@pytest.mark.parametrize("case,message", [
    ("self", "compares a plan with itself"),
    ("newer", "format 'precsearch-plan/3' is not supported"),
    ("model-only", "--model and --data go together"),
    ("one", "compare needs at least two plans"),
])
def test_compare_bad_input(tmp_path, capsys, case, message):
    a = Plan(default="bf16").save(tmp_path / "a.yaml")
    newer = tmp_path / "new.yaml"
    newer.write_text("format: precsearch-plan/3\n")
    argv = {"self": [str(a), str(a)], "newer": [str(a), str(newer)],
            "model-only": [str(a), str(Plan().save(tmp_path / "b.yaml")), "--model", "precsearch.examples.demo:model"],
            "one": [str(a)]}[case]
    assert main(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_every_plan_and_table_uses_one_latency_basis(run_dir):
    setup = StudySetup.load(_study(run_dir))
    plans = [load_plan(run_dir / "plan.yaml")] + [load_plan(p) for p in (run_dir / "pareto").glob("*.yaml")]
    for plan in plans:
        metrics = plan.metrics
        assert metrics.baseline_latency_ms == pytest.approx(setup.baseline_ms, rel=1e-3)
        assert metrics.latency_ms * metrics.speedup == pytest.approx(metrics.baseline_latency_ms, rel=2e-3)
    markdown = (run_dir / "report.md").read_text()
    assert "final race" in markdown  # the chosen plan's numbers come from the race, and the report says so


def test_written_files_honour_the_umask(run_dir):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for name in ("plan.yaml", "trials.csv", "report.md", "report.html", "tradeoff.png"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o666 & ~mask, name


def test_report_says_what_was_held_out_and_never_claims_compiled_for_an_eager_plan(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "No batch was held out of the search (optimize --holdout or --holdout-data)." in report
    assert "compiled with torch.compile" not in report and ", eager." in report
    assert "holdout_error" not in report and "compiled_error" not in report


def test_the_compiled_note_says_how_well_eager_trials_ranked_the_compiled_finalists():
    from precsearch.report.summary import _compile_note
    from precsearch.runtime.plan_sections import Constraint, PlanMetrics

    constraint = Constraint(metric="rel_l2", limit=0.01)
    note = _compile_note(PlanMetrics(compiled_error=0.004, compiled_raced=5, compiled_rank_agreement=0.6), constraint)
    assert "the 5 plans that raced compiled kept their eager order with Spearman 0.60" in note
    assert "Spearman" not in _compile_note(PlanMetrics(compiled_error=0.004), constraint)
