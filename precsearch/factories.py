"""Resolve ``MODULE:FUNC`` factories for models and data (the current directory is importable)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from torch import nn

from precsearch import batches as _batches
from precsearch.errors import InputError

DEMO_MODEL = "precsearch.examples.demo:model"
DEMO_DATA = "precsearch.examples.demo:data"
DEMO_TRAINING_DATA = "precsearch.examples.demo:training_data"


def resolve(spec: str, what: str) -> Callable[..., Any]:
    """``"pkg.mod:func"`` -> the callable, or an InputError naming the culprit."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"--{what} {spec!r}: expected MODULE:FUNC, e.g. mypkg.models:build")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"--{what} {spec!r}: cannot import {module_name!r} ({error})") from None
    except (Exception, SystemExit) as error:
        raise InputError(f"--{what} {spec!r}: importing {module_name!r} raised "
                         f"{type(error).__name__}: {error}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"--{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"--{what} {spec!r}: {attr!r} is not callable")
    return target


def _call(spec: str, what: str) -> Any:
    factory = resolve(spec, what)
    try:
        return factory()
    except (Exception, SystemExit) as error:  # a factory that calls sys.exit() is still bad input
        message = str(error).splitlines()[0] if str(error) else ""
        raise InputError(f"--{what} {spec!r}: the factory raised {type(error).__name__}: {message}") from None


def load_model(spec: str) -> nn.Module:
    model = _call(spec, "model")
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_data(spec: str, what: str = "data") -> list[Any]:
    """The batches a ``--data`` (or ``--holdout-data``: ``what="holdout-data"``) factory returns."""
    data = _call(spec, what)
    try:
        return _batches.as_list(data)
    except InputError as error:
        raise InputError(f"--{what} {spec!r}: {error}") from None
