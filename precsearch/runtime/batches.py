"""Batches as the CLI contract defines them, and calling a model on one."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from precsearch.runtime.errors import InputError

Batch = Any  # a Tensor, a tuple/list of positional inputs, or a dict of keyword inputs
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def split(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``batch`` -> ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise InputError(
        f"a batch must be a Tensor, a tuple/list of inputs or a dict of keyword inputs, "
        f"not {type(batch).__name__}"
    )


def call(model: nn.Module, batch: Batch) -> Any:
    args, kwargs = split(batch)
    return model(*args, **kwargs)


def forward_runner(model: Callable[..., Any], batch: Batch) -> Callable[[], None]:
    """A zero-argument forward pass of ``model`` (or a loaded package) on ``batch`` under
    ``no_grad``, its outputs dropped: what timing a forward pass runs."""
    def run() -> None:
        with torch.no_grad():
            call(model, batch)  # type: ignore[arg-type]
    return run


def as_list(batches: Iterable[Batch]) -> list[Batch]:
    """Materialise ``batches`` once; an empty iterable is an input error."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise InputError("data must be a list (or iterable) of batches, not a single batch")
    try:
        materialised = list(batches)
    except TypeError:
        raise InputError(f"data must be a list (or iterable) of batches, not {type(batches).__name__}") from None
    if not materialised:
        raise InputError("data is empty: give at least one batch")
    for index, batch in enumerate(materialised):
        split(batch)
        if is_empty(batch):
            raise InputError(f"data: batch {index} is empty (every tensor in it has zero elements): "
                             f"give batches with at least one sample")
    return materialised


def is_empty(batch: Batch) -> bool:
    """A batch with tensors that all have zero elements (a batch of no tensors is not judged)."""
    tensors = list(_tensors(batch))
    return bool(tensors) and all(t.numel() == 0 for t in tensors)


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    """Every tensor inside ``value`` (tensors, tuples, lists, mappings)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def fingerprint(batches: list[Batch]) -> str:
    """A hash of the batches' structure, dtypes, shapes and values: searches on other data differ.
    Other objects inside a batch count by type (and value, for plain numbers and strings)."""
    digest = hashlib.sha256()
    for batch in batches:
        _digest_value(digest, batch)
    return "sha256:" + digest.hexdigest()


def _digest_value(digest: Any, value: Any) -> None:
    """Feed ``value`` (a batch or a part of one) into ``digest``, structure first."""
    if isinstance(value, torch.Tensor):
        dense = value.detach().to_dense() if value.layout != torch.strided else value.detach()
        digest.update(f"T{dense.dtype}{tuple(dense.shape)}".encode())
        if dense.numel():
            digest.update(dense.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"M{len(value)}".encode())
        for key, item in value.items():
            digest.update(repr(key).encode())
            _digest_value(digest, item)
    elif isinstance(value, (tuple, list)):
        digest.update(f"S{len(value)}".encode())
        for item in value:
            _digest_value(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"V{value!r}".encode())
    else:  # its repr may hold a memory address: the type alone is stable
        digest.update(f"O{type(value).__qualname__}".encode())


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move every tensor inside ``value`` (tensors, tuples, lists, dicts) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    return value


def split_training(batch: Batch, where: str = "training batch") -> tuple[Batch, torch.Tensor]:
    """A training batch ``(inputs, target)`` -> its two halves, or an InputError."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise InputError(f"{where}: training mode needs each batch as (inputs, target), "
                         f"got {type(batch).__name__}{length}")
    return batch[0], batch[1]


def compute_loss(loss_fn: LossFn, output: Any, target: torch.Tensor, name: str = "--loss") -> torch.Tensor:
    """``loss_fn(output, target)`` checked to be a scalar tensor."""
    loss = loss_fn(output, target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InputError(f"{name}: the loss must be a scalar tensor, got {shape}")
    return loss.reshape(())
