"""Side-by-side comparison of plans: recorded metrics and settings, per-unit differences, and
(given the model and data) a fair re-measurement of all of them in one interleaved run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from precsearch.runtime.accuracy import Fidelity, builtin_metric
from precsearch.search import bench
from precsearch.search.bench import format_interval
from precsearch.runtime.errors import InputError
from precsearch.search.evaluate import eager_runners
from precsearch.runtime.ops import model_device_type
from precsearch.runtime.plan import Plan, load_plan
from precsearch.runtime.plan_sections import PlanMetrics
from precsearch.runtime.precisions import NAMES
from precsearch.runtime.apply import apply_plan
from precsearch.runtime.weights import find_weight_uses, weight_mb
from precsearch.runtime.workload import TokenGate


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Plans side by side: their recorded summary, the units where they differ, the units that
    were compared (all the model's when it was given), and the re-measurement when it was made."""

    names: list[str]
    plans: list[Plan]
    units: list[str]
    units_known: bool
    summary: list[dict[str, Any]]
    differences: list[dict[str, str]]
    warnings: list[str]
    remeasured: list[dict[str, Any]] | None = None

    @property
    def defaults(self) -> dict[str, str]:
        return {name: plan.default for name, plan in zip(self.names, self.plans)}

    def to_dict(self) -> dict[str, Any]:
        """As ``compare --json`` prints it."""
        return {"plans": self.summary, "defaults": self.defaults, "units_known": self.units_known,
                "differences": self.differences, "remeasured": self.remeasured, "warnings": self.warnings}


def compare_plans(paths: list[Path], model: nn.Module | None = None, batches: list[Any] | None = None, *,
                  compiled: bool = False) -> Comparison:
    """Load the plans at ``paths`` and compare them; with the model and its batches, over all its
    units and re-measured on this machine in one interleaved run (``compiled``: under torch.compile)."""
    from precsearch.search.graph import walk

    plans = [load_plan(path) for path in paths]
    check_distinct(paths, plans)
    names = short_names(paths)
    known_units, remeasured = None, None
    if model is not None and batches:
        known_units = walk(model, batches[0]).units
        plans = [plan.for_model(model) for plan in plans]   # tables an older plan keeps in FP32, by name
        remeasured = remeasure(model, batches, names, plans, compiled=compiled)
    units = all_units(plans, known_units)
    return Comparison(names, plans, units, known_units is not None, summary_rows(names, plans, units),
                      unit_differences(names, plans, units), provenance_warnings(names, plans), remeasured)


def short_names(paths: list[Path]) -> list[str]:
    """Plan labels: file names, or parent/file where file names repeat."""
    names = [path.name for path in paths]
    if len(set(names)) < len(names):
        names = [f"{path.parent.name}/{path.name}" for path in paths]
    if len(set(names)) < len(names):
        names = [str(path) for path in paths]
    return names


def check_distinct(paths: list[Path], plans: list[Plan]) -> None:
    if len(plans) < 2:
        raise InputError("compare needs at least two plans")
    seen: dict[str, Path] = {}
    for path, plan in zip(paths, plans):
        key = plan.dumps().split("\n", 2)[-1]  # everything but the creation time
        if path.resolve() in {p.resolve() for p in seen.values()} or key in seen:
            raise InputError(f"{path}: compares a plan with itself ({seen.get(key, path)}); give different plans")
        seen[key] = path


def provenance_warnings(names: list[str], plans: list[Plan]) -> list[str]:
    """Differences that make recorded numbers incomparable."""
    messages = []
    for label, get in (("devices", lambda p: p.target.get("device_name") or p.target.get("device")),
                       ("torch versions", lambda p: p.target.get("torch")),
                       ("model fingerprints", lambda p: p.model.get("fingerprint"))):
        values = {name: get(plan) for name, plan in zip(names, plans) if get(plan)}
        if len(set(values.values())) > 1:
            messages.append(f"plans were made on different {label}: " +
                            ", ".join(f"{name}={str(value)[:24]}" for name, value in values.items()))
    return messages


def summary_rows(names: list[str], plans: list[Plan], units: list[str]) -> list[dict[str, Any]]:
    """One row per plan: recorded metrics, constraint, target and units per dtype."""
    rows = []
    for name, plan in zip(names, plans):
        metrics, constraint = plan.measured, plan.constraint
        counts = plan.counts(units)
        rows.append({"plan": name, "default": plan.default,
                     **{dtype: counts.get(dtype, 0) for dtype in NAMES},
                     "speedup": metrics.speedup, "interval": _interval(metrics),
                     "latency_ms": metrics.latency_ms,
                     "error": metrics.error, "weight_mb": metrics.weight_mb,
                     "limit": f"{constraint.metric}<={constraint.limit}" if constraint is not None else "-<=-",
                     "device": plan.target.get("device", "-")})
    return rows


def _interval(metrics: PlanMetrics) -> str | None:
    return format_interval(metrics.speedup_low, metrics.speedup_high)


def unit_differences(names: list[str], plans: list[Plan], units: list[str]) -> list[dict[str, str]]:
    """Units whose precision differs between the plans, in unit order."""
    rows = []
    for unit in units:
        chosen = [plan.precision(unit) for plan in plans]
        if len(set(chosen)) > 1:
            rows.append({"unit": unit or "<root>", **dict(zip(names, chosen))})
    return rows


def differences_line(differences: list[dict[str, str]], units: list[str], units_known: bool) -> str:
    """How many units differ; without the model its units are unknown, and the line says so.

    >>> differences_line([], [], units_known=False)
    'units unknown without --model: the plans name no unit'
    """
    if units_known:
        return f"{len(differences)} of {len(units)} units differ"
    if not units:
        return "units unknown without --model: the plans name no unit"
    return f"units unknown without --model: {len(differences)} of the {len(units)} units the plans name differ"


def all_units(plans: list[Plan], known: list[str] | None = None) -> list[str]:
    """The model's units when known, else every unit any plan names."""
    if known is not None:
        return known
    return list(dict.fromkeys(unit for plan in plans for unit in plan.layers))


def remeasure(model: nn.Module, batches: list[Any], names: list[str], plans: list[Plan],
              repeats: int = 20, compiled: bool = False) -> list[dict[str, Any]]:
    """Every plan and the FP32 baseline timed in one interleaved run; errors on this machine.

    The model runs in the mode it is given: pass it in ``eval()`` mode to measure inference.

    ``compiled``: every plan and the FP32 model run compiled, each on its own copy; speedups
    are then against compiled FP32 (the eager FP32 row is timed in the same run).

    A run is the plans' workload (``runtime.workload``, which they must share): generating plans
    are timed generating, with prefill, decode and tokens/s and their greedy tokens' agreement
    with FP32's in each row."""
    from precsearch.search.compiled import workload_of

    workload = workload_of(plans)
    workload.check(model, batches[0])
    device_type = model_device_type(model)
    metric = next(filter(None, (builtin_metric(p.constraint) for p in plans)), "rel_l2")
    fidelity = Fidelity.builtin(model, batches, metric, 0.0)  # only its error is used here
    modules = list(model.named_modules())
    uses = find_weight_uses(model, batches[0], device_type)  # the same for every plan
    for plan in plans:  # once each; the many applications below skip the fingerprint
        plan.validate_for(model, fingerprint_mismatch="warn")

    def apply(plan: Plan) -> Any:
        return apply_plan(model, plan, fingerprint_mismatch="ignore", modules=modules, weight_uses=uses)

    gate = TokenGate(model, batches, workload, 0.0) if workload.generates else None

    if compiled:
        from precsearch.search.compiled import time_compiled

        race = time_compiled(model, batches[0], dict(zip(names, plans)), device_type, repeats).race
        baseline = "fp32 compiled"
    else:
        baseline = "fp32 baseline"
        runners = eager_runners(dict(zip(names, plans)), Plan(runtime=plans[0].runtime), apply,
                                lambda plan: workload.runner(model, batches[0]), fp32_name=baseline)
        race = bench.race(runners, baseline=baseline, device_type=device_type, repeats=repeats, warmup=2)
    fp32 = race.timings[baseline]
    rows = [{"plan": "fp32 baseline", "latency_ms": round(fp32.median_ms, 3), "speedup": 1.0, "interval": "-",
             f"{metric}": 0.0, "weight_mb": round(weight_mb(model), 3), "peak_memory_mb": fp32.peak_memory_mb,
             **_generation_columns(race.generation.get(baseline), 1.0 if gate else None)}]
    for name, plan in zip(names, plans):
        with apply(plan):
            error = fidelity.error(model)
            agreement = gate.agreement(model) if gate else None
            weights = weight_mb(model)
        timing, estimate = race.timings[name], race.speedup(name, over=baseline)
        rows.append({"plan": name, "latency_ms": round(timing.median_ms, 3),
                     "speedup": round(estimate.median, 3), "interval": format_interval(estimate.low, estimate.high),
                     f"{metric}": error, "weight_mb": round(weights, 3), "peak_memory_mb": timing.peak_memory_mb,
                     **_generation_columns(race.generation.get(name), agreement)})
    return rows


def _generation_columns(stats: Any, agreement: float | None) -> dict[str, Any]:
    """A generating row's prefill ms, decode ms per token, tokens/s and token agreement."""
    if stats is None:
        return {}
    decode = stats.decode_ms_per_token
    return {"prefill_ms": round(stats.prefill_ms, 3), "decode_ms_per_token": None if decode is None else round(decode, 3),
            "tokens_per_s": round(stats.tokens_per_s, 1), "token_agreement": agreement}
