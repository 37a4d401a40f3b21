"""Which ops autocast lowers, per device type, and what they cost.

The names come from the ``lower_precision_fp`` lists in ATen's ``autocast_mode.cpp`` (the ops
autocast casts to FP16/BF16), plus the kernels those ops reach below the autocast dispatch key
(``linear`` becomes ``mm``/``addmm``, ``conv2d`` becomes ``convolution``, ...). One set therefore
serves a ``torch.export`` graph (op level), an FX graph (function and module level) and a
dispatch-mode recording (kernel level).

Storage modules (``nn.Embedding``, ``nn.EmbeddingBag``) hold floating weights but run no eligible
op: their one op reads rows of their table (``STORAGE_OPS``), and makes them *storage* units,
whose precision is the dtype their weights are held in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_COMMON = {
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "linalg_vecdot",
    "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "_convolution", "prelu", "_prelu_kernel",
    "scaled_dot_product_attention",
    # recurrent layers as torch.export records them (they reach mkldnn_rnn_layer / _cudnn_rnn)
    "lstm", "gru", "rnn_tanh", "rnn_relu",
    # fused layer kernels: a whole encoder layer or attention block as one op (torch's fast paths)
    "_transformer_encoder_layer_fwd",
    # FP8 GEMMs (the fp8 precision's kernel; the audit reads their operands' dtype)
    "_scaled_mm",
}
_KERNELS_CPU = {
    "_scaled_dot_product_flash_attention_for_cpu", "_native_multi_head_attention",
    "mkldnn_rnn", "mkldnn_rnn_layer",
    # backward kernels of the above (matmul backward is mm/bmm again)
    "convolution_backward", "_scaled_dot_product_flash_attention_for_cpu_backward", "mkldnn_rnn_layer_backward",
}
_KERNELS_CUDA = {
    "addmv", "addr", "mv", "einsum", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell",
    "rnn_relu_cell", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_cudnn_rnn", "cudnn_convolution",
    "convolution_backward", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward", "_cudnn_rnn_backward",
}
# torch.nn.functional / torch / Tensor-method spellings seen in FX graphs.
_ALIASES = {"__matmul__": "matmul", "__rmatmul__": "matmul"}

ELIGIBLE_OPS: dict[str, frozenset[str]] = {
    "cpu": frozenset(_COMMON | _KERNELS_CPU | {"einsum"}),
    "cuda": frozenset(_COMMON | _KERNELS_CUDA),
}

# Leaf modules whose forward is a single eligible op (used where FX keeps modules opaque).
_MODULE_OPS: dict[type[nn.Module], str] = {
    nn.Linear: "linear", nn.Bilinear: "linear",
    nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d", nn.PReLU: "prelu",
    nn.LSTM: "mkldnn_rnn", nn.GRU: "mkldnn_rnn", nn.RNN: "mkldnn_rnn",
    nn.MultiheadAttention: "_native_multi_head_attention",
}

# Storage modules and the ops that read their tables (the export / FX / kernel spellings).
_STORAGE_MODULES: dict[type[nn.Module], str] = {nn.Embedding: "embedding", nn.EmbeddingBag: "embedding_bag"}
STORAGE_OPS = frozenset({"embedding", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only"})


def device_type_of(device: str | torch.device) -> str:
    """``"cuda:1"`` -> ``"cuda"``; only cpu and cuda have autocast lists here."""
    kind = torch.device(device).type
    if kind not in ELIGIBLE_OPS:
        raise ValueError(f"device {device!r} is not supported: use cpu or cuda")
    return kind


def model_device_type(model: nn.Module, fallback: str = "cpu") -> str:
    """The device type of the model's first parameter (or buffer), else ``fallback``."""
    for parameter in model.parameters():
        return device_type_of(parameter.device)
    for buffer in model.buffers():
        return device_type_of(buffer.device)
    return device_type_of(fallback)


def op_name(target: object) -> str:
    """Normalise an aten overload, torch function or method name to one op name."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        name = str(schema.name).split("::")[-1]
    elif isinstance(target, str):
        name = target
    else:
        name = getattr(target, "__name__", str(target))
    return _ALIASES.get(name, name)


def module_op(module: nn.Module) -> str | None:
    """The eligible op a leaf module stands for, or None."""
    for cls in type(module).__mro__:
        if cls in _MODULE_OPS:
            return _MODULE_OPS[cls]
    return None


def is_eligible(name: str, device_type: str) -> bool:
    return name in ELIGIBLE_OPS[device_type]


def is_storage_module(module: nn.Module) -> bool:
    """An embedding table read by rows. Not one that ``max_norm`` renormalises in place as it runs."""
    return isinstance(module, tuple(_STORAGE_MODULES)) and getattr(module, "max_norm", None) is None


def storage_op(module: nn.Module) -> str | None:
    """The table read a storage module stands for (where FX keeps it opaque), or None."""
    return next((op for cls, op in _STORAGE_MODULES.items() if isinstance(module, cls)), None) \
        if is_storage_module(module) else None


def is_unit_op(name: str, device_type: str, storage: bool) -> bool:
    """Whether an op makes the module that runs it a unit: an eligible op, or a table read by a
    storage module (``storage``)."""
    return is_eligible(name, device_type) or (storage and name in STORAGE_OPS)


def estimate_flops(name: str, inputs: Sequence[Sequence[int] | None], output: Sequence[int] | None) -> int:
    """Multiply-add count x2 of one op from its input/output shapes; 0 when unknown."""
    if not output or name in STORAGE_OPS:  # a table read computes nothing
        return 0
    out = math.prod(output)
    first = inputs[0] if inputs else None
    if name in {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_tbc",
                "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "cudnn_convolution"}:
        weight = inputs[1] if len(inputs) > 1 else None
        return 2 * out * math.prod(weight[1:]) if weight else 0
    if "scaled_dot_product" in name or name == "_native_multi_head_attention":
        if first is None or len(first) < 2:
            return 0
        key = inputs[1] if len(inputs) > 1 and inputs[1] else first
        return 4 * math.prod(first) * key[-2]
    if name in {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "mv", "addmv"}:
        operand = first if name not in {"addmm", "baddbmm", "addbmm", "addmv"} else (
            inputs[1] if len(inputs) > 1 else None)
        return 2 * out * operand[-1] if operand else 0
    return out
