"""Measuring one candidate plan on the real model: its error over all batches and its latency
(a forward pass, or a training step) timed interleaved with the FP32 model, in rounds whose
order each measurement draws afresh (``bench.round_orders``)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from precsearch.runtime.accuracy import Fidelity
from precsearch.search import bench
from precsearch.search.bench import RaceResult, Speedup, clearly_faster, speedup
from precsearch.runtime.errors import InputError, described
from precsearch.runtime.plan import Plan, Runtime
from precsearch.runtime.apply import PlanHandle, apply_plan
from precsearch.runtime.weights import find_weight_uses, weight_mb
from precsearch.runtime.workload import DEFAULT_MIN_TOKEN_AGREEMENT, GenerationStats, TokenGate

MIN_ROUNDS = 5               # timed rounds before the intervals may stop a measurement
TARGET_HALF_WIDTH = 0.02     # a speedup known to +-2% needs no more rounds
INFEASIBLE_ROUNDS = 4        # a candidate over the limit is timed only for the record (two pairs)

PlanT = TypeVar("PlanT")   # a plan as a race names it: a ``Plan``, or the layers of one


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One candidate's error and speedup over FP32 (timed in the same rounds).

    ``latency_ms`` is on the FP32 basis: ``baseline_ms`` divided by the median speedup, which
    ``[speedup_low, speedup_high]`` brackets (a 95% confidence interval).
    """

    error: float
    latency_ms: float
    baseline_ms: float         # FP32 median, interleaved with it
    peak_memory_mb: float | None
    failure: str | None = None
    weight_mb: float | None = None   # the model's weights as the candidate runs (low ones held)
    speedup_low: float | None = None
    speedup_high: float | None = None
    generation: GenerationStats | None = None   # --workload generate: prefill, decode, tokens/s, agreement

    @classmethod
    def timed(cls, error: float, estimate: Speedup, baseline_ms: float, **fields: Any) -> Measurement:
        return cls(error, baseline_ms / estimate.median, baseline_ms, speedup_low=estimate.low,
                   speedup_high=estimate.high, **fields)

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.latency_ms if self.latency_ms > 0 else math.nan

    @property
    def interval(self) -> Speedup | None:
        if self.speedup_low is None or self.speedup_high is None:
            return None
        return Speedup(self.speedup, self.speedup_low, self.speedup_high, 0)


@dataclasses.dataclass(frozen=True)
class Raced:
    """One plan in a race: its speedup over FP32, FP32's median ms and the plan's peak memory
    (CUDA) in the same run, and its per-round times (round i of every plan of a race is the same
    round, so two plans compare pairwise: ``bench.clearly_faster``)."""

    speedup: Speedup
    baseline_ms: float
    peak_memory_mb: float | None = None
    samples_ms: tuple[float, ...] = ()

    @classmethod
    def of(cls, result: RaceResult, name: str) -> Raced:
        """``name`` in ``result``, a race whose baseline is the eager FP32 model."""
        timing = result.timings[name]
        return cls(result.speedups[name], result.baseline_ms, timing.peak_memory_mb, timing.samples_ms)


class Evaluator:
    """Runs candidates on one model: accuracy over all batches, latency on the first batch.

    What one timed run is, the runtime's workload decides (``precsearch.runtime.workload``): a forward
    pass, or greedy generation; generating, a candidate must also agree with FP32's greedy
    tokens (generated once, here) at least ``min_token_agreement`` of the time."""

    mode = "inference"

    def __init__(self, model: nn.Module, batches: list[Any], fidelity: Fidelity, device_type: str,
                 repeats: int = 10, runtime: Runtime | None = None, min_token_agreement: float | None = None) -> None:
        self.model, self.batches, self.fidelity = model, batches, fidelity
        self.device_type, self.repeats = device_type, repeats
        self.runtime = runtime or Runtime.default_for(self.mode)
        self.workload = self.runtime.run
        self.workload.check(model, batches[0])
        if self.workload.generates and fidelity.gate is None:
            minimum = DEFAULT_MIN_TOKEN_AGREEMENT if min_token_agreement is None else min_token_agreement
            self.fidelity = dataclasses.replace(fidelity, gate=TokenGate(model, batches, self.workload, minimum))
        self.generation: dict[str, GenerationStats] = {}   # the last race's, by plan name
        self.order_seeds = itertools.count()  # each timing draws its own round orders, reproducibly
        # Once, not once per candidate: the module walk, and which weights may be held low.
        self.modules = list(model.named_modules())
        self.weight_uses = (find_weight_uses(model, batches[0], device_type)
                            if self.runtime.weights == "low" else None)

    def plan(self, layers: dict[str, str]) -> Plan:
        """The plan a candidate is measured as: it runs as it will be deployed."""
        return Plan.compact(layers, mode=self.mode, runtime=self.runtime)

    def step(self, plan: Plan | None) -> Callable[[], None]:
        """What is timed for ``plan`` (None: the FP32 model, under the evaluator's runtime): the
        run of the plan's workload on the first batch (a new one each time: a generating run notes
        its own prefill and decode times). The plan itself is applied around the run, not here."""
        workload = self.workload if plan is None else plan.resolved_runtime.run
        return workload.runner(self.model, self.batches[0])

    def apply(self, layers: dict[str, str]) -> PlanHandle:
        return apply_plan(self.model, self.plan(layers), device_type=self.device_type, modules=self.modules,
                          weight_uses=self.weight_uses)

    def error(self, layers: dict[str, str]) -> float:
        with self.apply(layers):
            return self.fidelity.error(self.model)

    def measure(self, layers: dict[str, str], repeats: int | None = None, max_seconds: float | None = None,
                incumbent: Speedup | None = None) -> Measurement:
        """Error, then speedup: timed until its interval is tight (``TARGET_HALF_WIDTH``), it is
        clearly slower than ``incumbent`` (the best so far), or the round cap is reached."""
        try:
            with self.apply(layers) as handle:
                weights = weight_mb(self.model)
                verdict = self.fidelity.judge(self.model)
                error = verdict.constrained   # inf when its generated tokens stray from FP32's
                feasible = error <= self.fidelity.limit
                cap = repeats or (self.repeats if feasible else INFEASIBLE_ROUNDS)
                candidate = self.step(handle.plan)
                # Equal preparation: the candidate's turn goes through the same swap as FP32's
                # (allocations and bookkeeping just before a turn slow it measurably).
                result = bench.race(
                    {"baseline": (handle.suspended, self.step(None)),
                     "candidate": (lambda: _after_swap(handle), candidate)}, baseline="baseline",
                    device_type=self.device_type, repeats=cap, warmup=1, max_seconds=max_seconds,
                    min_repeats=min(MIN_ROUNDS, cap), until=lambda samples: settled(samples, incumbent),
                    seed=next(self.order_seeds))
        except InputError:
            raise
        except Exception as failure:  # NaN guards, dtype errors, (simulated) OOM: the candidate fails, not the search
            gc.collect()
            if self.device_type == "cuda":
                torch.cuda.empty_cache()
            reason = described(failure, width=200)
            return Measurement(math.inf, math.nan, math.nan, None, reason)
        gate_failure = verdict.failure and f"{verdict.failure} ({self.fidelity.name} {verdict.error:.4g})"
        generation = result.generation.get("candidate")
        return Measurement.timed(error, result.speedups["candidate"], result.baseline_ms,
                                 peak_memory_mb=result.timings["candidate"].peak_memory_mb, weight_mb=weights,
                                 failure=gate_failure or (None if math.isfinite(error)
                                                          else "non-finite outputs (NaN or inf)"),
                                 generation=generation and dataclasses.replace(generation,
                                                                               token_agreement=verdict.agreement))

    def race(self, plans: dict[str, dict[str, str]], repeats: int, min_repeats: int = MIN_ROUNDS
             ) -> dict[str, Raced]:
        """Several plans and the FP32 model timed in one interleaved run, until the leader is
        clearly faster than every other plan or ``repeats`` rounds are spent."""
        turns = eager_runners(plans, {}, self.apply,
                              lambda layers: self.step(None if layers is None else self.plan(layers)))
        result = bench.race(turns, baseline="fp32", device_type=self.device_type, repeats=repeats, warmup=1,
                            min_repeats=min(min_repeats, repeats), until=decided, seed=next(self.order_seeds))
        self.generation = {name: result.generation[name] for name in plans if name in result.generation}
        return {name: Raced.of(result, name) for name in plans}


@contextlib.contextmanager
def _after_swap(handle: PlanHandle) -> Iterator[None]:
    """The plan as it is, after the swap to FP32 and back that the FP32 turn makes."""
    with handle.suspended():
        pass
    yield


def eager_runners(plans: Mapping[str, PlanT], fp32: PlanT, apply: Callable[[PlanT], PlanHandle],
                  run: Callable[[PlanT | None], Callable[[], Any]], fp32_name: str = "fp32") -> dict[str, bench.Runner]:
    """The FP32 model's runner (``fp32_name``) and each plan's, for one race on one eager model.

    Each plan is applied (``apply``) around each of its turns; the FP32 turn is prepared alike,
    with ``fp32``, the all-FP32 plan, applied and suspended (``without_plan``). ``run(plan)`` is
    what a turn times (``run(None)``: the FP32 model's), built in this order: FP32, then the plans.
    """
    runners: dict[str, bench.Runner] = {fp32_name: (lambda: without_plan(apply(fp32)), run(None))}
    for name, plan in plans.items():
        runners[name] = (functools.partial(apply, plan), run(plan))
    return runners


@contextlib.contextmanager
def without_plan(handle: PlanHandle) -> Iterator[None]:
    """The FP32 model's turn, prepared as a plan's turn is (work done just before a turn slows
    it): ``handle`` just applied, then suspended for the turn and removed after it."""
    with handle, handle.suspended():
        yield


def settled(samples: dict[str, list[float]], incumbent: Speedup | None) -> bool:
    """A candidate's speedup is known well enough, or it is clearly slower than the best so far."""
    estimate = speedup(samples["baseline"], samples["candidate"])
    return estimate.half_width <= TARGET_HALF_WIDTH or (incumbent is not None and incumbent.clearly_faster_than(estimate))


def decided(samples: dict[str, list[float]]) -> bool:
    """In a race: the plan with the best median is clearly faster than each of the others,
    round by round."""
    plans = {name: times for name, times in samples.items() if name != "fp32"}
    if len(plans) < 2:
        return any(speedup(samples["fp32"], times).half_width <= TARGET_HALF_WIDTH for times in plans.values())
    leader = max(plans, key=lambda name: speedup(samples["fp32"], plans[name]).median)
    return all(clearly_faster(plans[leader], times) for name, times in plans.items() if name != leader)


class TrainingEvaluator(Evaluator):
    """Times a full training step (forward, backward, optimizer step) instead of a forward pass.

    The optimizer is AdamW with a zero learning rate: it does all of its work and never moves a
    weight, so every candidate is measured at the same weights.
    """

    mode = "training"

    def __init__(self, model: nn.Module, batches: list[Any], fidelity: Fidelity, device_type: str,
                 repeats: int = 10, loss_fn: Callable | None = None) -> None:
        from precsearch.runtime.training import default_loss

        super().__init__(model, batches, fidelity, device_type, repeats)
        self.loss_fn = loss_fn or default_loss
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                           weight_decay=0.0)

    def step(self, plan: Plan | None) -> Callable[[], None]:
        from precsearch.runtime.training import training_step

        return training_step(self.model, self.batches[0], self.loss_fn, self.optimizer, plan, self.device_type)
