"""Resolve ``--model`` and ``--data``: ``MODULE:FUNC`` factories (the current directory is
importable), local transformers checkpoints (``hf:DIR``) and data files (``.txt``, ``.jsonl``,
``.csv``, a saved ``datasets`` folder)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

from torch import nn

from precsearch.runtime import batches as _batches
from precsearch.runtime.errors import InputError, described

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
        raise InputError(f"--{what} {spec!r}: the factory raised {described(error)}") from None


def load_model(spec: str, task: str | None = None) -> nn.Module:
    """The model of a factory or, for ``hf:DIR``, of a local checkpoint (``task``: ``--task``)."""
    from precsearch.runtime import hf
    if hf.is_checkpoint(spec):
        return hf.load_model(spec, task)
    if task is not None:
        raise InputError(f"--task {task}: applies to --model hf:DIR checkpoints, not to a factory ({spec!r})")
    model = _call(spec, "model")
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_data_file(spec: str, model_spec: str, options: Any) -> list[Any] | None:
    """The examples of a ``--data FILE`` (``datafiles.read``), None for a factory: a bad file
    fails here, before the model is loaded."""
    from precsearch.search import datafiles
    return datafiles.read(spec, model_spec, options) if datafiles.is_data_file(spec) else None


def load_data(spec: str, what: str = "data", *, model: nn.Module | None = None, model_spec: str | None = None,
              options: Any = None, device: Any = None, examples: list[Any] | None = None) -> list[Any]:
    """The batches a ``--data`` (or ``--holdout-data``: ``what="holdout-data"``) factory returns,
    or, for a data file, its examples (``examples`` when already read) tokenized for ``model``
    (``hf:DIR``) with ``options`` (``datafiles.DataOptions``); on ``device`` when one is given."""
    from precsearch.search import datafiles
    if what == "data" and datafiles.is_data_file(spec):
        return datafiles.load(spec, model_spec, model, options or datafiles.DataOptions(),  # type: ignore[arg-type]
                              device, examples)
    if options is not None and options != datafiles.DataOptions(seed=options.seed):
        raise InputError(f"--text-field, --image-field, --batch-size, --max-length and --samples apply to "
                         f"--data FILE, not to a factory ({spec!r})")
    data = _call(spec, what)
    try:
        data = _batches.as_list(data)
    except InputError as error:
        raise InputError(f"--{what} {spec!r}: {error}") from None
    return data if device is None else [_batches.to_device(batch, device) for batch in data]
