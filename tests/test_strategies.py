import math

import optuna
import pytest

from precsearch.cli import main
from precsearch.search.config import SearchConfig
from precsearch.search.decisions import Decisions, encode
from precsearch.examples import demo
from precsearch.search.trials import TrialRecord, lead_of
from precsearch.search.loop import optimize
from precsearch.search.space import Choice
from precsearch.search.strategies import Lead, lead_plan

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _run(strategy, trials=12):
    # bf16 only, never dropped as slow: which plans a strategy proposes must not depend on the
    # machine's load.
    model, batches = demo.small_model(), demo.data(batches=2, batch_size=128)
    return optimize(model, batches, SearchConfig.from_names(space="bf16_only", trials=trials, progress=False,
                                                            repeats=3, strategy=strategy, drop_slow_dtypes=False))


def _sequence(result):
    complete = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    return [TrialRecord.of(t, result.graph.units).code for t in complete]


def test_global_uses_one_dtype_for_the_whole_model():
    result = _run("global")
    # units: stem, blocks.0.fc1, blocks.0.fc2, amplify, shift, head; all-bf16 breaks `shift`
    assert _sequence(result) == ["bbbbbb", "ffffff"]
    assert result.plan.layers == {} and result.plan.default == "fp32"


def test_greedy_backs_off_the_most_sensitive_unit_first():
    result = _run("greedy")
    assert _sequence(result) == ["bbbbbb", "bbbbfb"]
    assert result.plan.precision("shift") == "fp32" and result.plan.metrics.error <= 0.01


def test_bisect_finds_the_unit_that_must_stay_fp32():
    result = _run("bisect")
    sequence = _sequence(result)
    assert sequence[0] == "bbbbbb" and sequence[-1] == "bbbbfb"  # its conclusion: only shift stays fp32
    # the study's answer is the fastest feasible plan it measured: bisection's or an earlier step's
    assert result.plan.precision("shift") == "fp32" and result.plan.metrics.error <= 0.01


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


# -- the default strategy's lead: greedy's answer, then the model's proposals ---------------------

TRAP = ["big", "s1", "s2", "s3", "s4"]
TRAP_SENSITIVITY = {"big": {"bf16": 0.006}, **{u: {"bf16": 0.0045} for u in TRAP[1:]}}
TRAP_FLOPS = {"big": 800, "s1": 50, "s2": 50, "s3": 50, "s4": 50}
TRUE_GAIN, TRUE_SAVING, LIMIT = 1.5, 0.6, 0.01


def _fake_measurement(layers):
    """The truth the models must learn: errors add in quadrature at 1.5x the sensitivity; each
    lowered unit saves 0.6 of its FLOP share."""
    lowered = [u for u in TRAP if layers[u] == "bf16"]
    error = TRUE_GAIN * math.sqrt(sum(TRAP_SENSITIVITY[u]["bf16"] ** 2 for u in lowered))
    relative = 1 - TRUE_SAVING * sum(TRAP_FLOPS[u] for u in lowered) / sum(TRAP_FLOPS.values())
    return TrialRecord({u: layers[u] for u in TRAP}, error, relative, 1.0)


def _trap_decisions():
    return Decisions([Choice(u, (u,), ("bf16", "fp32")) for u in TRAP], TRAP_SENSITIVITY, TRAP_FLOPS,
                     ranked=False, limit=LIMIT, calibration={"bf16": 1.0}, speed={"bf16": 0.5})


def _lead_study(trials):
    decisions = _trap_decisions()
    lead = Lead(decisions, {u: 0 for u in TRAP}, LIMIT, TRAP)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lead.after_trial(study)
    for _ in range(trials):
        trial = study.ask()
        suggested = decisions.suggest(trial)
        layers = lead_plan(trial, TRAP) or suggested
        assert layers == suggested  # a lead trial's params say its plan: TPE learns from it
        record = _fake_measurement(layers)
        record.save(trial)
        lead.after_trial(study)
        study.tell(trial, record.latency_ms)
    return study


def test_lead_checks_greedys_answer_then_proposes_what_greedys_order_misses():
    study = _lead_study(8)
    leads = [(lead_of(t)[0], TrialRecord.of(t, TRAP).code) for t in study.trials if lead_of(t)]
    greedy = [code for tag, code in leads if tag == "greedy"]
    # predicted with the prior gain (big back in FP32), calibrated by that measurement (1.5x),
    # then checked either side: greedy's own answer is s3 and s4 low, the rest FP32
    assert greedy == ["fbbbb", "fffbb", "ffbbb"]
    assert leads[:3] == [("greedy", code) for code in greedy]
    proposals = [code for tag, code in leads if tag == "proposal"]
    assert "bffff" in proposals      # the big saving alone fits: greedy's order put it back first
    measured = {record.code: record for t in study.trials if (record := TrialRecord.of(t, TRAP))}
    assert measured["bffff"].error <= LIMIT
    assert measured["bffff"].latency_ms < measured["fffbb"].latency_ms


def test_lead_enqueues_the_sensitivity_seeds_after_the_first_proposals():
    study = _lead_study(8)
    first_seed = next(t.number for t in study.trials if not lead_of(t))
    first_proposal = next(t.number for t in study.trials if lead_of(t) and lead_of(t)[0] == "proposal")
    assert first_proposal < first_seed
    assert study.trials[first_seed].params in _trap_decisions().seeds()


@pytest.mark.slow
def test_the_default_strategy_starts_from_greedys_plan_and_records_its_leads():
    # Whether a proposal gets a trial of its own depends on measured latencies (a proposal equal to
    # a measured plan is not measured again): the fake-measurement test above covers proposals.
    result = _run("optuna", trials=5)
    units = result.graph.units
    trials = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    leads = [lead_of(t) for t in trials]
    assert leads[0][0] == "greedy"
    assert {lead[0] for lead in leads if lead} <= {"greedy", "proposal"}
    lead = Lead(result.decisions, {u: result.graph[u]["params"] for u in units}, 0.01, units)
    greedy_codes = {encode(plan, units) for plan in lead.greedy}
    for trial, marks in zip(trials, leads):
        if marks:
            assert TrialRecord.of(trial, units).code == marks[1]
            assert trial.params == result.decisions.params_for(lead_plan(trial, units))  # TPE sees the plan
        if marks and marks[0] == "greedy":
            assert marks[1] in greedy_codes
    assert all(t.user_attrs.get("predicted_error") is not None for t in trials)


def test_the_best_plan_of_each_baseline_always_races():
    from precsearch.search.selection import FeasiblePlan, best_leads

    def candidate(trial, lead, latency, error):
        layers = {str(unit): "bf16" for unit in range(trial)}
        return FeasiblePlan(trial, TrialRecord(layers, error, latency, 1.0), lead)

    candidates = [candidate(1, None, 0.5, 0.001), candidate(2, "greedy", 0.9, 0.002),
                  candidate(3, "greedy", 0.8, 0.009), candidate(4, "greedy", 0.85, 0.003),
                  candidate(5, "proposal", 0.7, 0.004)]
    assert [c.trial for c in best_leads(candidates, headroom=0.005)] == [5, 4]  # 3 is over the headroom
