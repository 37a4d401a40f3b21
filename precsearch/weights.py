"""Low-precision weights held while a plan is applied (``runtime.weights: low``).

Autocast casts an FP32 weight to the unit's dtype on every call, with the same rounding each
time: holding the cast weight instead gives bit-identical outputs without the per-call cast,
and with less memory. That holds only for a tensor that nothing but its unit's autocast-eligible
ops read. ``find_weight_uses`` finds out, by running the model once in FP32 under a recording: a
tensor read by a non-eligible op (an embedding, a norm), or by a module that does not own it (a
parent reading a child's ``.weight``), stays FP32. A tensor tied between modules (GPT-2's
``lm_head`` and ``wte``) gets a low copy of its own in each low unit that may hold one.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn

from precsearch import batches as _batches
from precsearch.ops import is_eligible, op_name
from precsearch.recording import OpRecorder


@dataclasses.dataclass(frozen=True)
class WeightUses:
    """For each weight (parameter or buffer, by storage): the modules that register it, and who
    reads it how. A property of the model and its inputs, not of a plan: computed once."""

    owners: dict[int, frozenset[str]]        # storage -> modules that register it
    readers: dict[int, frozenset[str]]       # storage -> units whose (non-view) ops read it
    only_eligible: dict[int, frozenset[str]]  # storage -> readers whose every read is an eligible op

    def may_hold_low(self, storage: int, module: str) -> bool:
        """Whether ``module`` may hold its reference to this weight in low precision."""
        readers = self.readers.get(storage, frozenset())
        owners = self.owners.get(storage, frozenset())
        return (module in self.only_eligible.get(storage, frozenset())
                and readers <= owners)  # tied owners read through their own attribute


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


def find_weight_uses(model: nn.Module, example_inputs: Any, device_type: str) -> WeightUses:
    """Run ``model`` once in FP32 on ``example_inputs`` (a batch) and record which unit's ops read
    each weight."""
    return weight_uses_of_call(model, *_batches.split(example_inputs), device_type)


def weight_uses_of_call(model: nn.Module, args: tuple, kwargs: dict, device_type: str) -> WeightUses:
    """``find_weight_uses`` for a call ``model(*args, **kwargs)``."""
    owners: dict[int, set[str]] = defaultdict(set)
    for module, _, tensor in _weights(model):
        owners[_storage(tensor)].add(module)
    reads: dict[int, dict[str, set[bool]]] = defaultdict(lambda: defaultdict(set))

    def on_op(func: Any, args: tuple, output: Any, unit: str) -> None:
        if getattr(func, "is_view", False):
            return  # a view computes nothing; the op that consumes it is the read
        eligible = is_eligible(op_name(func), device_type)
        for arg in torch.utils._pytree.tree_leaves(args):
            if isinstance(arg, torch.Tensor) and _storage(arg) in owners:
                reads[_storage(arg)][unit].add(eligible)

    with torch.no_grad(), OpRecorder(model, device_type, on_op=on_op):
        model(*args, **kwargs)
    return WeightUses(
        owners={key: frozenset(value) for key, value in owners.items()},
        readers={key: frozenset(units) for key, units in reads.items()},
        only_eligible={key: frozenset(unit for unit, kinds in units.items() if kinds == {True})
                       for key, units in reads.items()})


class LowWeights:
    """Holds each low unit's own weights in its dtype; ``restore()`` puts the FP32 tensors back
    by reference (ties included), ``hold()`` the low ones again (cast once, kept)."""

    def __init__(self, model: nn.Module, dtype_of: dict[str, torch.dtype | None], uses: WeightUses) -> None:
        # (module, attribute, the FP32 tensor, its low copy)
        self.swaps: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        modules = dict(model.named_modules())
        low: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        for name, attribute, tensor in _weights(model):
            dtype = dtype_of.get(name)
            if dtype is None or not uses.may_hold_low(_storage(tensor), name):
                continue
            key = (id(tensor), dtype)
            if key not in low:
                cast = tensor.detach().to(dtype)
                low[key] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast
            self.swaps.append((modules[name], attribute, tensor, low[key]))
        self.hold()

    def hold(self) -> None:
        for module, attribute, _, low in self.swaps:
            setattr(module, attribute, low)

    def restore(self) -> None:
        for module, attribute, original, _ in self.swaps:
            setattr(module, attribute, original)

    def drop_fp32(self) -> None:
        """Forget the FP32 tensors (their memory is freed unless held elsewhere): ``restore`` is
        no longer possible."""
        self.swaps = [(module, attribute, low, low) for module, attribute, _, low in self.swaps]


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's distinct floating weights (parameters and buffers) by dtype name."""
    from precsearch.precisions import name_of_dtype

    seen: set[int] = set()
    total: Counter = Counter()
    for _, _, tensor in _weights(model):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total[name_of_dtype(tensor.dtype)] += tensor.numel() * tensor.element_size()
    return dict(total)
