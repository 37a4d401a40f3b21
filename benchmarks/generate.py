"""Generation as the workload: a GPT-2 searched for prefill + greedy decode with the KV cache.

A transformers GPT-2 from a config (random weights, nothing downloaded), hidden 256, 4 layers,
on this machine's CPU; prompts of random tokens, ``BATCH`` x ``PROMPT`` tokens, 32 new tokens.

(a) ``optimize --workload generate --new-tokens 32`` with the causal LM's task metric
    (perplexity) and a token-agreement limit that all-BF16 violates (halfway between all-BF16's
    agreement with FP32's greedy tokens and 1);
(b) decode tokens/s of FP32, all-BF16 and the searched plan, eager and compiled (a static cache
    and a compiled decode step), all timed interleaved in one run;
(c) the searched plan exported as an AOTInductor package (``precsearch export``): its latency
    next to the compiled plan's. A package holds the forward pass, not the generation loop, so
    (c) times one forward pass on the prompts, for both.

    python benchmarks/generate.py [--trials 16] [--repeats 10] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from precsearch import Plan, apply_plan
from precsearch.search.bench import settings, speedup, time_interleaved
from precsearch.search.compiled import RECOMPILE_LIMIT, compiled_replica
from precsearch.search.config import SearchConfig
from precsearch.runtime.plan import Runtime
from precsearch.search.loop import optimize
from precsearch.runtime.batches import forward_runner
from precsearch.runtime.weights import MB
from precsearch.runtime.workload import TokenGate, Workload, stats_of

HIDDEN, LAYERS, BATCH, PROMPT, NEW_TOKENS = 256, 4, 4, 32, 32
TINY = {"hidden": 64, "layers": 2, "vocab": 2000, "new_tokens": 8}   # --tiny: a smoke run of the whole script


def model_name(hidden: int, layers: int, new_tokens: int) -> str:
    return (f"GPT2LMHeadModel(hidden={hidden}, layers={layers}), {BATCH} prompts x {PROMPT} tokens, "
            f"{new_tokens} new tokens")


def gpt2(hidden: int, layers: int, vocab: int | None = None) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=max(hidden // 64, 1),
                        **({"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0} if vocab else {}))
    return GPT2LMHeadModel(config).eval()


def prompts(vocab: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (BATCH, PROMPT), generator=generator),
             "attention_mask": torch.ones(BATCH, PROMPT, dtype=torch.long)} for _ in range(n)]


def search(model: GPT2LMHeadModel, data: list, new_tokens: int, trials: int) -> dict:
    """(a): all-BF16's token agreement, the limit it violates, and the searched plan."""
    workload = Workload("generate", new_tokens)
    gate = TokenGate(model, data, workload, 0.0)
    with apply_plan(model, Plan(default="bf16")):
        all_bf16 = gate.agreement(model)
    minimum = round((1 + all_bf16) / 2, 4)
    started = time.perf_counter()
    result = optimize(model, data, SearchConfig.from_names(
        space="bf16_only", metric="perplexity", max_error=0.01, trials=trials, progress=False, workload="generate",
        new_tokens=new_tokens, min_token_agreement=minimum, study_name="generate-benchmark"))
    plan = result.plan
    return {"all_bf16_token_agreement": all_bf16, "min_token_agreement": minimum, "trials": trials,
            "search_s": round(time.perf_counter() - started, 1), "plan": plan,
            "units": len(result.graph), "units_fp32": plan.counts(result.graph.units).get("fp32", 0) if plan else None}


def forms(model: GPT2LMHeadModel, batch: dict, plan: Plan, new_tokens: int, repeats: int) -> list[dict]:
    """(b): FP32, all-BF16 and the plan, eager and compiled, generating, timed interleaved."""
    workload = Workload("generate", new_tokens)
    plans = {"fp32": None, "all bf16": Plan(default="bf16", runtime=Runtime(workload="generate", new_tokens=new_tokens)),
             "searched plan": plan}
    runs, first_call_s = {}, {}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        for name, applied in plans.items():
            eager = copy.deepcopy(model)
            if applied is not None:
                apply_plan(eager, applied, example_inputs=batch)
            for label, replica in ((f"{name}, eager", eager),
                                   (f"{name}, compiled", compiled_replica(model, applied, batch, "cpu", workload))):
                runs[label] = workload.runner(replica, batch)
                started = time.perf_counter()
                runs[label]()   # compiles the decode step, or warms the eager model
                first_call_s[label] = round(time.perf_counter() - started, 1)
        with torch._dynamo.config.patch(error_on_recompile=True):   # a compiled number, or an exception
            timings = time_interleaved(runs, repeats=repeats, warmup=2)
    base = timings["fp32, eager"].samples_ms
    rows = []
    for label, timing in timings.items():
        stats = stats_of(runs[label], len(timing.samples_ms))
        rows.append({"form": label, "generate_ms": round(timing.median_ms, 2),
                     "prefill_ms": round(stats.prefill_ms, 2), "decode_ms_per_token": round(stats.decode_ms_per_token, 3),
                     "decode_tokens_per_s": round(BATCH * 1e3 / stats.decode_ms_per_token, 1),
                     "speedup_vs_eager_fp32": str(speedup(base, timing.samples_ms)),
                     "first_call_s": first_call_s[label] if label.endswith("compiled") else None})
    torch._dynamo.reset()
    return rows


def package(model: GPT2LMHeadModel, data: list, plan: Plan, repeats: int) -> dict:
    """(c): the plan exported as an AOTInductor package, its forward pass timed beside the
    compiled plan's (and eager FP32's), interleaved."""
    from precsearch.search.export import export_plan

    forward = Plan.from_dict({**plan.to_dict(), "runtime": {"weights": "low", "compile": True}})
    batch = {**data[0], "use_cache": False}   # a forward pass, as the package runs it
    inputs = [{**b, "use_cache": False} for b in data]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "plan.pt2"
        try:
            result = export_plan(model, forward, inputs, out, repeats=repeats)
        except Exception as error:  # noqa: BLE001  (say so rather than measure something else)
            return {"failure": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        loaded = torch._inductor.aoti_load_package(str(out))
        compiled = compiled_replica(model, forward, batch, "cpu")

        runs = {"fp32 eager": forward_runner(model, batch), "plan compiled": forward_runner(compiled, batch),
                "package": forward_runner(loaded, batch)}
        runs["plan compiled"]()   # compiles
        timings = time_interleaved(runs, repeats=repeats, warmup=2)
    ratio = speedup(timings["plan compiled"].samples_ms, timings["package"].samples_ms)
    return {"size_mb": round(result.size_bytes / MB, 2), "export_s": result.export_s,
            "max_diff_vs_eager_plan": result.verification.max_diff,
            "forward_ms": {name: round(t.median_ms, 3) for name, t in timings.items()},
            "package_speedup_vs_compiled_plan": str(ratio)}


def run(trials: int, repeats: int, tiny: bool = False) -> dict:
    hidden, layers, vocab, new_tokens = ((TINY["hidden"], TINY["layers"], TINY["vocab"], TINY["new_tokens"]) if tiny
                                         else (HIDDEN, LAYERS, None, NEW_TOKENS))
    model = gpt2(hidden, layers, vocab)
    data = prompts(model.config.vocab_size)
    searched = search(model, data, new_tokens, trials)
    plan = searched.pop("plan")
    report = {"model": model_name(hidden, layers, new_tokens), **settings(), "search": searched}
    if plan is None:
        report["failure"] = "no plan met the limits"
        return report
    report["plan"] = {"default": plan.default, "layers": plan.layers,
                      "metrics": plan.metrics.to_dict() if plan.metrics else None}
    report["forms"] = forms(model, data[0], plan, new_tokens, repeats)
    report["package"] = package(model, data, plan, repeats)
    by = {row["form"]: row for row in report["forms"]}
    report["plan_vs_fp32_decode_tokens_per_s"] = {
        form: round(by[f"searched plan, {form}"]["decode_tokens_per_s"] / by[f"fp32, {form}"]["decode_tokens_per_s"], 3)
        for form in ("eager", "compiled")}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a small model and 8 new tokens: a smoke run")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    report = run(args.trials, args.repeats, args.tiny)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    json.dump(report, sys.stdout, indent=2, default=str)


if __name__ == "__main__":
    main()
