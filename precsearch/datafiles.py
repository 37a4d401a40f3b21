"""Data files for ``--data FILE``: text examples read, chosen and tokenized into batches.

Formats: ``.txt`` (one example a line), ``.jsonl`` and ``.csv`` (a text field, ``text`` unless
``--text-field`` says otherwise, and an optional ``label``), and a directory written by
``datasets``' ``save_to_disk``. Batches are tokenized with the checkpoint's own tokenizer.

>>> examples = read_examples(Path("examples.jsonl"))                    # doctest: +SKIP
>>> batches = tokenize(examples, tokenizer, model, DataOptions(batch_size=8, max_length=128))
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from precsearch.errors import InputError

SUFFIXES = (".txt", ".jsonl", ".csv")
MAX_LINE_BYTES = 1_000_000   # a longer line is almost surely not one example (a binary or minified file)
LABEL = "label"
LABELED_TASKS = ("sequence-classification", "image-classification")  # one class per example


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: int | str | None = None


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How examples become batches: ``--text-field``, ``--batch-size``, ``--max-length``,
    ``--samples`` and ``--seed``."""

    text_field: str = "text"
    batch_size: int = 8
    max_length: int = 128
    samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value, minimum in (("--batch-size", self.batch_size, 1), ("--max-length", self.max_length, 2),
                                     ("--samples", self.samples, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < minimum):
                raise InputError(f"{flag} {value!r}: must be an integer >= {minimum}")
        if not self.text_field:
            raise InputError("--text-field: give a field name")


class LabeledBatch(dict):
    """A dict of model inputs that also carries its examples' labels (``.labels``), which the
    model is not given: ``model(**batch)`` sees only the inputs."""

    labels: torch.Tensor | None = None


def is_data_file(spec: str) -> bool:
    """A ``--data`` value that names a file or folder rather than a ``MODULE:FUNC`` factory."""
    path = Path(spec).expanduser()
    return path.suffix.lower() in SUFFIXES or path.exists() or "/" in spec or "\\" in spec


def read_examples(path: Path, text_field: str = "text") -> list[Example]:
    """Every example in ``path``, or an InputError naming the file, line and fix."""
    if path.is_dir():
        return _read_saved_dataset(path, text_field)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"--data {path}: unknown format {suffix or '(no suffix)'!r}; use .txt (one example "
                         f"a line), .jsonl, .csv, or a datasets.save_to_disk directory")
    lines = list(_lines(path))
    if suffix == ".txt":
        examples = [Example(text) for _, text in lines if text.strip()]
    elif suffix == ".jsonl":
        examples = [_json_example(path, number, text, text_field) for number, text in lines if text.strip()]
    else:
        examples = _csv_examples(path, lines, text_field)
    if not examples:
        raise InputError(f"--data {path}: the file has no examples (it is empty or blank)")
    if len({example.label is None for example in examples}) > 1:
        raise InputError(f"--data {path}: some examples have a {LABEL!r} and others not; give every example "
                         f"a label, or none")
    return examples


def _lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every line, decoded as UTF-8, each within ``MAX_LINE_BYTES``."""
    lines = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"--data {path}: line {number} is {len(raw)} bytes, over the limit of "
                                 f"{MAX_LINE_BYTES}; give one example a line")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"--data {path}: line {number} is not UTF-8 (byte 0x{raw[error.start]:02x} "
                                 f"at column {error.start + 1}); save the file as UTF-8") from None
            lines.append((number, text.removeprefix("\ufeff") if number == 1 else text))
    return [(number, text.rstrip("\r\n")) for number, text in lines]


def _json_example(path: Path, number: int, text: str, text_field: str) -> Example:
    try:
        record = json.loads(text)
    except ValueError as error:
        raise InputError(f"--data {path}: line {number} is not JSON ({error})") from None
    if not isinstance(record, dict):
        raise InputError(f"--data {path}: line {number} is a JSON {type(record).__name__}, not an object "
                         f"with a {text_field!r} field")
    return _example(record, f"--data {path}: line {number}", text_field)


def _csv_examples(path: Path, lines: list[tuple[int, str]], text_field: str) -> list[Example]:
    try:
        rows = list(csv.DictReader(io.StringIO("\n".join(text for _, text in lines))))
    except csv.Error as error:
        raise InputError(f"--data {path}: not a readable CSV file ({error})") from None
    header = list(rows[0]) if rows else []
    if rows and text_field not in header:
        raise InputError(f"--data {path}: the header has no {text_field!r} column (columns: "
                         f"{', '.join(map(str, header))}); use --text-field NAME")
    filled = ({key: value for key, value in row.items() if value not in (None, "") or key == text_field}
              for row in rows)  # an empty label cell is no label
    return [_example(row, f"--data {path}: row {index}", text_field) for index, row in enumerate(filled, start=1)]


def _example(record: dict[str, Any], where: str, text_field: str) -> Example:
    if text_field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise InputError(f"{where} has no {text_field!r} field (fields: {fields}); use --text-field NAME")
    text = record[text_field]
    if not isinstance(text, str):
        raise InputError(f"{where}: {text_field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        raise InputError(f"{where}: {text_field!r} is empty; give every example some text")
    label = record.get(LABEL)
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
        raise InputError(f"{where}: {LABEL!r} is a {type(label).__name__}; give an integer class or a "
                         f"class name")
    return Example(text, label)


def _read_saved_dataset(path: Path, text_field: str) -> list[Example]:
    """The examples of a ``datasets.save_to_disk`` directory (its test split, else validation,
    else train, else the first)."""
    try:
        import datasets
    except ImportError:
        raise InputError(f"--data {path}: a directory is read as a saved `datasets` dataset, and datasets is "
                         f"not installed: pip install datasets") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:
        raise InputError(f"--data {path}: not a datasets.save_to_disk directory "
                         f"({type(error).__name__})") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = next((name for name in ("test", "validation", "train") if name in dataset),
                     next(iter(dataset), None))
        if split is None:
            raise InputError(f"--data {path}: the saved dataset has no splits")
        dataset = dataset[split]
    if text_field not in dataset.column_names:
        raise InputError(f"--data {path}: the dataset has no {text_field!r} column (columns: "
                         f"{', '.join(dataset.column_names)}); use --text-field NAME")
    examples = [_example(row, f"--data {path}: row {index}", text_field)
                for index, row in enumerate(dataset, start=1)]
    if not examples:
        raise InputError(f"--data {path}: the dataset has no rows")
    return examples


def choose(examples: list[Example], samples: int | None, seed: int) -> list[Example]:
    """A seeded choice of ``samples`` examples, in file order (all of them when there are fewer)."""
    if samples is None or samples >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), samples))
    return [examples[index] for index in chosen]


def tokenize(examples: list[Example], tokenizer: Any, model: nn.Module,
             options: DataOptions) -> list[LabeledBatch]:
    """Batches of ``options.batch_size`` examples, padded and truncated to ``options.max_length``,
    holding only the inputs ``model.forward`` takes; a seq2seq model's decoder reads the input
    shifted right (teacher forcing); a classifier's labels ride along as ``batch.labels``."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None and options.batch_size > 1:
            raise InputError("--data: the checkpoint's tokenizer has no pad token (nor eos token) to pad "
                             "batches with; use --batch-size 1")
        tokenizer.pad_token = tokenizer.eos_token
    from precsearch.hf import task_of

    accepted = set(inspect.signature(model.forward).parameters)
    labels = _label_ids(examples, model) if task_of(model) in LABELED_TASKS else None
    batches = []
    for start in range(0, len(examples), options.batch_size):
        chunk = examples[start:start + options.batch_size]
        encoded = tokenizer([example.text for example in chunk], padding=True, truncation=True,
                            max_length=_max_length(model, options.max_length), return_tensors="pt")
        batch = LabeledBatch({key: value for key, value in encoded.items() if key in accepted})
        if "decoder_input_ids" in accepted and hasattr(model, "prepare_decoder_input_ids_from_labels"):
            shifted = model.prepare_decoder_input_ids_from_labels(labels=batch["input_ids"])
            batch["decoder_input_ids"] = shifted
        if labels is not None:
            batch.labels = torch.tensor(labels[start:start + options.batch_size])
        batches.append(batch)
    return batches


def _max_length(model: nn.Module, requested: int) -> int:
    """``--max-length``, within the positions the model has."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(requested, positions) if isinstance(positions, int) and positions > 0 else requested


def _label_ids(examples: list[Example], model: nn.Module) -> list[int] | None:
    """Class ids of the examples' labels (names through the model's ``label2id``), or None without labels."""
    if examples[0].label is None:
        return None
    config = getattr(model, "config", None)
    label2id = {str(name): index for name, index in (getattr(config, "label2id", None) or {}).items()}
    classes = getattr(config, "num_labels", None)
    ids = []
    for example in examples:
        label = example.label
        if isinstance(label, str):
            label = label2id.get(label, int(label) if label.strip().lstrip("-").isdigit() else None)
        if label is None or (classes is not None and not 0 <= label < classes):
            raise InputError(f"--data: label {example.label!r} is not one of the model's {classes} classes "
                             f"(0..{(classes or 1) - 1}{', or ' + ', '.join(label2id) if label2id else ''})")
        ids.append(int(label))
    return ids


def read(spec: str, checkpoint: str | None, options: DataOptions) -> list[Example]:
    """The examples of ``--data FILE`` chosen by ``options``, checked before any model is loaded."""
    from precsearch import hf

    if checkpoint is None or not hf.is_checkpoint(checkpoint):
        raise InputError(f"--data {spec}: a data file is tokenized with the checkpoint's tokenizer; give "
                         f"--model hf:DIR, or --data MODULE:FUNC with your own batches")
    return choose(read_examples(Path(spec).expanduser(), options.text_field), options.samples, options.seed)


def load(spec: str, checkpoint: str | None, model: nn.Module, options: DataOptions,
         device: torch.device | str | None = None,
         examples: list[Example] | None = None) -> list[LabeledBatch]:
    """``--data FILE`` for ``--model hf:DIR``: the batches, on ``device`` (``examples``: already ``read``)."""
    from precsearch import hf

    if examples is None:
        examples = read(spec, checkpoint, options)
    if hf.task_of(model) == "image-classification":
        raise InputError(f"--data {spec}: data files hold text; give an image checkpoint its pixel_values "
                         f"batches with --data MODULE:FUNC")
    batches = tokenize(examples, hf.load_tokenizer(checkpoint), model, options)  # type: ignore[arg-type]
    return batches if device is None else [to_device(batch, device) for batch in batches]


def to_device(batch: LabeledBatch, device: torch.device | str) -> LabeledBatch:
    """``batch`` with its inputs and labels on ``device``."""
    moved = LabeledBatch({key: value.to(device) for key, value in batch.items()})
    moved.labels = None if batch.labels is None else batch.labels.to(device)
    return moved
