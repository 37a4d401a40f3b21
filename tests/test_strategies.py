import optuna

from precsearch.cli import main
from precsearch.config import SearchConfig
from precsearch.examples import demo
from precsearch.records import TrialRecord
from precsearch.search import optimize

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _run(strategy, trials=12):
    # bf16 only, never dropped as slow: which plans a strategy proposes must not depend on the
    # machine's load.
    model, batches = demo.small_model(), demo.data(batches=2, batch_size=128)
    return optimize(model, batches, SearchConfig(space="bf16_only", trials=trials, progress=False, repeats=3,
                                                 strategy=strategy, drop_slow_dtypes=False))


def _sequence(result):
    return [TrialRecord.of(t).plan for t in result.study.trials if t.state.name == "COMPLETE"]


def test_global_uses_one_dtype_for_the_whole_model():
    result = _run("global")
    # units: stem, blocks.0.fc1, blocks.0.fc2, amplify, shift, head; all-bf16 breaks `shift`
    assert _sequence(result) == ["bbbbbb", "ffffff"]
    assert result.plan.layers == {} and result.plan.default == "fp32"


def test_greedy_backs_off_the_most_sensitive_unit_first():
    result = _run("greedy")
    assert _sequence(result) == ["bbbbbb", "bbbbfb"]
    assert result.plan.precision("shift") == "fp32" and result.plan.metrics["error"] <= 0.01


def test_bisect_finds_the_unit_that_must_stay_fp32():
    result = _run("bisect")
    sequence = _sequence(result)
    assert sequence[0] == "bbbbbb" and sequence[-1] == "bbbbfb"  # its conclusion: only shift stays fp32
    # the study's answer is the fastest feasible plan it measured: bisection's or an earlier step's
    assert result.plan.precision("shift") == "fp32" and result.plan.metrics["error"] <= 0.01


def test_random_samples_without_seeds():
    result = _run("random", trials=6)
    assert len(_sequence(result)) == 6
    assert all(t.system_attrs.get("fixed_params") is None for t in result.study.trials)
    assert result.setup.settings.sampler == "RandomSampler"


def test_cli_strategy(tmp_path, capsys):
    assert main(["optimize", "--strategy", "greedy", "--trials", "5", "--out", str(tmp_path),
                 "--model", "precsearch.examples.demo:small_model", "--data", "precsearch.examples.demo:data"]) == 0
    assert "strategy | greedy" in (tmp_path / "report.md").read_text()
    assert main(["optimize", "--strategy", "annealing", "--out", str(tmp_path)]) == 2
    assert "invalid choice: 'annealing'" in capsys.readouterr().err
