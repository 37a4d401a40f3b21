"""The search: an Optuna study that assigns a dtype to every choice of the search space,
minimising measured latency under an accuracy constraint.

Each trial applies its plan to the one model (no copies), measures the error against the cached
FP32 reference, and times the candidate interleaved with the FP32 model. The default strategy's
first trials are greedy's answer and the model-based proposals (``strategies.Lead``), then the
FP32 baseline, the all-low-precision plans and sensitivity-ordered plans; the study is stored
(``SearchConfig.storage``; the CLI's default is SQLite in the output folder) so that rerunning
the same command resumes it.

>>> result = optimize(model, batches, SearchConfig(max_error=0.01, trials=40))   # doctest: +SKIP
>>> result.plan.save("plan.yaml")                                                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import torch
from torch import nn

from precsearch.runtime import batches as _batches
from precsearch.runtime.accuracy import Fidelity
from precsearch.search.bench import Speedup
from precsearch.search.config import SearchConfig
from precsearch.search.decisions import Decisions, decode, encode
from precsearch.search.evaluate import Evaluator, Measurement, TrainingEvaluator
from precsearch.search.graph import LayerGraph, walk
from precsearch.runtime.memory import MemoryBudget
from precsearch.runtime.ops import model_device_type
from precsearch.runtime.plan import Plan
from precsearch.runtime.precisions import FP32, NAMES
from precsearch.search.progress import Progress
from precsearch.search.trials import StudySetup, TrialRecord, load_diagnostics, mark_worker, save_diagnostics
from precsearch.search.bench import format_speedup
from precsearch.search.selection import choose, split_holdout
from precsearch.search.storage import (
    COUNTED,
    WORKER,
    Surplus,
    budget_left,
    check_budget,
    claim_setup,
    open_storage,
    open_study,
    recover_dead_trials,
    wait_for_setup,
)
from precsearch.search.strategies import Lead, lead_plan
from precsearch.search.study_setup import (
    check_same_search,
    decisions_for,
    find_ties,
    held_weights,
    set_up,
    study_fingerprint,
)

FAILED_OBJECTIVE = 10.0   # a candidate that could not run scores this many FP32 latencies
_CAP = 1e9                # constraint value stored for non-finite errors


@dataclasses.dataclass
class SearchResult:
    """What a search found: the fastest feasible plan, the Pareto set, and the study behind them."""

    plan: Plan | None
    pareto: list[Plan]
    study: optuna.Study
    graph: LayerGraph
    decisions: Decisions
    setup: StudySetup
    set_up_here: bool = False   # this process did the study's one-time setup

    def shortfall(self) -> str | None:
        """Why no plan was feasible when the memory budget is to blame, in one clause; None when
        there is no budget or no trial met the accuracy limit (the limit is then the problem)."""
        budget = MemoryBudget.of(self.setup.settings.constraint)
        records = [(record, trial.constraints.get("error", 1.0) <= 0)
                   for trial in self.study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
                   if (record := TrialRecord.of(trial, self.graph.units)) is not None]
        accurate = [record for record, within in records if within]
        if not budget or not accurate:
            return None
        limits = budget.limits()
        lightest = min(accurate, key=lambda r: [getattr(r, limit.measured) or math.inf for limit, _ in limits])
        within = sum(budget.allows(record) for record, _ in records)
        inaccurate = f", and the {within} within the budget {'was' if within == 1 else 'were'} over the accuracy limit"
        return (f"{len(accurate)} trial{'s' if len(accurate) > 1 else ''} met the accuracy limit, each over the "
                f"memory budget (the lightest: {'; '.join(budget.violations(lightest))})"
                f"{inaccurate if within else ''}; "
                f"raise {' or '.join(limit.flag for limit, _ in limits)} or loosen the accuracy limit")

    def summary(self) -> list[dict[str, Any]]:
        """Rows for a table: FP32 baseline vs the chosen plan."""
        rows = [{"plan": "fp32 baseline", "latency_ms": self.setup.baseline_ms, "speedup": "1.00x", "error": 0.0,
                 **{d: len(self.graph) if d == FP32 else 0 for d in NAMES}}]
        if self.plan is not None:
            metrics = self.plan.measured
            counts = self.plan.counts(self.graph.units)
            rows.append({"plan": "chosen", "latency_ms": metrics.latency_ms,
                         "speedup": format_speedup(metrics.speedup, metrics.speedup_low, metrics.speedup_high),
                         "error": metrics.error,
                         **{d: counts.get(d, 0) for d in NAMES}})
        return rows


def optimize(model: nn.Module, batches: list[Any], config: SearchConfig | None = None) -> SearchResult:
    """Search the fastest per-unit precision plan whose error stays within the limit.

    Several processes may call this with the same ``config.storage`` and ``config.study_name``:
    the first does the one-time setup (sensitivity, probes, seeds), all share the budget.
    """
    config = config or SearchConfig()
    batches, holdout = split_holdout(_batches.as_list(batches), config)  # the search never sees holdout
    inputs = ([_batches.split_training(b, f"--data batch {i}")[0] for i, b in enumerate(batches)]
              if config.training else batches)
    device_type = model_device_type(model)
    config.memory.check_device(device_type)
    storage = open_storage(config.storage, config.heartbeat)
    study, created = open_study(config.study_name, storage, config.strategy.sampler(config.seed))
    if created:
        claim_setup(study)
    must_set_up = created or wait_for_setup(study)
    with _restored(model):
        model.eval()
        try:
            graph = walk(model, inputs[0], device=device_type)
            config.space.choices(graph, device_type)  # a space that does not fit fails here
            evaluator = _evaluator(model, batches, device_type, config)
        except BaseException:
            if created and storage is not None:  # leave no half-made study behind: a rerun starts afresh
                optuna.delete_study(study_name=config.study_name, storage=storage)
            raise
        data = _batches.fingerprint(batches)
        fingerprint = study_fingerprint(model, config, config.constraint(evaluator.fidelity), data)
        if must_set_up:
            ties = find_ties(model, inputs[0], graph, config, device_type)
            choices = config.space.choices(graph, device_type, ties)
            setup, decisions = set_up(study, model, inputs[0], graph, choices, evaluator, config, fingerprint,
                                      ties, data)
        else:
            stored = StudySetup.load(study)
            assert stored is not None   # another worker set the study up (wait_for_setup)
            setup = stored
            check_same_search(study, setup, fingerprint, config, data)
            choices = config.space.choices(graph, device_type, setup.ties)
            decisions = decisions_for(setup, graph, choices, config, evaluator.fidelity.limit)
        recover_dead_trials(study)
        lead = Lead(decisions, graph.streamed_params(), evaluator.fidelity.limit,
                    graph.units, held_weights(graph, config)) if config.strategy.leads else None
        _run_trials(study, decisions, evaluator, graph.units, config, setup.baseline_ms, lead)
        fp32_allowed = all(FP32 in choice.dtypes for choice in choices)
        plan, pareto = choose(model, study, graph, evaluator, config, setup, fp32_allowed, holdout)
        if isinstance(evaluator, TrainingEvaluator) and plan is not None and load_diagnostics(study) is None:
            from precsearch.runtime.training import diagnose

            save_diagnostics(study, diagnose(model, plan, batches, evaluator.loss_fn))
        return SearchResult(plan, pareto, study, graph, decisions, setup, set_up_here=must_set_up)


def _evaluator(model: nn.Module, batches: list[Any], device_type: str, config: SearchConfig) -> Evaluator:
    if config.training:
        from precsearch.runtime.training import default_loss, gradient_fidelity

        loss_fn = config.loss_fn or default_loss
        fidelity = config.fidelity or gradient_fidelity(model, batches, loss_fn, config.max_error)
        return TrainingEvaluator(model, batches, fidelity, device_type, config.repeats, loss_fn)
    fidelity = config.fidelity or Fidelity.builtin(model, batches, config.metric, config.max_error)
    return Evaluator(model, batches, fidelity, device_type, config.repeats, config.runtime, config.min_token_agreement)


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Training steps update BatchNorm statistics; the caller gets them back as they were."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers:
                    buffer.copy_(buffers[name])
        model.train(was_training)


def _run_trials(study: optuna.Study, decisions: Decisions, evaluator: Evaluator, units: list[str],
                config: SearchConfig, baseline_ms: float, lead: Lead | None = None) -> None:
    """Run trials until the budget is spent; with a strategy's proposer, its plans instead of
    the sampler's, until it has its answer; with a ``lead``, the plans it enqueues (each trial
    records the model's prediction of its plan, made before measuring it)."""
    limit, budget = evaluator.fidelity.limit, config.memory
    seen: dict[str, Measurement] = {}
    best: list[Speedup] = []   # the fastest feasible speedup so far: slower candidates stop early
    proposer = config.strategy.proposer(decisions, limit) if config.strategy.proposer else None
    proposed = [next(proposer)] if proposer is not None else []

    def objective(trial: optuna.Trial) -> float:
        mark_worker(trial, WORKER)
        check_budget(study, trial, config.trials)
        layers = proposed[0] if proposer is not None else decisions.suggest(trial)
        if lead is not None:
            layers = lead_plan(trial, units) or layers
            lead.predict(lead.calibrated(study), layers).save(trial)
        code = encode(layers, units)
        measured = seen.get(code) or evaluator.measure(layers, incumbent=best[0] if best else None)
        seen[code] = measured
        feasible = measured.error <= limit and budget.allows(measured)
        if feasible and measured.interval and (not best or measured.speedup > best[0].median):
            best[:] = [measured.interval]
        if proposer is not None:
            try:
                proposed[0] = proposer.send(measured)
            except StopIteration:
                study.stop()
        TrialRecord(decode(code, units), measured.error if math.isfinite(measured.error) else None,
                    measured.latency_ms, measured.baseline_ms, measured.peak_memory_mb, measured.failure,
                    measured.weight_mb,
                    measured.speedup_low, measured.speedup_high,
                    **(measured.generation.record() if measured.generation else {})).save(trial)
        trial.set_constraint("error", min(measured.error - limit, _CAP))
        for name, value in budget.constraints(measured).items():  # over the memory budget: infeasible too
            trial.set_constraint(name, value)
        if lead is not None:
            lead.after_trial(study)
        if not math.isfinite(measured.latency_ms):
            return baseline_ms * FAILED_OBJECTIVE
        # Normalised to the study's baseline: drift of the machine between trials cancels.
        return baseline_ms * measured.latency_ms / measured.baseline_ms

    # The budget counts finished trials across all workers; one that failed (an interrupt, a
    # crash) is redone.
    remaining = budget_left(study, config.trials)
    if not decisions.low:
        # Every low precision was left out as slower than FP32 (or the space allows none): one
        # trial of the FP32 plan is the whole answer; the rest of the budget would repeat it.
        warnings.warn("no low precision is left to search on this device: one trial, the FP32 plan", stacklevel=3)
        remaining = min(remaining, 1 - len(study.get_trials(deepcopy=False, states=COUNTED)))
    if remaining > 0:
        callbacks: list[Any] = [optuna.study.MaxTrialsCallback(config.trials, states=COUNTED)]
        progress = (Progress(config.trials, config.trials - remaining, limit, units) if config.progress
                    else None)
        callbacks += [progress] if progress else []
        try:
            with _expected_failures_quiet():
                study.optimize(objective, n_trials=remaining, timeout=config.timeout, catch=(Surplus,),
                               callbacks=callbacks, gc_after_trial=False)
        finally:
            if progress:
                progress.close()


class _ExpectedFailures(logging.Filter):
    """Drops Optuna's traceback warnings for trials that end as planned: an interrupt (Ctrl-C,
    reported in one line by the CLI) or a trial past the global budget."""

    def __init__(self) -> None:
        super().__init__()
        self.trials: set[str | None] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        number = message.split(" ", 2)[1] if message.startswith("Trial ") else None
        if record.exc_info and isinstance(record.exc_info[1], (Surplus, KeyboardInterrupt)):
            self.trials.add(number)
            return False
        return not (number in self.trials and "failed with value" in message)


@contextmanager
def _expected_failures_quiet() -> Iterator[None]:
    logger = logging.getLogger("optuna.study._optimize")
    quiet = _ExpectedFailures()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
