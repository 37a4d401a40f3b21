"""Enforce a plan at run time (``apply_plan``) and prove it (``audit``).

>>> handle = apply_plan(model, plan)        # doctest: +SKIP
>>> model(inputs)                            # each unit runs in its planned dtype
>>> handle.remove()                          # the model is exactly as before

Every module has a precision: its plan entry, else the plan's default. A module whose
precision differs from its parent's (and always the root) gets its ``forward`` wrapped in a
lexically scoped ``torch.autocast``: FP16/BF16 modules enable it with their dtype; FP32 modules
disable it and cast floating inputs to float32. A low-precision module returning into an FP32
parent casts its floating results to float32, so every op an FP32 unit owns computes in float32.
Modules that own no eligible op are unaffected by their own precision.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from precsearch import batches as _batches
from precsearch.errors import PlanError
from precsearch.ops import device_type_of, is_eligible, op_name
from precsearch.plan import DTYPES, Plan

_LOW = (torch.float16, torch.bfloat16)
_applied: weakref.WeakKeyDictionary[nn.Module, PlanHandle] = weakref.WeakKeyDictionary()


def cast_low_to_fp32(value: Any) -> Any:
    """Cast every FP16/BF16 tensor inside ``value`` (nested tuples, lists, dicts, HF outputs)
    to float32; everything else, float64 included, passes through untouched."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOW else value
    if isinstance(value, (tuple, list)):
        items = [cast_low_to_fp32(item) for item in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, Mapping):
        mapped = {key: cast_low_to_fp32(item) for key, item in value.items()}
        if all(mapped[key] is item for key, item in value.items()):
            return value
        try:
            return type(value)(**mapped) if type(value) is not dict else mapped
        except TypeError:
            return mapped
    return value


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def model_device_type(model: nn.Module, fallback: str = "cpu") -> str:
    for tensor in model.parameters():
        return device_type_of(tensor.device)
    for tensor in model.buffers():
        return device_type_of(tensor.device)
    return device_type_of(fallback)


def _wrap(original: Callable, device_type: str, precision: str, cast_output: bool) -> Callable:
    if precision == "fp32":
        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type, enabled=False):
                return original(*cast_low_to_fp32(args), **cast_low_to_fp32(kwargs))
    else:
        dtype = DTYPES[precision]

        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type, dtype=dtype):
                output = original(*args, **kwargs)
            return cast_low_to_fp32(output) if cast_output else output
    forward.__wrapped__ = original  # type: ignore[attr-defined]
    return forward


class PlanHandle:
    """A plan applied to a model; ``remove()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, model: nn.Module, plan: Plan, device_type: str,
                 modules: list[tuple[str, nn.Module]] | None = None) -> None:
        self.model, self.plan, self.device_type = model, plan, device_type
        # (module, its own ``forward`` attribute or None, the wrapper)
        self._saved: list[tuple[nn.Module, Any, Callable]] = []
        modules = modules if modules is not None else list(model.named_modules())
        precision = {name: plan.precision(name) for name, _ in modules}
        for name, module in modules:
            parent = precision[_parent_name(name)] if name else None
            if name and precision[name] == parent:
                continue
            cast_output = parent == "fp32" and precision[name] != "fp32"
            wrapper = _wrap(module.forward, device_type, precision[name], cast_output)
            self._saved.append((module, module.__dict__.get("forward"), wrapper))
        self._install()
        self.wrapped = len(self._saved)
        _applied[model] = self

    def _install(self) -> None:
        for module, _, wrapper in self._saved:
            module.forward = wrapper

    def _uninstall(self) -> None:
        for module, own_forward, _ in reversed(self._saved):
            if own_forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own_forward

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The model exactly as without the plan for a block (cheap: no module walk)."""
        self._uninstall()
        try:
            yield
        finally:
            self._install()

    def remove(self) -> None:
        """Restore every wrapped ``forward`` exactly; safe to call twice."""
        self._uninstall()
        self._saved.clear()
        if _applied.get(self.model) is self:
            del _applied[self.model]

    def __enter__(self) -> PlanHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PlanHandle({self.wrapped} modules wrapped, default={self.plan.default})"


def apply_plan(model: nn.Module, plan: Plan, *, device_type: str | None = None,
               fingerprint_mismatch: str = "error", modules: list[tuple[str, nn.Module]] | None = None) -> PlanHandle:
    """Make ``model`` run each unit in the dtype ``plan`` gives it. Parameters stay FP32.

    Returns a handle that is also a context manager::

        with apply_plan(model, load_plan("plan.yaml")):
            logits = model(batch)

    ``modules`` (``list(model.named_modules())``) saves the module walk for callers that apply
    many plans to one model, like the search.
    """
    if model in _applied:
        raise PlanError("a plan is already applied to this model: call handle.remove() first")
    plan.validate_for(model, fingerprint_mismatch=fingerprint_mismatch,
                      names={name for name, _ in modules} if modules is not None else None)
    return PlanHandle(model, plan, device_type or model_device_type(model, plan.target.get("device", "cpu")),
                      modules)


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan currently applied to ``model``, if any."""
    handle = _applied.get(model)
    return handle.plan if handle is not None else None


@contextmanager
def applied(model: nn.Module, plan: Plan, **options: Any) -> Iterator[PlanHandle]:
    """``plan`` applied to ``model`` for a block; reuses the handle if it is already applied."""
    current = _applied.get(model)
    if current is not None:
        if current.plan != plan:
            raise PlanError("another plan is applied to this model: remove its handle first")
        yield current
        return
    with apply_plan(model, plan, **options) as handle:
        yield handle


# -- recording which unit ran which op in which dtype -----------------------------------------
@dataclasses.dataclass(frozen=True)
class OpRecord:
    unit: str       # innermost module executing the op ("" is the root)
    op: str         # aten kernel name, e.g. "addmm"
    dtype: torch.dtype
    shapes: tuple   # input tensor shapes (None for non-tensors), then the output shape
    phase: str = "forward"


class _ModuleStack:
    """Tracks the innermost executing module of ``model`` through global forward hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(module): name for name, module in model.named_modules()}
        self.stack: list[str] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> _ModuleStack:
        def push(module: nn.Module, *args: Any) -> None:
            name = self.names.get(id(module))
            if name is not None:
                self.stack.append(name)

        def pop(module: nn.Module, *args: Any) -> None:
            if id(module) in self.names and self.stack:
                self.stack.pop()

        hooks = nn.modules.module
        self._hooks = [hooks.register_module_forward_pre_hook(push),
                       hooks.register_module_forward_hook(pop, always_call=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""


class _NodeOwners(TorchFunctionMode):
    """Which unit created each autograd node, so that backward ops can be attributed: every
    torch call claims the not-yet-claimed nodes behind its outputs for the innermost module."""

    def __init__(self, modules: _ModuleStack) -> None:
        super().__init__()
        self.modules = modules
        self.owner: dict[Any, str] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        unit = self.modules.current
        for leaf in torch.utils._pytree.tree_leaves(result):
            pending = [getattr(leaf, "grad_fn", None)] if isinstance(leaf, torch.Tensor) else []
            while pending:
                node = pending.pop()
                if node is not None and node not in self.owner:
                    self.owner[node] = unit
                    pending.extend(parent for parent, _ in node.next_functions)
        return result


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class OpRecorder(TorchDispatchMode):
    """Records every autocast-eligible kernel that runs, with its unit and computed dtype.

    ``on_op(func, args, output, unit)`` is called for every op (eligible or not), which lets
    the graph walker follow data flow with the same recording.
    """

    def __init__(self, model: nn.Module, device_type: str,
                 on_op: Callable[[Any, tuple, Any, str], None] | None = None, backward: bool = False) -> None:
        super().__init__()
        self.device_type = device_type
        self.modules = _ModuleStack(model)
        self.nodes = _NodeOwners(self.modules) if backward else None
        self.records: list[OpRecord] = []
        self.on_op = on_op
        self.phase = "forward"

    def __enter__(self) -> OpRecorder:
        self.modules.__enter__()
        if self.nodes is not None:
            self.nodes.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self.nodes is not None:
                self.nodes.__exit__(*exc)
            self.modules.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        output = func(*args, **(kwargs or {}))
        unit = self.modules.current
        if self.nodes is not None and self.phase == "backward":
            unit = self.nodes.owner.get(torch._C._current_autograd_node(), unit)
        name = op_name(func)
        if is_eligible(name, self.device_type):
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            first = next((t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
            if first is not None:
                shapes = tuple(_shape(arg) for arg in args) + (_shape(first),)
                self.records.append(OpRecord(unit, name, first.dtype, shapes, self.phase))
        if self.on_op is not None:
            self.on_op(func, args, output, unit)
        return output


# -- audit --------------------------------------------------------------------------------------
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


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
    """Every eligible op executed, the dtype it computed in, and what the plan asked for."""

    entries: tuple[AuditEntry, ...]

    @property
    def mismatches(self) -> list[AuditEntry]:
        return [entry for entry in self.entries if not entry.ok]

    @property
    def ok(self) -> bool:
        return bool(self.entries) and not self.mismatches

    def by_unit(self) -> dict[str, Counter]:
        """unit -> Counter of actual dtypes."""
        summary: dict[str, Counter] = {}
        for entry in self.entries:
            summary.setdefault(entry.unit, Counter())[entry.actual] += 1
        return summary

    def __str__(self) -> str:
        units = self.by_unit()
        if self.ok:
            return f"audit ok: {len(self.entries)} eligible ops in {len(units)} units ran in their planned dtype"
        lines = [f"audit found {len(self.mismatches)} of {len(self.entries)} eligible ops off plan:"]
        lines += [f"  {e.unit or '<root>'}: {e.op} ({e.phase}) ran in {e.actual}, plan says {e.expected}"
                  for e in self.mismatches[:20]]
        return "\n".join(lines)


def audit(model: nn.Module, plan: Plan, batches: Iterable[Any], *, device_type: str | None = None,
          loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> AuditReport:
    """Run ``model`` under ``plan`` and record the dtype each eligible op computed in.

    With ``loss_fn``, batches are ``(inputs, target)`` and the backward pass is audited too:
    the ops autograd runs for a unit must compute in the unit's dtype. Applies the plan for the
    duration unless it is already applied.
    """
    batches = _batches.as_list(batches)
    device_type = device_type or model_device_type(model)
    training = loss_fn is not None
    with applied(model, plan, device_type=device_type), torch.set_grad_enabled(training), \
            OpRecorder(model, device_type, backward=training) as recorder:
        for batch in batches:
            recorder.phase = "forward"
            if not training:
                _batches.call(model, batch)
                continue
            from precsearch.training import compute_loss, split_training_batch

            inputs, target = split_training_batch(batch)
            loss = compute_loss(loss_fn, _batches.call(model, inputs), target, "loss_fn")
            recorder.phase = "backward"
            loss.backward()
        if training:
            model.zero_grad(set_to_none=True)
    entries = tuple(
        AuditEntry(r.unit, r.op, plan.precision(r.unit),
                   "fp32" if r.dtype == torch.float64 else _NAMES.get(r.dtype, str(r.dtype)), r.phase)
        for r in recorder.records)
    return AuditReport(entries)
