"""Run the CPU benchmarks on this machine and rewrite benchmarks/README.md from the results.

    python benchmarks/run.py                      # all of them: about 40 minutes on 2 cores
    python benchmarks/run.py deployed stability   # only these; the others' last results are reused
    python benchmarks/run.py --render             # only rewrite this README from the last results

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
import deployed  # noqa: E402
import search_overhead  # noqa: E402
import stability  # noqa: E402
import strategies  # noqa: E402

from precsearch.study_setup import device_name  # noqa: E402


def render(applier: dict, quality: dict, overhead: dict, deployed_form: dict, stable: dict) -> str:
    trap, bert, cnn = quality["trap_model"], quality["bert"], quality["cnn"]
    lines = [
        "# Benchmarks",
        "",
        "Regenerate everything below with `python benchmarks/run.py` (about 40 minutes on 2 cores).",
        f"Machine: {device_name('cpu')}, {quality['threads']} threads, torch {quality['torch']}, "
        f"Python {platform.python_version()}. CPU only: BF16 autocast is fast here (AVX512-BF16), "
        "FP16 several times slower than FP32, so every search leaves FP16 out after probing it. "
        "Times are medians of interleaved runs; the machine is shared, so differences of a few "
        "percent are noise.",
        "",
        *_deployed_section(deployed_form),
        *_stability_section(stable),
        "## Strategies (`strategies.py`)",
        "",
        f"{quality.get('note', '')}"
        "Each strategy searched the same model with the same data and limit; then every distinct plan found and "
        "FP32 were timed together, interleaved. *evaluations*: distinct plans whose accuracy and latency were "
        "measured; *search s*: wall time of the search.",
        "",
        f"### Trap model: the demo's traps in {trap['units']} units, rel_l2 <= {trap['limit']}",
        "",
        f"Exhaustive search ({trap['exhaustive']['evaluations']} plans, {trap['exhaustive']['seconds']} s) "
        f"establishes the optimum: `{_short(trap['exhaustive']['plan'])}`.",
        "",
        *_strategy_table(trap, with_optimum=True),
        "",
        f"Trials until a plan within 5% of the exhaustive optimum: Optuna "
        f"{trap['strategies']['optuna']['trials_to_within_5pct']}, random "
        f"{trap['strategies']['random']['trials_to_within_5pct']} (latencies from the exhaustive run's table).",
        "",
        f"### transformers BERT: {bert['model']}, {bert['units']} units",
        "",
        f"All-BF16 has rel_l2 {bert['all_bf16_error']:.3g}; the limit is half that, {bert['limit']:.3g}, so some "
        "units must stay FP32.",
        "",
        *_strategy_table(bert),
        "",
        f"Greedy latency / Optuna latency: **{bert['strategies']['greedy']['ms'] / bert['strategies']['optuna']['ms']:.3f}**.",
        "",
        f"### CNN: {cnn['model']}, {cnn['units']} units, rel_l2 <= {cnn['limit']}",
        "",
        *_strategy_table(cnn),
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
        "## Search overhead at 300+ units (`search_overhead.py`)",
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
              "sensitivity order to lower; categorical: one parameter per unit.", "",
              "## GPU", "", "`benchmarks/gpu.sh` (GPT-2 small: FP32 vs global FP16/BF16 autocast vs a searched plan, "
              "inference and training step, latency and peak memory) is prepared for an H200 and smoke-tested "
              "on the CPU (`python benchmarks/gpu.py --device cpu --tiny`). " + _gpu_note(), ""]
    return "\n".join(lines)


def _strategy_table(result: dict, with_optimum: bool = False) -> list[str]:
    header = "| strategy | fp32 units | rel_l2 | meets limit | median ms | speedup vs fp32 | evaluations | search s |"
    rule = "| --- | ---: | ---: | :---: | ---: | ---: | ---: | ---: |"
    if with_optimum:
        header += " latency vs optimum |"
        rule += " ---: |"
    rows = [header, rule, f"| fp32 | {result['units']} | 0 | yes | {result['fp32_ms']} | 1.000 | - | - |" +
            (" - |" if with_optimum else "")]
    for name, row in result["strategies"].items():
        line = (f"| {name} | {row['fp32_units']} | {row['error']:.3g} | {'yes' if row['meets_limit'] else 'no'} | "
                f"{row['ms']} | {row['speedup']} | {row['evaluations']} | {row['seconds']} |")
        rows.append(line + (f" {row['relative_to_optimum']} |" if with_optimum else ""))
    return rows


def _gpu_note() -> str:
    path = HERE / "results" / "gpu.json"
    if not path.exists():
        return "No GPU was available when this last ran, so no GPU numbers are committed."
    result = json.loads(path.read_text())
    rows = ", ".join(f"{name} {value['speedup']}x" for name, value in result["inference"].items())
    return f"Last run on {result['device']}: inference speedups {rows}."


def _deployed_section(result: dict) -> list[str]:
    forms, searches = result["forms"], result["searches"]
    lines = ["## Plans as deployed (`deployed.py`)", "",
             f"{result['model']}, timed interleaved in one run. *low weights*: each BF16 unit holds its own weights "
             "in BF16 while the plan is applied; *fp32 weights*: what autocast does, a cast on every call.", "",
             "| form | median ms | speedup vs eager fp32 | weight MiB | first call s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {row['form']} | {row['median_ms']} | {row['speedup_vs_eager_fp32']} | {row['weight_mib']} | "
              f"{row['first_call_s'] if row['first_call_s'] is not None else '-'} |" for row in forms["rows"]]
    lines += ["", f"All-BF16 with weights held low vs autocast's FP32 weights: **{forms['low_vs_autocast_eager']}x** "
              f"eager (goal 1.05x), **{forms['low_vs_autocast_compiled']}x** compiled (goal 1.25x).", "",
              f"`optimize --space transformer` at rel_l2 <= {searches['limit']:.3g} (half of all-BF16's "
              f"{searches['all_bf16_error']:.3g}), {searches['trials']} trials, under three runtimes:", "",
              "| runtime | speedup vs eager fp32 | vs compiled fp32 | rel_l2 | fp32 units | weight MiB (fp32: "
              "all) | search s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, row in searches["results"].items():
        lines.append(f"| {label} | {row['speedup_vs_eager_fp32']} | {row['speedup_vs_compiled_fp32'] or '-'} | "
                     f"{row['error']:.3g} | {row['units_fp32']} of {row['units']} | {row['weight_mib']} "
                     f"({row['fp32_weight_mib']}) | {row['search_s']} |")
    return [*lines, "", "Goal: the compiled weights-low plan at least 1.5x eager FP32.", ""]


def _stability_section(result: dict) -> list[str]:
    lines = ["## Searches that agree with themselves (`stability.py`)", "",
             f"{result['model']}, `--space transformer`, each case searched with seeds 0, 1, 2; every chosen plan "
             "re-measured afterwards, interleaved with FP32 (30 rounds). Speedups are medians of per-round ratios "
             "with 95% intervals.", "",
             "| mode | limit | seed | reported | re-measured | inside interval | within 3% of best | trials/min |",
             "| --- | ---: | ---: | ---: | ---: | :---: | :---: | ---: |"]
    for case in result["cases"]:
        for run in case["runs"]:
            again = run["remeasured"]
            lines.append(f"| {case['mode']} | {case['limit']:.3g} | {run['seed']} | {run['speedup']}x "
                         f"[{run['low']}, {run['high']}] | {again['speedup']}x [{again['low']}, {again['high']}] | "
                         f"{'yes' if run['remeasured_inside_interval'] else 'no'} | "
                         f"{'yes' if run['within_3pct_of_best'] else 'no'} | {run['trials_per_minute']} |")
    return [*lines, ""]


def _short(plan: dict[str, str]) -> str:
    return " ".join(f"{unit}={dtype}" for unit, dtype in plan.items())


BENCHMARKS = {
    "applier_overhead": applier_overhead.measure,
    "strategies": strategies.run_all,
    "search_overhead": search_overhead.overhead,
    "deployed": lambda: {"model": deployed.MODEL, **deployed.settings(), "forms": deployed.forms(20),
                         "searches": deployed.searches(24)},
    "stability": lambda: {"model": stability.MODEL, **stability.settings(),
                          "cases": [stability.case(True, 12), stability.case(False, 12)]},
}


def main() -> None:
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    chosen = sys.argv[1:] or list(BENCHMARKS)
    chosen = [] if chosen == ["--render"] else chosen  # only rewrite the README from the last results
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"unknown benchmark {sorted(unknown)[0]!r}; choose from {', '.join(BENCHMARKS)}")
    for name in chosen:
        (results / f"{name}.json").write_text(json.dumps(BENCHMARKS[name](), indent=2, default=str))
    loaded = {name: json.loads((results / f"{name}.json").read_text()) for name in BENCHMARKS}
    (HERE / "README.md").write_text(render(loaded["applier_overhead"], loaded["strategies"],
                                           loaded["search_overhead"], loaded["deployed"], loaded["stability"]))
    print((HERE / "README.md").read_text())


if __name__ == "__main__":
    main()
