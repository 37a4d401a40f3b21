"""The search: an Optuna study that assigns a dtype to every choice of the search space,
minimising measured latency under an accuracy constraint.

Each trial applies its plan to the one model (no copies), measures the error against the cached
FP32 reference, and times the candidate interleaved with the FP32 model. The study is seeded
with the FP32 baseline, the all-low-precision plans and sensitivity-ordered plans, and is
stored (SQLite by default) so that rerunning the same command resumes it.

>>> result = optimize(model, batches, max_error=0.01, trials=40)    # doctest: +SKIP
>>> result.plan.save("plan.yaml")                                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import torch
from torch import nn

from precsearch import batches as _batches
from precsearch.accuracy import Fidelity
from precsearch.bench import time_interleaved
from precsearch.decisions import Decisions, decode, encode
from precsearch.errors import InputError
from precsearch.evaluate import Evaluator, Measurement, TrainingEvaluator
from precsearch.graph import LayerGraph, walk
from precsearch.ops import model_device_type
from precsearch.plan import Plan, model_fingerprint
from precsearch.precisions import FP32, NAMES, needs_loss_scaling
from precsearch.sensitivity import choice_error, unit_sensitivity
from precsearch.space import Choice, SearchSpace
from precsearch.storage import (
    COUNTED,
    HEARTBEAT_S,
    Surplus,
    budget_left,
    check_budget,
    claim_setup,
    mark_worker,
    open_storage,
    open_study,
    recover_dead_trials,
    wait_for_setup,
)

log = logging.getLogger(__name__)

MAX_CATEGORICAL = 48     # above this many choices, the study searches a ranked parametrisation
SLOW_DTYPE = 1.25        # an all-low plan this many times FP32's latency takes its dtype out of the search
FINALISTS, FINALIST_MARGIN = 4, 1.10  # plans re-timed together before the winner is chosen
_CAP = 1e9               # constraint value stored for non-finite errors


# -- the study --------------------------------------------------------------------------------------
@dataclasses.dataclass
class SearchResult:
    """What a search found: the fastest feasible plan, the Pareto set, and the study behind them."""

    plan: Plan | None
    pareto: list[Plan]
    study: optuna.Study
    graph: LayerGraph
    decisions: Decisions
    baseline_ms: float
    set_up_here: bool = False   # this process did the study's one-time setup

    @property
    def feasible(self) -> bool:
        return self.plan is not None

    def summary(self) -> list[dict[str, Any]]:
        """Rows for a table: FP32 baseline vs the chosen plan."""
        baseline = (self.plan.metrics or {}).get("baseline_latency_ms") if self.plan else None
        rows = [{"plan": "fp32 baseline", "latency_ms": baseline or self.baseline_ms, "speedup": "1.00x", "error": 0.0,
                 **{d: len(self.graph) if d == FP32 else 0 for d in NAMES}}]
        if self.plan is not None:
            metrics = self.plan.metrics or {}
            counts = self.plan.counts(self.graph.units)
            rows.append({"plan": "chosen", "latency_ms": metrics.get("latency_ms"),
                         "speedup": f"{metrics.get('speedup', math.nan):.2f}x", "error": metrics.get("error"),
                         **{d: counts.get(d, 0) for d in NAMES}})
        return rows


def optimize(model: nn.Module, batches: list[Any], *, space: str | SearchSpace = "default",
             fidelity: Fidelity | None = None, metric: str = "rel_l2", max_error: float = 0.01,
             mode: str = "inference", loss_fn: Callable | None = None,
             trials: int = 60, timeout: float | None = None, storage: str | None = None,
             study_name: str = "precsearch", seed: int = 0, model_name: str | None = None,
             progress: bool = True, repeats: int = 9, max_categorical: int = MAX_CATEGORICAL,
             drop_slow_dtypes: bool = True, heartbeat: float = HEARTBEAT_S, strategy: str = "optuna") -> SearchResult:
    """Search the fastest per-unit precision plan whose error stays within the limit.

    ``fidelity`` overrides ``metric``/``max_error`` (e.g. ``Fidelity.user(...)`` for a task
    metric). ``mode="training"`` times full training steps on ``(inputs, target)`` batches and
    bounds the gradients' rel_l2 against FP32 (``loss_fn(output, target)``, default cross
    entropy). ``trials`` is the study's total budget: a resumed study runs only what is left.
    ``drop_slow_dtypes`` leaves out a half precision whose all-low plan ran clearly slower than
    FP32 (FP16 on most CPUs).

    Several processes may call this with the same ``storage`` and ``study_name``: the first does
    the one-time setup (sensitivity, probes, seeds), all share the ``trials`` budget.

    ``strategy`` is ``"optuna"`` (seeded TPE), or a reference to compare against: ``"random"``,
    ``"global"``, ``"greedy"`` or ``"bisect"`` (see ``precsearch.strategies``); ``trials`` then
    caps their evaluations.
    """
    from precsearch.batches import split_training
    from precsearch.strategies import PROPOSERS, STRATEGIES
    from precsearch.training import default_loss, gradient_fidelity

    batches = _batches.as_list(batches)
    if strategy not in STRATEGIES:
        raise InputError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if mode not in ("inference", "training"):
        raise InputError(f"--mode {mode!r}: use inference or training")
    if not isinstance(trials, int) or trials < 1:
        raise InputError(f"--trials {trials!r}: must be a positive integer")
    if timeout is not None and not timeout > 0:
        raise InputError(f"--timeout {timeout!r}: must be a positive number of seconds")
    space = space if isinstance(space, SearchSpace) else SearchSpace.load(space)
    training = mode == "training"
    inputs = [split_training(b, f"--data batch {i}")[0] for i, b in enumerate(batches)] if training else batches
    device_type = model_device_type(model)
    sampler = (optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=10)
               if strategy == "optuna" else optuna.samplers.RandomSampler(seed=seed))
    study, created = open_study(study_name, open_storage(storage, heartbeat), sampler)
    if created:
        claim_setup(study)
    setup = created or wait_for_setup(study)
    # Training steps update BatchNorm statistics; the caller gets them back as they were.
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    try:
        model.eval()
        graph = walk(model, inputs[0], device=device_type)
        choices = space.choices(graph, device_type)
        units = graph.units
        if setup:
            low = sorted({d for c in choices for d in c.dtypes if d != FP32})
            study.set_user_attr("sensitivity", unit_sensitivity(model, units, inputs[0], low, device_type))
        if training:
            loss_fn = loss_fn or default_loss
            fidelity = fidelity or gradient_fidelity(model, batches, loss_fn, max_error)
            evaluator: Evaluator = TrainingEvaluator(model, batches, fidelity, device_type, repeats, loss_fn)
        else:
            fidelity = fidelity or Fidelity.builtin(model, batches, metric, max_error)
            evaluator = Evaluator(model, batches, fidelity, device_type, repeats)
        fingerprint = _study_fingerprint(model, space, fidelity, mode, strategy)
        if setup:
            _record_setup(study, graph, choices, evaluator, space, mode, model_name or type(model).__name__,
                          trials, seed, max_categorical, fingerprint, strategy)
        elif study.user_attrs.get("fingerprint") != fingerprint:
            raise InputError(f"--study {study.study_name!r} was made for another model, space, constraint or mode "
                             f"({_describe(study.user_attrs.get('settings', {}))}); give this search its own --study")
        probe = study.user_attrs["dtype_probe"]
        if drop_slow_dtypes:
            choices = _without_slow_dtypes(choices, probe, device_type)
        decisions = Decisions(choices, study.user_attrs["sensitivity"], {u: graph[u]["flops"] for u in units},
                              ranked=strategy == "optuna" and len(choices) > max_categorical, limit=fidelity.limit,
                              calibration={d: p["error_gain"] for d, p in probe.items() if p.get("error_gain")},
                              speed={d: p["relative_latency"] for d, p in probe.items()})
        if setup:
            _seed(study, decisions if strategy == "optuna" else None, evaluator)
        recover_dead_trials(study)
        proposer = PROPOSERS[strategy](decisions, fidelity.limit) if strategy in PROPOSERS else None
        _run_trials(study, decisions, evaluator, units, trials, timeout, progress, proposer)
        result = _result(model, study, graph, decisions, evaluator, space, model_name, storage, mode)
        result.set_up_here = setup
        if training and result.plan is not None and "training_diagnostics" not in study.user_attrs:
            from precsearch.training import diagnose

            study.set_user_attr("training_diagnostics",
                                diagnose(model, result.plan, batches, evaluator.loss_fn).to_dict())
        return result
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        model.train(was_training)


def _record_setup(study: optuna.Study, graph: LayerGraph, choices: list[Choice], evaluator: Evaluator,
                  space: SearchSpace, mode: str, model_name: str, trials: int, seed: int, max_categorical: int,
                  fingerprint: str, strategy: str) -> None:
    """Once per study, by the worker that set it up: what every worker and the report share."""
    device_type, fidelity = evaluator.device_type, evaluator.fidelity
    # What `precsearch report` needs to describe the run without the model.
    study.set_user_attr("units", [{k: row[k] for k in ("name", "type", "params", "flops")} for row in graph.rows()])
    study.set_user_attr("edges", [list(edge) for edge in graph.graph.edges])
    study.set_user_attr("settings", {
        "model": model_name, "space": space.name, "mode": mode, "constraint": fidelity.describe(),
        **_target(device_type), "trials": trials, "seed": seed, "strategy": strategy,
        "sampler": {"optuna": "TPESampler", "random": "RandomSampler"}.get(strategy, f"{strategy} (no sampler)"),
        "parametrisation": "ranked" if strategy == "optuna" and len(choices) > max_categorical else "categorical"})
    study.set_user_attr("fingerprint", fingerprint)
    study.set_user_attr("dtype_probe", _probe_dtypes(evaluator, choices, study.user_attrs["sensitivity"]))


def _seed(study: optuna.Study, decisions: Decisions | None, evaluator: Evaluator) -> None:
    """Enqueue the seed plans (TPE only) and time the FP32 baseline; then other workers may start."""
    for params in decisions.seeds() if decisions is not None else []:
        study.enqueue_trial(params, skip_if_exists=True)
    timing = time_interleaved({"fp32": evaluator.step(None)}, device_type=evaluator.device_type,
                              repeats=max(evaluator.repeats, 5))
    study.set_user_attr("baseline_ms", timing["fp32"].median_ms)
    study.set_user_attr("ready", True)


def _study_fingerprint(model: nn.Module, space: SearchSpace, fidelity: Fidelity, mode: str, strategy: str) -> str:
    import hashlib

    text = repr((model_fingerprint(model), space.dtypes, [(r.dtypes, r.name and r.name.pattern, r.types)
                                                          for r in space.rules],
                 [g.pattern for g in space.groups], fidelity.describe(), mode, strategy))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _describe(settings: dict[str, Any]) -> str:
    constraint = settings.get("constraint", {})
    return (f"model {settings.get('model', '?')}, space {settings.get('space', '?')}, "
            f"{constraint.get('metric', '?')} <= {constraint.get('limit', '?')}, mode {settings.get('mode', '?')}")


def _run_trials(study: optuna.Study, decisions: Decisions, evaluator: Evaluator, units: list[str],
                trials: int, timeout: float | None, progress: bool, proposer: Any = None) -> None:
    """Run trials until the budget is spent; with a ``proposer`` (a strategy's generator), its
    plans instead of the sampler's, until it has its answer."""
    baseline_ms = study.user_attrs["baseline_ms"]
    limit = evaluator.fidelity.limit
    seen: dict[str, Measurement] = {}
    proposed = [next(proposer)] if proposer is not None else []

    def objective(trial: optuna.Trial) -> float:
        mark_worker(trial)
        check_budget(study, trial, trials)
        layers = proposed[0] if proposer is not None else decisions.suggest(trial)
        code = encode(layers, units)
        measured = seen.get(code) or evaluator.measure(layers)
        seen[code] = measured
        if proposer is not None:
            try:
                proposed[0] = proposer.send(measured)
            except StopIteration:
                study.stop()
        trial.set_user_attr("plan", code)
        trial.set_user_attr("error", measured.error if math.isfinite(measured.error) else None)
        trial.set_user_attr("latency_ms", measured.latency_ms)
        trial.set_user_attr("baseline_ms", measured.baseline_ms)
        trial.set_user_attr("peak_memory_mb", measured.peak_memory_mb)
        if measured.failure:
            trial.set_user_attr("failure", measured.failure)
        trial.set_constraint("error", min(measured.error - limit, _CAP))
        if not math.isfinite(measured.latency_ms):
            return baseline_ms * 10  # failed candidates: clearly worse than anything that ran
        # Normalised to the study's baseline: drift of the machine between trials cancels.
        return baseline_ms * measured.latency_ms / measured.baseline_ms

    # The budget counts finished trials across all workers; one that failed (an interrupt, a
    # crash) is redone.
    remaining = budget_left(study, trials)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, timeout=timeout, show_progress_bar=progress, catch=(Surplus,),
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=COUNTED)], gc_after_trial=False)


def _probe_dtypes(evaluator: Evaluator, choices: list[Choice], sensitivity) -> dict[str, dict[str, float]]:
    """Per low dtype, the all-low plan measured once: its latency relative to FP32, and its
    error divided by the error sensitivity predicts (so sensitivity predicts the user's metric)."""
    probe = {}
    for dtype in sorted({d for c in choices for d in c.dtypes if d != FP32}):
        layers = {u: dtype for c in choices if dtype in c.dtypes for u in c.units}
        measured = evaluator.measure(layers, repeats=5, max_seconds=3.0)  # a slow dtype shows in 3 rounds
        if measured.failure:
            continue
        predicted = choice_error(sensitivity, tuple(layers), dtype, 0.0)
        probe[dtype] = {"relative_latency": measured.latency_ms / measured.baseline_ms,
                        "error_gain": measured.error / predicted
                        if math.isfinite(measured.error) and math.isfinite(predicted) and predicted > 0 else None}
    return probe


def _without_slow_dtypes(choices: list[Choice], probe: dict[str, dict[str, float]], device_type: str) -> list[Choice]:
    """Drop a half precision that made the whole model clearly slower than FP32 on this device
    (FP16 on most CPUs): trials spent on it cannot win. A choice keeps it if it has no other option."""
    slow = {d for d, p in probe.items() if p["relative_latency"] >= SLOW_DTYPE}
    for dtype in sorted(slow):
        warnings.warn(f"{dtype} left out of the search: the all-{dtype} plan ran "
                      f"{probe[dtype]['relative_latency']:.2f}x the FP32 latency on this {device_type}", stacklevel=3)
    return [dataclasses.replace(c, dtypes=tuple(d for d in c.dtypes if d not in slow) or c.dtypes) for c in choices]


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    return [t for t in complete if all(v <= 0 for v in t.constraints.values()) and t.user_attrs.get("plan")]


def pareto_front(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Feasible trials not dominated in (latency, error), one per distinct plan, fastest first."""
    unique: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in sorted(trials, key=lambda t: t.value):
        unique.setdefault(trial.user_attrs["plan"], trial)
    points = [(t.value, t.user_attrs["error"] or 0.0, t) for t in unique.values()]
    return [t for value, error, t in points
            if not any(v <= value and e <= error and (v < value or e < error) for v, e, _ in points)]


def _result(model, study, graph, decisions, evaluator, space, model_name, storage, mode):
    from precsearch.plan import LossScaling

    units, fidelity, baseline_ms = graph.units, evaluator.fidelity, study.user_attrs["baseline_ms"]
    front = pareto_front(feasible_trials(study))
    # Shared by every plan written: computed once, not once per Pareto plan.
    model_info = {"name": model_name or type(model).__name__, "fingerprint": model_fingerprint(model),
                  "units": len(units)}
    search_info = {"space": space.name, "trials": len(study.get_trials(deepcopy=False, states=COUNTED)),
                   "sampler": type(study.sampler).__name__, "study": study.study_name, "storage": storage}

    def plan_of(trial: optuna.trial.FrozenTrial, measured: Measurement | None = None) -> Plan:
        layers = decode(trial.user_attrs["plan"], units)
        latency = measured.baseline_ms / measured.speedup if measured else trial.value
        error = measured.error if measured else trial.user_attrs["error"]
        speedup = measured.speedup if measured else baseline_ms / trial.value
        return Plan.compact(
            layers, mode=mode,
            loss_scaling=LossScaling() if mode == "training" and needs_loss_scaling(layers.values()) else None,
            model=dict(model_info),
            target=_target(evaluator.device_type),
            constraint=fidelity.describe(),
            metrics={"latency_ms": round(latency, 4),
                     "baseline_latency_ms": round(measured.baseline_ms if measured else baseline_ms, 4),
                     "speedup": round(speedup, 3), "error": error,
                     "peak_memory_mb": measured.peak_memory_mb if measured else trial.user_attrs.get("peak_memory_mb"),
                     "trial": trial.number},
            search=dict(search_info))

    if not front:
        return SearchResult(None, [], study, graph, decisions, baseline_ms)
    # The best of many noisy trials flatters itself: the feasible plans within 10% of the fastest
    # race once more, interleaved and longer, and the race picks the winner.
    # The FP32 plan always races too: no plan slower than the model as it was is recommended.
    finalists: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in sorted(feasible_trials(study), key=lambda t: t.value):
        fp32 = set(trial.user_attrs["plan"]) == {"f"}
        if fp32 or (trial.value <= FINALIST_MARGIN * front[0].value and len(finalists) < FINALISTS):
            finalists.setdefault(trial.user_attrs["plan"], trial)
    try:
        raced = evaluator.race({code: decode(code, units) for code in finalists}, repeats=max(3 * evaluator.repeats, 15))
    except Exception as failure:  # keep the trials' own numbers
        log.warning("final race failed (%s); using the trials' measurements", failure)
        raced = {}
    if raced:
        code = min(raced, key=lambda c: raced[c][0] / raced[c][1])
        latency, base, memory = raced[code]
        best = finalists[code]
        plan = plan_of(best, Measurement(best.user_attrs["error"] or 0.0, latency, base, memory))
    else:
        best = front[0]
        plan = plan_of(best)
    others = [plan_of(t) for t in front if t.user_attrs["plan"] not in (best.user_attrs["plan"], "f" * len(units))]
    return SearchResult(plan, others, study, graph, decisions, baseline_ms)


def _target(device_type: str) -> dict[str, Any]:
    return {"device": device_type, "device_name": device_name(device_type), "torch": torch.__version__.split("+")[0]}


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
