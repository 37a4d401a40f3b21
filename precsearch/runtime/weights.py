"""Low-precision weights held while a plan is applied (``runtime.weights: low``).

Autocast casts an FP32 weight to the unit's dtype on every call, with the same rounding each
time: holding the cast weight instead gives bit-identical outputs without the per-call cast,
and with less memory. That holds only for a tensor that nothing but its unit's autocast-eligible
ops (or a storage unit's table reads, which read it in the unit's dtype: see ``runtime``) read,
and whose dtype nobody looks at. ``WeightUseRecorder`` finds out while the model runs
once (in FP32, or under the plan with FP32 weights, which autocast casts per call): a tensor read
by a non-eligible op (a norm, or an embedding op outside a storage unit), by a module that does
not own it (a parent reading a child's ``.weight``), or whose ``.dtype`` is read (``x.to(self.proj.weight.dtype)``) stays FP32.
A tensor tied between modules (GPT-2's ``lm_head`` and ``wte``) is held as one low copy per dtype:
units tied at one precision share it, and ``restore()`` ties them to the master again.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from precsearch.runtime import batches as _batches
from precsearch.runtime.ops import is_storage_module, is_unit_op, op_name
from precsearch.runtime.recording import OpRecorder

_DTYPE = torch._C.TensorBase.dtype   # the descriptor whose ``__get__`` reads a tensor's dtype
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclasses.dataclass(frozen=True)
class WeightUses:
    """For each weight (parameter or buffer, by storage): the modules that register it, and who
    reads it how. A property of the model and its inputs, not of a plan: computed once."""

    owners: dict[int, frozenset[str]]        # storage -> modules that register it
    readers: dict[int, frozenset[str]]       # storage -> units whose (non-view) ops read it
    only_eligible: dict[int, frozenset[str]]  # storage -> readers whose every read is an eligible op
    dtype_read: frozenset[int] = frozenset()  # storages whose ``.dtype`` the model looked at

    def may_hold_low(self, storage: int, module: str) -> bool:
        """Whether ``module`` may hold its reference to this weight in low precision."""
        readers = self.readers.get(storage, frozenset())
        owners = self.owners.get(storage, frozenset())
        return (module in self.only_eligible.get(storage, frozenset())
                and readers <= owners                # tied owners read through their own attribute
                and storage not in self.dtype_read)  # the model's code may branch on its dtype

    def renamed(self, storages: dict[int, int]) -> WeightUses:
        """The same uses, keyed by other storages (``storages`` maps old keys to new ones)."""
        def rename(table: dict[int, frozenset[str]]) -> dict[int, frozenset[str]]:
            return {storages.get(key, key): value for key, value in table.items()}

        return WeightUses(rename(self.owners), rename(self.readers), rename(self.only_eligible),
                          frozenset(storages.get(key, key) for key in self.dtype_read))


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _weights(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(module name, attribute, tensor) for every floating parameter and buffer, ties included."""
    found = []
    for name, module in model.named_modules():
        for attribute, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
            if tensor.is_floating_point() and tensor.numel():
                found.append((name, attribute, tensor))
    return found


class _DtypeReads(TorchFunctionMode):
    """Which weights' ``.dtype`` is read while it is active."""

    def __init__(self, storages: set[int]) -> None:
        super().__init__()
        self.storages = storages
        self.read: set[int] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if getattr(func, "__self__", None) is _DTYPE and args and isinstance(args[0], torch.Tensor):
            key = _storage(args[0])
            if key in self.storages:
                self.read.add(key)
        return func(*args, **(kwargs or {}))


class WeightUseRecorder:
    """Records, while active, which unit's ops read each weight of ``model``, and how.

    Under a plan with FP32 weights, a low unit's eligible op reads its weight through autocast's
    cast to the unit's dtype (``low_dtype_of``): holding the weight in that dtype replaces exactly
    that cast, so a cast to the unit's own dtype counts as an eligible read (an explicit one in
    the model's code casts the same way, so it gives the same tensor too). A storage unit's table
    read counts too: a low storage unit reads its table in its dtype, held or cast per call.
    """

    def __init__(self, model: nn.Module, device_type: str,
                 low_dtype_of: dict[str, torch.dtype | None] | None = None) -> None:
        self.owners: dict[int, set[str]] = defaultdict(set)
        for module, _, tensor in _weights(model):
            self.owners[_storage(tensor)].add(module)
        self.low_dtype_of = low_dtype_of or {}
        self.storage = frozenset(name for name, module in model.named_modules() if is_storage_module(module))
        self.device_type = device_type
        self.reads: dict[int, dict[str, set[bool]]] = defaultdict(lambda: defaultdict(set))
        self.ops = OpRecorder(model, device_type, on_op=self._on_op)
        self.dtypes = _DtypeReads(set(self.owners))

    def _on_op(self, func: Any, args: tuple[Any, ...], output: Any, unit: str) -> None:
        if getattr(func, "is_view", False):
            return  # a view computes nothing; the op that consumes it is the read
        name = op_name(func)
        eligible = is_unit_op(name, self.device_type, unit in self.storage) or (
            name == "_to_copy" and isinstance(output, torch.Tensor) and output.dtype == self.low_dtype_of.get(unit))
        for arg in torch.utils._pytree.tree_leaves(args):
            if isinstance(arg, torch.Tensor) and _storage(arg) in self.owners:
                self.reads[_storage(arg)][unit].add(eligible)

    def __enter__(self) -> WeightUseRecorder:
        self.dtypes.__enter__()  # type: ignore[no-untyped-call]  # unannotated in torch
        self.ops.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.ops.__exit__(*exc)
        finally:
            self.dtypes.__exit__(*exc)  # type: ignore[no-untyped-call]  # unannotated in torch

    def uses(self) -> WeightUses:
        return WeightUses(
            owners={key: frozenset(value) for key, value in self.owners.items()},
            readers={key: frozenset(units) for key, units in self.reads.items()},
            only_eligible={key: frozenset(unit for unit, kinds in units.items() if kinds == {True})
                           for key, units in self.reads.items()},
            dtype_read=frozenset(self.dtypes.read))


def find_weight_uses(model: nn.Module, example_inputs: Any, device_type: str) -> WeightUses:
    """Run ``model`` once in FP32 on ``example_inputs`` (a batch) and record which unit's ops read
    each weight. The model runs as it is: for a search's own batches."""
    with torch.no_grad(), WeightUseRecorder(model, device_type) as recorder:
        _batches.call(model, example_inputs)
    return recorder.uses()


def find_weight_uses_aside(model: nn.Module, example_inputs: Any, device_type: str) -> WeightUses:
    """``find_weight_uses`` that leaves ``model`` exactly as it was: it runs a shadow that shares
    the parameters but has its own buffers and Python state, none of the model's hooks, and the
    random number generators restored afterwards (a train-mode BatchNorm counts no batch, a
    dropout draws nothing, a hook does not fire)."""
    shadow = _shadow(model)
    with torch.random.fork_rng(devices=None if device_type == "cuda" else []):
        uses = find_weight_uses(shadow, example_inputs, device_type)
    to_model = {_storage(mine): _storage(theirs)
                for (_, _, mine), (_, _, theirs) in zip(_weights(shadow), _weights(model))}
    return uses.renamed(to_model)


def _shadow(model: nn.Module) -> nn.Module:
    saved = [(module, attribute, getattr(module, attribute)) for module in model.modules()
             for attribute in _HOOKS if getattr(module, attribute, None)]
    try:
        for module, attribute, hooks in saved:
            setattr(module, attribute, type(hooks)())
        return copy.deepcopy(model, {id(p): p for p in model.parameters()})
    finally:
        for module, attribute, hooks in saved:
            setattr(module, attribute, hooks)


def _cast_key(tensor: torch.Tensor) -> tuple[object, ...]:
    """Changes whenever the tensor's values may have: edited in place, ``.data`` replaced, moved."""
    return id(tensor), tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device, tensor.shape


@dataclasses.dataclass
class _Held:
    """One module attribute held low: the FP32 master and its low copy."""

    module: nn.Module
    attribute: str
    master: torch.Tensor
    low: torch.Tensor
    cast_from: tuple[object, ...] = ()   # the master's _cast_key when ``low`` was cast from it
    low_key: tuple[object, ...] = ()     # the low copy's _cast_key when it was last put in place

    def __deepcopy__(self, memo: dict[int, Any]) -> _Held:
        """A copy whose keys describe the copied tensors: unchanged stays unchanged."""
        copied = _Held(copy.deepcopy(self.module, memo), self.attribute, copy.deepcopy(self.master, memo),
                       copy.deepcopy(self.low, memo))
        copied.cast_from = _cast_key(copied.master) if self.cast_from == _cast_key(self.master) else ()
        copied.low_key = _cast_key(copied.low) if self.low_key == _cast_key(self.low) else ()
        return copied


class LowWeights:
    """Holds each low unit's own weights in its dtype. ``restore()`` puts the FP32 masters back
    by reference (ties included) and ``hold()`` the low ones again, re-cast only when a master
    changed. What the user does to the module meanwhile is kept: a tensor assigned while held
    becomes the master; a low copy edited in place is written back to its master."""

    def __init__(self, model: nn.Module, dtype_of: dict[str, torch.dtype | None], uses: WeightUses) -> None:
        self.held: list[_Held] = []
        modules = dict(model.named_modules())
        weights = _weights(model)
        holders: dict[int, dict[str, torch.dtype]] = defaultdict(dict)  # tensor -> module -> the dtype it holds
        for name, _, tensor in weights:
            dtype = dtype_of.get(name)
            if dtype is not None and tensor.dtype != torch.float64 and uses.may_hold_low(_storage(tensor), name):
                holders[id(tensor)][name] = dtype
        low: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        for name, attribute, tensor in weights:
            dtype = holders[id(tensor)].get(name) or _as_its_readers(
                holders[id(tensor)], uses.readers.get(_storage(tensor), frozenset()), name)
            if dtype is None:
                continue
            key = (id(tensor), dtype)
            if key not in low:
                low[key] = _low_copy(tensor, dtype)
            self.held.append(_Held(modules[name], attribute, tensor, low[key], _cast_key(tensor)))
        self.materialized = False
        self.hold()

    @property
    def trainable(self) -> bool:
        """A master needs gradients: calls with grad enabled must run the masters."""
        return not self.materialized and any(h.master.requires_grad for h in self.held)

    def hold(self) -> None:
        for held in self.held:
            current = getattr(held.module, held.attribute)
            if current is not held.master and current is not held.low:  # assigned while restored
                held.master = current
            if _cast_key(held.master) != held.cast_from:
                self._recast(held)
            setattr(held.module, held.attribute, held.low)
            held.low_key = _cast_key(held.low)

    def refresh(self) -> None:
        """Re-cast the low copies whose master changed (an optimizer step on the masters)."""
        for held in self.held:
            if _cast_key(held.master) != held.cast_from:
                self._recast(held)
                held.low_key = _cast_key(held.low)

    def restore(self) -> None:
        for held in self.held:
            current = getattr(held.module, held.attribute)
            if current is not held.low:                    # the user assigned a tensor while held
                held.master = current
            elif _cast_key(held.low) != held.low_key and not self.materialized:  # edited in place
                with torch.no_grad():
                    held.master.copy_(held.low)
            setattr(held.module, held.attribute, held.master)

    def _recast(self, held: _Held) -> None:
        source = held.master
        with torch.no_grad():
            if held.low.shape == source.shape and held.low.device == source.device and held.low is not source:
                held.low.copy_(source)
            else:
                held.low = _low_copy(source, held.low.dtype)
        held.cast_from = _cast_key(source)

    def drop_fp32(self) -> None:
        """Forget the FP32 masters (their memory is freed unless held elsewhere): ``restore`` then
        keeps the low copies."""
        for held in self.held:
            held.master = held.low
            held.cast_from = _cast_key(held.low)
        self.materialized = True


def _as_its_readers(holders: dict[str, torch.dtype], readers: frozenset[str], module: str) -> torch.dtype | None:
    """The dtype a module that registers a tensor but never reads it holds it in: its readers'
    one dtype, when every reader holds it (T5's ``shared``, whose table only the ``embed_tokens``
    of encoder and decoder read); otherwise it alone would keep the FP32 tensor alive."""
    dtypes = set(holders.values())
    if module in readers or not readers or not readers <= holders.keys() or len(dtypes) != 1:
        return None
    return dtypes.pop()


def _low_copy(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cast = tensor.detach().to(dtype)
    return nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's distinct floating weights (parameters and buffers) by dtype name."""
    from precsearch.runtime.precisions import name_of_dtype

    seen: set[int] = set()
    total: Counter[str] = Counter()
    for _, _, tensor in _weights(model):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total[name_of_dtype(tensor.dtype)] += tensor.numel() * tensor.element_size()
    return dict(total)


MB = 2**20   # what precsearch means by MB: weights, peak memory, memory budgets, package sizes


def weight_mb(model: nn.Module) -> float:
    """The model's distinct floating weights in MB, all dtypes together, as it is now (a plan's
    low weights held, ties counted once)."""
    return sum(weight_bytes(model).values()) / MB
