"""Run every CPU benchmark on this machine and rewrite benchmarks/README.md from the results.

    python benchmarks/run.py            # about 4 minutes on 2 cores

Results land in benchmarks/results/*.json; the README's tables are rendered from them, never
typed by hand. Times are medians of interleaved runs; ratios are ratios of medians.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import applier_overhead  # noqa: E402
import search_quality  # noqa: E402

from precsearch.search import device_name  # noqa: E402


def render(applier: dict, quality: dict) -> str:
    trap, bert, overhead = quality["trap_model"], quality["bert"], quality["overhead_300_units"]
    lines = [
        "# Benchmarks",
        "",
        "Regenerate everything below with `python benchmarks/run.py` (about 4 minutes on 2 cores).",
        f"Machine: {device_name('cpu')}, {quality['threads']} threads, torch {quality['torch']}, "
        f"Python {platform.python_version()}. CPU only: BF16 autocast is fast here (AVX512-BF16), "
        "FP16 is several times slower than FP32. Times are medians of interleaved runs.",
        "",
        "## Applier overhead (`applier_overhead.py`)",
        "",
        f"{applier['model']}, CPU.",
        "",
        "| run | median ms | ratio to plain autocast |",
        "| --- | ---: | ---: |",
        f"| `torch.autocast(bf16)` around the model | {applier['autocast_ms']} | 1.000 |",
        f"| all-bf16 plan (`apply_plan`) | {applier['plan_all_bf16_ms']} | {applier['overhead_ratio_all_bf16']} |",
        f"| mixed plan (every other unit fp32) | {applier['plan_mixed_ms']} | "
        f"{applier['plan_mixed_ms'] / applier['autocast_ms']:.3f} |",
        "",
        "## Search quality (`search_quality.py`)",
        "",
        "### Trap model vs exhaustive search",
        "",
        f"The demo's traps in {trap['units']} units (3^{trap['units']} = {trap['exhaustive_evaluations']} plans), "
        f"limit rel_l2 <= {trap['limit']}.",
        "",
        "| strategy | model evaluations | wall s | latency vs exhaustive optimum | speedup vs fp32 |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| exhaustive | {trap['exhaustive_evaluations']} | {trap['exhaustive_s']} | 1.000 | - |",
        f"| precsearch (Optuna) | {trap['search_trials']} (best found at trial {trap['search_found_at_trial']}) | "
        f"{trap['search_s']} | {trap['search_vs_exhaustive_latency']} | {trap['speedup_vs_fp32']} |",
        "",
        f"Same plan as exhaustive: {'yes' if trap['same_plan'] else 'no'} "
        f"(search: `{_short(trap['search_plan'])}`, exhaustive: `{_short(trap['exhaustive_plan'])}`).",
        "",
        "### Cost-aware search vs error-ordered greedy (transformers BERT)",
        "",
        f"{bert['model']}, {bert['units']} units; all-bf16 has rel_l2 {bert['all_bf16_error']:.3g}, "
        f"so the limit is {bert['limit']:.3g}.",
        "",
        "| strategy | fp32 units | rel_l2 | median ms | speedup vs fp32 | model evaluations |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| fp32 | {bert['units']} | 0 | {bert['fp32_ms']} | 1.000 | - |",
        f"| greedy (all bf16, most sensitive back to fp32) | {bert['greedy_fp32_units']} | "
        f"{bert['greedy_error']:.3g} | {bert['greedy_ms']} | {bert['fp32_ms'] / bert['greedy_ms']:.3f} | "
        f"{bert['greedy_evaluations']} |",
        f"| precsearch (Optuna, {bert['search_trials']} trials) | {bert['search_fp32_units']} | "
        f"{bert['search_error']:.3g} | {bert['search_ms']} | {bert['search_speedup_vs_fp32']} | "
        f"{bert['search_trials']} |",
        "",
        f"Greedy latency / precsearch latency: **{bert['greedy_over_search']}**.",
        "",
        "### Search overhead at 300+ units",
        "",
        f"BertModel with 48 tiny layers: {overhead['units']} units, walked by {overhead['walker_method']} "
        f"in {overhead['walker_s']} s. Overhead = everything in a trial but model evaluation "
        "(sampling, storage, bookkeeping).",
        "",
        "| parametrisation | trials | distinct plans | per trial ms | of which model evaluation ms | overhead ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in ("ranked", "categorical"):
        row = overhead[label]
        lines.append(f"| {label} | {row['trials']} | {row['distinct_plans']} | {row['per_trial_ms']} | "
                     f"{row['per_trial_model_evaluation_ms']} | {row['per_trial_overhead_ms']} |")
    lines += ["", "ranked (the default above 48 choices): which half precision and how far down the cost-aware "
              "sensitivity order to lower; categorical: one parameter per unit.", ""]
    return "\n".join(lines)


def _short(plan: dict[str, str]) -> str:
    return " ".join(f"{unit}={dtype}" for unit, dtype in plan.items())


def main() -> None:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    applier = applier_overhead.measure()
    (results / "applier_overhead.json").write_text(json.dumps(applier, indent=2))
    quality = search_quality.run_all()
    (results / "search_quality.json").write_text(json.dumps(quality, indent=2))
    (HERE / "README.md").write_text(render(applier, quality))
    print((HERE / "README.md").read_text())


if __name__ == "__main__":
    main()
