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
    assert rows[0] == {"name": "stem", "type": "Linear", "ops": {"linear": 1}, "params": 64 * 512 + 512,
                       "flops": 2 * 256 * 64 * 512}


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
    assert err.strip() == ("precsearch: error: layers.blocks.7.fc1: the model has no module of that name "
                           "(did you mean 'blocks.2.fc1'?)")


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
