"""Choosing the result of a search: the feasible Pareto front of the trials, a final interleaved
race among the close finalists (the FP32 plan always runs in it; with ``compile``, compiled and
held to the limit compiled), the plans written with the provenance that makes them
reproducible, and their scores on held-out batches the search never saw."""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from torch import nn

from precsearch.runtime.accuracy import Fidelity
from precsearch.search.bench import Speedup, clearly_faster, rank_correlation
from precsearch.search.config import SearchConfig
from precsearch.search.decisions import decode, encode
from precsearch.runtime.errors import described
from precsearch.search.evaluate import Evaluator, Measurement, Raced
from precsearch.search.graph import LayerGraph
from precsearch.runtime.memory import MemoryBudget, MemoryUse
from precsearch.runtime.plan import LossScaling, Plan, model_fingerprint
from precsearch.runtime.plan_sections import PlanMetrics
from precsearch.search.trials import StudySetup, TrialRecord, lead_of, pareto_front
from precsearch.search.storage import COUNTED

FINALISTS, FINALIST_MARGIN = 4, 1.10   # plans within 10% of the fastest re-timed together
# Compiled, the eager order of plans is only a rough guide (compiling a plan costs ~10 s on a
# 6-layer BERT, several eager trials): more of the eager front races in the deployed form.
COMPILED_FINALISTS, COMPILED_FINALIST_MARGIN = 6, 1.25
RACE_REPEATS = 15                       # at least this many rounds in the final race


@dataclasses.dataclass(frozen=True)
class FeasiblePlan:
    """A feasible trial's plan and measurement; ``relative`` is its latency / FP32 latency."""

    trial: int
    record: TrialRecord
    lead: str | None = None   # the baseline that enqueued it (``records.lead_of``): greedy, proposal

    @property
    def relative(self) -> float:
        return self.record.latency_ms / self.record.baseline_ms

    @property
    def error(self) -> float:
        return self.record.error or 0.0


def feasible_plans(study: optuna.Study, units: list[str]) -> list[FeasiblePlan]:
    """One per distinct plan (its fastest trial) among completed trials within the constraint
    (``units``: the study's, in execution order)."""
    found: dict[str, FeasiblePlan] = {}
    for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE]):
        record = TrialRecord.of(trial, units)
        if record is None or any(v > 0 for v in trial.constraints.values()) or record.speedup is None:
            continue
        marks = lead_of(trial)
        candidate = FeasiblePlan(trial.number, record, marks[0] if marks else None)
        if record.code not in found or candidate.relative < found[record.code].relative:
            found[record.code] = candidate
    return list(found.values())


def front(candidates: list[FeasiblePlan]) -> list[FeasiblePlan]:
    return pareto_front(candidates, key=lambda c: (c.relative, c.error))


def finalists(candidates: list[FeasiblePlan], headroom: float, compiled: bool = False) -> list[FeasiblePlan]:
    """The close finalists, fastest first: candidates whose search error is within ``headroom``
    (the limit less the margin) and whose latency is within ``FINALIST_MARGIN`` of the fastest
    (``COMPILED_FINALIST_MARGIN``, more of them, when they race compiled)."""
    count, margin = (COMPILED_FINALISTS, COMPILED_FINALIST_MARGIN) if compiled else (FINALISTS, FINALIST_MARGIN)
    eligible = sorted((c for c in candidates if c.error <= headroom), key=lambda c: c.relative)
    return [c for c in eligible if c.relative <= margin * eligible[0].relative][:count]


def best_leads(candidates: list[FeasiblePlan], headroom: float) -> list[FeasiblePlan]:
    """The fastest eligible plan of each baseline the search started from (greedy's answer, the
    model's proposal): they always race, so the chosen plan is never one the race shows slower."""
    best: dict[str | None, FeasiblePlan] = {}
    for candidate in sorted((c for c in candidates if c.error <= headroom and c.lead), key=lambda c: c.relative):
        best.setdefault(candidate.lead, candidate)
    return list(best.values())


def split_holdout(batches: list[Any], config: SearchConfig) -> tuple[list[Any], list[Any]]:
    """``(search batches, held-out batches)``: ``config.holdout_data``, or a seeded choice of
    ``config.holdout_count`` of ``batches``, each part kept in its order."""
    if config.holdout_data is not None:
        return batches, list(config.holdout_data)
    held = set(random.Random(config.seed).sample(range(len(batches)), config.holdout_count(len(batches))))
    return ([b for i, b in enumerate(batches) if i not in held], [b for i, b in enumerate(batches) if i in held])


def choose(model: nn.Module, study: optuna.Study, graph: LayerGraph, evaluator: Evaluator, config: SearchConfig,
           setup: StudySetup, fp32_allowed: bool = True, holdout: list[Any] | None = None
           ) -> tuple[Plan | None, list[Plan]]:
    """The plan to recommend and the other Pareto-optimal feasible plans (FP32 left out).

    The best of many noisy trials flatters itself: the close finalists race once more,
    interleaved, until the leader is clearly faster than the rest or the race's rounds are spent.
    Plans the race cannot tell apart are tied; the tie goes to the one with more accuracy
    headroom (lower error), then fewer cast boundaries. The FP32 plan races whenever the space
    allows it, and a plan whose interval says it is slower than FP32 is never recommended. The
    fastest plan of each baseline the default strategy started from (greedy's answer, the model's
    proposal) races too, so the chosen plan is never one the race shows clearly slower.
    ``fp32_allowed``: the search space lets every unit run in FP32.

    Finalists are plans whose search error is within ``limit * (1 - config.margin)``. With
    ``config.compile`` they race compiled, and a finalist whose compiled error is over the limit
    is dropped; a compiled race that fails is one warning, and the plans are then measured and
    written eager (``runtime.compile: false``). ``holdout`` batches score the written plans.
    """
    units = graph.units
    candidates = feasible_plans(study, units)
    headroom = evaluator.fidelity.limit * (1 - config.margin)
    close = finalists(candidates, headroom, config.compile)
    if not close:
        return None, []
    pareto = front(candidates)
    fp32_code = encode({}, units)
    budget = config.memory   # the candidates are within it; the FP32 plan races only when it is too
    fp32_races = fp32_allowed and (budget.max_weight_mb is None or (
        setup.weight_mb is not None and setup.weight_mb <= budget.max_weight_mb))
    codes = list(dict.fromkeys([c.record.code for c in close + best_leads(candidates, headroom)]
                               + ([fp32_code] if fp32_races else [])))
    repeats = max(3 * evaluator.repeats, RACE_REPEATS)
    race = final_race(evaluator, {code: decode(code, units) for code in codes}, repeats, config.compile)
    by_code = {c.record.code: c for c in candidates}
    race = _within_budget(race, budget, by_code, setup.weight_mb)
    write = _PlanWriter(model, study, units, evaluator, config, setup)
    if race.over_budget and not race.estimates:
        warnings.warn(f"no finalist holds {budget.text()} in the final race ({race.over_budget[0]}): no plan "
                      f"is recommended; loosen the budget", stacklevel=3)
        return None, []
    if race.over_limit and not race.estimates:
        warnings.warn(f"no finalist holds {evaluator.fidelity.name} <= {evaluator.fidelity.limit:g} compiled "
                      f"(lowest compiled error {min(race.over_limit.values()):.4g}): no plan is recommended for "
                      f"--compile; search without --compile for eager plans", stacklevel=3)
        return None, []
    if race.estimates:
        error = {code: by_code[code].error if code in by_code else 0.0 for code in race.estimates}
        code, ties = race_winner({code: raced.speedup for code, raced in race.estimates.items()}, error,
                                 lambda code: graph.cast_boundaries(decode(code, units)), fp32_code,
                                 {code: raced.samples_ms for code, raced in race.estimates.items()})
        estimate, base, memory = (race.estimates[code].speedup, race.estimates[code].baseline_ms,
                                  race.estimates[code].peak_memory_mb)
        chosen = by_code.get(code)
        weight_mb = chosen.record.weight_mb if chosen else setup.weight_mb
        plan = write(code, Measurement.timed(error[code], estimate, base, peak_memory_mb=memory, weight_mb=weight_mb,
                                             generation=_raced_generation(evaluator, code, chosen)),
                     chosen.trial if chosen else None, {**race.extra.get(code, {}), "race_ties": len(ties) - 1,
                                                        **_eager_vs_compiled(race, by_code, fp32_code)},
                     compiled=race.compiled)
    else:
        chosen = close[0]
        code = chosen.record.code
        plan = write(code, _measurement(chosen.record), chosen.trial)
    others = [(c.record.code, write(c.record.code, _measurement(c.record), c.trial))
              for c in pareto if c.record.code not in (code, fp32_code, *race.over_limit)]
    if holdout:
        score = _holdout_scorer(model, holdout, evaluator, units)
        return score(code, plan), [score(other_code, other) for other_code, other in others]
    return plan, [other for _, other in others]


@dataclasses.dataclass(frozen=True)
class Race:
    """The final race: each raced plan's ``(speedup over FP32, FP32 median ms, peak memory MB)``,
    what the compiled race adds per plan (compiled error, compile time, speedup against compiled
    FP32), the finalists dropped for their compiled error, and whether the race ran compiled."""

    estimates: dict[str, Raced]
    extra: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    over_limit: dict[str, float] = dataclasses.field(default_factory=dict)
    compiled: bool = False
    over_budget: list[str] = dataclasses.field(default_factory=list)   # why raced plans were dropped


def final_race(evaluator: Evaluator, plans: dict[str, dict[str, str]], repeats: int, compile: bool) -> Race:
    """The finalists raced compiled (``compile``) or eager. A compiled race that fails is one
    warning and the race runs eager; an eager race that fails leaves the trials' numbers."""
    if compile:
        try:
            return _race_compiled(evaluator, plans, repeats)
        except Exception as failure:
            warnings.warn(f"the compiled final race failed ({described(failure)}); the plans are measured "
                          f"eager and say runtime.compile: false", stacklevel=3)
    try:
        return Race(evaluator.race(plans, repeats=repeats))
    except Exception as failure:  # keep the trials' own numbers
        warnings.warn(f"the final race failed ({described(failure)}); using the trials' measurements",
                      stacklevel=3)
        return Race({})


def _within_budget(race: Race, budget: MemoryBudget, by_code: dict[str, FeasiblePlan],
                   fp32_weight_mb: float | None) -> Race:
    """The race without the plans its own measurement puts over the memory budget (the peak
    memory it measured on CUDA; the weights the plan's trial measured, FP32's for the FP32 plan)."""
    if not budget or not race.estimates:
        return race
    kept: dict[str, Raced] = {}
    dropped: list[str] = []
    for code, estimate in race.estimates.items():
        record = by_code[code].record if code in by_code else None
        peak = estimate.peak_memory_mb
        measured = MemoryUse(record.weight_mb if record else fp32_weight_mb,
                            peak if peak is not None else record.peak_memory_mb if record else None)
        if budget.allows(measured):
            kept[code] = estimate
        else:
            dropped.extend(f"{code}: {reason}" for reason in budget.violations(measured))
    return dataclasses.replace(race, estimates=kept, over_budget=dropped)


def _holdout_scorer(model: nn.Module, holdout: list[Any], evaluator: Evaluator, units: list[str]
                    ) -> Callable[[str, Plan], Plan]:
    """Scores plans on the held-out batches, eager, with the search's metric against their own
    FP32 reference (computed once, now): each plan gains ``metrics.holdout_error``."""
    fidelity = Fidelity.builtin(model, holdout, evaluator.fidelity.name, evaluator.fidelity.limit)

    def score(code: str, plan: Plan) -> Plan:
        with evaluator.apply(decode(code, units)):
            error = fidelity.error(evaluator.model)
        metrics = plan.measured.with_values(holdout_error=error, holdout_batches=len(holdout))
        return dataclasses.replace(plan, metrics=metrics)
    return score


def race_winner(estimates: dict[str, Speedup], error: dict[str, float], boundaries: Callable[[str], int],
                fp32: str, samples: dict[str, tuple[float, ...]] | None = None) -> tuple[str, list[str]]:
    """The race's winner and the plans tied with the leader (the winner among them).

    A plan clearly slower than FP32 (its whole interval below 1) cannot win while the FP32 plan
    races. The leader is the best median; every plan it is not clearly faster than is tied with
    it, and ties go to the lower error, then fewer cast boundaries, then the median. With the
    plans' per-round ``samples``, "clearly faster" compares two plans round by round
    (``bench.clearly_faster``), else by their intervals against FP32.
    """
    def faster(a: str, b: str) -> bool:
        if samples and samples.get(a) and samples.get(b):
            return clearly_faster(samples[a], samples[b])
        return contenders[a].clearly_faster_than(contenders[b])

    contenders = {code: e for code, e in estimates.items() if e.high >= 1.0 or code == fp32}
    if fp32 not in estimates and not contenders:  # the space forbids the FP32 plan: the best there is
        contenders = dict(estimates)
    leader = max(contenders, key=lambda code: contenders[code].median)
    tied = [code for code in contenders if code == leader or not faster(leader, code)]
    winner = min(tied, key=lambda code: (error[code], boundaries(code), -contenders[code].median))
    return winner, tied


def _race_compiled(evaluator: Evaluator, plans: dict[str, dict[str, str]], repeats: int) -> Race:
    """The race with every plan compiled, each first checked against the limit compiled (over
    all search batches, against the FP32 reference). Speedups are against eager FP32, the basis
    of every plan; a compiled plan also records its compiled error, its speedup against compiled
    FP32 and its compile time."""
    from precsearch.search.compiled import time_compiled

    times = time_compiled(evaluator.model, evaluator.batches[0],
                          {code: evaluator.plan(layers) for code, layers in plans.items()},
                          evaluator.device_type, repeats, fidelity=evaluator.fidelity)
    raced = [code for code in plans if code in times.compile_s]
    evaluator.generation = {code: times.generation[code] for code in raced if code in times.generation}
    # No peak memory from the compiled race: every plan's compiled copy of the model is resident in it.
    estimates = {code: dataclasses.replace(Raced.of(times.race, code), peak_memory_mb=None) for code in raced}
    extra = {code: {"compiled_error": times.errors[code],
                    "speedup_vs_compiled_fp32": round(times.race.speedup(code, over="fp32 compiled").median, 3),
                    "compile_s": round(times.compile_s[code], 2)} for code in raced}
    over = {code: error for code, error in times.errors.items() if code not in times.compile_s}
    for code, error in over.items():
        warnings.warn(f"finalist {code} dropped: compiled, its {evaluator.fidelity.name} is {error:.4g}, over the "
                      f"limit {evaluator.fidelity.limit:g}", stacklevel=4)
    return Race(estimates, extra, over, compiled=True)


def _eager_vs_compiled(race: Race, by_code: dict[str, FeasiblePlan], fp32: str) -> dict[str, Any]:
    """How well the eager trials ranked the plans that raced compiled: the Spearman rank
    correlation of their eager and compiled speedups (``compiled_rank_agreement``; 1: the same
    order), over ``compiled_raced`` plans. Nothing for an eager race or fewer than three plans."""
    eager = {code: 1.0 if code == fp32 else by_code[code].record.speedup or math.nan   # None ranks as NaN
             for code in race.estimates if code == fp32 or code in by_code}
    if not race.compiled or len(eager) < 3:
        return {}
    compiled = {code: race.estimates[code].speedup.median for code in eager}
    agreement = rank_correlation([eager[c] for c in eager], [compiled[c] for c in eager])
    return {"compiled_raced": len(eager), "compiled_rank_agreement": None if agreement is None else round(agreement, 3)}


def _measurement(record: TrialRecord) -> Measurement:
    return Measurement(record.error or 0.0, record.latency_ms, record.baseline_ms, record.peak_memory_mb,
                       weight_mb=record.weight_mb, speedup_low=record.speedup_low, speedup_high=record.speedup_high,
                       generation=record.generation)


def _raced_generation(evaluator: Evaluator, code: str, chosen: FeasiblePlan | None) -> Any:
    """A generating plan's prefill and decode times in the final race, with its trial's token
    agreement (the FP32 plan's is 1); None when the plans do not generate."""
    raced = evaluator.generation.get(code) or (chosen.record.generation if chosen else None)
    agreement = chosen.record.token_agreement if chosen else 1.0
    return dataclasses.replace(raced, token_agreement=agreement) if raced is not None else None


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class _PlanWriter:
    """Builds result plans; what they share (model, target, search) is computed once."""

    def __init__(self, model: nn.Module, study: optuna.Study, units: list[str], evaluator: Evaluator,
                 config: SearchConfig, setup: StudySetup) -> None:
        from precsearch.search.study_setup import target

        self.units, self.config, self.setup = units, config, setup
        self.constraint = config.constraint(evaluator.fidelity)
        reference = evaluator.fidelity.reference_value   # the FP32 model's accuracy, perplexity...
        self.fp32_metric = {} if reference is None else {"fp32_metric": round(reference, 6)}
        self.model = {"name": config.model_name or type(model).__name__, "fingerprint": model_fingerprint(model),
                      "units": len(units)}
        self.target = target(evaluator.device_type)
        self.runtime = evaluator.runtime
        self.search = {"space": config.space.name, "trials": len(study.get_trials(deepcopy=False, states=COUNTED)),
                       "sampler": type(study.sampler).__name__, "study": study.study_name, "storage": config.storage,
                       **({"margin": config.margin} if config.margin else {})}

    def __call__(self, code: str, measured: Measurement, trial: int | None,
                 extra: dict[str, Any] | None = None, compiled: bool = False) -> Plan:
        """The plan ``code`` with its measurement; ``compiled``: measured compiled (else eager,
        and the plan says ``runtime.compile: false``)."""
        layers = decode(code, self.units)
        plan = Plan.compact(layers)
        baseline = self.setup.baseline_ms
        # One latency basis for every plan: the study's FP32 baseline divided by the speedup
        # measured against the FP32 model interleaved in the same run.
        metrics = PlanMetrics.from_dict({
            "latency_ms": round(baseline / measured.speedup, 4), "baseline_latency_ms": round(baseline, 4),
            "speedup": round(measured.speedup, 3), "speedup_low": _round(measured.speedup_low),
            "speedup_high": _round(measured.speedup_high), "error": measured.error,
            "peak_memory_mb": measured.peak_memory_mb, "weight_mb": _mb(measured.weight_mb),
            "baseline_weight_mb": _mb(self.setup.weight_mb), "trial": trial, **self.fp32_metric,
            **(measured.generation.plan_metrics(baseline / measured.speedup, baseline) if measured.generation else {}),
            **(extra or {})})
        return dataclasses.replace(
            plan, mode=self.config.mode, runtime=dataclasses.replace(self.runtime, compile=compiled),
            loss_scaling=LossScaling() if self.config.training and plan.needs_loss_scaling else None,
            model=dict(self.model), target=dict(self.target), constraint=self.constraint,
            ties=dict(self.setup.ties), metrics=metrics, search=dict(self.search))
