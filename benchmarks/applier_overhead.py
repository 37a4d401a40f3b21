"""Applier overhead: an all-bf16 plan vs plain ``torch.autocast(bf16)`` around the whole model.

Measured interleaved in one run on a transformers BERT (random weights) on this machine's CPU;
also a mixed plan (every other unit fp32) to show the cost of many wrapped modules.

    python benchmarks/applier_overhead.py [--repeats 60]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import BertConfig, BertModel

from precsearch import Plan, apply_plan, walk
from precsearch.runtime.batches import forward_runner
from precsearch.search.bench import settings, time_interleaved


def measure(repeats: int = 60) -> dict:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    model = BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (8, 128))}
    units = walk(model, inputs).units

    def plain() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs)

    def planned(plan: Plan):
        copy = BertModel(config).eval()  # same weights, its own wrappers, applied once
        copy.load_state_dict(model.state_dict())
        apply_plan(copy, plan)
        return forward_runner(copy, inputs)

    mixed = Plan(default="bf16", layers={unit: "fp32" for unit in units[::2]})
    timings = time_interleaved({"autocast": plain, "plan_all_bf16": planned(Plan(default="bf16")),
                                "plan_mixed": planned(mixed)}, repeats=repeats, warmup=3)
    base = timings["autocast"].median_ms
    result = {
        "model": f"BertModel(hidden=256, layers=4), batch 8 x 128 tokens, {len(units)} units",
        **settings(),
        "autocast_ms": round(base, 3),
        "plan_all_bf16_ms": round(timings["plan_all_bf16"].median_ms, 3),
        "overhead_ratio_all_bf16": round(timings["plan_all_bf16"].median_ms / base, 4),
        "plan_mixed_ms": round(timings["plan_mixed"].median_ms, 3),
        "repeats": repeats,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    options = parser.parse_args()
    result = measure(options.repeats)
    print(json.dumps(result, indent=2))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
