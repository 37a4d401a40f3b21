"""Every strategy on the same models, data, limit and machine, in one run.

For each model and strategy: the plan's latency and speedup against FP32 (all plans and FP32
re-timed interleaved in one run, so the comparison is fair), its error, whether it meets the
limit, how many distinct plans it evaluated, and the wall time of its search. On the trap model
the exhaustive optimum is known, and the table says after how many evaluations Optuna and random
search first reach within 5% of it.

``optuna`` is the default: TPE started from greedy's answer and the model-based proposals;
``tpe`` is the seeded TPE it replaced. For the strategies whose trials record the model's
prediction, the row also says how well it matched the measurements (``prediction``).

    python benchmarks/strategies.py [--json PATH] [--only trap_model|bert|cnn]
"""

from __future__ import annotations

import argparse
import json
import time

import optuna
import torch
from torch import nn

from precsearch import Plan, walk
from precsearch.accuracy import Fidelity
from precsearch.bench import settings, time_interleaved
from precsearch.config import SearchConfig
from precsearch.decisions import decode, encode
from precsearch.evaluate import Evaluator
from precsearch.examples import demo
from precsearch.records import TrialRecord
from precsearch.report import prediction_quality, trials_frame
from precsearch.runtime import apply_plan
from precsearch.search import optimize
from precsearch.strategies import STRATEGIES, exhaustive
from precsearch.weights import find_weight_uses

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_strategies(model: nn.Module, batches: list, limit: float, trials: int) -> dict[str, dict]:
    """Each strategy's search, then all found plans timed together."""
    found = {}
    for strategy in STRATEGIES:
        started = time.perf_counter()
        result = optimize(model, batches, SearchConfig(max_error=limit, trials=trials, progress=False, seed=0, strategy=strategy))
        units = result.graph.units  # the same for every strategy
        complete = [t for t in result.study.trials if t.state.name == "COMPLETE"]
        quality = prediction_quality(trials_frame(result.study))
        found[strategy] = {
            "plan": {u: result.plan.precision(u) for u in units} if result.plan else {u: "fp32" for u in units},
            "seconds": round(time.perf_counter() - started, 1),
            "evaluations": len({TrialRecord.of(t).plan for t in complete}),
            "sequence": [TrialRecord.of(t).plan for t in complete],
            "feasible_sequence": [t.constraints["error"] <= 0 for t in complete],
            "trials": len(complete),
            **({"prediction": quality} if quality else {}),
        }
    batch = batches[0]

    def run():
        with torch.no_grad():
            model(**batch) if isinstance(batch, dict) else model(batch)

    # Each distinct plan timed once: strategies that agree get the same number.
    distinct = {"f" * len(units): {}}
    for row in found.values():
        distinct.setdefault(encode(row["plan"], units), row["plan"])
    uses = find_weight_uses(model, batch, "cpu")  # which weights may be held low: learnt once, outside the timing
    timings = time_interleaved({code: (lambda layers=layers: apply_plan(model, Plan.compact(layers), weight_uses=uses),
                                       run) for code, layers in distinct.items()}, repeats=40, warmup=3)
    evaluator = Evaluator(model, batches, Fidelity.builtin(model, batches, "rel_l2", limit), "cpu")
    base = timings["f" * len(units)].median_ms
    for name, row in found.items():
        median = timings[encode(row["plan"], units)].median_ms
        row["ms"] = round(median, 3)
        row["speedup"] = round(base / median, 3)
        row["error"] = evaluator.error(row["plan"])
        row["meets_limit"] = row["error"] <= limit
        row["fp32_units"] = sum(d == "fp32" for d in row["plan"].values())
    greedy_over_default = found["greedy"]["ms"] / found["optuna"]["ms"]
    return {"fp32_ms": round(base, 3), "limit": limit, "units": len(units), "strategies": found,
            "greedy_latency_over_default": round(greedy_over_default, 3)}


def trap_model() -> dict:
    model, batches = demo.small_model(), demo.data(batches=2, batch_size=128)
    result = run_strategies(model, batches, 0.01, trials=20)
    units = walk(model, batches[0]).units
    evaluator = Evaluator(model, batches, Fidelity.builtin(model, batches), "cpu")
    started = time.perf_counter()
    best = exhaustive(evaluator, units)
    optimum = min(best.relative.values())
    result["exhaustive"] = {"plan": best.layers, "evaluations": best.evaluations,
                            "seconds": round(time.perf_counter() - started, 1), "relative_latency": round(optimum, 4)}
    for name in ("optuna", "random"):
        row = result["strategies"][name]
        reached = None
        for index, (code, ok) in enumerate(zip(row["sequence"], row["feasible_sequence"]), start=1):
            key = tuple(decode(code, units).values())
            if ok and best.relative.get(key, float("inf")) <= 1.05 * optimum:
                reached = index
                break
        row["trials_to_within_5pct"] = reached
    for name, row in result["strategies"].items():
        row["relative_to_optimum"] = round(best.relative.get(tuple(row["plan"].values()), float("nan")) / optimum, 4)
    return result


def bert() -> dict:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    model = BertModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (8, 128), generator=generator)} for _ in range(2)]
    units = walk(model, batches[0]).units
    probe = Evaluator(model, batches, Fidelity.builtin(model, batches, "rel_l2", 1.0), "cpu")
    all_bf16 = probe.error({u: "bf16" for u in units})
    result = run_strategies(model, batches, round(all_bf16 / 2, 6), trials=40)  # all-BF16 violates this limit
    result.update(model="BertModel(hidden=256, layers=4, heads=4), 2 batches of 8 x 128 tokens",
                  all_bf16_error=all_bf16)
    return result


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
    batches = [torch.randn(16, 3, 64, 64, generator=generator) for _ in range(2)]
    result = run_strategies(model, batches, 0.005, trials=30)
    result.update(model="VGG-style CNN (4 conv + BatchNorm, 1 linear), 2 batches of 16 x 3 x 64 x 64")
    return result


MODELS = {"trap_model": trap_model, "bert": bert, "cnn": cnn}


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
