"""Which unit ran which op, in which dtype: the recording the graph walker and the audit share.

``ModuleStack`` follows the innermost executing module through global forward hooks;
``OpRecorder`` (a dispatch mode) records every autocast-eligible kernel, and every table read of
a storage unit (an embedding: the dtype its table is held in), with that unit and the dtype it
computed in; during backward, ops are attributed to the unit whose forward created the
autograd node that runs them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from precsearch.runtime.ops import is_storage_module, is_unit_op, op_name
from precsearch.runtime.precisions import OPERAND_OPS


@dataclasses.dataclass(frozen=True)
class OpRecord:
    unit: str       # innermost module executing the op ("" is the root)
    op: str         # aten kernel name, e.g. "addmm"
    dtype: torch.dtype
    shapes: tuple[tuple[int, ...] | None, ...]   # input shapes (None for non-tensors), then the output's
    phase: str = "forward"


class ModuleStack:
    """Tracks the innermost executing module of ``model`` through global forward hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(module): name for name, module in model.named_modules()}
        self.stack: list[str] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> ModuleStack:
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

    def __init__(self, modules: ModuleStack) -> None:
        super().__init__()
        self.modules = modules
        self.owner: dict[Any, str] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
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
    """Records every autocast-eligible kernel that runs, and every storage unit's table read (in
    the dtype of the table it read), with its unit and computed dtype.

    ``on_op(func, args, output, unit)`` is called for every op (eligible or not), which lets
    the graph walker follow data flow with the same recording.
    """

    def __init__(self, model: nn.Module, device_type: str,
                 on_op: Callable[[Any, tuple[Any, ...], Any, str], None] | None = None,
                 backward: bool = False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # unannotated in torch
        self.device_type = device_type
        self.modules = ModuleStack(model)
        self.storage = frozenset(name for name, module in model.named_modules() if is_storage_module(module))
        self.nodes = _NodeOwners(self.modules) if backward else None
        self.records: list[OpRecord] = []
        self.on_op = on_op
        self.phase = "forward"

    def __enter__(self) -> OpRecorder:
        self.modules.__enter__()
        if self.nodes is not None:
            self.nodes.__enter__()  # type: ignore[no-untyped-call]  # unannotated in torch
        super().__enter__()  # type: ignore[no-untyped-call]  # unannotated in torch
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)  # type: ignore[no-untyped-call]  # unannotated in torch
        finally:
            if self.nodes is not None:
                self.nodes.__exit__(*exc)  # type: ignore[no-untyped-call]  # unannotated in torch
            self.modules.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        output = func(*args, **(kwargs or {}))
        with torch._C.DisableTorchFunction():  # what follows reads dtypes: no torch-function mode sees it
            self._record(func, args, output)
        return output

    def _record(self, func: Any, args: tuple[Any, ...], output: Any) -> None:
        unit = self.modules.current
        if self.nodes is not None and self.phase == "backward":
            unit = self.nodes.owner.get(torch._C._current_autograd_node(), unit)
        name = op_name(func)
        if is_unit_op(name, self.device_type, unit in self.storage):
            # Most kernels compute in their output's dtype; an FP8 GEMM outputs BF16/FP32 from
            # float8 operands, and is known by those.
            outputs = args if name in OPERAND_OPS else (output if isinstance(output, (tuple, list)) else (output,))
            first = next((t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
            if first is not None:
                shapes = tuple(_shape(arg) for arg in args) + (_shape(first),)
                self.records.append(OpRecord(unit, name, first.dtype, shapes, self.phase))
        if self.on_op is not None:
            self.on_op(func, args, output, unit)
