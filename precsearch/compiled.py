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
from typing import Any

import torch
from torch import nn

from precsearch import batches as _batches
from precsearch.bench import Timing, time_interleaved
from precsearch.plan import Plan
from precsearch.runtime import apply_plan

RECOMPILE_LIMIT = 64   # each plan is one cache entry on the shared code; never the limit


@dataclasses.dataclass(frozen=True)
class CompiledTimes:
    """Timings of every plan compiled and of the FP32 model (``"fp32 compiled"``, ``"fp32 eager"``),
    and each plan's compile time (s)."""

    timings: dict[str, Timing]
    compile_s: dict[str, float]

    @property
    def ms(self) -> dict[str, float]:
        return {name: self.timings[name].median_ms for name in self.compile_s}


def time_compiled(model: nn.Module, batch: Any, plans: dict[str, Plan], device_type: str,
                  repeats: int) -> CompiledTimes:
    """``plans`` (inference) and the FP32 model compiled, and the FP32 model eager, interleaved."""
    runners: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            for name, plan in [("fp32 compiled", None), *plans.items()]:
                runners[name] = _runner(compiled_replica(model, plan, batch, device_type), batch)
                started = time.perf_counter()
                runners[name]()  # compiles
                compile_s[name] = time.perf_counter() - started
            runners["fp32 eager"] = _runner(model, batch)
            with torch._dynamo.config.patch(error_on_recompile=True):
                timings = time_interleaved(runners, device_type=device_type, repeats=repeats, warmup=1)
    finally:
        runners.clear()
        torch._dynamo.reset()
    return CompiledTimes(timings, {name: compile_s[name] for name in plans})


def check_compiled(model: nn.Module, plan: Plan, batches: list[Any], device_type: str) -> dict[str, Any]:
    """What ``check --compile`` proves beyond the (eager) audit: the plan compiles, and the
    compiled model's error against FP32 stays within the plan's limit."""
    from precsearch.accuracy import METRICS, Fidelity
    from precsearch.errors import InputError

    if plan.mode == "training":
        raise InputError("--compile: compiled checking is for inference plans")
    constraint = plan.constraint or {}
    metric = constraint.get("metric") if constraint.get("metric") in METRICS else "rel_l2"
    fidelity = Fidelity.builtin(model, batches, metric, 0.0)  # FP32 reference outputs, computed once
    with apply_plan(model, plan, example_inputs=batches[0], fingerprint_mismatch="ignore"):
        eager = fidelity.error(model)
    started = time.perf_counter()
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            compiled = fidelity.error(compiled_replica(model, plan, batches[0], device_type))
    finally:
        torch._dynamo.reset()
    limit = constraint.get("limit") if constraint.get("metric") == metric else None
    return {"metric": metric, "eager_error": eager, "compiled_error": compiled, "limit": limit,
            "within_limit": None if limit is None else compiled <= limit,
            "compile_s": round(time.perf_counter() - started, 2)}


def compiled_replica(model: nn.Module, plan: Plan | None, example_inputs: Any, device_type: str) -> Any:
    """A copy of ``model`` with ``plan`` applied (None: as it is), compiled: each plan on its own
    copy, so that interleaving plans never makes dynamo recompile."""
    replica = copy.deepcopy(model)
    if plan is not None:
        apply_plan(replica, plan, device_type=device_type, example_inputs=example_inputs,
                   fingerprint_mismatch="ignore")
    return torch.compile(replica)


def _runner(model: Any, batch: Any) -> Any:
    def run() -> None:
        with torch.no_grad():
            _batches.call(model, batch)
    return run
