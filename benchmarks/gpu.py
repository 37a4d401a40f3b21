"""GPU check (prepared for one H200, under 8 minutes): GPT-2 small built from its config.

FP32 vs global FP16/BF16 autocast vs a searched plan, for inference and for a training step:
median latency (interleaved) and peak memory. Run it with ``bash benchmarks/gpu.sh``; results go
to ``$OUT/gpu.json`` (or ``benchmarks/results/gpu.json``). ``--device cpu --tiny`` is a smoke test
of the same code path on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import optuna
import torch

from precsearch import Plan, apply_plan
from precsearch.runtime.batches import forward_runner
from precsearch.search.bench import time_interleaved
from precsearch.search.config import SearchConfig
from precsearch.search.loop import optimize
from precsearch.runtime.training import default_loss, grad_scaler
from precsearch.runtime.weights import find_weight_uses

optuna.logging.set_verbosity(optuna.logging.WARNING)


def build(device: str, tiny: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=128) if tiny else GPT2Config()
    model = GPT2LMHeadModel(config).to(device).eval()
    generator = torch.Generator().manual_seed(1)
    batch, length = (2, 32) if tiny else (16, 512)
    ids = [torch.randint(0, config.vocab_size, (batch, length), generator=generator).to(device) for _ in range(2)]
    return model, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer GPT-2: smoke test")
    parser.add_argument("--trials", type=int, default=24)
    options = parser.parse_args()
    device, started = options.device, time.time()
    model, ids = build(device, options.tiny)
    plans = {"fp32": Plan(default="fp32"), "autocast_fp16": Plan(default="fp16"), "autocast_bf16": Plan(default="bf16")}

    # Search (inference): the fastest plan within rel_l2 <= 0.01 of the FP32 logits.
    config = SearchConfig.from_names(space="transformer", max_error=0.01, trials=options.trials, progress=False,
                                     repeats=5, drop_slow_dtypes=True)
    result = optimize(model, [{"input_ids": x} for x in ids], config)
    plans["searched"] = result.plan
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
              "model": "GPT-2 small (124M) from config" if not options.tiny else "GPT-2 tiny",
              "batch": list(ids[0].shape), "searched_plan": result.plan.to_dict() if result.plan else None,
              "search_s": round(time.time() - started, 1)}

    infer = forward_runner(model, {"input_ids": ids[0]})
    uses = find_weight_uses(model, {"input_ids": ids[0]}, device)  # learnt once, outside the timing
    timings = time_interleaved({name: (lambda p=plan: apply_plan(model, p, weight_uses=uses), infer)
                                for name, plan in plans.items() if plan is not None},
                               device_type=device, repeats=20, warmup=3)
    report["inference"] = {name: {"ms": round(t.median_ms, 3), "peak_memory_mb": t.peak_memory_mb,
                                  "speedup": round(timings["fp32"].median_ms / t.median_ms, 3)}
                           for name, t in timings.items()}

    # Training step: forward, backward, AdamW step, with loss scaling where the plan has FP16.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    inputs, target = ids[0], ids[0]

    def step(plan):
        scaler = grad_scaler(plan, device)

        def run():
            optimizer.zero_grad(set_to_none=True)
            logits = model(input_ids=inputs).logits
            loss = default_loss(logits, target)
            (scaler.scale(loss) if scaler else loss).backward()
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
        return run

    # Training keeps FP32 master weights: the same layers as training plans.
    plans = {name: dataclasses.replace(plan, mode="training", runtime=None) if plan is not None else None
             for name, plan in plans.items()}
    timings = time_interleaved({name: (lambda p=plan: apply_plan(model, p), step(plan))
                                for name, plan in plans.items() if plan is not None},
                               device_type=device, repeats=10, warmup=2)
    report["training_step"] = {name: {"ms": round(t.median_ms, 3), "peak_memory_mb": t.peak_memory_mb,
                                      "speedup": round(timings["fp32"].median_ms / t.median_ms, 3)}
                               for name, t in timings.items()}
    report["total_s"] = round(time.time() - started, 1)
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu.json"), "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
