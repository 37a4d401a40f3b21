"""Every strategy on the same models, data and limit, searched as a user runs it and then
measured in the deployed form: compiled with ``torch.compile``, low weights held.

For each model, each strategy searches with ``compile=True`` (its finalists race compiled),
once per seed (``global``, ``greedy`` and ``bisect`` once: their plans follow from the
measured errors, not from a seed). Then every distinct plan found is compiled and timed with
FP32 compiled and FP32 eager in one interleaved run, and its compiled error measured over the
search batches. On the trap model (eager: it is too small to compile usefully) the exhaustive
optimum is known.

``optuna`` is the default: TPE started from greedy's answer and the model-based proposals;
``tpe`` is the seeded TPE it replaced.

    python benchmarks/strategies.py [--json PATH] [--only trap_model|bert|gpt2|cnn]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import optuna
import torch
from torch import nn

from precsearch import Plan, walk
from precsearch.runtime.accuracy import Fidelity
from precsearch.runtime.batches import forward_runner
from precsearch.search.bench import settings, speedup, time_interleaved
from precsearch.search.compiled import time_compiled
from precsearch.search.config import SearchConfig
from precsearch.search.decisions import decode, encode
from precsearch.search.evaluate import Evaluator
from precsearch.examples import demo
from precsearch.search.trials import TrialRecord
from precsearch.report.summary import prediction_quality, trials_frame
from precsearch.runtime.apply import apply_plan
from precsearch.search.loop import optimize
from precsearch.search.strategies import exhaustive
from precsearch.runtime.weights import find_weight_uses

optuna.logging.set_verbosity(optuna.logging.WARNING)

SEEDS = (0, 1, 2)
SEED_FREE = ("global", "greedy", "bisect")   # deterministic given the errors: one run each
ORDER = ("global", "greedy", "bisect", "random", "tpe", "optuna")
NO_LIMIT = 1e9                                 # a fidelity that measures every plan's error, judging none


def search(model: nn.Module, batches: list, limit: float, trials: int, strategy: str, seed: int,
           compile: bool) -> dict:
    """One search as ``precsearch optimize`` runs it: its plan, cost and trial statistics."""
    started = time.perf_counter()
    config = SearchConfig.from_names(max_error=limit, trials=trials, progress=False, seed=seed, strategy=strategy,
                                     compile=compile)
    result = optimize(model, batches, config)
    seconds = time.perf_counter() - started
    units = result.graph.units
    complete = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    quality = prediction_quality(trials_frame(result.study))
    plan = {u: result.plan.precision(u) for u in units} if result.plan else {u: "fp32" for u in units}
    return {"seed": seed, "plan": plan, "seconds": round(seconds, 1), "trials": len(complete),
            "evaluations": len({TrialRecord.of(t, units).code for t in complete}),
            "sequence": [TrialRecord.of(t, units).code for t in complete],
            "feasible_sequence": [t.constraints["error"] <= 0 for t in complete],
            **({"prediction": quality} if quality else {})}


def searches(model: nn.Module, batches: list, limit: float, trials: int, compile: bool) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for strategy in ORDER:
        seeds = SEEDS[:1] if strategy in SEED_FREE else SEEDS
        runs[strategy] = [search(model, batches, limit, trials, strategy, seed, compile) for seed in seeds]
        print(f"  {strategy}: {[run['seconds'] for run in runs[strategy]]} s", flush=True)
    return runs


def deployed(model: nn.Module, batches: list, limit: float, runs: dict[str, list[dict]], units: list[str]) -> dict:
    """Every distinct plan found, compiled, timed with FP32 compiled and eager in one run."""
    distinct = {encode(run["plan"], units): run["plan"] for group in runs.values() for run in group}
    distinct.pop(encode({}, units), None)   # FP32 itself is timed as "fp32 compiled"
    fidelity = Fidelity.builtin(model, batches, "rel_l2", NO_LIMIT)
    times = time_compiled(model, batches[0], {code: Plan.compact(layers) for code, layers in distinct.items()},
                          "cpu", repeats=20, fidelity=fidelity)
    eager, compiled = times.timings["fp32 eager"], times.timings["fp32 compiled"]
    measured = {"fp32": {"vs_eager": _interval(speedup(eager.samples_ms, compiled.samples_ms)),
                         "vs_compiled": [1.0, 1.0, 1.0], "error": 0.0}}
    for code in distinct:
        samples = times.timings[code].samples_ms
        measured[code] = {"vs_eager": _interval(speedup(eager.samples_ms, samples)),
                          "vs_compiled": _interval(speedup(compiled.samples_ms, samples)),
                          "error": times.errors[code], "compile_s": round(times.compile_s[code], 1)}
    for group in runs.values():
        for run in group:
            code = encode(run["plan"], units)
            row = measured["fp32" if code == encode({}, units) else code]
            run.update(speedup_vs_eager=row["vs_eager"], speedup_vs_compiled=row["vs_compiled"],
                       compiled_error=row["error"], meets_limit=row["error"] <= limit,
                       fp32_units=sum(d == "fp32" for d in run["plan"].values()))
    compile_s = [row["compile_s"] for row in measured.values() if "compile_s" in row]
    return {"eager_fp32_ms": round(eager.median_ms, 3), "compiled_fp32_ms": round(compiled.median_ms, 3),
            "compile_s_per_plan": round(statistics.median(compile_s), 1) if compile_s else None}


def summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per strategy, medians over its seeds; and whether the default met the issue's goals."""
    rows = {name: {"speedup_vs_eager": statistics.median(r["speedup_vs_eager"][0] for r in group),
                   "speedup_vs_compiled": statistics.median(r["speedup_vs_compiled"][0] for r in group),
                   "seconds": statistics.median(r["seconds"] for r in group)} for name, group in runs.items()}
    default, greedy = rows["optuna"], rows["greedy"]
    return {"strategies": rows, "default_at_least_every_baseline": all(
                default["speedup_vs_eager"] >= row["speedup_vs_eager"] for name, row in rows.items() if name != "optuna"),
            "default_over_greedy": round(default["speedup_vs_eager"] / greedy["speedup_vs_eager"], 3),
            "default_seconds_budget": round(1.2 * greedy["seconds"] + 30, 1),
            "default_within_time_budget": default["seconds"] <= 1.2 * greedy["seconds"] + 30}


def compiled_case(name: str, model: nn.Module, batches: list, trials: int) -> dict:
    """A model searched by every strategy, every plan then measured compiled."""
    units = walk(model, batches[0]).units
    probe = Evaluator(model, batches, Fidelity.builtin(model, batches, "rel_l2", NO_LIMIT), "cpu")
    all_bf16 = probe.error({u: "bf16" for u in units})
    limit = round(all_bf16 / 2, 6)   # all-BF16 violates it: some units must stay FP32
    print(f"{name}: {len(units)} units, all-bf16 rel_l2 {all_bf16:.4g}, limit {limit}", flush=True)
    runs = searches(model, batches, limit, trials, compile=True)
    timing = deployed(model, batches, limit, runs, units)
    return {"model": name, "units": len(units), "limit": limit, "all_bf16_error": all_bf16, "trials": trials,
            **timing, "runs": runs, **summary(runs)}


def bert() -> dict:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536)
    model = BertModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (16, 32), generator=generator)} for _ in range(2)]
    return compiled_case("BertModel(hidden=384, layers=6), 2 batches of 16 x 32 tokens", model, batches, trials=16)


def gpt2() -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=8192, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (8, 64), generator=generator)} for _ in range(3)]
    return compiled_case("GPT2LMHeadModel(hidden=256, layers=4, vocab=8192), 3 batches of 8 x 64 tokens",
                         model, batches, trials=24)


class ConvNet(nn.Module):
    """A small VGG-style CNN on 64x64 images."""

    def __init__(self) -> None:
        super().__init__()
        channels = [3, 32, 64, 128, 128]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels, channels[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for b in channels[1:])
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = nn.functional.max_pool2d(torch.relu(norm(conv(x))), 2)
        return self.fc(x.mean((2, 3)))


def cnn() -> dict:
    torch.manual_seed(0)
    model = ConvNet().eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 3, 64, 64, generator=generator) for _ in range(3)]
    return compiled_case("VGG-style CNN (4 conv + BatchNorm, 1 linear), 3 batches of 16 x 3 x 64 x 64",
                         model, batches, trials=24)


def trap_model() -> dict:
    """The demo's traps in 6 units, eager: every strategy, then the exhaustive optimum."""
    model, batches = demo.small_model(), demo.data(batches=2, batch_size=128)
    limit = 0.01
    units = walk(model, batches[0]).units
    runs = searches(model, batches, limit, trials=20, compile=False)
    evaluator = Evaluator(model, batches, Fidelity.builtin(model, batches, "rel_l2", limit), "cpu")
    started = time.perf_counter()
    best = exhaustive(evaluator, units)
    optimum = min(best.relative.values())
    found = {encode(run["plan"], units): run["plan"] for group in runs.values() for run in group}
    found.setdefault(encode({}, units), {u: "fp32" for u in units})
    uses = find_weight_uses(model, batches[0], "cpu")

    run = forward_runner(model, batches[0])
    timings = time_interleaved({code: (lambda layers=layers: apply_plan(model, Plan.compact(layers), weight_uses=uses),
                                       run) for code, layers in found.items()}, repeats=40, warmup=3)
    base = timings[encode({}, units)].samples_ms
    for group in runs.values():
        for row in group:
            row["speedup_vs_eager"] = _interval(speedup(base, timings[encode(row["plan"], units)].samples_ms))
            row["speedup_vs_compiled"] = [float("nan")] * 3
            row["compiled_error"] = evaluator.error(row["plan"])   # eager here
            row["meets_limit"] = row["compiled_error"] <= limit
            row["fp32_units"] = sum(d == "fp32" for d in row["plan"].values())
            row["relative_to_optimum"] = round(best.relative.get(tuple(row["plan"].values()), float("nan")) / optimum, 4)
            reached = None
            for index, (code, ok) in enumerate(zip(row["sequence"], row["feasible_sequence"]), start=1):
                if ok and best.relative.get(tuple(decode(code, units).values()), float("inf")) <= 1.05 * optimum:
                    reached = index
                    break
            row["trials_to_within_5pct"] = reached
    return {"model": "trap model (the demo's traps in 6 units), 2 batches of 128", "units": len(units),
            "limit": limit, "runs": runs, **summary(runs),
            "exhaustive": {"plan": best.layers, "evaluations": best.evaluations,
                           "seconds": round(time.perf_counter() - started, 1)}}


def _interval(estimate) -> list[float]:
    return [round(estimate.median, 3), round(estimate.low, 3), round(estimate.high, 3)]


MODELS = {"trap_model": trap_model, "bert": bert, "gpt2": gpt2, "cnn": cnn}


def run_all(only: str | None = None) -> dict:
    return {**settings(), **{name: run() for name, run in MODELS.items() if only in (None, name)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--only", choices=list(MODELS), help="one model instead of all")
    options = parser.parse_args()
    result = run_all(options.only)
    print(json.dumps(result, indent=2, default=str))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(result, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
