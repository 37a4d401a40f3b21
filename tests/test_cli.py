import json
import subprocess
import sys

import pytest

from precsearch import Plan, model_fingerprint
from precsearch.cli import main
from precsearch.examples import demo


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_layers_lists_the_demo_units(capsys):
    code, out, _ = run(capsys, "layers")
    assert code == 0
    for unit in ("stem", "blocks.0.fc1", "amplify", "shift", "head"):
        assert unit in out
    assert "10 precision units" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_layers_json(capsys):
    code, out, _ = run(capsys, "layers", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 10
    assert rows[0] == {"name": "stem", "type": "Linear", "kind": "compute", "ops": {"linear": 1},
                       "params": 64 * 512 + 512, "flops": 2 * 256 * 64 * 512}


def test_layers_shows_embedding_tables_as_storage_units(capsys):
    code, out, _ = run(capsys, "layers", "--model", "precsearch.examples.transformers_models:bert",
                       "--data", "precsearch.examples.transformers_models:tokens")
    assert code == 0
    table = [line.split() for line in out.splitlines() if line.startswith("embeddings.")]
    assert {row[2] for row in table} == {"storage"} and len(table) == 3
    assert "(3 storage: embedding tables, held in their unit's dtype)" in out


def test_check_passes_a_matching_plan_and_fails_a_missing_layer(capsys, tmp_path):
    good = Plan(default="bf16", layers={"shift": "fp32", "amplify": "bf16"},
                model={"fingerprint": model_fingerprint(demo.model())}).save(tmp_path / "good.yaml")
    code, out, _ = run(capsys, "check", "--plan", str(good))
    assert code == 0 and "audit ok: 40 eligible ops in 10 units" in out
    code, out, _ = run(capsys, "check", "--plan", str(good), "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    bad = Plan(layers={"blocks.7.fc1": "bf16"}).save(tmp_path / "bad.yaml")
    code, _, err = run(capsys, "check", "--plan", str(bad))
    assert code == 2
    assert err.strip().startswith("precsearch: error: layers.blocks.7.fc1: the model has no module ")
    assert err.strip().endswith("(did you mean 'blocks.2.fc1'?)") and len(err.strip().splitlines()) == 1


def test_check_fingerprint_mismatch(capsys, tmp_path):
    plan = Plan(model={"fingerprint": "sha256:" + "1" * 64}).save(tmp_path / "p.yaml")
    code, _, err = run(capsys, "check", "--plan", str(plan))
    assert code == 2 and "model.fingerprint" in err and "--ignore-fingerprint" in err
    code, _, _ = run(capsys, "check", "--plan", str(plan), "--ignore-fingerprint")
    assert code == 0


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "userfactories.py").write_text(
        "import torch\n"
        "def raises():\n    raise ValueError('no weights here')\n"
        "def not_a_model():\n    return 42\n"
        "def not_batches():\n    return 42\n"
        "def linear():\n    return torch.nn.Linear(4, 4)\n"
        "def batches():\n    return [torch.randn(2, 4)]\n"
    )
    (tmp_path / "broken.py").write_text("import does_not_exist\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["layers", "--model", "nope:f", "--data", "userfactories:batches"], "cannot import 'nope'"),
    (["layers", "--model", "broken:f", "--data", "userfactories:batches"], "cannot import 'broken'"),
    (["layers", "--model", "userfactories", "--data", "userfactories:batches"], "expected MODULE:FUNC"),
    (["layers", "--model", "userfactories:missing", "--data", "userfactories:batches"], "no attribute 'missing'"),
    (["layers", "--model", "userfactories:raises", "--data", "userfactories:batches"],
     "the factory raised ValueError: no weights here"),
    (["layers", "--model", "userfactories:not_a_model", "--data", "userfactories:batches"], "not a torch.nn.Module"),
    (["layers", "--model", "userfactories:linear", "--data", "userfactories:not_batches"], "list (or iterable)"),
    (["layers", "--model", "userfactories:linear"], "--model and --data go together"),
    (["layers", "--device", "tpu"], "--device 'tpu'"),
    (["check", "--plan", "missing.yaml"], "missing.yaml: cannot read plan"),
    (["layers", "--bogus"], "unrecognized arguments: --bogus"),
    (["check"], "the following arguments are required: --plan"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, factories, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_user_factories_work_from_the_current_directory(capsys, factories):
    code, out, _ = run(capsys, "layers", "--model", "userfactories:linear", "--data", "userfactories:batches")
    assert code == 0 and "<root>" in out


@pytest.mark.parametrize("text", [
    "not: [valid",
    "format: precsearch-plan/1\nlayers: !!python/object/apply:os.system ['echo hacked']\n",
    "format: precsearch-plan/9\n",
    "format: precsearch-plan/1\nlayers: {stem: fp12}\n",
])
def test_bad_plans_exit_2_without_traceback(tmp_path, text):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "precsearch", "check", "--plan", str(path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "hacked" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "layers" in out and "check" in out


@pytest.mark.parametrize("argv,message", [
    (["optimize", "--holdout", "1.5"], "argument --holdout: '1.5' must be a fraction >= 0 and < 1"),
    (["optimize", "--holdout", "-0.1"], "argument --holdout: '-0.1' must be a finite number >= 0"),
    (["optimize", "--margin", "1"], "argument --margin: '1' must be a fraction >= 0 and < 1"),
    (["optimize", "--margin", "lots"], "argument --margin: 'lots' is not a number"),
    (["optimize", "--holdout", "0.5", "--mode", "train"], "--holdout: held-out scoring works with"),
    (["optimize", "--holdout-data", "userfactories:not_batches"], "--holdout-data"),
])
def test_bad_unseen_data_flags_are_one_line_and_exit_2(capsys, factories, argv, message):
    code, _, err = run(capsys, *argv, "--out", str(factories / "out"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (factories / "out").exists()


def test_inference_commands_say_they_run_the_model_in_eval_mode(capsys):
    for command in ("optimize", "check", "layers"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "eval mode (model.eval())" in " ".join(capsys.readouterr().out.split())


def two_linears():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(64, 16))   # in train mode: the CLI must call eval()


def eight_batches():
    import torch

    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=generator) for _ in range(8)]


@pytest.mark.slow
def test_optimize_holds_out_batches_and_keeps_a_margin(tmp_path, capsys):
    from precsearch import load_plan
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "optimize", "--model", "test_cli:two_linears", "--data", "test_cli:eight_batches",
                            "--trials", "4", "--margin", "0.2", "--out", str(out), "--space", "bf16_only")
    assert code == 0, err
    assert "2 of 8 batches held out (--holdout 0.25) to score the plans; --margin 0.2" in err
    plans = [load_plan(out / "plan.yaml"), *(load_plan(p) for p in sorted((out / "pareto").glob("*.yaml")))]
    for plan in plans:
        assert plan.metrics.holdout_batches == 2 and 0 <= plan.metrics.holdout_error < 0.05
    chosen = plans[0]
    assert chosen.metrics.error <= 0.01 * 0.8 and chosen.search["margin"] == 0.2
    report = (out / "report.md").read_text()
    assert "| error | holdout_error |" in report and "held-out batches the search never saw" in report


@pytest.mark.slow
def test_optimize_compile_records_the_compiled_error_within_the_limit(tmp_path, capsys):
    from precsearch import load_plan
    out = tmp_path / "run"
    code, _, err = run(capsys, "optimize", "--model", "test_compiled:explicit_rounding", "--data",
                       "test_compiled:explicit_rounding_data", "--trials", "3", "--compile", "--out", str(out),
                       "--space", "bf16_only", "--max-error", "0.02")
    assert code == 0, err
    plan = load_plan(out / "plan.yaml")
    assert plan.resolved_runtime.compile and 0 <= plan.metrics.compiled_error <= 0.02
    report = " ".join((out / "report.md").read_text().split())
    assert "compiled with torch.compile, where its rel_l2 against FP32 is" in report
    assert all(not load_plan(p).resolved_runtime.compile for p in (out / "pareto").glob("*.yaml"))
