"""Timing plans as compiled with ``torch.compile``: the deployed form of ``runtime.compile``.

Each plan runs on its own copy of the model, with the plan applied and compiled once, so that
interleaving plans never makes dynamo recompile. Dynamo is made to fail instead of silently
falling back to eager (recompile limit hit, or any recompile while timing): a number from this
module is a compiled number, or an exception.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from precsearch.runtime.accuracy import Fidelity
from precsearch.search import bench
from precsearch.search.bench import RaceResult, Timing
from precsearch.runtime.errors import InputError, failures_as
from precsearch.runtime.plan import Plan
from precsearch.runtime.apply import apply_plan
from precsearch.runtime.workload import GenerationStats, Workload, with_token_gate

RECOMPILE_LIMIT = 64   # each plan is one cache entry on the shared code; never the limit


class NotCompilable(InputError):
    """The model, with a plan applied, cannot run compiled: dynamo or inductor failed, or it
    recompiles where a compiled measurement must not (``--compile``: exit 2 in ``compare``;
    ``check`` reports it as a failed check)."""


@dataclasses.dataclass(frozen=True)
class CompiledTimes:
    """The race of every timed plan compiled and of the FP32 model (``"fp32 compiled"``, and
    ``"fp32 eager"``, its baseline), each timed plan's compile time (s), and, when a fidelity was
    given, every plan's compiled error (plans over the limit are in ``errors`` but were not timed)."""

    race: RaceResult
    compile_s: dict[str, float]
    errors: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def timings(self) -> dict[str, Timing]:
        return self.race.timings

    @property
    def generation(self) -> dict[str, GenerationStats]:
        """The generating runs' prefill and decode times."""
        return self.race.generation

    @property
    def ms(self) -> dict[str, float]:
        return {name: self.timings[name].median_ms for name in self.compile_s}


def time_compiled(model: nn.Module, batch: Any, plans: dict[str, Plan], device_type: str,
                  repeats: int, fidelity: Fidelity | None = None) -> CompiledTimes:
    """``plans`` (inference) and the FP32 model compiled, and the FP32 model eager, interleaved.

    With ``fidelity``, each compiled plan's error is measured first, over the fidelity's batches
    against its FP32 reference, and a plan over the fidelity's limit is left out of the timing.
    A run is the plans' workload (``runtime.workload``; they share one): generating, each copy
    generates with a static cache and a compiled decode step. Raises ``NotCompilable`` when a
    plan cannot run compiled.
    """
    workload = workload_of(plans.values())
    runners: dict[str, bench.Runner] = {}
    compile_s: dict[str, float] = {}
    errors: dict[str, float] = {}
    torch._dynamo.reset()
    try:
        with _compiled_only(), _failures_named("the model"):
            for name, plan in [("fp32 compiled", None), *plans.items()]:
                runner, compile_s[name], error = _compiled_runner(model, name, plan, batch, device_type, fidelity,
                                                                  workload)
                if error is not None:
                    errors[name] = error
                if error is None or error <= fidelity.limit:  # type: ignore[union-attr]
                    runners[name] = runner
            runners["fp32 eager"] = workload.runner(model, batch)
            with torch._dynamo.config.patch(error_on_recompile=True):
                race = bench.race(runners, baseline="fp32 eager", device_type=device_type, repeats=repeats,
                                  warmup=1)
    finally:
        runners.clear()
        torch._dynamo.reset()
    return CompiledTimes(race, {name: compile_s[name] for name in plans if name in race.timings}, errors)


def workload_of(plans: Any) -> Workload:
    """The workload plans were measured under (``runtime.workload``): they must share one."""
    workloads = {plan.resolved_runtime.run for plan in plans}
    if len(workloads) > 1:
        raise InputError("the plans were measured under different workloads (" + ", ".join(
            sorted(w.describe() for w in workloads)) + "): time them apart")
    return workloads.pop() if workloads else Workload()


def _compiled_runner(model: nn.Module, name: str, plan: Plan | None, batch: Any, device_type: str,
                     fidelity: Fidelity | None, workload: Workload) -> tuple[Any, float, float | None]:
    """One plan (None: the FP32 model) compiled on its own copy: its runner on ``batch``, its
    compile time (s), and its compiled error under ``fidelity`` (None without one, or for FP32)."""
    replica = compiled_replica(model, plan, batch, device_type, workload)
    runner = workload.runner(replica, batch)
    with _failures_named("the FP32 model" if plan is None else f"plan {name!r}"):
        started = time.perf_counter()
        runner()  # compiles
        seconds = time.perf_counter() - started
        error = fidelity.error(replica) if fidelity is not None and plan is not None else None
    return runner, seconds, error


def compiled_error(model: nn.Module, plan: Plan, example_inputs: Any, device_type: str, fidelity: Fidelity) -> float:
    """``plan`` compiled on a copy of ``model``: its error under ``fidelity`` (FP32 reference,
    all of the fidelity's batches). Raises ``NotCompilable`` when it cannot run compiled."""
    torch._dynamo.reset()
    try:
        with _compiled_only(), _failures_named("the model"):
            return fidelity.error(compiled_replica(model, plan, example_inputs, device_type))
    finally:
        torch._dynamo.reset()


@dataclasses.dataclass(frozen=True)
class CompiledCheck:
    """What ``check --compile`` found: ``within_limit`` is False when the compiled error is over the
    limit or the model cannot run compiled (``failure`` says why), None when the plan states no limit."""

    metric: str
    eager_error: float
    compiled_error: float | None
    limit: float | None
    within_limit: bool | None
    compile_s: float
    failure: str | None

    def to_dict(self) -> dict[str, Any]:
        """As ``check --json`` prints it."""
        return dataclasses.asdict(self)


def check_compiled(model: nn.Module, plan: Plan, batches: list[Any], device_type: str) -> CompiledCheck:
    """What ``check --compile`` proves beyond the (eager) audit: the plan compiles, and the
    compiled model's error against FP32 stays within the plan's limit.

    Runs in eval mode (inference plans; the model's modes are restored). ``within_limit`` is
    False when the compiled error is over the limit or the model cannot run compiled
    (``failure`` says why), None when the plan states no limit for a built-in metric.
    """
    if plan.mode == "training":
        raise InputError("--compile: compiled checking is for inference plans")
    with eval_mode(model):
        fidelity = Fidelity.of_constraint(model, batches, plan.constraint)  # FP32 reference, computed once
        fidelity = with_token_gate(fidelity, model, batches, plan)
        with apply_plan(model, plan, device_type=device_type, fingerprint_mismatch="ignore"):
            eager = fidelity.error(model)
        started = time.perf_counter()
        try:
            compiled, failure = compiled_error(model, plan, batches[0], device_type, fidelity), None
        except NotCompilable as error:
            compiled, failure = None, str(error)
    limit = fidelity.limit
    within = False if failure else (None if limit is None else compiled <= limit)  # type: ignore[operator]
    return CompiledCheck(metric=fidelity.name, eager_error=eager, compiled_error=compiled, limit=limit,
                         within_limit=within, compile_s=round(time.perf_counter() - started, 2), failure=failure)


def verdict(result: CompiledCheck) -> str:
    """One line for people: ``check_compiled``'s result and what it means."""
    if result.failure:
        return f"compiled: FAILED, {result.failure}"
    numbers = (f"{result.metric} {result.compiled_error:.4g} against FP32 (eager {result.eager_error:.4g}; "
               f"compile {result.compile_s:.1f} s)")
    if result.limit is None:
        return f"compiled: {numbers}; the plan states no {result.metric} limit to check"
    if result.within_limit:
        return f"compiled: ok, {numbers} within the limit {result.limit:g}"
    return f"compiled: FAILED, {numbers} over the limit {result.limit:g}"


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; every module's mode is restored after it."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextmanager
def _compiled_only() -> Iterator[None]:
    """Dynamo fails instead of falling back to eager when a plan recompiles past the limit."""
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        yield


def _failures_named(what: str) -> AbstractContextManager[None]:
    """A failure to run compiled becomes one ``NotCompilable`` line naming ``what`` failed."""
    return failures_as(NotCompilable, f"--compile: {what} cannot run compiled with torch.compile: ",
                       keep=NotCompilable)


def compiled_replica(model: nn.Module, plan: Plan | None, example_inputs: Any, device_type: str,
                     workload: Workload | None = None) -> Any:
    """A copy of ``model`` with ``plan`` applied (None: as it is), compiled for ``workload``
    (default: the plan's): each plan on its own copy, so that interleaving plans never makes
    dynamo recompile."""
    replica = copy.deepcopy(model)
    if plan is not None:
        apply_plan(replica, plan, device_type=device_type, example_inputs=example_inputs,
                   fingerprint_mismatch="ignore")
    workload = workload or (plan.resolved_runtime.run if plan is not None else Workload())
    return workload.compile(replica)
