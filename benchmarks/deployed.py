"""Plans as deployed: weights held low, torch.compile, weight memory — and searches that measure it.

A transformers BERT (random weights, nothing downloaded) on this machine's CPU, 16 x 128 tokens.

(a) all-BF16 as autocast runs it (FP32 weights, cast on every call) vs weights held low, eager and
    compiled, with FP32 eager and compiled, all timed interleaved in one run;
(b) ``optimize`` at a limit all-BF16 violates, with FP32 weights, weights held low, and weights
    held low + compiled race: each chosen plan's speedup over eager FP32 and its weight memory.

    python benchmarks/deployed.py [--trials 24] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import optuna
import torch
from transformers import BertConfig, BertModel

from precsearch import Plan, apply_plan
from precsearch.runtime.accuracy import Fidelity
from precsearch.runtime.batches import forward_runner
from precsearch.search.bench import settings, time_interleaved
from precsearch.search.config import SearchConfig
from precsearch.runtime.plan import Runtime
from precsearch.search.loop import optimize
from precsearch.runtime.weights import weight_mb

HIDDEN, LAYERS, BATCH, LENGTH = 256, 4, 16, 128

MODEL = f"BertModel(hidden={HIDDEN}, layers={LAYERS}), {BATCH} x {LENGTH} tokens"


def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HIDDEN // 64,
                        intermediate_size=4 * HIDDEN)
    return BertModel(config).eval()


def batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 30522, (BATCH, LENGTH), generator=generator)} for _ in range(n)]


def _mib(model: torch.nn.Module) -> float:
    return round(weight_mb(model), 2)


def forms(repeats: int) -> dict:
    """(a): all-BF16 with FP32 weights and with weights held low, eager and compiled."""
    model, batch = bert(), batches(1)[0]
    variants: dict[str, torch.nn.Module] = {}
    memory: dict[str, float] = {}
    for weights in ("fp32", "low"):
        replica = copy.deepcopy(model)
        apply_plan(replica, Plan(default="bf16", runtime=Runtime(weights=weights)), example_inputs=batch)
        variants[f"bf16, {weights} weights"] = replica
        memory[f"bf16, {weights} weights"] = _mib(replica)
    memory["fp32"] = _mib(model)
    runs, compile_s = {}, {}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        for name, module in [("fp32", model), *variants.items()]:
            for compiled in (False, True):
                target = torch.compile(copy.deepcopy(module)) if compiled else module
                label = f"{name}, {'compiled' if compiled else 'eager'}"

                run = forward_runner(target, batch)
                started = time.perf_counter()
                run()
                compile_s[label] = round(time.perf_counter() - started, 1)
                runs[label] = run
        with torch._dynamo.config.patch(error_on_recompile=True):
            timings = time_interleaved(runs, repeats=repeats, warmup=2)
    base = timings["fp32, eager"].median_ms
    rows = [{"form": label, "median_ms": round(t.median_ms, 3), "speedup_vs_eager_fp32": round(base / t.median_ms, 3),
             "weight_mib": memory[label.rsplit(", ", 1)[0]],
             "first_call_s": compile_s[label] if label.endswith("compiled") else None}
            for label, t in timings.items()]
    by = {row["form"]: row for row in rows}
    return {"rows": rows,
            "low_vs_autocast_eager": round(by["bf16, fp32 weights, eager"]["median_ms"]
                                           / by["bf16, low weights, eager"]["median_ms"], 3),
            "low_vs_autocast_compiled": round(by["bf16, fp32 weights, compiled"]["median_ms"]
                                              / by["bf16, low weights, compiled"]["median_ms"], 3)}


def searches(trials: int) -> dict:
    """(b): the same search under three runtimes, at half the all-BF16 error."""
    model, data = bert(), batches(2)
    probe = Fidelity.builtin(model, data, "rel_l2", 1.0)
    with apply_plan(model, Plan(default="bf16")):
        all_bf16 = probe.error(model)
    limit = all_bf16 / 2
    results = {}
    for label, weights, compiled in (("fp32 weights", "fp32", False), ("low weights", "low", False),
                                     ("low weights + compile", "low", True)):
        started = time.perf_counter()
        config = SearchConfig.from_names(space="transformer", max_error=limit, trials=trials, progress=False,
                                         weights=weights, compile=compiled, study_name=f"deployed-{weights}-{compiled}")
        result = optimize(model, data, config)
        metrics = result.plan.metrics
        results[label] = {"speedup_vs_eager_fp32": metrics.speedup, "error": metrics.error,
                          "weight_mib": metrics.weight_mb, "fp32_weight_mib": metrics.baseline_weight_mb,
                          "speedup_vs_compiled_fp32": metrics.speedup_vs_compiled_fp32,
                          "units_fp32": result.plan.counts(result.graph.units).get("fp32", 0),
                          "units": len(result.graph), "search_s": round(time.perf_counter() - started, 1)}
    return {"all_bf16_error": all_bf16, "limit": limit, "trials": trials, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/deployed.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    report = {"model": MODEL, **settings(),
              "forms": forms(args.repeats), "searches": searches(args.trials)}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    json.dump(report, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
