"""Training with a plan: each unit's forward and backward in its planned dtype, FP32 master
weights (parameters never change dtype), and dynamic loss scaling when any unit is FP16.

A plain PyTorch loop adopts a plan in three lines::

    trainer = Trainer(model, load_plan("plan.yaml"), optimizer)     # applies the plan
    for inputs, target in loader:
        loss = trainer.step(inputs, target)                          # forward, backward, step
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from precsearch.runtime import batches as _batches
from precsearch.runtime.accuracy import Fidelity, check_limit, flatten_outputs
from precsearch.runtime.batches import LossFn, compute_loss, split_training
from precsearch.runtime.ops import model_device_type
from precsearch.runtime.plan import LossScaling, Plan, Runtime
from precsearch.runtime.precisions import PRECISIONS
from precsearch.runtime.apply import applied_plan, apply_plan


def default_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the first floating output (logits) against ``target``."""
    logits = flatten_outputs(output)[0]
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))


def grad_scaler(plan: Plan | None, device_type: str) -> torch.amp.GradScaler | None:
    """A GradScaler configured by the plan's ``loss_scaling`` (torch's defaults if absent), or
    None for plans that need none (BF16 keeps FP32's range)."""
    if plan is None or not plan.needs_loss_scaling:
        return None
    scaling = plan.loss_scaling or LossScaling()
    return torch.amp.GradScaler(device_type, init_scale=scaling.init_scale, growth_factor=scaling.growth_factor,
                                backoff_factor=scaling.backoff_factor, growth_interval=scaling.growth_interval)


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None, clip: Callable[[], None] | None = None) -> None:
    """Backward from ``loss`` and an optimizer step, through ``scaler``'s dynamic loss scaling when
    given (the step is skipped and the scale backs off when gradients overflow). ``clip`` runs on
    the unscaled gradients, just before the step."""
    if scaler is None:
        loss.backward()
        if clip is not None:
            clip()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    if clip is not None:
        scaler.unscale_(optimizer)
        clip()
    scaler.step(optimizer)
    scaler.update()


class Trainer:
    """A plan applied to ``model`` for training with ``optimizer``.

    ``step(inputs, target)`` runs forward and backward in the planned dtypes, clips gradients
    (after unscaling) when ``max_grad_norm`` is set, and steps the optimizer — skipping the step
    and backing off the loss scale when FP16 gradients overflow.
    """

    def __init__(self, model: nn.Module, plan: Plan, optimizer: torch.optim.Optimizer, *,
                 loss_fn: LossFn = default_loss, max_grad_norm: float | None = None) -> None:
        self.model, self.plan, self.optimizer = model, plan, optimizer
        self.loss_fn, self.max_grad_norm = loss_fn, max_grad_norm
        self.device_type = model_device_type(model)
        # Training keeps FP32 master weights, whatever runtime an inference plan asks for.
        self.handle = apply_plan(model, dataclasses.replace(plan, runtime=Runtime(weights="fp32")),
                                 device_type=self.device_type)
        self.scaler = grad_scaler(plan, self.device_type)
        self.scales: list[float] = []    # loss scale after each step (empty without FP16)
        self.skipped = 0                 # steps skipped for non-finite gradients

    def step(self, inputs: Any, target: torch.Tensor) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = compute_loss(self.loss_fn, _batches.call(self.model, inputs), target, "loss_fn")
        before = self.scaler.get_scale() if self.scaler is not None else 0.0
        backward_and_step(loss, self.optimizer, self.scaler, self._clip if self.max_grad_norm is not None else None)
        if self.scaler is not None:
            self.scales.append(self.scaler.get_scale())
            self.skipped += self.scaler.get_scale() < before
        return float(loss.detach())

    def _clip(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# -- what the search needs in training mode -------------------------------------------------------
def _parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def _same_randomness(seed: int = 0) -> Iterator[None]:
    """Dropout draws the same masks for every candidate, so gradients compare like for like."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _backward(model: nn.Module, batches: list[Any], loss_fn: LossFn, scale: float = 1.0) -> list[nn.Parameter]:
    """Clear the gradients, then accumulate those of ``batches`` (of the loss times ``scale``)."""
    params = _parameters(model)
    for p in params:
        p.grad = None
    with _same_randomness():
        for batch in batches:
            inputs, target = split_training(batch)
            (compute_loss(loss_fn, _batches.call(model, inputs), target) * scale).backward()
    return params


def _clear(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def gradients(model: nn.Module, batches: list[Any], loss_fn: LossFn, scale: float = 1.0) -> torch.Tensor:
    """All parameter gradients over ``batches``, concatenated in float64 (divided by ``scale``)."""
    params = _backward(model, batches, loss_fn, scale)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten() for p in params])
    _clear(params)
    return flat / scale


def scaled_gradients(model: nn.Module, batches: list[Any], loss_fn: LossFn, plan: Plan | None) -> torch.Tensor:
    """Gradients as dynamic loss scaling would produce them: start at the plan's init scale and
    back off while they overflow (unscaled for plans that need no scaling)."""
    if plan is None or not plan.needs_loss_scaling:
        return gradients(model, batches, loss_fn)
    scaling = plan.loss_scaling or LossScaling()
    scale = scaling.init_scale
    for _ in range(24):
        grads = gradients(model, batches, loss_fn, scale)
        if torch.isfinite(grads).all():
            return grads
        scale *= scaling.backoff_factor
    return grads


def gradient_fidelity(model: nn.Module, batches: list[Any], loss_fn: LossFn, limit: float) -> Fidelity:
    """rel_l2 of the concatenated parameter gradients against FP32, same batches and weights."""
    for index, batch in enumerate(batches):
        split_training(batch, f"--data batch {index}")
    model.train()
    reference = gradients(model, batches, loss_fn)
    norm = float(reference.norm())

    def error(candidate: nn.Module) -> float:
        grads = scaled_gradients(candidate, batches, loss_fn, applied_plan(candidate))
        if not torch.isfinite(grads).all():
            return math.inf
        return float((grads - reference).norm()) / norm if norm > 0 else float(grads.norm() > 0) * math.inf

    return Fidelity("grad_rel_l2", check_limit(limit, "--max-error"), error)


def training_step(model: nn.Module, batch: Any, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                  plan: Plan | None, device_type: str) -> Callable[[], None]:
    """One full training step (forward, backward, optimizer step) as the search times it."""
    inputs, target = split_training(batch)
    scaler = grad_scaler(plan, device_type)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        backward_and_step(compute_loss(loss_fn, _batches.call(model, inputs), target), optimizer, scaler)
    return run


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """How FP16 gradients fare under a plan: per unit, and the loss scale over a few steps."""

    underflow: dict[str, float]   # unit -> fraction of its gradient that is zero in FP16 without scaling only
    overflow: list[str]           # units whose gradients are non-finite without scaling
    scales: list[float]
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        """As a study's ``training_diagnostics`` user attribute stores it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diagnostics:
        return cls(underflow=dict(data["underflow"]), overflow=list(data["overflow"]),
                   scales=list(data["scales"]), skipped=int(data["skipped"]))


def diagnose(model: nn.Module, plan: Plan, batches: list[Any], loss_fn: LossFn, steps: int = 10) -> Diagnostics:
    """Compare each loss-scaled (FP16) unit's unscaled gradients with FP32's, then run ``steps``
    scaled steps with a zero learning rate (weights unchanged) to record the loss-scale history."""
    units = [name for name, _ in model.named_modules() if PRECISIONS[plan.precision(name)].loss_scaling]
    underflow, overflow = {}, []
    if units:
        modules = dict(model.named_modules())
        model.train()
        reference = _per_module_grads(model, modules, units, batches, loss_fn)
        with apply_plan(model, plan):
            lowered = _per_module_grads(model, modules, units, batches, loss_fn)
        for unit in units:
            if unit not in lowered or lowered[unit].numel() == 0:
                continue
            got, want = lowered[unit], reference[unit]
            if not torch.isfinite(got).all():
                overflow.append(unit)
                continue
            lost = float(((got == 0) & (want != 0)).double().mean())
            if lost > 0.01:
                underflow[unit] = round(lost, 4)
    scales, skipped = [], 0
    if plan.needs_loss_scaling:
        optimizer = torch.optim.SGD(_parameters(model), lr=0.0)
        with Trainer(model, plan, optimizer, loss_fn=loss_fn) as trainer:
            for index in range(steps):
                inputs, target = split_training(batches[index % len(batches)])
                trainer.step(inputs, target)
            scales, skipped = trainer.scales, trainer.skipped
        _clear(_parameters(model))
    return Diagnostics(underflow, overflow, scales, skipped)


def _per_module_grads(model: nn.Module, modules: dict[str, nn.Module], units: list[str], batches: list[Any],
                      loss_fn: LossFn) -> dict[str, torch.Tensor]:
    params = _backward(model, batches, loss_fn)
    result = {}
    for unit in units:
        grads = [p.grad.flatten() for p in modules[unit].parameters(recurse=False) if p.grad is not None]
        result[unit] = torch.cat(grads) if grads else torch.empty(0)
    _clear(params)
    return result
