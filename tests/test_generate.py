"""Generation as a workload (``--workload generate``): greedy prefill + decode with the KV cache,
timed through the same interleaved path as a forward pass, judged by the task metric and by the
agreement of the generated tokens with FP32's. Tiny GPT-2 and T5 checkpoints, nothing downloaded."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml

from precsearch.search import factories
from precsearch.runtime import hf
from precsearch.runtime.accuracy import Fidelity
from precsearch.cli import main
from precsearch.search.config import SearchConfig
from precsearch.search.datafiles import DataOptions
from precsearch.runtime.errors import InputError, PlanError
from precsearch.search.evaluate import Evaluator
from precsearch.runtime.plan import Plan, Runtime
from precsearch.runtime.workload import (
    GenerationRun,
    GenerationStats,
    TokenGate,
    Workload,
    greedy_agreement,
    prompt_of,
    stats_of,
)

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import hf_fixtures  # after the skips: it builds transformers models


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return {kind: hf_fixtures.save_checkpoint(root / kind, kind) for kind in ("gpt2", "t5", "bert")}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return hf_fixtures.write_examples(tmp_path_factory.mktemp("data") / "examples.jsonl")


def _loaded(checkpoints, examples, kind, batch_size=3):
    model = hf.load_model(checkpoints[kind])
    batches = factories.load_data(str(examples), model=model, model_spec=checkpoints[kind],
                                  options=DataOptions(batch_size=batch_size))
    return model, batches


# --- token agreement --------------------------------------------------------------------------------

def test_agreement_is_the_share_of_equal_tokens_at_the_same_position():
    reference = [torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.tensor([[9, 9]])]
    got = [torch.tensor([[1, 2, 0, 4], [5, 0, 0, 8]]), torch.tensor([[9, 1]])]
    assert greedy_agreement(got, reference) == 6 / 10
    assert greedy_agreement(reference, reference) == 1.0
    shifted = [torch.tensor([[2, 3, 4, 0], [6, 7, 8, 0]]), torch.tensor([[9, 9]])]  # one token late: no credit
    assert greedy_agreement(shifted, reference) == 2 / 10
    with pytest.raises(RuntimeError, match="FP32 generated"):
        greedy_agreement([torch.tensor([[1, 2]])], [torch.tensor([[1, 2, 3]])])


def test_the_gate_fails_below_its_minimum_and_names_the_flag():
    gate = TokenGate.__new__(TokenGate)
    gate.minimum = 0.9
    assert gate.failure(0.9) is None
    assert "--min-token-agreement 0.9" in gate.failure(0.85) and "0.850" in gate.failure(0.85)


def test_a_fidelity_with_a_failing_gate_is_infeasible_whatever_its_error():
    class Gate:
        minimum = 0.9

        def agreement(self, model):
            return 0.5

        def failure(self, agreement):
            return "tokens stray"

        def describe(self):
            return {"min_token_agreement": 0.9}

    fidelity = Fidelity("perplexity", 0.01, lambda model: 0.001, gate=Gate())
    verdict = fidelity.judge(torch.nn.Linear(1, 1))
    assert (verdict.error, verdict.agreement, verdict.failure) == (0.001, 0.5, "tokens stray")
    assert fidelity.error(torch.nn.Linear(1, 1)) == math.inf
    assert fidelity.describe() == {"metric": "perplexity", "limit": 0.01, "min_token_agreement": 0.9}


# --- prompts and runs ---------------------------------------------------------------------------------

def test_a_causal_prompt_is_padded_on_the_left_with_its_tokens_in_order(checkpoints):
    model = hf.load_model(checkpoints["gpt2"])
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([0, 1])}
    prompt = prompt_of(model, batch)
    assert set(prompt) == {"input_ids", "attention_mask"}
    assert prompt["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert prompt["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_a_seq2seq_prompt_keeps_its_padding_and_drops_the_teacher_forced_decoder_input(checkpoints):
    model = hf.load_model(checkpoints["t5"])
    batch = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]),
             "decoder_input_ids": torch.tensor([[0, 5, 6]])}
    prompt = prompt_of(model, batch)
    assert set(prompt) == {"input_ids", "attention_mask"} and prompt["input_ids"].tolist() == [[5, 6, 0]]
    with pytest.raises(InputError, match="needs token batches"):
        prompt_of(model, torch.zeros(2, 3))


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_a_generating_run_makes_exactly_n_greedy_tokens_and_times_prefill_and_decode(checkpoints, examples, kind):
    model, batches = _loaded(checkpoints, examples, kind)
    run = Workload("generate", new_tokens=4).runner(model, batches[0])
    assert isinstance(run, GenerationRun)
    tokens = run.generate()
    assert tokens.shape == (batches[0]["input_ids"].shape[0], 4)
    assert torch.equal(run.generate(), tokens)   # greedy: the same every time
    for _ in range(3):
        run()
    stats = stats_of(run)
    assert stats.tokens == 3 * 4 and stats.prefill_ms > 0 and stats.decode_ms_per_token > 0
    assert stats.prefill_ms <= stats.total_ms and stats.tokens_per_s > 0
    assert stats_of(Workload().runner(model, batches[0])) is None   # a forward pass has no generation stats


def test_one_new_token_has_no_decode_step(checkpoints, examples):
    model, batches = _loaded(checkpoints, examples, "gpt2")
    run = Workload("generate", new_tokens=1).runner(model, batches[0])
    run()
    assert run.stats().decode_ms_per_token is None


def test_generation_runs_a_seq2seq_encoder_in_the_plans_default(checkpoints, examples):
    """T5's generate calls its encoder directly, not through the root forward the plan wraps."""
    from precsearch import apply_plan
    model, batches = _loaded(checkpoints, examples, "t5")
    with apply_plan(model, Plan(default="bf16"), example_inputs=batches[0]):
        tokens = Workload("generate", new_tokens=3).runner(model, batches[0]).generate()
    assert tokens.shape[1] == 3


def test_stats_round_trip_through_a_trials_record():
    stats = GenerationStats(prefill_ms=2.0, decode_ms_per_token=0.5, tokens=12, total_ms=4.0, token_agreement=0.75)
    record = stats.record()
    assert record["tokens_per_s"] == 3000.0 and record["generated_tokens"] == 12
    again = GenerationStats.of(record)
    assert (again.prefill_ms, again.decode_ms_per_token, again.tokens, again.token_agreement) == (2.0, 0.5, 12, 0.75)
    assert math.isclose(again.total_ms, 4.0)
    assert GenerationStats.of({"prefill_ms": None}) is None
    assert stats.plan_metrics(latency_ms=6.0, baseline_ms=12.0)["tokens_per_s"] == 2000.0


# --- the evaluator: what a candidate's run is ---------------------------------------------------------

def test_the_evaluator_times_generation_and_judges_the_tokens_against_fp32(checkpoints, examples):
    model, batches = _loaded(checkpoints, examples, "gpt2")
    fidelity = Fidelity.builtin(model, batches, "perplexity", 0.05)
    runtime = Runtime(workload="generate", new_tokens=3)
    evaluator = Evaluator(model, batches, fidelity, "cpu", repeats=2, runtime=runtime, min_token_agreement=0.8)
    assert evaluator.fidelity.gate.minimum == 0.8
    assert [t.shape for t in evaluator.fidelity.gate.reference] == [(3, 3), (3, 3)]   # FP32's, generated once
    assert evaluator.fidelity.describe()["min_token_agreement"] == 0.8
    measured = evaluator.measure({}, repeats=2)
    assert measured.error == 0.0 and measured.failure is None
    assert measured.generation.token_agreement == 1.0 and measured.generation.tokens == 9
    assert evaluator.plan({}).runtime == runtime


def test_a_candidate_under_the_token_agreement_is_infeasible_with_the_reason(checkpoints, examples, monkeypatch):
    model, batches = _loaded(checkpoints, examples, "gpt2")
    evaluator = Evaluator(model, batches, Fidelity.builtin(model, batches, "perplexity", 0.05), "cpu", repeats=2,
                          runtime=Runtime(workload="generate", new_tokens=2), min_token_agreement=0.9)
    monkeypatch.setattr(evaluator.fidelity.gate, "agreement", lambda candidate: 0.5)
    measured = evaluator.measure({}, repeats=2)
    assert measured.error == math.inf and measured.generation.token_agreement == 0.5
    assert "0.500 of the time, under --min-token-agreement 0.9" in measured.failure
    assert "perplexity 0" in measured.failure   # the metric's own value stays in the record


def test_a_forward_evaluator_is_unchanged(checkpoints, examples):
    model, batches = _loaded(checkpoints, examples, "gpt2")
    evaluator = Evaluator(model, batches, Fidelity.builtin(model, batches, "perplexity", 0.05), "cpu", repeats=2)
    assert evaluator.fidelity.gate is None and evaluator.measure({}, repeats=2).generation is None


# --- configuration and plans --------------------------------------------------------------------------

@pytest.mark.parametrize("fields, words", [
    ({"workload": "decode"}, "--workload 'decode'"),
    ({"workload": "generate", "new_tokens": 0}, "--new-tokens 0"),
    ({"new_tokens": 8}, "--new-tokens: applies to --workload generate"),
    ({"min_token_agreement": 0.5}, "--min-token-agreement: applies to --workload generate"),
    ({"workload": "generate", "min_token_agreement": 1.5}, "--min-token-agreement 1.5"),
    ({"workload": "generate", "mode": "train", "weights": "fp32"}, "drop it with --mode train"),
])
def test_bad_workload_settings_name_the_flag(fields, words):
    with pytest.raises(InputError, match=words):
        SearchConfig(**fields)


def test_the_config_defaults_and_runtime_of_a_generating_search():
    config = SearchConfig(workload="generate")
    assert (config.new_tokens, config.min_token_agreement) == (32, 0.9)
    assert config.runtime == Runtime(weights="low", workload="generate", new_tokens=32)
    assert SearchConfig().runtime == Runtime()


def test_a_plan_records_its_workload_and_older_plans_load_as_forward(tmp_path):
    plan = Plan(runtime=Runtime(workload="generate", new_tokens=16),
                constraint={"metric": "perplexity", "limit": 0.01, "min_token_agreement": 0.9})
    path = plan.save(tmp_path / "plan.yaml")
    raw = yaml.safe_load(path.read_text())
    assert raw["runtime"] == {"weights": "low", "compile": False, "workload": "generate", "new_tokens": 16}
    from precsearch.runtime.plan import load_plan

    assert load_plan(path).resolved_runtime.run == Workload("generate", 16)
    raw["runtime"] = {"weights": "low", "compile": False}   # as plans were written before
    assert Plan.from_dict(raw).resolved_runtime.run == Workload()
    assert Plan(runtime=Runtime()).to_dict()["runtime"] == {"weights": "low", "compile": False}
    for runtime, words in (({"workload": "generate"}, "runtime.new_tokens"), ({"workload": "beam"}, "runtime.workload"),
                           ({"new_tokens": 4}, "applies to workload: generate")):
        with pytest.raises(PlanError, match=words):
            Plan.from_dict({**raw, "runtime": runtime})
    with pytest.raises(PlanError, match="constraint.min_token_agreement"):
        Plan.from_dict({**raw, "constraint": {"metric": "perplexity", "limit": 0.01, "min_token_agreement": 2}})


# --- the command line ---------------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("precsearch: error:"), err
    return err[0]


@pytest.mark.parametrize("case, words", [
    ("not_a_language_model", "BertForSequenceClassification is not a causal or seq2seq language model"),
    ("zero_tokens", "--new-tokens: '0' must be at least 1"),
    ("agreement_over_one", "--min-token-agreement: '1.5' must be a fraction"),
    ("tokens_without_generate", "--new-tokens: applies to --workload generate"),
    ("unknown_workload", "--workload: invalid choice"),
    ("training", "--workload generate: generation is timed for inference"),
])
def test_bad_generation_input_exits_2_with_one_line_and_leaves_nothing(case, words, checkpoints, examples, tmp_path,
                                                                      capsys):
    model = checkpoints["bert" if case == "not_a_language_model" else "gpt2"]
    args = {"not_a_language_model": ["--workload", "generate"],
            "zero_tokens": ["--workload", "generate", "--new-tokens", "0"],
            "agreement_over_one": ["--workload", "generate", "--min-token-agreement", "1.5"],
            "tokens_without_generate": ["--new-tokens", "4"],
            "unknown_workload": ["--workload", "beam"],
            "training": ["--workload", "generate", "--mode", "train", "--weights", "fp32"]}[case]
    out = tmp_path / "out"
    code = main(["optimize", "--model", model, "--data", str(examples), "--trials", "1", "--out", str(out), *args])
    line = _one_error_line(capsys)
    assert code == 2 and not out.exists(), line
    assert words in line, line


def test_the_demo_with_generate_names_the_model_class(tmp_path, capsys):
    assert main(["optimize", "--workload", "generate", "--out", str(tmp_path / "out")]) == 2
    assert "is not a causal or seq2seq language model" in _one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("kind, metric", [("gpt2", "perplexity"), ("t5", "token_agreement")])
def test_optimize_generation_end_to_end_then_check_and_compare(kind, metric, checkpoints, examples, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", checkpoints[kind], "--data", str(examples), "--batch-size", "3"]
    code = main(["optimize", *common, "--trials", "3", "--space", "bf16_only", "--workload", "generate",
                 "--new-tokens", "3", "--min-token-agreement", "0.5", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "generation (3 new tokens, eager): prefill" in captured.out and "tokens/s" in captured.out
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["runtime"]["workload"] == "generate" and plan["runtime"]["new_tokens"] == 3
    assert plan["constraint"] == {"metric": metric, "limit": 0.01, "min_token_agreement": 0.5}
    metrics = plan["metrics"]
    assert metrics["generated_tokens"] == 2 * 3 * 3 // 2 and metrics["token_agreement"] >= 0.5
    assert metrics["prefill_ms"] > 0 and metrics["decode_ms_per_token"] > 0
    assert math.isclose(metrics["tokens_per_s"], metrics["generated_tokens"] * 1e3 / metrics["latency_ms"], rel_tol=1e-3)
    trials = (out / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"prefill_ms", "decode_ms_per_token", "tokens_per_s", "token_agreement"} <= set(trials)
    report = (out / "report.md").read_text()
    assert "Timed as generation" in report and "tokens_per_s" in report
    assert main(["check", "--plan", str(out / "plan.yaml"), *common]) == 0
    capsys.readouterr()
    uniform = "fp32" if plan["default"] == "bf16" and not plan["layers"] else "bf16"
    other = dataclasses.replace(Plan.from_dict(plan), layers={}, default=uniform).save(tmp_path / "uniform.yaml")
    assert main(["compare", str(out / "plan.yaml"), str(other), *common, "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)["remeasured"]
    assert all(row["prefill_ms"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    assert rows[0]["token_agreement"] == 1.0 and rows[-1]["token_agreement"] == 1.0


@pytest.mark.slow
def test_compiled_generation_uses_a_static_cache_and_does_not_recompile_per_step(checkpoints, examples):
    from precsearch.search.compiled import time_compiled

    model, batches = _loaded(checkpoints, examples, "gpt2", batch_size=6)   # one batch shape: one graph per copy
    plan = Plan(default="bf16", runtime=Runtime(workload="generate", new_tokens=3))
    fidelity = Fidelity.builtin(model, batches, "perplexity", 1.0)
    fidelity = dataclasses.replace(fidelity, gate=TokenGate(model, batches, plan.runtime.run, 0.0))
    times = time_compiled(model, batches[0], {"bf16": plan}, "cpu", repeats=2, fidelity=fidelity)
    assert set(times.generation) == {"fp32 compiled", "bf16", "fp32 eager"}
    assert times.generation["bf16"].decode_ms_per_token > 0 and "bf16" in times.errors
    assert Workload("generate", 3).compile(model).generation_config.cache_implementation == "static"
