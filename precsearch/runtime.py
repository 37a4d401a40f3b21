"""Enforce a plan at run time: ``apply_plan`` and the handle that undoes it.

>>> handle = apply_plan(model, plan)        # doctest: +SKIP
>>> model(inputs)                            # each unit runs in its planned dtype
>>> handle.remove()                          # the model is exactly as before

Every module has a precision: its plan entry, else the plan's default. A module whose
precision differs from its parent's (and always the root) gets its ``forward`` wrapped in a
lexically scoped ``torch.autocast``: FP16/BF16 modules enable it with their dtype; FP32 modules
disable it and cast floating inputs to float32. A low-precision module returning into an FP32
parent casts its floating results to float32, so every op an FP32 unit owns computes in float32.
Modules that own no eligible op are unaffected by their own precision.

A wrapper holds its module's original bound ``forward``, and the handle lives on the root module,
so ``copy.deepcopy`` of an applied model gives a copy that runs its own modules under the plan
and has its own handle (``handle_of(copy)``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from precsearch.batches import split
from precsearch.errors import PlanError
from precsearch.ops import model_device_type
from precsearch.plan import Plan
from precsearch.precisions import PRECISIONS, low_precisions
from precsearch.weights import LowWeights, WeightUses, find_weight_uses, weight_bytes, weight_uses_of_call

_LOW = tuple(p.dtype for p in low_precisions())
_HANDLE = "_precsearch_plan_handle"  # the root module's attribute holding its PlanHandle
_FUSED = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)  # fast paths


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


class _Forward:
    """A unit's wrapped ``forward``: the module's original ``forward`` run in the unit's dtype.

    An object rather than a closure so that ``copy.deepcopy`` of the model remaps ``original``
    (a method bound to the module) to the copy's module: the copy runs its own weights.
    """

    __slots__ = ("original", "enforce", "device_type", "cast_output")

    def __init__(self, original: Any, enforce: Any, device_type: str, cast_output: bool) -> None:
        self.original, self.enforce = original, enforce
        self.device_type, self.cast_output = device_type, cast_output

    @property
    def __wrapped__(self) -> Any:  # inspect.signature (used by transformers) sees the real one
        return self.original

    def __deepcopy__(self, memo: dict) -> _Forward:
        original = copy.deepcopy(self.original, memo)
        return type(self)(original, self.enforce, self.device_type, self.cast_output)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickling would rebind ``original`` by name, i.e. to this wrapper: fail clearly instead.
        raise TypeError("a model with a plan applied cannot be pickled: remove the plan first")


class _Fp32Forward(_Forward):
    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.enforce(self.device_type):
            return self.original(*cast_low_to_fp32(args), **cast_low_to_fp32(kwargs))


class _LowForward(_Forward):
    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.enforce(self.device_type):
            output = self.original(*args, **kwargs)
        return cast_low_to_fp32(output) if self.cast_output else output


def _wrap(original: Any, device_type: str, precision: str, parent: str | None) -> _Forward:
    """``precision``'s wrapper. A low unit inside an FP32 parent returns float32 outputs, so
    that every op the parent owns computes in float32; an FP32 unit's outputs stay float32 (its
    precision is what protects the rest of the model)."""
    low = PRECISIONS[precision].low
    to_fp32 = parent is not None and low and not PRECISIONS[parent].low
    kind = _LowForward if low else _Fp32Forward
    return kind(original, PRECISIONS[precision].enforce, device_type, to_fp32)


class PlanHandle:
    """A plan applied to a model; ``remove()`` (or leaving the ``with`` block) undoes it.

    A deep copy of the model gets its own handle (``handle_of(copy)``), removable on its own.
    """

    def __init__(self, model: nn.Module, plan: Plan, device_type: str,
                 modules: list[tuple[str, nn.Module]] | None = None, weight_uses: WeightUses | None = None) -> None:
        self.model, self.plan, self.device_type = model, plan, device_type
        self.weights: LowWeights | None = None
        self.materialized = False
        # (module, its own ``forward`` attribute or None, the wrapper)
        self._saved: list[tuple[nn.Module, Any, _Forward]] = []
        modules = modules if modules is not None else list(model.named_modules())
        precision = {name: plan.precision(name) for name, _ in modules}
        for name, module in modules:
            parent = precision[_parent_name(name)] if name else None
            if name and precision[name] == parent:
                continue
            own = PRECISIONS[precision[name]].replace_forward
            wrapper = _wrap(own(module) if own else module.forward, device_type, precision[name], parent)
            self._saved.append((module, module.__dict__.get("forward"), wrapper))
        self._install()
        self.wrapped = len(self._saved)
        # Weights held low in autocast precisions only (an FP8 unit keeps its own FP8 copy).
        self._dtype_of = {name: PRECISIONS[p].dtype if PRECISIONS[p].low and PRECISIONS[p].autocast else None
                          for name, p in precision.items()}
        self._learning = None
        if plan.mode == "inference" and plan.resolved_runtime.weights == "low" and any(self._dtype_of.values()):
            if weight_uses is not None:
                self.weights = LowWeights(model, self._dtype_of, weight_uses)
            else:  # which weights only their unit reads is learnt on the first call
                self._learning = model.register_forward_pre_hook(self._learn_weights, with_kwargs=True)
        # torch's fused encoder/attention kernels run a whole layer as one op, below the units:
        # while the plan is applied, the layers run their units, each in its own dtype.
        self._unfused = [model.register_forward_pre_hook(self._fast_path_off),
                         model.register_forward_hook(self._fast_path_back, always_call=True)] \
            if any(isinstance(m, _FUSED) for _, m in modules) else []
        self._fast_path: list[bool] = []
        # On the model itself, not in a registry: a deep copy of the model copies its handle too.
        model.__dict__[_HANDLE] = self

    def _fast_path_off(self, model: nn.Module, args: tuple) -> None:
        self._fast_path.append(torch.backends.mha.get_fastpath_enabled())
        torch.backends.mha.set_fastpath_enabled(False)

    def _fast_path_back(self, model: nn.Module, args: tuple, output: Any) -> None:
        if self._fast_path:
            torch.backends.mha.set_fastpath_enabled(self._fast_path.pop())

    def _learn_weights(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._learning is not None:
            self._hold_low(args, kwargs)

    def prepare(self, example_inputs: Any) -> PlanHandle:
        """Hold the low weights now, learning from ``example_inputs`` (a batch) which weights
        only their unit reads (otherwise done on the model's first call). A no-op once done."""
        if self._learning is not None:
            self._hold_low(*split(example_inputs))
        return self

    def _hold_low(self, args: tuple, kwargs: dict) -> None:
        self._learning.remove()
        self._learning = None
        with self.suspended():
            uses = weight_uses_of_call(self.model, args, kwargs, self.device_type)
        self.weights = LowWeights(self.model, self._dtype_of, uses)

    def _install(self) -> None:
        for module, _, wrapper in self._saved:
            module.forward = wrapper
        self._installed = True

    def _uninstall(self) -> None:
        for module, own_forward, _ in reversed(self._saved):
            if own_forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own_forward
        self._installed = False

    def __deepcopy__(self, memo: dict) -> PlanHandle | None:
        """Reached through ``copy.deepcopy`` of the model: the same plan over the copy's modules
        and wrappers (the memo maps both). A copy made inside ``suspended()`` is a plain model."""
        if not self._installed:
            return None
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.model = copy.deepcopy(self.model, memo)
        clone._saved = copy.deepcopy(self._saved, memo)
        clone.weights = copy.deepcopy(self.weights, memo)
        clone._learning = copy.deepcopy(self._learning, memo)
        clone._unfused = copy.deepcopy(self._unfused, memo)
        clone._fast_path = []
        return clone

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The model exactly as without the plan for a block: the FP32 weights swapped back by
        reference (cheap: no module walk, no cast)."""
        self._uninstall()
        if self.weights is not None:
            self.weights.restore()
        try:
            yield
        finally:
            if self.weights is not None:
                self.weights.hold()
            self._install()

    def materialize(self) -> PlanHandle:
        """Drop the FP32 copies of the weights held low, so that their memory is really freed
        (the deployed form). The plan can no longer be removed."""
        if self.weights is not None:
            self.weights.drop_fp32()
        self.materialized = True
        return self

    def remove(self) -> None:
        """Restore every wrapped ``forward`` and FP32 weight exactly; safe to call twice."""
        if self.materialized:
            raise PlanError("this plan was materialized (its FP32 weights dropped): it cannot be removed")
        self._uninstall()
        if self.weights is not None:
            self.weights.restore()
            self.weights = None
        if self._learning is not None:
            self._learning.remove()
            self._learning = None
        for hook in self._unfused:
            hook.remove()
        self._unfused = []
        self._saved.clear()
        if self.model.__dict__.get(_HANDLE) is self:
            del self.model.__dict__[_HANDLE]

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the model's weights by dtype, as it is now (low weights held, ties shared)."""
        return weight_bytes(self.model)

    def __enter__(self) -> PlanHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PlanHandle({self.wrapped} modules wrapped, default={self.plan.default})"


def apply_plan(model: nn.Module, plan: Plan, *, device_type: str | None = None,
               fingerprint_mismatch: str = "error", example_inputs: Any = None,
               modules: list[tuple[str, nn.Module]] | None = None,
               weight_uses: WeightUses | None = None) -> PlanHandle:
    """Make ``model`` run each unit in the dtype ``plan`` gives it.

    Returns a handle that is also a context manager::

        with apply_plan(model, load_plan("plan.yaml")):
            logits = model(batch)

    Inference plans (``runtime.weights: low``) hold each low unit's own weights in its dtype:
    the same outputs as FP32 weights, without the per-call cast. Which weights only their own
    unit reads is learnt by running the model once in FP32: on ``example_inputs`` now if given,
    else on the first call. ``handle.materialize()`` then frees the FP32 copies.

    ``modules`` (``list(model.named_modules())``) and ``weight_uses`` save that work for
    callers that apply many plans to one model, like the search.
    """
    if handle_of(model) is not None:
        raise PlanError("a plan is already applied to this model: call handle.remove() first")
    plan.validate_for(model, fingerprint_mismatch=fingerprint_mismatch,
                      names={name for name, _ in modules} if modules is not None else None)
    device_type = device_type or model_device_type(model, plan.target.get("device", "cpu"))
    if weight_uses is None and example_inputs is not None and plan.resolved_runtime.weights == "low":
        weight_uses = find_weight_uses(model, example_inputs, device_type)
    return PlanHandle(model, plan, device_type, modules, weight_uses)


def handle_of(model: nn.Module) -> PlanHandle | None:
    """The handle of the plan applied to ``model`` (or to the model it was deep-copied from:
    the copy's own handle), if any."""
    return model.__dict__.get(_HANDLE)


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan currently applied to ``model``, if any."""
    handle = handle_of(model)
    return handle.plan if handle is not None else None


@contextmanager
def applied(model: nn.Module, plan: Plan, **options: Any) -> Iterator[PlanHandle]:
    """``plan`` applied to ``model`` for a block; reuses the handle if it is already applied."""
    current = handle_of(model)
    if current is not None:
        if current.plan != plan:
            raise PlanError("another plan is applied to this model: remove its handle first")
        yield current
        return
    with apply_plan(model, plan, **options) as handle:
        yield handle
