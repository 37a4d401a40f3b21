"""Weight memory: what a precision plan holds low, against the whole model in BF16, and the search
under a memory budget (``optimize --max-weight-mb``).

A transformers BERT and a GPT-2 with a tied head (random weights from their configs, nothing
downloaded), on this machine's CPU. Per model: weight MiB and rel_l2 against FP32 of

- FP32;
- the all-BF16 plan, materialized (its FP32 copies dropped; ``weight_mb``);
- the whole model ``.to(torch.bfloat16)``;
- ``optimize --space transformer`` at half the all-BF16 rel_l2 (a limit all-BF16 violates),
  without a budget and with ``--max-weight-mb`` 60% of FP32's weights.

    python benchmarks/memory.py [--trials 16] [--tiny]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import optuna
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from precsearch import Plan, apply_plan
from precsearch.runtime.accuracy import Fidelity
from precsearch.search.bench import settings
from precsearch.search.config import SearchConfig
from precsearch.search.loop import optimize
from precsearch.runtime.weights import weight_mb

BUDGET = 0.6           # of FP32's weight bytes
BATCH, LENGTH = 8, 64
FULL = {"bert": {"hidden": 384, "layers": 6, "vocab": 30522}, "gpt2": {"hidden": 256, "layers": 4, "vocab": 50257}}
TINY = {"bert": {"hidden": 64, "layers": 2, "vocab": 2000}, "gpt2": {"hidden": 64, "layers": 2, "vocab": 2000}}


def bert(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    return BertModel(config).eval()


def gpt2(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=hidden // 64, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight, "the head is tied to the embedding"
    return model


BUILDERS = {"bert": bert, "gpt2": gpt2}


def batches(vocab: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (BATCH, LENGTH), generator=generator)} for _ in range(n)]


def _row(form: str, mib: float, fp32_mib: float, error: float, **extra) -> dict:
    return {"form": form, "weight_mib": round(mib, 2), "of_fp32": round(mib / fp32_mib, 3),
            "rel_l2": float(f"{error:.4g}"), **extra}


def measure(name: str, shape: dict, trials: int) -> dict:
    """One model's rows: FP32, the all-BF16 plan, ``.to(bfloat16)``, and the two searches."""
    model, data = BUILDERS[name](**shape), batches(shape["vocab"])
    fidelity = Fidelity.builtin(model, data, "rel_l2", 1.0)   # the FP32 reference, computed once
    fp32_mib = weight_mb(model)
    rows = [_row("fp32", fp32_mib, fp32_mib, 0.0)]

    replica = copy.deepcopy(model)
    handle = apply_plan(replica, Plan(default="bf16"), example_inputs=data[0]).materialize()
    all_bf16 = fidelity.error(replica)
    rows.append(_row("all-bf16 plan, materialized", weight_mb(replica), fp32_mib, all_bf16,
                     finite=all_bf16 < float("inf")))
    del replica, handle

    whole = copy.deepcopy(model).to(torch.bfloat16)
    rows.append(_row(".to(bfloat16)", weight_mb(whole), fp32_mib, fidelity.error(whole)))
    del whole

    limit = all_bf16 / 2
    budget = round(BUDGET * fp32_mib, 3)
    for label, max_weight_mb in (("searched, no budget", None), (f"searched, budget {budget:g} MiB", budget)):
        started = time.perf_counter()
        config = SearchConfig.from_names(space="transformer", max_error=limit, trials=trials, progress=False,
                                         max_weight_mb=max_weight_mb, study_name=f"memory-{name}-{max_weight_mb}")
        result = optimize(model, data, config)
        seconds = round(time.perf_counter() - started, 1)
        if result.plan is None:
            rows.append({"form": label, "weight_mib": None, "of_fp32": None, "rel_l2": None, "found": False,
                         "why": result.shortfall() or "no plan met the accuracy limit", "search_s": seconds})
            continue
        metrics = result.plan.metrics
        rows.append(_row(label, metrics.weight_mb, fp32_mib, metrics.error, found=True,
                         speedup=metrics.speedup, search_s=seconds,
                         fp32_units=result.plan.counts(result.graph.units).get("fp32", 0), units=len(result.graph)))
    return {"model": f"{type(model).__name__}(hidden={shape['hidden']}, layers={shape['layers']}, "
                     f"vocab={shape['vocab']}), {BATCH} x {LENGTH} tokens",
            "limit": limit, "budget_mib": budget, "all_low_within_goal": rows[1]["of_fp32"] <= 0.52, "rows": rows}


def run_all(trials: int = 16, tiny: bool = False) -> dict:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shapes = TINY if tiny else FULL
    return {**settings(), "trials": trials, "budget_share": BUDGET,
            "models": {name: measure(name, shape, trials) for name, shape in shapes.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="small models and vocabularies: a smoke test")
    parser.add_argument("--out", default=None, help="write the JSON here too (default: stdout only)")
    args = parser.parse_args()
    report = run_all(args.trials, args.tiny)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    json.dump(report, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
