"""Checking a plan on a model and its data: what ``precsearch check`` proves.

>>> result = precsearch.check(model, precsearch.load_plan("plan.yaml"), batches)   # doctest: +SKIP
>>> result.ok, str(result)                                                        # doctest: +SKIP
(True, 'audit ok: 40 eligible ops in 10 units ran in their planned dtype')

The audit proves that every eligible op ran in its planned dtype and that every unit the walker
finds ran one; a plan with a memory budget (``max_weight_mb``) is held to it with its weights as
applied; ``compile=True`` also proves the plan compiles and its compiled error against FP32
stays within the plan's limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from precsearch.runtime.accuracy import Fidelity
from precsearch.runtime.apply import apply_plan
from precsearch.runtime.audit import AuditReport, audit
from precsearch.runtime.batches import split_training
from precsearch.runtime.errors import InputError, PrecsearchError, described
from precsearch.runtime.memory import MemoryBudget
from precsearch.runtime.ops import model_device_type
from precsearch.runtime.plan import Plan
from precsearch.runtime.training import default_loss
from precsearch.runtime.weights import weight_mb
from precsearch.search.compiled import CompiledCheck, check_compiled, eval_mode, verdict
from precsearch.search.export import PackageCheck, check_package, load_package
from precsearch.search.graph import walk


class PlanBreaksModel(PrecsearchError):
    """The model raised while running under the plan (``check`` exits 1): most often a plan
    that splits a unit's precision from a unit it must share it with."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What ``check`` found: the audit, the weights as applied against the plan's memory budget
    (``max_weight_mb``, None when the plan states none) and, when asked, the compiled check."""

    audit: AuditReport
    weight_mb: float
    max_weight_mb: float | None = None
    compiled: CompiledCheck | None = None

    @property
    def within_budget(self) -> bool | None:
        """Whether the weights as applied fit the memory budget; None without one."""
        return None if self.max_weight_mb is None else self.weight_mb <= self.max_weight_mb

    @property
    def ok(self) -> bool:
        return (self.audit.ok and self.within_budget is not False
                and (self.compiled is None or self.compiled.within_limit is not False))

    def lines(self) -> list[str]:
        """The audit, then the budget and the compiled check where there are ones, for people."""
        lines = str(self.audit).splitlines()
        if self.max_weight_mb is not None:
            lines.append(f"weights as applied: {self.weight_mb:.4g} MB, {'within' if self.within_budget else 'OVER'} "
                         f"the plan's memory budget of {self.max_weight_mb:g} MB (max_weight_mb)")
        if self.compiled is not None:
            lines.append(verdict(self.compiled))
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        """As ``check --json`` prints it."""
        return {"ok": self.ok, "ops": len(self.audit.entries), "mismatches": [vars(e) for e in self.audit.mismatches],
                "weight_mb": round(self.weight_mb, 3), "max_weight_mb": self.max_weight_mb,
                "silent_units": list(self.audit.silent),
                "compiled": self.compiled.to_dict() if self.compiled is not None else None}


def check(model: nn.Module, plan: Plan, batches: list[Any], *, compile: bool = False,
          loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, device_type: str | None = None,
          fingerprint_mismatch: str = "error") -> CheckResult:
    """Apply ``plan`` to ``model``, run ``batches`` and prove the plan holds (see the module).

    Inference plans run in eval mode; training plans in train mode on ``(inputs, target)``
    batches, with the backward pass of ``loss_fn`` (default: cross entropy) audited too. The
    model's modes are restored after. ``fingerprint_mismatch`` is ``"error"``, ``"warn"`` or
    ``"ignore"`` for a plan made for another model. Raises ``PlanBreaksModel`` when the model
    fails under the plan.
    """
    device_type = device_type or model_device_type(model)
    training = plan.mode == "training"
    loss_fn = (loss_fn or default_loss) if training else None
    with _plan_mode(model, training):
        report, weight_mb = _audited(model, plan, batches, loss_fn, fingerprint_mismatch)
        compiled = check_compiled(model, plan, batches, device_type) if compile else None
    return CheckResult(report, weight_mb, MemoryBudget.of(plan.constraint).max_weight_mb, compiled)


def _audited(model: nn.Module, plan: Plan, batches: list[Any], loss_fn: Any,
             fingerprint_mismatch: str) -> tuple[AuditReport, float]:
    """The audit, every unit the walker finds expected to run, and the weights' MB as applied."""
    units = walk(model, split_training(batches[0])[0] if loss_fn else batches[0]).units
    try:
        with apply_plan(model, plan, fingerprint_mismatch=fingerprint_mismatch):
            report = audit(model, plan, batches, loss_fn=loss_fn, units=units)
            return report, weight_mb(model)
    except InputError:
        raise
    except (RuntimeError, TypeError, ValueError) as error:
        raise PlanBreaksModel(f"the model fails under this plan: {described(error)} (does it split a unit's "
                              f"precision from the unit around it? optimize ties such units)") from error


def load_package_for(plan: Plan, path: str) -> Callable[..., Any]:
    """The exported package at ``path``, to check against ``plan``: packages hold inference plans."""
    if plan.mode != "inference":
        raise InputError("--package: packages hold inference plans; this plan is for training")
    return load_package(path)


def check_exported(package: Callable[..., Any], model: nn.Module, plan: Plan, batches: list[Any], *,
                   path: str = "", fingerprint_mismatch: str = "error") -> PackageCheck:
    """An exported package (``load_package_for``) against the FP32 ``model`` in eval mode: its
    error under the plan's metric, within the plan's limit or not (``check --package``)."""
    plan.validate_for(model, fingerprint_mismatch=fingerprint_mismatch)
    with eval_mode(model):
        return check_package(package, Fidelity.of_constraint(model, batches, plan.constraint), path)


@contextmanager
def _plan_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Train mode for a training plan, else eval mode; every module's mode is restored after."""
    with eval_mode(model):
        model.train(training)
        yield
