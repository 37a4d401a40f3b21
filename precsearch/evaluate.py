"""Measuring one candidate plan on the real model: its error over all batches and its latency
(a forward pass, or a training step) timed interleaved with the FP32 model."""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from precsearch import batches as _batches
from precsearch.accuracy import Fidelity
from precsearch.bench import time_interleaved
from precsearch.errors import InputError
from precsearch.plan import Plan, Runtime
from precsearch.runtime import PlanHandle, apply_plan
from precsearch.weights import find_weight_uses


@dataclasses.dataclass(frozen=True)
class Measurement:
    error: float
    latency_ms: float          # candidate median, this trial
    baseline_ms: float         # FP32 median, interleaved with it
    peak_memory_mb: float | None
    failure: str | None = None
    weight_mb: float | None = None   # the model's weights as the candidate runs (low ones held)

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.latency_ms if self.latency_ms > 0 else math.nan


class Evaluator:
    """Runs candidates on one model: accuracy over all batches, latency on the first batch."""

    mode = "inference"

    def __init__(self, model: nn.Module, batches: list[Any], fidelity: Fidelity, device_type: str,
                 repeats: int = 9, runtime: Runtime | None = None) -> None:
        self.model, self.batches, self.fidelity = model, batches, fidelity
        self.device_type, self.repeats = device_type, repeats
        self.runtime = runtime or Runtime.default_for(self.mode)
        # Once, not once per candidate: the module walk, and which weights may be held low.
        self.modules = list(model.named_modules())
        self.weight_uses = (find_weight_uses(model, batches[0], device_type)
                            if self.runtime.weights == "low" else None)

    def plan(self, layers: dict[str, str]) -> Plan:
        """The plan a candidate is measured as: it runs as it will be deployed."""
        return Plan.compact(layers, mode=self.mode, runtime=self.runtime)

    def _run(self) -> None:
        with torch.no_grad():
            _batches.call(self.model, self.batches[0])

    def step(self, plan: Plan | None) -> Callable[[], None]:
        """What is timed for ``plan`` (None: the FP32 model): one forward pass on the first batch."""
        return self._run

    def apply(self, layers: dict[str, str]) -> PlanHandle:
        return apply_plan(self.model, self.plan(layers), device_type=self.device_type, modules=self.modules,
                          weight_uses=self.weight_uses)

    def error(self, layers: dict[str, str]) -> float:
        with self.apply(layers):
            return self.fidelity.error(self.model)

    def measure(self, layers: dict[str, str], repeats: int | None = None,
                max_seconds: float | None = None) -> Measurement:
        try:
            with self.apply(layers) as handle:
                weight_mb = sum(handle.weight_bytes().values()) / 2**20
                error = self.fidelity.error(self.model)
                feasible = error <= self.fidelity.limit
                timings = time_interleaved(
                    {"baseline": (handle.suspended, self.step(None)), "candidate": self.step(handle.plan)},
                    device_type=self.device_type, repeats=repeats or (self.repeats if feasible else 3), warmup=1,
                    max_seconds=max_seconds)
        except InputError:
            raise
        except Exception as failure:  # NaN guards, dtype errors, (simulated) OOM: the candidate fails, not the search
            gc.collect()
            if self.device_type == "cuda":
                torch.cuda.empty_cache()
            reason = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200] if str(failure) else ''}"
            return Measurement(math.inf, math.nan, math.nan, None, reason)
        return Measurement(error, timings["candidate"].median_ms, timings["baseline"].median_ms,
                           timings["candidate"].peak_memory_mb,
                           None if math.isfinite(error) else "non-finite outputs (NaN or inf)", weight_mb)

    def race(self, plans: dict[str, dict[str, str]], repeats: int) -> dict[str, tuple[float, float, float | None]]:
        """Several plans and the FP32 model timed in one interleaved run:
        ``{name: (median ms, FP32 median ms, peak memory MB or None)}``."""
        turns: dict[str, Any] = {"fp32": self.step(None)}
        for name, layers in plans.items():
            turns[name] = (lambda layers=layers: self.apply(layers), self.step(self.plan(layers)))
        timings = time_interleaved(turns, device_type=self.device_type, repeats=repeats, warmup=1)
        base = timings["fp32"].median_ms
        return {name: (timings[name].median_ms, base, timings[name].peak_memory_mb) for name in plans}


class TrainingEvaluator(Evaluator):
    """Times a full training step (forward, backward, optimizer step) instead of a forward pass.

    The optimizer is AdamW with a zero learning rate: it does all of its work and never moves a
    weight, so every candidate is measured at the same weights.
    """

    mode = "training"

    def __init__(self, model: nn.Module, batches: list[Any], fidelity: Fidelity, device_type: str,
                 repeats: int = 9, loss_fn: Callable | None = None) -> None:
        from precsearch.training import default_loss

        super().__init__(model, batches, fidelity, device_type, repeats)
        self.loss_fn = loss_fn or default_loss
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                           weight_decay=0.0)

    def step(self, plan: Plan | None) -> Callable[[], None]:
        from precsearch.training import training_step

        return training_step(self.model, self.batches[0], self.loss_fn, self.optimizer, plan, self.device_type)
