"""Enforce a plan at run time: ``apply_plan`` and the handle that undoes it.

>>> handle = apply_plan(model, plan)        # doctest: +SKIP
>>> model(inputs)                            # each unit runs in its planned dtype
>>> handle.remove()                          # the model is exactly as before

Every module has a precision: its plan entry, else the plan's default. A module whose
precision differs from that of any of its ancestors (and always the root) gets its ``forward``
wrapped in a lexically scoped ``torch.autocast``: FP16/BF16 modules enable it with their dtype;
FP32 modules disable it and cast floating inputs to float32. Wrapping against every ancestor,
not only the parent, keeps a unit's dtype when whatever calls it skips its container (a root
that calls the layers of an ``nn.ModuleList`` directly). A low-precision module returning into
an FP32 module casts its floating results to float32, so every op an FP32 unit owns computes in
float32. Modules that own no eligible op are unaffected by their own precision, except storage
modules (embedding tables): a low one runs with its own weights in its dtype (held so, or cast for
the call as autocast casts an eligible op's weight), so it returns rows of the low table, cast to
float32 like any low unit's results when it returns into an FP32 module.

Applying a plan never runs the model. Inference plans (``runtime.weights: low``) hold each low
unit's own weights in its dtype from the end of the first call on: that call runs the plan with
the FP32 weights (autocast casts them per call, with the same rounding) while recording which
weights only their unit's eligible ops read (``precsearch.runtime.weights``), so the first call already
gives the outputs of every later one. The held weights follow the model: ``state_dict`` and
``load_state_dict`` see the FP32 masters, ``.to()`` converts them, a train-mode call with grad
enabled runs them (gradients reach the parameters), and a master that changed is re-cast.

A wrapper holds its module's original bound ``forward``, and the handle lives on the root module,
so ``copy.deepcopy`` of an applied model gives a copy that runs its own modules under the plan
and has its own handle (``handle_of(copy)``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from torch._compile import _disable_dynamo

from precsearch.runtime.errors import PlanError
from precsearch.runtime.ops import is_storage_module, model_device_type
from precsearch.runtime.plan import Plan
from precsearch.runtime.precisions import PRECISIONS, low_precisions
from precsearch.runtime.weights import LowWeights, WeightUseRecorder, WeightUses, find_weight_uses_aside, weight_bytes

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

    def __deepcopy__(self, memo: dict[int, Any]) -> _Forward:
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


class _StorageForward(_LowForward):
    """A low storage module's ``forward``: its own floating weights, and floating inputs (an
    ``EmbeddingBag``'s ``per_sample_weights``), in the unit's dtype for the call. Held weights
    are that already; others (FP32 weights at run time, the first call) are cast for the call,
    as autocast casts an eligible op's weight, so the rows are the same either way."""

    __slots__ = ("dtype", "module")

    def __init__(self, original: Any, enforce: Any, device_type: str, cast_output: bool,
                 module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__(original, enforce, device_type, cast_output)
        self.module, self.dtype = module, dtype

    def __deepcopy__(self, memo: dict[int, Any]) -> _StorageForward:
        return type(self)(copy.deepcopy(self.original, memo), self.enforce, self.device_type, self.cast_output,
                          copy.deepcopy(self.module, memo), self.dtype)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, self._to_unit, (args, kwargs))
        with _weights_in(self.module, self.dtype):
            return super().__call__(*args, **kwargs)

    def _to_unit(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if tensor.dtype == torch.float32 else tensor


@contextmanager
def _weights_in(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """``module``'s own floating parameters and buffers in ``dtype`` for a block: those held in it
    stay, the others are cast (a differentiable cast: gradients reach the FP32 masters)."""
    with torch._C.DisableTorchFunction():  # the applier's own look is no dtype read of the model's code
        # for the block, a parameter's slot holds a plain (differentiably cast) tensor
        tables = cast("tuple[dict[str, torch.Tensor | None], ...]", (module._parameters, module._buffers))
        swapped = [(table, key, tensor) for table in tables
                   for key, tensor in table.items()
                   if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype]
    for table, key, tensor in swapped:
        table[key] = tensor.to(dtype)
    try:
        yield
    finally:
        for table, key, tensor in swapped:
            table[key] = tensor


def _wrap(module: nn.Module, original: Any, device_type: str, precision: str, parent: str | None) -> _Forward:
    """``precision``'s wrapper. A low unit inside an FP32 parent returns float32 outputs, so
    that every op the parent owns computes in float32; an FP32 unit's outputs stay float32 (its
    precision is what protects the rest of the model)."""
    low = PRECISIONS[precision].low
    to_fp32 = parent is not None and low and not PRECISIONS[parent].low
    if low and is_storage_module(module):
        return _StorageForward(original, PRECISIONS[precision].enforce, device_type, to_fp32, module,
                               PRECISIONS[precision].dtype)
    kind = _LowForward if low else _Fp32Forward
    return kind(original, PRECISIONS[precision].enforce, device_type, to_fp32)


class _RootMethod:
    """A method of the root module routed through its plan handle (``forward``, ``_apply``,
    ``state_dict``, ``load_state_dict``): an object, so that a deep copy maps it to the copy's
    handle, and installed with the wrappers, so that ``suspended()`` shows the plain model."""

    __slots__ = ("handle", "name", "original")

    def __init__(self, handle: PlanHandle, name: str, original: Any) -> None:
        self.handle, self.name, self.original = handle, name, original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.handle, f"_root_{self.name.lstrip('_')}")(self.original, *args, **kwargs)

    @property
    def __wrapped__(self) -> Any:  # inspect.signature (used by transformers) sees the real one
        return self.original

    def __deepcopy__(self, memo: dict[int, Any]) -> _RootMethod:
        return type(self)(copy.deepcopy(self.handle, memo), self.name, copy.deepcopy(self.original, memo))

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a model with a plan applied cannot be pickled: remove the plan first")


def _is_container(module: nn.Module) -> bool:
    """A module that cannot be called (``nn.ModuleList``, ``nn.ModuleDict``): only its children run."""
    return type(module).forward is nn.Module.forward


def _to_wrap(modules: list[tuple[str, nn.Module]], precision: dict[str, str]) -> list[tuple[str, str | None]]:
    """``(name, precision of the module it returns into)`` for every module to wrap: the root
    and its children (code may call a child directly: a seq2seq ``generate`` runs
    ``get_encoder()``), each module whose precision differs from that of any ancestor, and each
    low storage module (no autocast reaches its table)."""
    above: dict[str, frozenset[str]] = {}      # the precisions of a module and its ancestors
    caller: dict[str, str | None] = {}         # the nearest ancestor that can be called
    kind = dict(modules)
    wrap = []
    for name, _ in modules:
        parent = _parent_name(name) if name else None
        above[name] = (above[parent] if parent is not None else frozenset()) | {precision[name]}
        caller[name] = None if parent is None else (
            parent if not _is_container(kind[parent]) else caller[parent])
        entry = parent == "" and not _is_container(kind[name])   # may be called past the root: get_encoder()
        if parent is None or entry or above[parent] - {precision[name]} or (
                PRECISIONS[precision[name]].low and is_storage_module(kind[name])):
            called_by = caller[name]
            wrap.append((name, None if called_by is None else precision[called_by]))
    return wrap


class PlanHandle:
    """A plan applied to a model; ``remove()`` (or leaving the ``with`` block) undoes it.

    A deep copy of the model gets its own handle (``handle_of(copy)``), removable on its own.
    """

    def __init__(self, model: nn.Module, plan: Plan, device_type: str,
                 modules: list[tuple[str, nn.Module]] | None = None, weight_uses: WeightUses | None = None) -> None:
        self.model, self.plan, self.device_type = model, plan, device_type
        self.weights: LowWeights | None = None
        self.materialized = False
        modules = modules if modules is not None else list(model.named_modules())
        precision = {name: plan.precision(name) for name, _ in modules}
        _refuse_float64(modules, precision)
        # (module, its own attribute of the wrapper's name or None, the wrapper)
        self._saved: list[tuple[nn.Module, Any, Any]] = []
        named = dict(modules)
        for name, caller in _to_wrap(modules, precision):
            module = named[name]
            own = PRECISIONS[precision[name]].replace_forward
            wrapper: _Forward | _RootMethod = _wrap(module, own(module) if own else module.forward, device_type,
                                                    precision[name], caller)
            if not name:
                wrapper = _RootMethod(self, "forward", wrapper)
            self._saved.append((module, module.__dict__.get("forward"), wrapper))
        self.wrapped = len(self._saved)
        for method in ("_apply", "state_dict", "load_state_dict"):
            self._saved.append((model, model.__dict__.get(method), _RootMethod(self, method, getattr(model, method))))
        # Weights held low in autocast precisions only (an FP8 unit keeps its own FP8 copy).
        self._dtype_of = {name: PRECISIONS[p].dtype if PRECISIONS[p].low and PRECISIONS[p].autocast else None
                          for name, p in precision.items()}
        holds_low = (plan.mode == "inference" and plan.resolved_runtime.weights == "low"
                     and any(self._dtype_of.values()))
        self._learning = holds_low and weight_uses is None  # learnt during the first call
        self._masters_changed = False                         # a call ran the masters with grad enabled
        self._install()
        if holds_low and weight_uses is not None:
            self.weights = LowWeights(model, self._dtype_of, weight_uses)
        # torch's fused encoder/attention kernels run a whole layer as one op, below the units:
        # while the plan is applied, the layers run their units, each in its own dtype.
        self._unfused = [model.register_forward_pre_hook(self._fast_path_off),
                         model.register_forward_hook(self._fast_path_back, always_call=True)] \
            if any(isinstance(m, _FUSED) for _, m in modules) else []
        self._fast_path: list[bool] = []
        # On the model itself, not in a registry: a deep copy of the model copies its handle too.
        model.__dict__[_HANDLE] = self

    def _fast_path_off(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        self._fast_path.append(torch.backends.mha.get_fastpath_enabled())
        torch.backends.mha.set_fastpath_enabled(False)

    def _fast_path_back(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._fast_path:
            torch.backends.mha.set_fastpath_enabled(self._fast_path.pop())

    # -- the root's methods, while the plan is installed --------------------------------------
    def _root_forward(self, forward: Any, *args: Any, **kwargs: Any) -> Any:
        if self._learning:  # compiled callers learn eagerly: dynamo does not trace the recorder
            learn = _learn_eagerly if torch.compiler.is_compiling() else PlanHandle._learn
            return learn(self, forward, args, kwargs)
        weights = self.weights
        if weights is None:
            return forward(*args, **kwargs)
        if torch.is_grad_enabled() and self.model.training and weights.trainable:
            self._masters_changed = True   # an optimizer may step them before the next call
            with self._masters():
                return forward(*args, **kwargs)
        if self._masters_changed:
            weights.refresh()
            self._masters_changed = False
        return forward(*args, **kwargs)

    def _learn(self, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The first call: the plan with FP32 weights (autocast casts them per call: the same
        outputs), recording which weights may be held low. A call that raises learns nothing."""
        with WeightUseRecorder(self.model, self.device_type, self._dtype_of) as recorder:
            output = forward(*args, **kwargs)
        self._learning = False
        self.weights = LowWeights(self.model, self._dtype_of, recorder.uses())
        if self.materialized:
            self.weights.drop_fp32()
        return output

    def _root_apply(self, apply: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``.to()``, ``.double()``, ``.cuda()``...: the FP32 masters are converted, then held
        low again; a conversion to float64 is refused (autocast never lowers float64)."""
        low = any(PRECISIONS[p].low for p in (self.plan.default, *self.plan.layers.values()))
        if low and fn(torch.zeros(())).dtype == torch.float64:
            raise PlanError("this plan runs units in low precision, which autocast cannot do from float64: "
                            "remove the plan before converting the model to float64")
        with self._masters():
            result = apply(fn, *args, **kwargs)
        self._moved_to(model_device_type(self.model, self.device_type))
        return result

    def _root_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        """The FP32 masters, as without the plan."""
        with self._masters():
            return state_dict(*args, **kwargs)

    def _root_load_state_dict(self, load_state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        """Loads into the FP32 masters; the low copies are re-cast from what was loaded."""
        with self._masters():
            return load_state_dict(*args, **kwargs)

    @contextmanager
    def _masters(self) -> Iterator[None]:
        """The FP32 masters in the model for a block; the low copies after it, re-cast where a
        master changed."""
        if self.weights is not None:
            self.weights.restore()
        try:
            yield
        finally:
            if self.weights is not None:
                self.weights.hold()

    def _moved_to(self, device_type: str) -> None:
        if device_type == self.device_type:
            return
        self.device_type = device_type
        for _, _, wrapper in self._saved:
            inner = wrapper.original if isinstance(wrapper, _RootMethod) and wrapper.name == "forward" else wrapper
            if isinstance(inner, _Forward):
                inner.device_type = device_type

    # -- the handle's own API ------------------------------------------------------------------
    def prepare(self, example_inputs: Any) -> PlanHandle:
        """Hold the low weights now, learning from ``example_inputs`` (a batch) which weights
        only their unit reads, on a shadow of the model that leaves it untouched (otherwise done
        during the first call). A no-op once done."""
        if self._learning:
            with self.suspended():
                uses = find_weight_uses_aside(self.model, example_inputs, self.device_type)
            self._learning = False
            self.weights = LowWeights(self.model, self._dtype_of, uses)
            if self.materialized:
                self.weights.drop_fp32()
        return self

    def _install(self) -> None:
        for module, _, wrapper in self._saved:
            name = wrapper.name if isinstance(wrapper, _RootMethod) else "forward"
            module.__dict__[name] = wrapper
        self._installed = True

    def _uninstall(self) -> None:
        for module, own, wrapper in reversed(self._saved):
            name = wrapper.name if isinstance(wrapper, _RootMethod) else "forward"
            if own is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = own
        self._installed = False

    def __deepcopy__(self, memo: dict[int, Any]) -> PlanHandle | None:
        """Reached through ``copy.deepcopy`` of the model: the same plan over the copy's modules
        and wrappers (the memo maps both). A copy made inside ``suspended()`` is a plain model."""
        if not self._installed:
            return None
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.model = copy.deepcopy(self.model, memo)
        clone._saved = copy.deepcopy(self._saved, memo)
        clone.weights = copy.deepcopy(self.weights, memo)
        clone._unfused = copy.deepcopy(self._unfused, memo)
        clone._fast_path = []
        return clone

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The model exactly as without the plan for a block: the FP32 weights swapped back by
        reference (cheap: no module walk, no cast)."""
        self._uninstall()
        try:
            with self._masters():
                yield
        finally:
            self._install()

    def materialize(self) -> PlanHandle:
        """Drop the FP32 copies of the weights held low, so that their memory is really freed
        (the deployed form); before the first call, as soon as it has learnt which weights to
        hold. The plan can no longer be removed."""
        if self.weights is not None:
            self.weights.drop_fp32()
        self.materialized = True
        return self

    def remove(self) -> None:
        """Restore every wrapped method and FP32 weight exactly (with whatever the user loaded or
        assigned meanwhile); safe to call twice."""
        if self.materialized:
            raise PlanError("this plan was materialized (its FP32 weights dropped): it cannot be removed")
        self._uninstall()
        if self.weights is not None:
            self.weights.restore()
            self.weights = None
        self._learning = False
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


_learn_eagerly = _disable_dynamo(PlanHandle._learn)   # imports dynamo only when first called


def _refuse_float64(modules: list[tuple[str, nn.Module]], precision: dict[str, str]) -> None:
    """Autocast never lowers float64: a low unit holding float64 weights cannot run its plan."""
    for name, module in modules:
        if not PRECISIONS[precision[name]].low:
            continue
        for attribute, tensor in module.named_parameters(recurse=False):
            if tensor.dtype == torch.float64:
                raise PlanError(f"{name or '<root>'}.{attribute} is float64, which autocast cannot lower to "
                                f"{precision[name]}: convert the model with model.float() first")


def _check_ties(plan: Plan) -> None:
    for unit, outer in plan.ties.items():
        if plan.precision(unit) != plan.precision(outer):
            raise PlanError(f"ties: {unit!r} must share the precision of {outer!r} (the model cannot run them "
                            f"apart), but the plan gives {plan.precision(unit)} and {plan.precision(outer)}")


def apply_plan(model: nn.Module, plan: Plan, *, device_type: str | None = None,
               fingerprint_mismatch: str = "error", example_inputs: Any = None,
               modules: list[tuple[str, nn.Module]] | None = None,
               weight_uses: WeightUses | None = None) -> PlanHandle:
    """Make ``model`` run each unit in the dtype ``plan`` gives it. Never runs the model.

    Returns a handle that is also a context manager::

        with apply_plan(model, load_plan("plan.yaml")):
            logits = model(batch)

    Inference plans (``runtime.weights: low``) hold each low unit's own weights in its dtype:
    the same outputs as FP32 weights, without the per-call cast. Which weights only their own
    unit reads is learnt during the first call (which runs once, with the FP32 weights cast per
    call: the same outputs), or now from ``example_inputs`` on a shadow of the model that leaves
    it untouched. ``handle.materialize()`` then frees the FP32 copies.

    ``modules`` (``list(model.named_modules())``) and ``weight_uses`` save that work for
    callers that apply many plans to one model, like the search.
    """
    if handle_of(model) is not None:
        raise PlanError("a plan is already applied to this model: call handle.remove() first")
    plan.validate_for(model, fingerprint_mismatch=fingerprint_mismatch,
                      names={name for name, _ in modules} if modules is not None else None)
    plan = plan.for_model(model)
    _check_ties(plan)
    device_type = device_type or model_device_type(model, plan.target.get("device", "cpu"))
    if weight_uses is None and example_inputs is not None and plan.resolved_runtime.weights == "low":
        weight_uses = find_weight_uses_aside(model, example_inputs, device_type)
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
