"""The precisions precsearch knows, each defined once: what plans, spaces, the search, the
runtime, the audit, reports and plots ask about it.

>>> PRECISIONS["bf16"].dtype, PRECISIONS["bf16"].code
(torch.bfloat16, 'b')
>>> [p.name for p in low_precisions()]
['fp8', 'fp16', 'bf16']

Adding a precision is one entry here plus, if autocast cannot enforce it, its enforcement.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from precsearch.runtime import fp8
@dataclasses.dataclass(frozen=True)
class Precision:
    """One precision a unit can run in.

    ``enforce(device_type)`` returns the context a unit's forward runs in (autocast with the
    dtype, or autocast disabled for FP32). A precision autocast cannot give (FP8) replaces the
    unit's forward instead (``replace_forward``), on the modules it suits (``unsuitable``).
    The audit recognises a precision by the dtype an eligible op computed in, or for the kernels
    in ``operand_ops`` by their first operand's dtype.
    """

    name: str                       # the word in plans, spaces, reports: "bf16"
    dtype: torch.dtype
    code: str                       # one letter in a plan code (``decisions.encode``)
    color: str                      # in plots
    loss_scaling: bool = False      # training needs dynamic loss scaling (a narrow exponent range)
    preference: int = 0             # which low precision the search tries first while unmeasured (lower first)
    available: Callable[[str], bool] = lambda device_type: True
    replace_forward: Callable[[Any], Callable[..., Any]] | None = None   # takes a suitable module
    unsuitable: Callable[[nn.Module], str | None] = lambda module: None
    operand_ops: frozenset[str] = frozenset()
    inference_only: bool = False

    @property
    def low(self) -> bool:
        return self.dtype != torch.float32

    @property
    def autocast(self) -> bool:
        """Enforced by ``torch.autocast`` (so it may be a plan's default, and weights may be held in it)."""
        return self.replace_forward is None

    def enforce(self, device_type: str) -> AbstractContextManager[None]:
        if not self.low:
            return torch.autocast(device_type, enabled=False)
        if not self.autocast:
            return contextlib.nullcontext()  # the replaced forward follows the enclosing autocast
        return torch.autocast(device_type, dtype=self.dtype)


def _autocast_to(dtype: torch.dtype) -> Callable[[str], bool]:
    def available(device_type: str) -> bool:
        if not torch.amp.autocast_mode.is_autocast_available(device_type):
            return False
        if device_type == "cuda" and dtype == torch.bfloat16:
            return bool(torch.cuda.is_bf16_supported())
        return True
    return available


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp8", fp8.E4M3, "e", "#8e44ad", preference=2, available=fp8.available, replace_forward=fp8.Fp8Linear,
              unsuitable=fp8.unsuitable, operand_ops=frozenset({"_scaled_mm"}), inference_only=True),
    Precision("fp16", torch.float16, "h", "#e8871e", loss_scaling=True, preference=1,
              available=_autocast_to(torch.float16)),
    Precision("bf16", torch.bfloat16, "b", "#2f6fb0", preference=0, available=_autocast_to(torch.bfloat16)),
    Precision("fp32", torch.float32, "f", "#8c8c8c"),
)}
NAMES: tuple[str, ...] = tuple(PRECISIONS)
AUTOCAST: tuple[str, ...] = tuple(name for name, p in PRECISIONS.items() if p.autocast)  # a space's default dtypes
FP32 = "fp32"
_BY_CODE = {p.code: p.name for p in PRECISIONS.values()}
_BY_DTYPE = {p.dtype: p.name for p in PRECISIONS.values()}


OPERAND_OPS: frozenset[str] = frozenset().union(*(p.operand_ops for p in PRECISIONS.values()))


def low_precisions() -> list[Precision]:
    return [p for p in PRECISIONS.values() if p.low]


def is_precision(value: object) -> bool:
    return isinstance(value, str) and value in PRECISIONS


def by_code(code: str) -> str:
    return _BY_CODE[code]


def name_of_dtype(dtype: torch.dtype) -> str:
    """The precision an op computed in (float64 counts as fp32: no autocast op lowers it)."""
    if dtype == torch.float64:
        return FP32
    return _BY_DTYPE.get(dtype, str(dtype))


def needs_loss_scaling(precisions: Iterable[str]) -> bool:
    """Whether any of ``precisions`` (names) needs dynamic loss scaling in training."""
    return any(PRECISIONS[name].loss_scaling for name in precisions if name in PRECISIONS)


def choices_text() -> str:
    """``"fp16, bf16, fp32"``: for messages and help texts."""
    return ", ".join(NAMES)
