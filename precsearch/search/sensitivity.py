"""Per-unit sensitivity: how much the model's error grows when one unit alone runs in a lower
precision.

Up to ``END_TO_END_BUDGET`` (unit, dtype) pairs, it is measured end to end: the rel_l2 of the
model's outputs with only that unit lowered, which also captures how much the rest of the model
amplifies the unit's error. Beyond that (large models), it is the unit's *local* error: one FP32
pass records every unit's inputs and outputs, then each unit is re-run by itself under a plan
that lowers only it — one model pass plus one unit call per unit and dtype.

The local error is taken relative to the output's *variation* (each row centred over its last
dimension), not its magnitude: a normalisation layer downstream removes a common offset, and the
signal riding on that offset is what a short mantissa loses.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from precsearch.runtime import batches as _batches
from precsearch.runtime.accuracy import flatten_outputs
from precsearch.runtime.plan import Plan, Runtime
from precsearch.runtime.precisions import FP32
from precsearch.runtime.apply import apply_plan

log = logging.getLogger(__name__)

END_TO_END_BUDGET = 128   # (unit, dtype) pairs measured end to end; more are measured locally


def _snapshot(value: Any) -> Any:
    try:
        return copy.deepcopy(value)  # inputs such as a KV cache are mutated by the call
    except Exception:
        return value


def local_error(output: Any, reference: list[torch.Tensor]) -> float:
    """``||y - y_ref|| / ||y_ref - rowmean(y_ref)||`` over the floating outputs, in float64."""
    got = flatten_outputs(output)
    if len(got) != len(reference):
        return math.nan
    diff = spread = 0.0
    for candidate, ref in zip(got, reference):
        candidate, ref = candidate.double(), ref.double()
        if candidate.shape != ref.shape:
            return math.nan
        if not torch.isfinite(candidate).all():
            return math.inf
        diff += float((candidate - ref).pow(2).sum())
        centred = ref - ref.mean(dim=-1, keepdim=True) if ref.dim() else ref
        spread += float(centred.pow(2).sum()) or float(ref.pow(2).sum())
    return math.sqrt(diff / spread) if spread > 0 else (0.0 if diff == 0 else math.inf)


def unit_sensitivity(model: nn.Module, units: list[str], batch: Any, dtypes: list[str],
                     device_type: str, end_to_end_budget: int = END_TO_END_BUDGET) -> dict[str, dict[str, float | None]]:
    """``{unit: {dtype: error}}`` for each low-precision dtype; None where a unit could not be
    re-run on its own (it is then ranked in the middle).

    With at most ``end_to_end_budget`` (unit, dtype) pairs, the error is measured end to end
    (rel_l2 of the model's outputs with only that unit lowered), which also captures how much
    the rest of the model amplifies it. Beyond that, it is the unit's local error.
    """
    if len(units) * len(dtypes) <= end_to_end_budget:
        return _end_to_end(model, units, batch, dtypes, device_type)
    named = list(model.named_modules())
    modules = dict(named)
    captured: dict[str, tuple[Any, Any, list[torch.Tensor]]] = {}
    pending: dict[str, Any] = {}

    def recorder(name: str):
        def before(module: nn.Module, args: Any, kwargs: Any) -> None:
            if name not in captured and name not in pending:
                pending[name] = _snapshot((args, kwargs))

        def after(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if name in pending:
                call_args, call_kwargs = pending.pop(name)
                captured[name] = (call_args, call_kwargs, [t.detach().clone() for t in flatten_outputs(output)])
        return before, after

    hooks = []
    for unit in units:
        before, after = recorder(unit)
        hooks += [modules[unit].register_forward_pre_hook(before, with_kwargs=True),
                  modules[unit].register_forward_hook(after, with_kwargs=True)]
    try:
        with torch.no_grad():
            _batches.call(model, batch)
    finally:
        for hook in hooks:
            hook.remove()

    result: dict[str, dict[str, float | None]] = {}
    for unit in units:
        result[unit] = {}
        for dtype in dtypes:
            if unit not in captured:
                result[unit][dtype] = None
                continue
            args, kwargs, reference = captured[unit]
            args, kwargs = _snapshot((args, kwargs))
            try:
                with apply_plan(model, _alone(unit, dtype), device_type=device_type,
                                modules=named), torch.no_grad():
                    error = local_error(modules[unit](*args, **kwargs), reference)
            except Exception as failure:  # a unit that cannot run detached from its model
                log.info("sensitivity of %s in %s unknown: %s", unit, dtype, failure)
                error = math.nan
            result[unit][dtype] = None if math.isnan(error) else error
    return result


def _end_to_end(model, units, batch, dtypes, device_type) -> dict[str, dict[str, float | None]]:
    from precsearch.runtime.accuracy import rel_l2, run_outputs

    reference = run_outputs(model, [batch])
    named = list(model.named_modules())
    result: dict[str, dict[str, float | None]] = {}
    for unit in units:
        result[unit] = {}
        for dtype in dtypes:
            try:
                with apply_plan(model, _alone(unit, dtype), device_type=device_type,
                                modules=named):
                    result[unit][dtype] = rel_l2(run_outputs(model, [batch]), reference)
            except Exception as failure:  # the model cannot run with this unit in this dtype
                log.info("%s in %s breaks the model: %s", unit, dtype, failure)
                result[unit][dtype] = math.inf
    return result


def _alone(unit: str, dtype: str) -> Plan:
    """Only ``unit`` lowered; FP32 weights, since only the numbers matter here (and low weights
    give the same ones)."""
    return Plan(default=FP32, layers={unit: dtype}, runtime=Runtime(weights="fp32"))


def choice_error(sensitivity: dict[str, dict[str, float | None]], units: tuple[str, ...], dtype: str,
                 unknown: float) -> float:
    """Root-sum-square of the units' local errors: independent rounding errors add in quadrature."""
    total = 0.0
    for unit in units:
        value = sensitivity.get(unit, {}).get(dtype)
        value = unknown if value is None else value
        if math.isinf(value):
            return math.inf
        total += value * value
    return math.sqrt(total)
