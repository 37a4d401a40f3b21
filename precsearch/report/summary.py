"""What a search found, for people: terminal tables, ``trials.csv``, and ``report.md`` /
``report.html`` with plots, built from the study and the plans in an output directory."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from precsearch.search.bench import format_speedup, rank_correlation
from precsearch.runtime.errors import InputError
from precsearch.runtime.memory import MemoryBudget, label_of
from precsearch.runtime.plan_sections import Constraint, PlanMetrics
from precsearch.runtime.training import Diagnostics
from precsearch.runtime.precisions import NAMES, PRECISIONS, low_precisions
from precsearch.search.trials import (
    Prediction,
    Settings,
    StudySetup,
    TrialRecord,
    is_feasible,
    is_surplus,
    lead_of,
    load_diagnostics,
    violated,
)

LOW = [p.name for p in low_precisions()]


def human(number: float | int | None) -> str:
    """``1234567`` -> ``'1.23M'``; None -> ``'-'``."""
    if number is None:
        return "-"
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= threshold:
            return f"{number / threshold:.3g}{suffix}"
    return f"{number:.3g}" if isinstance(number, float) else str(number)


def format_table(rows: Sequence[dict[str, Any]], max_width: int = 100, max_rows: int = 60) -> str:
    """Left-aligned text columns, right-aligned numbers; long tables keep their head and tail."""
    if not rows:
        return "(empty)"
    columns = list(rows[0])
    if len(rows) > max_rows:
        half = max_rows // 2
        rows = [*rows[:half], {column: "..." for column in columns}, *rows[-half:]]
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    numeric = [all(_is_number(row.get(column)) or row.get(column) in ("...", None) for row in rows)
               for column in columns]
    widths = [max(len(str(column)), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]

    def render(values: list[str]) -> str:
        parts = [value.rjust(width) if right else value.ljust(width)
                 for value, width, right in zip(values, widths, numeric)]
        line = "  ".join(parts).rstrip()
        return line if len(line) <= max_width else line[: max_width - 1] + "…"

    header = render([str(column) for column in columns])
    rule = render(["-" * width for width in widths])
    return "\n".join([header, rule, *(render(line) for line in cells)])


def _is_number(value: Any) -> bool:
    if isinstance(value, str):  # numbers already made human: "1.2M", "0.5x"
        return re.fullmatch(r"-?[\d.]+(e[+-]?\d+)?[kMGT%x]?", value) is not None
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_frame(study: Any) -> Any:
    """One row per trial: per-dtype unit counts, the plan, objectives, constraint, feasibility."""
    import pandas as pd

    rows = []
    setup = StudySetup.load(study)
    units = setup.unit_names if setup else []
    for trial in study.get_trials(deepcopy=False):
        if (not trial.state.is_finished() and trial.state.name != "RUNNING") or is_surplus(trial):
            continue  # enqueued seeds not reached within the budget; trials past the budget
        record = TrialRecord.of(trial, units)
        predicted, lead = Prediction.of(trial), lead_of(trial)
        dtypes = list(record.layers.values()) if record else []
        constraint = trial.constraints.get("error")
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        rows.append({
            "trial": trial.number, "state": trial.state.name,
            **{name: dtypes.count(name) for name in PRECISIONS}, "plan": record.code if record else "",
            "latency_ms": trial.value, "measured_ms": record.latency_ms if record else None,
            "baseline_ms": record.baseline_ms if record else None,
            "speedup": record.speedup if record else None,
            "speedup_low": record.speedup_low if record else None,
            "speedup_high": record.speedup_high if record else None,
            "error": (float("inf") if record.error is None else record.error) if record else None,
            "constraint": constraint,
            "feasible": is_feasible(trial),
            "violates": ", ".join(label_of(name) for name in violated(trial)) or None,
            "peak_memory_mb": record.peak_memory_mb if record else None,
            "weight_mb": record.weight_mb if record else None, "duration_s": duration,
            "failure": record.failure if record else None,
            "lead": lead[0] if lead else None,
            "predicted_error": predicted.predicted_error if predicted else None,
            "predicted_speedup": predicted.predicted_speedup if predicted else None,
            **({column: getattr(record, column) for column in TRIAL_GENERATION_COLUMNS}
               if record is not None and record.generation is not None else {}),
        })
    return pd.DataFrame(rows)


# -- the report -----------------------------------------------------------------------------------
def open_study(directory: str | Path, storage: str | None = None, study_name: str | None = None) -> Any:
    """The study behind an output directory (``DIR/study.db`` unless ``storage`` says otherwise)."""
    import optuna

    from precsearch.search.storage import open_storage

    directory = Path(directory)
    if storage is None:
        if not (directory / "study.db").is_file():
            raise InputError(f"{directory}: no study here (expected {directory / 'study.db'}); "
                             f"pass --storage URL for a study stored elsewhere")
        storage = f"sqlite:///{directory / 'study.db'}"
    backend = open_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)]
    if study_name is None:
        if len(names) != 1:
            raise InputError(f"{directory}: the storage holds {len(names)} studies ({', '.join(names) or 'none'}); "
                             f"name one with --study")
        study_name = names[0]
    if study_name not in names:
        raise InputError(f"--study {study_name!r}: not in the storage (it has: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=study_name, storage=backend)
    if StudySetup.load(study) is None:
        raise InputError(f"study {study_name!r} was not made by precsearch optimize")
    return study


def write_report(directory: str | Path, study: Any) -> dict[str, Path]:
    """Write ``trials.csv``, three PNG plots, ``report.md`` and a self-contained ``report.html``."""
    from precsearch.report import plots
    from precsearch.runtime.plan import load_plan, write_atomic

    directory = Path(directory)
    setup = StudySetup.load(study)
    if setup is None:
        raise InputError(f"study {study.study_name!r} was not made by precsearch optimize")
    settings, units_info = setup.settings, setup.units
    units = [row["name"] for row in units_info]
    plan = load_plan(directory / "plan.yaml") if (directory / "plan.yaml").is_file() else None
    others = [(path, load_plan(path)) for path in sorted((directory / "pareto").glob("plan-*.yaml"))]
    for path, loaded in ([(directory / "plan.yaml", plan)] if plan else []) + others:
        check_plan_of_study(path, loaded, study.study_name, setup)
    trials = trials_frame(study)
    write_atomic(directory / "trials.csv", trials.to_csv(index=False))
    constraint = settings.constraint
    budget = MemoryBudget.of(constraint)
    baseline = setup.baseline_ms
    chosen = plan.measured.trial if plan else None
    files = {
        "tradeoff": plots.tradeoff(trials, constraint.limit, baseline, chosen,
                                   directory / "tradeoff.png", constraint.metric, budget.text()),
        "progress": plots.progress(trials, baseline, directory / "progress.png"),
    }
    precision = {u: plan.precision(u) for u in units} if plan else {}
    files["units"] = plots.unit_map(units, precision, setup.edges, directory / "units.png",
                                    "Chosen precision of every unit" if plan else "No feasible plan: all fp32")

    finished = trials[trials["state"].isin(["COMPLETE", "PRUNED"])]
    blocks: list[tuple] = [("h1", f"precsearch report: {settings.model}")]
    blocks += [("table", [
        {"setting": "model", "value": settings.model},
        {"setting": "device", "value": f"{settings.device} ({settings.device_name})"},
        {"setting": "torch", "value": settings.torch},
        {"setting": "search space", "value": settings.space},
        {"setting": "mode", "value": settings.mode},
        {"setting": "constraint", "value": f"{constraint.metric} <= {constraint.limit:g}"},
        *([{"setting": "memory budget", "value": f"{budget.text()} (FP32's weights: {_mb(setup.weight_mb)})"}]
          if budget else []),
        {"setting": "budget", "value": f"{settings.trials} trials ({len(finished)} finished)"},
        {"setting": "strategy", "value": f"{settings.strategy}: {settings.sampler} "
                                         f"(seed {settings.seed}), {settings.parametrisation} parametrisation"},
        {"setting": "study", "value": f"{study.study_name}"},
    ])]
    blocks.append(("h2", "Result"))
    extra = _error_columns([plan, *(p for _, p in others)])   # the error columns beside the search's own
    extra += _generation_columns([plan, *(p for _, p in others)])
    if plan is None:
        blocks.append(("p", f"No plan met {constraint.metric} <= {constraint.limit:g}"
                            f"{' and ' + budget.text() if budget else ''}.{_budget_shortfall(trials, budget)}"))
    else:
        metrics = plan.measured
        memory = metrics.peak_memory_mb
        runtime = plan.resolved_runtime
        blocks.append(("table", [
            {"plan": "fp32 baseline", "latency_ms": round(baseline, 3), "speedup": "1.00x", "error": 0.0,
             **{column: _fp32_cell(column, plan) for column in extra},
             "weight_mb": setup.weight_mb, "peak_memory_mb": "-" if memory is None else "measured per plan"},
            {"plan": "chosen (plan.yaml)", "latency_ms": metrics.latency_ms,
             "speedup": _metrics_speedup(metrics), "error": metrics.error,
             **{column: getattr(metrics, column) for column in extra}, "weight_mb": metrics.weight_mb,
             "peak_memory_mb": "not measured on CPU" if memory is None else memory},
        ]))
        blocks.append(("p", f"Measured as deployed: weights {runtime.weights}"
                            f"{' (each low unit holds its own weights in its dtype)' if runtime.weights == 'low' else ''}, "
                            f"{_compile_note(metrics, constraint) if runtime.compile else 'eager'}."))
        if runtime.run.generates:
            blocks.append(("p", _generation_note(plan)))
        blocks.append(("p", _unseen_data_note(plan, constraint)))
        blocks.append(("p", _race_note(plan, trials)))
        if budget:
            blocks.append(("p", _budget_note(plan, budget, trials)))
        counts = plan.counts(units)
        blocks.append(("p", "Units per dtype: " + ", ".join(f"{d} {counts.get(d, 0)}" for d in NAMES)
                       + f" (of {len(units)})."))
    blocks += [("img", files["tradeoff"].name, "error vs latency of every trial, weight memory as colour"),
               ("img", files["units"].name, "precision of every unit")]
    blocks += [("h2", "Pareto-optimal feasible plans"),
               ("p", "No plan is both faster and more accurate than any of these."
                     + (f" Each is within the memory budget, {budget.text()} (weight_mb)." if budget else "")),
               ("table", [_plan_row(name, p, units, extra) for name, p in
                          ([("plan.yaml", plan)] if plan else []) + [(f"pareto/{path.name}", p) for path, p in others]]
                or [{"plan": "none"}])]
    blocks += [("h2", "Search progress"), ("img", files["progress"].name, "best feasible latency over trials"),
               ("table", _milestones(trials))]
    blocks += _prediction_blocks(trials)
    blocks += _training_blocks(load_diagnostics(study), settings)
    failed = trials[trials["failure"].notna()] if "failure" in trials else trials.iloc[0:0]
    if len(failed):
        blocks += [("h2", "Trials that failed"),
                   ("table", [{"trial": int(r.trial), "reason": r.failure} for r in failed.itertuples()])]
    sensitivity = setup.sensitivity
    blocks += [("h2", "Units"), ("p", "Sensitivity: error of the model (or the unit's own output, for large "
                                      "models) with only that unit lowered."),
               ("table", [{"unit": row["name"] or "<root>", "type": row["type"], "params": row["params"],
                           "flops": human(row["flops"]),
                           **{f"sens_{d}": _fmt(sensitivity.get(row["name"], {}).get(d)) for d in LOW},
                           "chosen": precision.get(row["name"], "-")} for row in units_info])]
    markdown, page = _render(blocks, directory)
    files["md"] = write_atomic(directory / "report.md", markdown)
    files["html"] = write_atomic(directory / "report.html", page)
    files["csv"] = directory / "trials.csv"
    return files


def check_plan_of_study(path: Path, plan: Any, study_name: str, setup: StudySetup) -> None:
    """Refuse a plan that another study or model made: the report would show it as this study's."""
    reason = _not_of_study(plan, study_name, setup)
    if reason is not None:
        raise InputError(f"{path}: not a plan of study {study_name!r} ({reason}); move it away, or report on "
                         f"its own study with --storage and --study")


def _not_of_study(plan: Any, study_name: str, setup: StudySetup) -> str | None:
    """Why ``plan`` is another study's, or None when nothing it records says so."""
    search, model = plan.search or {}, plan.model or {}
    units = [row["name"] for row in setup.units]
    if search.get("study") not in (None, study_name):
        return f"its search.study is {search['study']!r}"
    if model.get("name") not in (None, setup.settings.model):
        return f"it was made for model {model['name']!r}, the study searched {setup.settings.model!r}"
    if model.get("units") not in (None, len(units)):
        return f"it counts {model['units']} units, the study's model has {len(units)}"
    unknown = [name for name in plan.layers if name not in set(units)]
    if unknown:
        return f"it names unit {unknown[0]!r}, which the study's model does not have"
    return None


def prediction_quality(trials: Any) -> dict[str, Any] | None:
    """How the model-based prediction, made before each trial, matched its measurement: the
    Spearman rank correlation of predicted and measured speedup and error, and the median
    measured / predicted error. None when no trial recorded a prediction."""
    if "predicted_error" not in trials:
        return None
    rows = trials[trials["predicted_error"].notna() & trials["speedup"].notna() & trials["error"].notna()]
    finite = rows[rows["error"].map(math.isfinite) & rows["predicted_error"].map(math.isfinite)]
    if len(finite) < 3:
        return None

    def spearman(a: Any, b: Any) -> float | None:
        value = rank_correlation(a, b)
        return None if value is None else round(value, 3)

    positive = finite[finite["predicted_error"] > 0]
    ratio = (positive["error"] / positive["predicted_error"]).median() if len(positive) else math.nan
    return {"trials": len(finite), "speedup_rank_correlation": spearman(finite["predicted_speedup"], finite["speedup"]),
            "error_rank_correlation": spearman(finite["predicted_error"], finite["error"]),
            "error_ratio": None if math.isnan(ratio) else round(float(ratio), 3)}


def _prediction_blocks(trials: Any) -> list[tuple]:
    quality = prediction_quality(trials)
    if quality is None:
        return []
    return [("h2", "Model-based prediction"),
            ("p", ("Before each trial, its plan's error was predicted from the units' sensitivities (squared "
                   "errors add, times a gain calibrated on the trials before it) and its speedup from the units' "
                   "FLOPs, bytes and cast boundaries (a fit on the trials before it).")),
            ("table", [{"trials": quality["trials"],
                        "spearman speedup": quality["speedup_rank_correlation"],
                        "spearman error": quality["error_rank_correlation"],
                        "median measured / predicted error": quality["error_ratio"]}])]


def _training_blocks(diagnostics: Diagnostics | None, settings: Settings) -> list[tuple]:
    """Loss scaling and gradient health of the chosen plan, for training searches."""
    if settings.mode != "training" or diagnostics is None:
        return []
    blocks: list[tuple] = [("h2", "Training: loss scaling and gradient health")]
    if not diagnostics.scales:
        blocks.append(("p", "The chosen plan has no FP16 unit: BF16 and FP32 keep FP32's range, no loss scaling."))
    else:
        scales = diagnostics.scales
        blocks.append(("p", f"Dynamic loss scaling over {len(scales)} steps: {diagnostics.skipped} skipped for "
                            f"non-finite gradients, final scale {scales[-1]:g} (history: "
                            + ", ".join(f"{s:g}" for s in scales) + ")."))
    flagged = [{"unit": unit, "problem": f"{share:.1%} of its gradient underflows to zero in FP16 without scaling"}
               for unit, share in diagnostics.underflow.items()]
    flagged += [{"unit": unit, "problem": "gradient overflows (inf/NaN) in FP16 without scaling"}
                for unit in diagnostics.overflow]
    blocks.append(("table", flagged) if flagged else ("p", "No FP16 unit loses its gradient without scaling."))
    return blocks


def _metrics_speedup(metrics: PlanMetrics) -> str:
    return format_speedup(metrics.speedup, metrics.speedup_low, metrics.speedup_high)


def _value(number: Any) -> float | None:
    """A number from a DataFrame cell, None for a missing one (NaN)."""
    return None if number is None or (isinstance(number, float) and math.isnan(number)) else float(number)


def _race_note(plan: Any, trials: Any) -> str:
    """How the final race's numbers relate to the trials': the race may reorder close plans."""
    metrics = plan.measured
    trial = metrics.trial
    sentences = [f"The close finalists and the FP32 model were re-timed together in a final race: the chosen plan "
                 f"ran {_metrics_speedup(metrics)} there (the median of per-round speedups, with its 95% "
                 f"confidence interval from order statistics)."]
    ties = metrics.race_ties
    if ties:
        sentences.append(f"The race could not tell it apart from {ties} other plan{'s' if ties > 1 else ''}; "
                         f"ties go to more accuracy headroom, then fewer cast boundaries.")
    feasible = trials[trials["feasible"]]
    own = feasible[feasible["trial"] == trial]
    if trial is None or own.empty:
        if plan.default == "fp32" and not plan.layers:
            sentences.append("It is the FP32 plan: no plan was shown faster.")
        return " ".join(sentences)
    row = own.iloc[0]
    sentences.append(f"Its trial, {trial}, measured "
                     f"{format_speedup(row['speedup'], _value(row['speedup_low']), _value(row['speedup_high']))}.")
    fastest = feasible.sort_values("latency_ms").iloc[0]
    if int(fastest["trial"]) != trial:
        sentences.append(f"The fastest trial, {int(fastest['trial'])} ("
                         f"{format_speedup(fastest['speedup'], _value(fastest['speedup_low']), _value(fastest['speedup_high']))}"
                         f"), did not win the race.")
    return " ".join(sentences)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g} MB"


def _over_budget(trials: Any) -> Any:
    """The finished trials within the accuracy limit but over the memory budget."""
    if "violates" not in trials:
        return trials.iloc[0:0]
    done = trials[(trials["state"] == "COMPLETE") & trials["violates"].notna()]
    return done[~done["violates"].str.contains("error")]


def _budget_note(plan: Any, budget: MemoryBudget, trials: Any) -> str:
    """The chosen plan against the memory budget, and how many accurate plans the budget ruled out."""
    over = _over_budget(trials)
    weight = plan.measured.weight_mb
    return (f"Memory budget ({budget.text()}): the chosen plan's weights take {_mb(weight)} as it runs; "
            f"{len(over)} trial{'s' if len(over) != 1 else ''} within the accuracy limit "
            f"{'were' if len(over) != 1 else 'was'} over the budget, so infeasible.")


def _budget_shortfall(trials: Any, budget: MemoryBudget) -> str:
    """Why no plan was feasible when the budget is to blame ("" otherwise)."""
    over = _over_budget(trials)
    if not budget or over.empty:
        return ""
    lightest = over.sort_values("weight_mb").iloc[0] if "weight_mb" in over else None
    least = f" (the lightest: {_mb(_value(lightest['weight_mb']))})" if lightest is not None else ""
    return (f" {len(over)} trial{'s' if len(over) != 1 else ''} met the accuracy limit but "
            f"{'were' if len(over) != 1 else 'was'} over the memory budget{least}.")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2g}"


def _plan_row(name: str, plan: Any, units: list[str], extra: Sequence[str] = ()) -> dict[str, Any]:
    metrics = plan.measured
    counts = plan.counts(units)
    return {"plan": name, "trial": metrics.trial, "latency_ms": metrics.latency_ms,
            "speedup": _metrics_speedup(metrics), "error": metrics.error,
            **{column: getattr(metrics, column) for column in extra}, "weight_mb": metrics.weight_mb,
            "compiled": "yes" if plan.resolved_runtime.compile else "no",
            **{d: counts.get(d, 0) for d in NAMES}}


ERROR_COLUMNS = ("holdout_error", "compiled_error")   # beside the search error, when a plan has them


# --workload generate: a trial's own medians (trials.csv), and the plans' (result tables)
TRIAL_GENERATION_COLUMNS = ("prefill_ms", "decode_ms_per_token", "tokens_per_s", "token_agreement")
GENERATION_COLUMNS = ("tokens_per_s", "prefill_ms", "decode_ms_per_token", "token_agreement")


def _generation_columns(plans: Sequence[Any]) -> list[str]:
    """The generation columns, when any of ``plans`` was measured generating."""
    generating = any(plan is not None and plan.measured.generates for plan in plans)
    return list(GENERATION_COLUMNS) if generating else []


def _fp32_cell(column: str, plan: Any) -> Any:
    """The FP32 baseline's value in an extra column: no error, FP32's own tokens, its tokens/s."""
    if column in ("holdout_error", "token_agreement"):
        return 0.0 if column == "holdout_error" else 1.0
    return plan.measured.baseline_tokens_per_s if column == "tokens_per_s" else None


def _generation_note(plan: Any) -> str:
    """What a generating plan's run was, and what judged its tokens."""
    runtime, constraint = plan.resolved_runtime, plan.constraint
    minimum = constraint.min_token_agreement if constraint is not None else None
    metric = constraint.metric if constraint is not None else "the metric"
    form = ("with a static KV cache, the decode step compiled (the prefill eager)" if runtime.compile
            else "with the model's KV cache, eager")
    return (f"Timed as generation: prefill and {runtime.new_tokens} greedy tokens in all (a decode step each after "
            f"the first), {form}; latency is a whole generation. tokens_per_s counts the tokens of all the "
            f"batch's sequences; prefill_ms and decode_ms_per_token are medians of the same runs. Beside "
            f"{metric}, every plan's greedy tokens on the data had to equal FP32's "
            f"at the same position at least {minimum if minimum is not None else '?'} of the time "
            f"(token_agreement); trials under it are listed as failed, with their agreement.")


def _error_columns(plans: Sequence[Any]) -> list[str]:
    """The error columns beyond the search's own that any of ``plans`` records."""
    return [column for column in ERROR_COLUMNS
            if any(plan is not None and getattr(plan.measured, column) is not None for plan in plans)]


def _compile_note(metrics: PlanMetrics, constraint: Constraint) -> str:
    """The compiled form's own error, which the search held to the limit."""
    compiled = metrics.compiled_error
    if compiled is None:
        return "compiled with torch.compile"
    note = (f"compiled with torch.compile, where its {constraint.metric} against FP32 is {compiled:.4g} "
            f"(limit {constraint.limit:g}; finalists over the limit compiled were dropped)")
    agreement = metrics.compiled_rank_agreement
    if agreement is not None:   # the search ranks eager; the finalists race compiled
        note += (f"; the {metrics.compiled_raced} plans that raced compiled kept their eager order with "
                 f"Spearman {agreement:.2f} (1: the same order)")
    return note


def _unseen_data_note(plan: Any, constraint: Constraint) -> str:
    """How the chosen plan did on batches the search never saw, and the headroom it kept."""
    metrics, search = plan.measured, plan.search or {}
    margin = search.get("margin")
    headroom = (f" It was chosen with a margin of {margin:g}: search error at most "
                f"{constraint.limit * (1 - margin):.4g}." if margin else "")
    held = metrics.holdout_error
    if held is None:
        return f"No batch was held out of the search (optimize --holdout or --holdout-data).{headroom}"
    verdict = "within" if held <= constraint.limit else "OVER"
    batches = "?" if metrics.holdout_batches is None else metrics.holdout_batches
    search_error = 0.0 if metrics.error is None else metrics.error
    return (f"On {batches} held-out batches the search never saw, its "
            f"{constraint.metric} is {held:.4g} ({verdict} the limit {constraint.limit:g}; "
            f"search error {search_error:.4g}).{headroom}")


def _milestones(trials: Any) -> list[dict[str, Any]]:
    """The trials at which the best feasible latency improved."""
    rows, best = [], math.inf
    for row in trials[trials["state"] == "COMPLETE"].sort_values("trial").itertuples():
        if row.feasible and row.latency_ms < best:
            best = row.latency_ms
            rows.append({"trial": int(row.trial), "best_latency_ms": round(best, 3),
                         "speedup": format_speedup(row.speedup, _value(row.speedup_low), _value(row.speedup_high)),
                         "error": row.error})
    return rows or [{"trial": "-", "best_latency_ms": "no feasible trial"}]


def _render(blocks: list[tuple], directory: Path) -> tuple[str, str]:
    """The same blocks as Markdown (images beside it) and as one self-contained HTML page."""
    md, page = [], []
    for kind, *content in blocks:
        if kind in ("h1", "h2"):
            md.append(("# " if kind == "h1" else "## ") + content[0])
            page.append(f"<{kind}>{html.escape(content[0])}</{kind}>")
        elif kind == "p":
            md.append(content[0])
            page.append(f"<p>{html.escape(content[0])}</p>")
        elif kind == "img":
            name, alt = content
            md.append(f"![{alt}]({name})")
            data = base64.b64encode((directory / name).read_bytes()).decode()
            page.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif kind == "table":
            rows = content[0]
            columns = list(rows[0])
            md.append("\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
                                  *("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows)]))
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
                           for r in rows)
            page.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:1em 0}")
    title = html.escape(blocks[0][1])
    document = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
                f"<style>{style}</style></head><body>" + "\n".join(page) + "</body></html>\n")
    return "\n\n".join(md) + "\n", document
