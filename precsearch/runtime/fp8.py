"""FP8 (E4M3) matrix multiplies for ``nn.Linear`` units: the enforcement of the ``fp8`` precision.

Activations and weights are quantised to ``float8_e4m3fn`` with dynamic per-tensor scales
(``amax / 448``), and the GEMM runs in ``torch._scaled_mm`` with an explicit output dtype: the
enclosing autocast dtype when autocast is on, else the input's. Per-tensor scales keep one
recipe valid on CPU and on CUDA, where row-wise scales would force a BF16 output. No
autocast-eligible op ever sees a float8 operand (autocast would silently upcast it).

Non-finite values (still per-tensor, for the reason above): the scale is the amax of the *finite*
values only, and every inf or NaN is quantised to NaN (E4M3FN has no inf; the CPU's plain cast
saturates inf to 448). So a row with an inf or NaN gives NaN in its own output row only, as it
gives inf or NaN in FP32, and never rescales, or poisons, the other rows of the batch. An empty
batch gives an empty output.

The weight is quantised on every call: a cache keyed on the tensor misses edits made through
``.data`` (``weight.data.copy_(...)`` bumps no version counter), and its key would be a guard
that makes ``torch.compile`` recompile.

CUDA's ``_scaled_mm`` checks what the CPU kernel does not (it accepted K=40 and a row-major
second operand here): ``unsuitable`` applies CUDA's rules everywhere, so a plan that passes on
CPU also runs on a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MULTIPLE = 16   # CUDA's _scaled_mm: both GEMM dimensions of the weight divisible by 16


def unsuitable(module: nn.Module) -> str | None:
    """Why ``module`` cannot run in FP8, or None when it can."""
    if type(module) is not nn.Linear:
        return f"fp8 runs nn.Linear units only, not {type(module).__name__}"
    if module.in_features % MULTIPLE or module.out_features % MULTIPLE:
        return (f"fp8 needs Linear dimensions divisible by {MULTIPLE} (CUDA's _scaled_mm); this one is "
                f"{module.in_features} -> {module.out_features}")
    return None


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor`` in E4M3 with a per-tensor scale, and the FP32 inverse scale ``_scaled_mm`` wants.

    The scale ignores inf and NaN, which become NaN (see the module docstring)."""
    scale = E4M3_MAX / finite_amax(tensor).clamp(min=1e-12)
    scaled = tensor.float() * scale
    quantized = torch.where(scaled.isfinite(), scaled.clamp(-E4M3_MAX, E4M3_MAX), torch.nan).to(E4M3)
    return quantized, scale.reciprocal()


def finite_amax(tensor: torch.Tensor) -> torch.Tensor:
    """The largest finite magnitude in ``tensor`` as an FP32 scalar; 0 when it has none."""
    magnitudes = tensor.detach().abs().float().nan_to_num(nan=0.0, posinf=0.0)
    if magnitudes.numel() == 0:
        return magnitudes.new_zeros(())
    return magnitudes.amax()


class Fp8Linear:
    """The forward of an ``nn.Linear`` unit in FP8 (an object, so that a deep copy of the model
    maps ``module`` to the copy's)."""

    def __init__(self, module: nn.Linear) -> None:
        self.module = module

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        device = input.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else input.dtype
        out_shape = (*input.shape[:-1], self.module.out_features)
        rows = input.reshape(-1, input.shape[-1])
        if rows.shape[0] == 0:
            return input.new_empty(out_shape, dtype=out_dtype)
        weight, weight_scale = quantize(self.module.weight)
        activations, input_scale = quantize(rows)
        # The weight transposed is column-major, as CUDA requires of the second operand.
        output = torch._scaled_mm(activations, weight.t(), scale_a=input_scale, scale_b=weight_scale,
                                  out_dtype=out_dtype)
        if self.module.bias is not None:
            output = output + self.module.bias.to(out_dtype)
        return output.reshape(out_shape)


def available(device_type: str) -> bool:
    """Where ``_scaled_mm`` runs: CPU (slowly), and GPUs with FP8 tensor cores (compute 8.9+)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    return device_type == "cpu"
