"""The one-time setup of a study, done by the worker that creates it: sensitivity, the dtype
probe, the FP32 baseline and the first plans (the default strategy's lead, or the seed plans). The other workers wait for it and check that they
search the same thing (the study fingerprint)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from typing import Any

import optuna
import torch
from torch import nn

from precsearch.runtime import batches as _batches
from precsearch.search.bench import format_speedup, time_against_itself
from precsearch.search.config import SearchConfig
from precsearch.search.decisions import Decisions
from precsearch.runtime.errors import InputError
from precsearch.search.evaluate import Evaluator
from precsearch.search.graph import LayerGraph
from precsearch.runtime.memory import MemoryBudget
from precsearch.runtime.plan import Plan, Runtime, model_fingerprint
from precsearch.runtime.plan_sections import Constraint
from precsearch.runtime.precisions import FP32, PRECISIONS
from precsearch.search.trials import DtypeProbe, Settings, StudySetup
from precsearch.runtime.apply import apply_plan
from precsearch.search.sensitivity import END_TO_END_BUDGET, choice_error, unit_sensitivity
from precsearch.search.space import Choice, usable_dtypes
from precsearch.search.strategies import Lead
from precsearch.runtime.weights import weight_mb

PROBE_SECONDS = 3.0      # a clearly slow dtype shows within a few rounds
PROBE_ROUNDS = 10        # five pairs of rounds (each pair: both orders)
NOISE_ROUNDS = 16        # FP32 timed against itself (an A/A measurement), to know how noisy this machine is
NOISY = 0.10             # above this half-width (relative) at the cap, plans cannot be ranked


def study_fingerprint(model: nn.Module, config: SearchConfig, constraint: Constraint, data: str) -> str:
    """What workers of one study must agree on: model, space, constraint, mode, strategy, how
    candidates run (``--weights``, ``--workload``) and the data (``batches.fingerprint``)."""
    space = config.space
    text = repr((model_fingerprint(model), space.dtypes,
                 [(r.dtypes, r.name and r.name.pattern, r.types) for r in space.rules],
                 [g.pattern for g in space.groups], constraint.to_dict(), config.mode, config.strategy.name,
                 config.weights, data, *([config.run.plan_fields()] if config.run.generates else [])))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def check_same_search(study: optuna.Study, setup: StudySetup, fingerprint: str, config: SearchConfig,
                      data: str) -> None:
    """Refuse to add trials to a study made for another search, naming what differs where it can."""
    name = study.study_name
    if setup.settings.weights not in (None, config.weights):
        raise InputError(f"--study {name!r} was measured with --weights {setup.settings.weights}, not "
                         f"--weights {config.weights}: their trials cannot be ranked together; give this search "
                         f"its own --study, or the study's --weights")
    stored = MemoryBudget.of(setup.settings.constraint)
    if stored != config.memory:
        def given(budget: MemoryBudget) -> str:
            return f"with {budget.flags()}" if budget else "without a memory budget"

        raise InputError(f"--study {name!r} was searched {given(stored)}, this search is {given(config.memory)}: "
                         f"its trials' feasibility was decided under its budget; give this search its own --study, "
                         f"or the study's budget")
    if setup.data not in (None, data):
        raise InputError(f"--study {name!r} was made on other --data (the batches' shapes, dtypes or values differ): "
                         f"their errors cannot be compared; give this search its own --study, or the study's --data")
    if setup.fingerprint != fingerprint:
        raise InputError(f"--study {name!r} was made for another model, space, constraint or mode "
                         f"({setup.settings.describe()}); give this search its own --study")


def find_ties(model: nn.Module, example_inputs: Any, graph: LayerGraph, config: SearchConfig,
              device_type: str) -> dict[str, str]:
    """Units that must share the precision of another: units holding one weight (``graph.weight_ties``:
    a tied embedding and head, held as one tensor), and units the model fails with when one alone
    runs in FP32 inside a low one (e.g. DeBERTa's attention fills a mask with
    ``finfo(query.dtype).min``, which overflows its BF16 scores when the query is FP32).

    One forward pass per unit not tied by its weights, for models within ``END_TO_END_BUDGET``
    units; larger models are not probed (their failing candidates are still recorded infeasible,
    with the reason)."""
    units = graph.units
    ties = dict(graph.weight_ties)
    low = sorted((PRECISIONS[d] for d in usable_dtypes(config.space.dtypes, device_type) if PRECISIONS[d].low),
                 key=lambda p: p.preference)
    if not low or len(units) > END_TO_END_BUDGET:
        return ties
    modules = list(model.named_modules())
    for unit in units:
        outer = next((u for u in _ancestors(unit) if u in graph), None)
        if outer is None or unit in ties:
            continue
        plan = Plan(default=low[0].name, layers={unit: FP32}, runtime=Runtime(weights="fp32"))
        try:
            with apply_plan(model, plan, device_type=device_type, modules=modules), torch.no_grad():
                _batches.call(model, example_inputs)
        except Exception:  # the model cannot run with this unit apart from the one around it
            ties[unit] = outer
    return ties


def _ancestors(unit: str) -> list[str]:
    """``a.b.c`` -> ``["a.b", "a", ""]``."""
    parts = unit.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)] if unit else []


def set_up(study: optuna.Study, model: nn.Module, example_inputs: Any, graph: LayerGraph, choices: list[Choice],
           evaluator: Evaluator, config: SearchConfig, fingerprint: str, ties: dict[str, str],
           data: str) -> tuple[StudySetup, Decisions]:
    """Measure what every worker shares, enqueue the seed plans, and store it all (then the study
    is ready for the other workers). Returns the setup and the search's decisions it calibrates."""
    low = sorted({d for c in choices for d in c.dtypes if d != FP32})
    sensitivity = unit_sensitivity(model, graph.units, example_inputs, low, evaluator.device_type)
    fp32_against_itself, baseline_ms = time_against_itself(evaluator.step(None), device_type=evaluator.device_type,
                                                           repeats=NOISE_ROUNDS, seed=config.seed)
    noise = fp32_against_itself.half_width
    if noise > NOISY:
        warnings.warn(f"this machine is too noisy to rank plans: FP32 timed against itself is known only to "
                      f"+-{noise:.0%} after {NOISE_ROUNDS} rounds; stop background work, give more or larger "
                      f"batches, or expect ties", stacklevel=3)
    strategy = config.strategy
    ranked = strategy.seeded and len(choices) > config.max_categorical
    setup = StudySetup(
        settings=Settings(model=config.model_name or type(model).__name__, space=config.space.name,
                          mode=config.mode, constraint=config.constraint(evaluator.fidelity),
                          **target(evaluator.device_type), trials=config.trials, seed=config.seed,
                          strategy=strategy.name, sampler=strategy.sampler_name,
                          parametrisation="ranked" if ranked else "categorical", weights=config.weights),
        fingerprint=fingerprint,
        units=[{k: row[k] for k in ("name", "type", "params", "flops")} for row in graph.rows()],
        edges=[list(edge) for edge in graph.graph.edges],
        sensitivity=sensitivity,
        dtype_probe=probe_dtypes(evaluator, choices, sensitivity),
        baseline_ms=baseline_ms,
        noise=noise,
        ties=ties,
        data=data,
        weight_mb=weight_mb(model),
    )
    decisions = decisions_for(setup, graph, choices, config, evaluator.fidelity.limit)
    if strategy.leads:  # greedy's predicted answer first; the rest follows the measurements
        Lead(decisions, graph.streamed_params(), evaluator.fidelity.limit,
             graph.units, held_weights(graph, config)).after_trial(study)
    elif strategy.seeded:
        for params in decisions.seeds():
            study.enqueue_trial(params, skip_if_exists=True)
    setup.save(study)
    return setup, decisions


def held_weights(graph: LayerGraph, config: SearchConfig) -> dict[str, int] | None:
    """Under a weight budget, the parameters each unit holds (the lead's greedy weighs by them)."""
    return {u: graph[u]["params"] for u in graph.units} if config.memory.max_weight_mb is not None else None


def decisions_for(setup: StudySetup, graph: LayerGraph, choices: list[Choice], config: SearchConfig,
                  limit: float) -> Decisions:
    """The search's decisions, calibrated by the setup's probe (slow dtypes left out if asked,
    with a warning)."""
    probe = setup.dtype_probe
    if config.drop_slow_dtypes:
        choices = without_slow_dtypes(choices, probe, graph.device_type,
                                      keep_one=config.memory.max_weight_mb is not None)
    return Decisions(choices, setup.sensitivity, {u: graph[u]["flops"] for u in graph.units},
                     ranked=config.strategy.seeded and len(choices) > config.max_categorical, limit=limit,
                     calibration={d: p.error_gain for d, p in probe.items() if p.error_gain},
                     speed={d: p.relative_latency for d, p in probe.items()})


def probe_dtypes(evaluator: Evaluator, choices: list[Choice], sensitivity) -> dict[str, DtypeProbe]:
    """Per low dtype, its plan (``probe_layers``) measured once: its latency relative to FP32,
    and its error divided by the error sensitivity predicts (so sensitivity predicts the
    user's metric).

    The probe asks how fast a precision is, not whether it is accurate: a plan whose outputs
    overflow is still timed (its speed is what drops a slow precision), and only a plan that
    could not run at all leaves its precision unprobed."""
    probe: dict[str, DtypeProbe] = {}
    for dtype in sorted({d for c in choices for d in c.dtypes if d != FP32}):
        layers = probe_layers(choices, sensitivity, dtype)
        measured = evaluator.measure(layers, repeats=PROBE_ROUNDS, max_seconds=PROBE_SECONDS)
        if not math.isfinite(measured.latency_ms):
            continue
        predicted = choice_error(sensitivity, tuple(u for u, d in layers.items() if d == dtype), dtype, 0.0)
        probe[dtype] = DtypeProbe(relative_latency=measured.latency_ms / measured.baseline_ms,
                                  speedup_low=measured.speedup_low, speedup_high=measured.speedup_high,
                                  error_gain=measured.error / predicted
                                  if math.isfinite(measured.error) and math.isfinite(predicted) and predicted > 0
                                  else None)
    return probe


def probe_layers(choices: list[Choice], sensitivity: dict[str, dict[str, float | None]], dtype: str) -> dict[str, str]:
    """Every unit: ``dtype`` where its choice allows it, else FP32. A choice with a unit that
    alone already makes the outputs non-finite in ``dtype`` (an FP16 overflow) stays FP32 too,
    unless that leaves nothing in ``dtype``, so that the probe's error can calibrate the
    sensitivity."""
    def overflows(choice: Choice) -> bool:
        errors = (sensitivity.get(unit, {}).get(dtype) for unit in choice.units)
        return any(error is not None and not math.isfinite(error) for error in errors)

    allowed = [c for c in choices if dtype in c.dtypes]
    lowered = {id(c) for c in ([c for c in allowed if not overflows(c)] or allowed)}
    return {unit: dtype if id(choice) in lowered else FP32 for choice in choices for unit in choice.units}


def without_slow_dtypes(choices: list[Choice], probe: dict[str, DtypeProbe], device_type: str,
                        announce: bool = True, keep_one: bool = False) -> list[Choice]:
    """Drop a low precision that made the whole model clearly slower than FP32 on this device
    (FP16 on most CPUs): its whole speedup interval is below 1. Trials spent on it cannot win.
    A choice keeps it if it has no other option. ``keep_one`` (a weight budget, which only low
    precisions can meet): when every probed one is slow, the fastest of them stays."""
    slow = {d for d, p in probe.items() if is_clearly_slower(p)}
    if keep_one and slow and slow >= set(probe):
        slow.discard(min(slow, key=lambda d: probe[d].relative_latency))
    for dtype in sorted(slow) if announce else ():
        ran = format_speedup(1 / probe[dtype].relative_latency, probe[dtype].speedup_low, probe[dtype].speedup_high)
        warnings.warn(f"{dtype} left out of the search: the model with its units in {dtype} ran "
                      f"{ran} FP32's speed on this {device_type}", stacklevel=3)
    return [dataclasses.replace(c, dtypes=tuple(d for d in c.dtypes if d not in slow) or c.dtypes) for c in choices]


def is_clearly_slower(probe: DtypeProbe) -> bool:
    """A probed precision whose speedup interval lies wholly below 1 (without one, in studies
    made before it was recorded: 25% slower)."""
    high = probe.speedup_high
    return high < 1.0 if high is not None else probe.relative_latency >= 1.25


def target(device_type: str) -> dict[str, Any]:
    """Where the numbers come from: device type and name, torch version."""
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
