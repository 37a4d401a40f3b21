"""Local transformers checkpoints for ``--model hf:DIR``: never downloaded, loaded in FP32.

>>> model = load_model("hf:checkpoints/bert-sst2")                     # doctest: +SKIP
>>> task_of(model)                                                      # doctest: +SKIP
'sequence-classification'

transformers is an optional extra (``pip install 'precsearch[hf]'``), imported only here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from precsearch.runtime.errors import InputError, described

PREFIX = "hf:"
INSTALL = "pip install 'precsearch[hf]'"

# --task NAME -> the transformers Auto class that loads it
TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "feature-extraction": "AutoModel",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
}

# How a model class name ends -> its task (first match wins; a bare ``...Model`` extracts features)
_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForConditionalGeneration", "seq2seq-lm"), ("ForSeq2SeqLM", "seq2seq-lm"),
    ("ForImageClassification", "image-classification"),
    ("Model", "feature-extraction"),
)


def is_checkpoint(spec: str | None) -> bool:
    """``"hf:DIR"`` names a checkpoint; anything else is a ``MODULE:FUNC`` factory."""
    return bool(spec) and spec.startswith(PREFIX)  # type: ignore[union-attr]


def directory(spec: str) -> Path:
    """The checkpoint directory of ``"hf:DIR"``, or an InputError when it is not a local directory."""
    path = Path(spec[len(PREFIX):]).expanduser()
    if not spec[len(PREFIX):] or not path.is_dir():
        raise InputError(f"--model {spec!r}: {str(path) or 'DIR'!s} is not a local directory: download it "
                         f"first, e.g. with `huggingface-cli download NAME --local-dir DIR`, and give DIR")
    if not (path / "config.json").is_file():
        raise InputError(f"--model {spec!r}: {path} has no config.json; give a directory written by "
                         f"save_pretrained")
    return path


def transformers_module() -> Any:
    """transformers, or an InputError saying which install to run."""
    try:
        import transformers
    except ImportError:
        raise InputError(f"--model hf:DIR needs transformers, which is not installed: {INSTALL}") from None
    return transformers


def task_of_class(name: str) -> str | None:
    """``"GPT2LMHeadModel"`` -> ``"causal-lm"``; None for a class name no task ends with."""
    return next((task for suffix, task in _SUFFIXES if name.endswith(suffix)), None)


def task_of(model: nn.Module) -> str | None:
    """The task of a loaded transformers model, from its class name."""
    return task_of_class(type(model).__name__)


def model_class(spec: str, path: Path, task: str | None) -> Any:
    """The class that loads the checkpoint: ``--task``'s Auto class, else the config's architecture."""
    transformers = transformers_module()
    if task is not None:
        if task not in TASKS:
            raise InputError(f"--task {task!r}: use one of {', '.join(TASKS)}")
        return getattr(transformers, TASKS[task])
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        architectures = config.get("architectures") or []
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"--model {spec!r}: cannot read {path / 'config.json'} ({error})") from None
    for name in architectures:
        if isinstance(name, str) and hasattr(transformers, name) and task_of_class(name):
            return getattr(transformers, name)
    reason = (f"its architectures {architectures} name no model class this transformers knows" if architectures
              else "its config.json names no architecture")
    raise InputError(f"--model {spec!r}: {reason}; give --task ({', '.join(TASKS)})")


def load_model(spec: str, task: str | None = None) -> nn.Module:
    """The FP32 model in ``"hf:DIR"``, in eval mode, from local files only."""
    import torch

    path = directory(spec)
    cls = model_class(spec, path, task)
    transformers = transformers_module()
    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    try:
        with _quiet(transformers):
            model: nn.Module = cls.from_pretrained(str(path), local_files_only=True, **dtype)
    except Exception as error:  # a broken or mismatched checkpoint is bad input
        raise InputError(f"--model {spec!r}: {cls.__name__} cannot load it: {described(error)}") from None
    return model.eval()


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars while loading: the command's own output stays readable."""
    progress = transformers.utils.logging
    enabled = progress.is_progress_bar_enabled()
    progress.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            progress.enable_progress_bar()


def load_tokenizer(spec: str) -> Any:
    """The checkpoint's own tokenizer (``AutoTokenizer``, local files only)."""
    path = directory(spec)
    transformers = transformers_module()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise InputError(f"--model {spec!r}: no tokenizer loads from {path} ({described(error)}); "
                         f"save one there with tokenizer.save_pretrained") from None


def load_image_processor(spec: str) -> Any:
    """The checkpoint's own image processor (``AutoImageProcessor``, local files only)."""
    path = directory(spec)
    transformers = transformers_module()
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # not "requires torchvision; falling back to ...Pil": it works without
    try:
        return transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise InputError(f"--model {spec!r}: no image processor loads from {path} ({described(error)}); "
                         f"save one there with image_processor.save_pretrained") from None
    finally:
        logging.set_verbosity(verbosity)


def study_name(spec: str) -> str:
    """``"hf:ckpt/bert-sst2"`` -> ``"hf-bert-sst2"``."""
    return "hf-" + (Path(spec[len(PREFIX):]).expanduser().resolve().name or "model")
