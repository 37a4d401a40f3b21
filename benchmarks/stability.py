"""Do searches agree with themselves? A transformers BERT searched three times (seeds 0, 1, 2) in
training and in inference, each chosen plan re-measured independently afterwards.

Goal: every run's chosen plan within 3% of the best plan any run found, and the re-measured
speedup inside the interval the search reported.

    python benchmarks/stability.py [--trials 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import optuna
import torch
from transformers import BertConfig, BertModel

from precsearch import Plan, apply_plan
from precsearch.runtime.accuracy import Fidelity
from precsearch.runtime.batches import forward_runner
from precsearch.search.bench import settings, speedup, time_interleaved
from precsearch.search.config import SearchConfig
from precsearch.search.loop import optimize
from precsearch.runtime.training import default_loss, training_step

HIDDEN, LAYERS, BATCH, LENGTH, VOCAB = 256, 4, 8, 128, 8192

MODEL = f"BertModel(hidden={HIDDEN}, layers={LAYERS}), {BATCH} x {LENGTH} tokens"


def bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=4 * HIDDEN, max_position_embeddings=512)
    return BertModel(config).eval()


def tokens(n: int, training: bool) -> list:
    generator = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)} for _ in range(n)]
    if training:  # the pooled output classified into 2 classes by the default loss: logits = first output
        return [(batch, torch.randint(0, 2, (BATCH, LENGTH), generator=generator)) for batch in batches]
    return batches


def remeasure(model: torch.nn.Module, plan: Plan, batch, training: bool, rounds: int = 30) -> dict:
    """The plan and FP32 timed interleaved, independently of the search."""
    if training:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        fp32 = training_step(model, batch, default_loss, optimizer, None, "cpu")
        candidate = training_step(model, batch, default_loss, optimizer, plan, "cpu")
    else:
        fp32 = candidate = forward_runner(model, batch)
    example = None if training else batch
    timings = time_interleaved({"fp32": fp32, "plan": (lambda: apply_plan(model, plan, example_inputs=example),
                                                       candidate)}, repeats=rounds, warmup=2)
    estimate = speedup(timings["fp32"].samples_ms, timings["plan"].samples_ms)
    model.eval()
    return {"speedup": round(estimate.median, 3), "low": round(estimate.low, 3), "high": round(estimate.high, 3)}


def case(training: bool, trials: int) -> dict:
    model, data = bert(), tokens(2, training)
    if training:
        limit = 0.02
    else:
        fidelity = Fidelity.builtin(model, data, "rel_l2", 1.0)  # the FP32 reference, before any plan
        with apply_plan(model, Plan(default="bf16"), example_inputs=data[0]):
            all_bf16 = fidelity.error(model)
        limit = all_bf16 / 2
    runs = []
    for seed in (0, 1, 2):
        started = time.perf_counter()
        config = SearchConfig.from_names(space="transformer", mode="training" if training else "inference",
                                         max_error=limit, trials=trials, seed=seed, progress=False,
                                         study_name=f"stability-{training}-{seed}")
        result = optimize(model, data, config)
        minutes = (time.perf_counter() - started) / 60
        metrics = result.plan.metrics
        again = remeasure(model, result.plan, data[0], training)
        runs.append({"seed": seed, "speedup": metrics.speedup, "low": metrics.speedup_low,
                     "high": metrics.speedup_high, "error": metrics.error, "remeasured": again,
                     "remeasured_inside_interval": metrics.speedup_low is not None
                     and metrics.speedup_low <= again["speedup"] <= metrics.speedup_high,
                     "layers": result.plan.layers, "default": result.plan.default,
                     "trials_per_minute": round(trials / minutes, 2)})
    best = max(run["remeasured"]["speedup"] for run in runs)
    for run in runs:
        run["within_3pct_of_best"] = run["remeasured"]["speedup"] >= best / 1.03
    return {"mode": "training" if training else "inference", "limit": limit, "trials": trials, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/results/stability.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    report = {"model": MODEL, **settings(),
              "cases": [case(True, args.trials), case(False, args.trials)]}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    json.dump(report, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
