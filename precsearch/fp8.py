"""FP8 (E4M3) matrix multiplies for ``nn.Linear`` units: the enforcement of the ``fp8`` precision.

Activations and weights are quantised to ``float8_e4m3fn`` with dynamic per-tensor scales
(``amax / 448``), and the GEMM runs in ``torch._scaled_mm`` with an explicit output dtype: the
enclosing autocast dtype when autocast is on, else the input's. Per-tensor scales keep one
recipe valid on CPU and on CUDA, where row-wise scales would force a BF16 output. The weight's
FP8 copy and scale are computed once per weight version. No autocast-eligible op ever sees a
float8 operand (autocast would silently upcast it).

CUDA's ``_scaled_mm`` checks what the CPU kernel does not (it accepted K=40 and a row-major
second operand here): ``unsuitable`` applies CUDA's rules everywhere, so a plan that passes on
CPU also runs on a GPU.
"""

from __future__ import annotations

from typing import Any

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
    """``tensor`` in E4M3 with a per-tensor scale, and the FP32 inverse scale ``_scaled_mm`` wants."""
    amax = tensor.detach().abs().amax().float().clamp(min=1e-12)
    scale = E4M3_MAX / amax
    quantized = (tensor.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return quantized, scale.reciprocal()


class Fp8Linear:
    """The forward of an ``nn.Linear`` unit in FP8 (an object, so that a deep copy of the model
    maps ``module`` to the copy's)."""

    def __init__(self, module: nn.Linear) -> None:
        self.module = module
        self.cached: tuple[Any, torch.Tensor, torch.Tensor] | None = None   # (weight version key, fp8, scale)

    def _weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.module.weight
        key = (id(weight), weight._version)
        if self.cached is None or self.cached[0] != key:
            self.cached = (key, *quantize(weight))
        return self.cached[1], self.cached[2]

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        device = input.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else input.dtype
        weight, weight_scale = self._weight()
        rows = input.reshape(-1, input.shape[-1])
        activations, input_scale = quantize(rows)
        # The weight transposed is column-major, as CUDA requires of the second operand.
        output = torch._scaled_mm(activations, weight.t(), scale_a=input_scale, scale_b=weight_scale,
                                  out_dtype=out_dtype)
        if self.module.bias is not None:
            output = output + self.module.bias.to(out_dtype)
        return output.reshape(*input.shape[:-1], self.module.out_features)


def available(device_type: str) -> bool:
    """Where ``_scaled_mm`` runs: CPU (slowly), and GPUs with FP8 tensor cores (compute 8.9+)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    return device_type == "cpu"
