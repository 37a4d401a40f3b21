"""The audit: run a model under a plan and prove which dtype every eligible op computed in, and
which dtype every storage unit's table was held in when it was read (the dtype of its rows).

>>> report = audit(model, plan, batches)     # doctest: +SKIP
>>> report.ok, str(report)                   # doctest: +SKIP
(True, 'audit ok: 40 eligible ops in 10 units ran in their planned dtype')
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from precsearch.runtime import batches as _batches
from precsearch.runtime.ops import model_device_type
from precsearch.runtime.plan import Plan, Runtime
from precsearch.runtime.precisions import name_of_dtype
from precsearch.runtime.recording import OpRecorder
from precsearch.runtime.apply import applied


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    unit: str
    op: str
    expected: str
    actual: str
    phase: str = "forward"

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """Every eligible op executed (and storage unit's table read), the dtype it computed in (the
    table's dtype), and what the plan asked for."""

    entries: tuple[AuditEntry, ...]
    silent: tuple[str, ...] = ()   # units expected to run that recorded no eligible op

    @property
    def mismatches(self) -> list[AuditEntry]:
        return [entry for entry in self.entries if not entry.ok]

    @property
    def ok(self) -> bool:
        return bool(self.entries) and not self.mismatches and not self.silent

    def by_unit(self) -> dict[str, Counter[str]]:
        """unit -> Counter of actual dtypes."""
        summary: dict[str, Counter[str]] = {}
        for entry in self.entries:
            summary.setdefault(entry.unit, Counter())[entry.actual] += 1
        return summary

    def __str__(self) -> str:
        units = self.by_unit()
        if self.ok:
            return f"audit ok: {len(self.entries)} eligible ops in {len(units)} units ran in their planned dtype"
        lines = [f"audit found {len(self.mismatches)} of {len(self.entries)} eligible ops off plan"
                 + (f" and {len(self.silent)} units that ran no eligible op" if self.silent else "") + ":"]
        lines += [f"  {e.unit or '<root>'}: {e.op} ({e.phase}) ran in {e.actual}, plan says {e.expected}"
                  for e in self.mismatches[:20]]
        lines += [f"  {unit or '<root>'}: ran no eligible op (another kernel ran in its place?)" for unit in self.silent[:20]]
        return "\n".join(lines)


def audit(model: nn.Module, plan: Plan, batches: Iterable[Any], *, device_type: str | None = None,
          loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, units: Iterable[str] | None = None) -> AuditReport:
    """Run ``model`` under ``plan`` and record the dtype each eligible op computed in, and the
    dtype each storage unit's table was read in (an embedding's rows have its table's dtype).

    With ``loss_fn``, batches are ``(inputs, target)`` and the backward pass is audited too:
    the ops autograd runs for a unit must compute in the unit's dtype. ``units`` (from
    ``walk``) must each run an eligible op (a storage unit: read its table): a unit that records
    none is reported. Applies the
    plan for the duration unless it is already applied.
    """
    batches = _batches.as_list(batches)
    device_type = device_type or model_device_type(model)
    plan = plan.for_model(model)
    training = loss_fn is not None
    if training and plan.resolved_runtime.weights == "low":  # gradients need the FP32 master weights
        plan = dataclasses.replace(plan, runtime=Runtime(weights="fp32"))
    with applied(model, plan, device_type=device_type), torch.set_grad_enabled(training):
        recorder = _record(model, batches, device_type, loss_fn)  # from the first call on, as users run it
    entries = tuple(AuditEntry(r.unit, r.op, plan.precision(r.unit), name_of_dtype(r.dtype), r.phase)
                    for r in recorder.records)
    ran = {entry.unit for entry in entries}
    return AuditReport(entries, tuple(unit for unit in units or () if unit not in ran))


def _record(model: nn.Module, batches: list[Any], device_type: str, loss_fn: Any) -> OpRecorder:
    training = loss_fn is not None
    with OpRecorder(model, device_type, backward=training) as recorder:
        for batch in batches:
            recorder.phase = "forward"
            if not training:
                _batches.call(model, batch)
                continue
            inputs, target = _batches.split_training(batch)
            loss = _batches.compute_loss(loss_fn, _batches.call(model, inputs), target, "loss_fn")
            recorder.phase = "backward"
            loss.backward()
        if training:
            model.zero_grad(set_to_none=True)
    return recorder
