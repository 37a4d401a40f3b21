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
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import applier_overhead  # noqa: E402
import deployed  # noqa: E402
import generate  # noqa: E402
import memory  # noqa: E402
import search_overhead  # noqa: E402
import stability  # noqa: E402
import strategies  # noqa: E402

from precsearch.search.bench import format_speedup  # noqa: E402
from precsearch.search.study_setup import device_name  # noqa: E402


def render(applier: dict, quality: dict, overhead: dict, deployed_form: dict, stable: dict,
           weight_memory: dict | None = None, generation: dict | None = None) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Regenerate everything below with `python benchmarks/run.py` (about 90 minutes on 2 cores).",
        f"Machine: {device_name('cpu')}, {quality['threads']} threads, torch {quality['torch']}, "
        f"Python {platform.python_version()}. CPU only: BF16 autocast is fast here (AVX512-BF16), "
        "FP16 several times slower than FP32, so every search leaves FP16 out after probing it. "
        "Times are medians of interleaved runs; the machine is shared, so differences of a few "
        "percent are noise.",
        "",
        *_deployed_section(deployed_form),
        *_memory_section(weight_memory),
        *_generate_section(generation),
        *_stability_section(stable),
        *_strategies_section(quality),
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


def _strategies_section(quality: dict) -> list[str]:
    lines = ["## Strategies (`strategies.py`)", "",
             "Each strategy searched the same model, data and limit as `optimize --compile` runs it (its finalists "
             "race compiled), with seeds 0, 1, 2 (global, greedy and bisect once: their plans follow from the "
             "measured errors). Then every distinct plan found was compiled and timed with FP32 compiled and FP32 "
             "eager in one interleaved run (20 rounds), and its compiled error measured on the search batches. "
             "Speedups are medians of per-round ratios with 95% intervals; *plans*: distinct plans measured; "
             "*search s*: wall time of the search. `optuna` is the default (TPE from greedy's answer and the "
             "model-based proposals), `tpe` the seeded TPE it replaced. " + quality.get("note", ""), ""]
    for name in ("bert", "gpt2", "cnn"):
        if name in quality:
            lines += _compiled_case(quality[name])
    if "trap_model" in quality:
        trap = quality["trap_model"]
        lines += [f"### {trap['model']}, rel_l2 <= {trap['limit']}, eager", "",
                  f"Exhaustive search ({trap['exhaustive']['evaluations']} plans, {trap['exhaustive']['seconds']} s) "
                  f"establishes the optimum: `{_short(trap['exhaustive']['plan'])}`.", "",
                  "| strategy | seed | fp32 units | rel_l2 | speedup vs eager fp32 | latency vs optimum | "
                  "trials to within 5% | plans | search s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for strategy, runs in trap["runs"].items():
            lines += [f"| {strategy} | {run['seed']} | {run['fp32_units']} | {run['compiled_error']:.3g} | "
                      f"{_x(run['speedup_vs_eager'])} | {run['relative_to_optimum']} | "
                      f"{run['trials_to_within_5pct'] or '-'} | {run['evaluations']} | {run['seconds']} |" for run in runs]
        lines.append("")
    return lines


def _compiled_case(case: dict) -> list[str]:
    lines = [f"### {case['model']}, {case['units']} units", "",
             f"All-BF16 has rel_l2 {case['all_bf16_error']:.3g}; the limit is half that, {case['limit']:.3g}. "
             f"{case['trials']} trials a search. FP32: {case['eager_fp32_ms']} ms eager, {case['compiled_fp32_ms']} "
             f"ms compiled; compiling one plan took {case['compile_s_per_plan']} s (median), an eager trial "
             f"{_trial_seconds(case)} s.", "",
             "| strategy | seed | fp32 units | compiled rel_l2 | meets limit | vs eager fp32 | vs compiled fp32 | "
             "trials | plans | search s |", "| --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: |"]
    for strategy, runs in case["runs"].items():
        lines += [f"| {strategy} | {run['seed']} | {run['fp32_units']} | {run['compiled_error']:.3g} | "
                  f"{'yes' if run['meets_limit'] else 'no'} | {_x(run['speedup_vs_eager'])} | "
                  f"{_x(run['speedup_vs_compiled'])} | {run['trials']} | {run['evaluations']} | {run['seconds']} |"
                  for run in runs]
    summary = case["strategies"]
    lines += ["", "| strategy | median vs eager fp32 | median vs compiled fp32 | median search s |",
              "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {row['speedup_vs_eager']:.3f} | {row['speedup_vs_compiled']:.3f} | {row['seconds']} |"
              for name, row in summary.items()]
    lines += ["", f"Goals: the default's median at least every baseline's: **{_met(case['default_at_least_every_baseline'])}**; "
              f"default / greedy = **{case['default_over_greedy']}** (goal >= 1.05 on at least one model); "
              f"default search s {summary['optuna']['seconds']} <= 1.2 x greedy's + 30 = "
              f"{case['default_seconds_budget']}: **{_met(case['default_within_time_budget'])}**.", ""]
    return lines


def _trial_seconds(case: dict) -> str:
    runs = case["runs"]["tpe"]
    return f"{statistics.median(run['seconds'] / run['trials'] for run in runs):.1f}"


def _x(interval: list[float]) -> str:
    median, low, high = interval
    return format_speedup(median, low, high)


def _met(flag: bool) -> str:
    return "met" if flag else "missed"


def _gpu_note() -> str:
    path = HERE / "results" / "gpu.json"
    if not path.exists():
        return "No GPU was available when this last ran, so no GPU numbers are committed."
    result = json.loads(path.read_text())
    rows = ", ".join(f"{name} {format_speedup(value['speedup'])}" for name, value in result["inference"].items())
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
    lines += ["", f"All-BF16 with weights held low vs autocast's FP32 weights: "
              f"**{format_speedup(forms['low_vs_autocast_eager'])}** eager (goal 1.05x), "
              f"**{format_speedup(forms['low_vs_autocast_compiled'])}** compiled (goal 1.25x).", "",
              f"`optimize --space transformer` at rel_l2 <= {searches['limit']:.3g} (half of all-BF16's "
              f"{searches['all_bf16_error']:.3g}), {searches['trials']} trials, under three runtimes:", "",
              "| runtime | speedup vs eager fp32 | vs compiled fp32 | rel_l2 | fp32 units | weight MiB (fp32: "
              "all) | search s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, row in searches["results"].items():
        lines.append(f"| {label} | {row['speedup_vs_eager_fp32']} | {row['speedup_vs_compiled_fp32'] or '-'} | "
                     f"{row['error']:.3g} | {row['units_fp32']} of {row['units']} | {row['weight_mib']} "
                     f"({row['fp32_weight_mib']}) | {row['search_s']} |")
    return [*lines, "", "Goal: the compiled weights-low plan at least 1.5x eager FP32.", ""]


def _memory_section(result: dict | None) -> list[str]:
    lines = ["## Weight memory and the memory budget (`memory.py`)", ""]
    if result is None:
        return [*lines, "Not run on this machine yet: `python benchmarks/run.py memory`.", ""]
    lines += [f"Weight MiB of each form (2**20 bytes, as `weight_mb`) and its rel_l2 against FP32. The searches "
              f"(`--space transformer`, {result['trials']} trials) run at half the all-BF16 rel_l2, a limit all-BF16 "
              f"violates, without a budget and with `--max-weight-mb` {result['budget_share']:.0%} of FP32's "
              "weights. Goals: the all-BF16 plan at most 0.52 of FP32; under the budget a feasible plan whenever "
              "the all-BF16 plan meets the limit.", ""]
    for case in result["models"].values():
        lines += [f"### {case['model']}: rel_l2 <= {case['limit']:.3g}, budget {case['budget_mib']:g} MiB", "",
                  "| form | weight MiB | of fp32 | rel_l2 | speedup vs fp32 | fp32 units |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in case["rows"]:
            if row.get("found") is False:
                lines.append(f"| {row['form']} | no feasible plan: {row['why']} | | | | |")
                continue
            units = f"{row['fp32_units']} of {row['units']}" if "units" in row else "-"
            lines.append(f"| {row['form']} | {row['weight_mib']} | {row['of_fp32']} | {row['rel_l2']:.3g} | "
                         f"{row.get('speedup', '-')} | {units} |")
        lines.append("")
    return lines


def _generate_section(result: dict | None) -> list[str]:
    lines = ["## Generation as the workload (`generate.py`)", ""]
    if result is None:
        return [*lines, "Not run yet on this machine: `python benchmarks/run.py generate`.", ""]
    search, plan = result["search"], result.get("plan", {})
    lines += [f"{result['model']}. `optimize --workload generate --space bf16_only` with perplexity <= 0.01 and "
              f"`--min-token-agreement {search['min_token_agreement']}` (all-BF16's greedy tokens agree with FP32's "
              f"{search['all_bf16_token_agreement']:.3g} of the time"
              f"{': all-BF16 is infeasible' if search['all_bf16_token_agreement'] < 1 else ', so no limit excludes it'}"
              f"), {search['trials']} "
              f"trials, {search['search_s']} s: the plan keeps {search['units_fp32']} of {search['units']} units in "
              f"FP32; its tokens agree {plan.get('metrics', {}).get('token_agreement')}.", "",
              "Every form generates the same tokens, timed interleaved in one run; *compiled*: a static KV cache and "
              "a compiled decode step (the prefill eager).", "",
              "| form | generate ms | prefill ms | decode ms/token | decode tokens/s | speedup vs eager fp32 | "
              "first call s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {row['form']} | {row['generate_ms']} | {row['prefill_ms']} | {row['decode_ms_per_token']} | "
              f"{row['decode_tokens_per_s']} | {row['speedup_vs_eager_fp32']} | "
              f"{row['first_call_s'] if row['first_call_s'] is not None else '-'} |" for row in result.get("forms", [])]
    ratios = result.get("plan_vs_fp32_decode_tokens_per_s", {})
    lines += ["", f"Searched plan / FP32 decode tokens/s: **{format_speedup(ratios.get('eager'))}** eager, "
              f"**{format_speedup(ratios.get('compiled'))}** compiled (goal 1.3x).", ""]
    package = result.get("package", {})
    if "failure" in package:
        lines += [f"Export: the plan could not be packaged: {package['failure']}", ""]
    elif package:
        forward = package["forward_ms"]
        lines += [f"The plan as an AOTInductor package ({package['size_mb']} MB, exported in {package['export_s']} s, "
                  f"max difference {package['max_diff_vs_eager_plan']:.3g} against the eager plan), one forward pass "
                  f"on the prompts (a package holds no generation loop): package {forward['package']} ms, compiled "
                  f"plan {forward['plan compiled']} ms, eager FP32 {forward['fp32 eager']} ms; package vs compiled "
                  f"plan **{package['package_speedup_vs_compiled_plan']}** (goal: within 5%).", ""]
    return lines


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
            lines.append(f"| {case['mode']} | {case['limit']:.3g} | {run['seed']} | "
                         f"{format_speedup(run['speedup'], run['low'], run['high'])} | "
                         f"{format_speedup(again['speedup'], again['low'], again['high'])} | "
                         f"{'yes' if run['remeasured_inside_interval'] else 'no'} | "
                         f"{'yes' if run['within_3pct_of_best'] else 'no'} | {run['trials_per_minute']} |")
    return [*lines, ""]


def _short(plan: dict[str, str]) -> str:
    return " ".join(f"{unit}={dtype}" for unit, dtype in plan.items())


BENCHMARKS = {
    "applier_overhead": applier_overhead.measure,
    "strategies": strategies.run_all,
    "search_overhead": search_overhead.overhead,
    "memory": memory.run_all,
    "deployed": lambda: {"model": deployed.MODEL, **deployed.settings(), "forms": deployed.forms(20),
                         "searches": deployed.searches(24)},
    "generate": lambda: generate.run(trials=16, repeats=10),
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
    loaded = {name: json.loads((results / f"{name}.json").read_text()) for name in BENCHMARKS
              if (results / f"{name}.json").exists()}
    (HERE / "README.md").write_text(render(loaded["applier_overhead"], loaded["strategies"],
                                           loaded["search_overhead"], loaded["deployed"], loaded["stability"],
                                           loaded.get("memory"), loaded.get("generate")))
    print((HERE / "README.md").read_text())


if __name__ == "__main__":
    main()
