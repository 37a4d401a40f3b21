"""Data files for ``--data FILE``: examples read, chosen and made into batches for a checkpoint.

Text: ``.txt`` (one example a line), ``.jsonl`` and ``.csv`` (a text field, ``text`` unless
``--text-field`` says otherwise, an optional ``label``, and for token classification an optional
``labels``: one per whitespace-separated word), and a directory written by ``datasets``'
``save_to_disk``; tokenized with the checkpoint's own tokenizer. Images (a checkpoint whose input is
``pixel_values``): a directory of image files (unlabeled) or of one subfolder per class (the
subfolder's name is the label), or ``.jsonl``/``.csv`` rows with an ``image`` field (``--image-field``:
a path relative to the data file's folder); processed by the checkpoint's own image processor.

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

from precsearch.runtime.errors import InputError, described

SUFFIXES = (".txt", ".jsonl", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes
MAX_LINE_BYTES = 1_000_000   # a longer line is almost surely not one example (a binary or minified file)
LABEL = "label"
WORD_LABELS = "labels"      # token classification: one label per whitespace-separated word of the text
UNSCORED = -100             # a token no label scores (as transformers' loss ignores it): padding, special
                            # tokens, a word's later pieces, a word labelled null or -100
LABELED_TASKS = ("sequence-classification", "image-classification")  # one class per example


@dataclasses.dataclass(frozen=True)
class Example:
    """One example: its ``text`` or its ``image`` file, its class ``label`` and, for token
    classification, ``word_labels`` (one per word of the text; None: that word is not scored)."""

    text: str | None = None
    label: int | str | None = None
    word_labels: tuple[int | str | None, ...] | None = None
    image: Path | None = None


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How examples become batches: ``--text-field``, ``--image-field``, ``--batch-size``,
    ``--max-length``, ``--samples`` and ``--seed``."""

    text_field: str = "text"
    image_field: str = "image"
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
        for flag, field in (("--text-field", self.text_field), ("--image-field", self.image_field)):
            if not field:
                raise InputError(f"{flag}: give a field name")


class LabeledBatch(dict):
    """A dict of model inputs that also carries its examples' labels (``.labels``), which the
    model is not given: ``model(**batch)`` sees only the inputs."""

    labels: torch.Tensor | None = None


def is_data_file(spec: str) -> bool:
    """A ``--data`` value that names a file or folder rather than a ``MODULE:FUNC`` factory."""
    path = Path(spec).expanduser()
    return path.suffix.lower() in SUFFIXES or path.exists() or "/" in spec or "\\" in spec


def read_examples(path: Path, text_field: str = "text", image_field: str = "image") -> list[Example]:
    """Every example in ``path``, or an InputError naming the file, line and fix."""
    if path.is_dir():
        if any((path / name).is_file() for name in SAVED_DATASET_FILES):
            return _read_saved_dataset(path, text_field)
        return _read_image_folder(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"--data {path}: unknown format {suffix or '(no suffix)'!r}; use .txt (one example "
                         f"a line), .jsonl, .csv, a folder of images, or a datasets.save_to_disk directory")
    lines = list(_lines(path))
    if suffix == ".txt":
        examples = [Example(text) for _, text in lines if text.strip()]
    elif suffix == ".jsonl":
        examples = [_json_example(path, number, text, text_field, image_field)
                    for number, text in lines if text.strip()]
    else:
        examples = _csv_examples(path, lines, text_field, image_field)
    if not examples:
        raise InputError(f"--data {path}: the file has no examples (it is empty or blank)")
    return _consistent(path, examples)


def _consistent(path: Path, examples: list[Example]) -> list[Example]:
    """``examples``, all labelled or none, all images or all text."""
    for what, missing in ((f"a {LABEL!r}", lambda e: e.label is None),
                          (f"{WORD_LABELS!r}", lambda e: e.word_labels is None),
                          ("an image", lambda e: e.image is None)):
        if len({missing(example) for example in examples}) > 1:
            raise InputError(f"--data {path}: some examples have {what} and others not; give every example "
                             f"the same fields")
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


def _json_example(path: Path, number: int, text: str, text_field: str, image_field: str) -> Example:
    try:
        record = json.loads(text)
    except ValueError as error:
        raise InputError(f"--data {path}: line {number} is not JSON ({error})") from None
    if not isinstance(record, dict):
        raise InputError(f"--data {path}: line {number} is a JSON {type(record).__name__}, not an object "
                         f"with a {text_field!r} field")
    return _example(record, f"--data {path}: line {number}", text_field, image_field, path.parent)


def _csv_examples(path: Path, lines: list[tuple[int, str]], text_field: str, image_field: str) -> list[Example]:
    try:
        rows = list(csv.DictReader(io.StringIO("\n".join(text for _, text in lines))))
    except csv.Error as error:
        raise InputError(f"--data {path}: not a readable CSV file ({error})") from None
    header = list(rows[0]) if rows else []
    if rows and text_field not in header and image_field not in header:
        raise InputError(f"--data {path}: the header has no {text_field!r} column (columns: "
                         f"{', '.join(map(str, header))}); use --text-field NAME")
    kept = (text_field, image_field)
    filled = ({key: value for key, value in row.items() if value not in (None, "") or key in kept}
              for row in rows)  # an empty label cell is no label
    return [_example(row, f"--data {path}: row {index}", text_field, image_field, path.parent)
            for index, row in enumerate(filled, start=1)]


def _example(record: dict[str, Any], where: str, text_field: str, image_field: str = "image",
             folder: Path | None = None) -> Example:
    if text_field not in record and image_field in record and folder is not None:
        return Example(label=_label(record, where), image=_image_path(record[image_field], where, image_field,
                                                                      folder))
    if text_field not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise InputError(f"{where} has no {text_field!r} field (fields: {fields}); use --text-field NAME"
                         + (" (or --image-field NAME for image paths)" if folder is not None else ""))
    text = record[text_field]
    if not isinstance(text, str):
        raise InputError(f"{where}: {text_field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        raise InputError(f"{where}: {text_field!r} is empty; give every example some text")
    return Example(text, _label(record, where), _word_labels(record, where, text))


def _is_class(label: object) -> bool:
    return not isinstance(label, bool) and isinstance(label, (int, str))


def _label(record: dict[str, Any], where: str) -> int | str | None:
    label = record.get(LABEL)
    if label is not None and not _is_class(label):
        raise InputError(f"{where}: {LABEL!r} is a {type(label).__name__}; give an integer class or a "
                         f"class name")
    return label


def _word_labels(record: dict[str, Any], where: str, text: str) -> tuple[int | str | None, ...] | None:
    """The ``labels`` of a token-classification example: one per whitespace-separated word of the
    text (a CSV cell: the labels separated by spaces); null (or -100) leaves a word unscored."""
    labels = record.get(WORD_LABELS)
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = labels.split()
    if not isinstance(labels, list) or not all(label is None or _is_class(label) for label in labels):
        raise InputError(f"{where}: {WORD_LABELS!r} must be a list of word labels (integer classes or class "
                         f"names, null for a word not scored), one per word of the text")
    words = len(text.split())
    if len(labels) != words:
        raise InputError(f"{where}: {len(labels)} {WORD_LABELS!r} for {words} words; give one label per "
                         f"whitespace-separated word of the text")
    return tuple(labels)


def _image_path(value: object, where: str, image_field: str, folder: Path) -> Path:
    """An example's image file: a path relative to the data file's folder, or absolute."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {image_field!r} must be the path of an image file")
    path = folder / Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"{where}: image {value!r} not found ({path}); give a path relative to the data "
                         f"file's folder")
    return path


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _read_image_folder(path: Path) -> list[Example]:
    """A folder of image files: unlabeled at its top, or one subfolder per class (the label is the
    subfolder's name)."""
    top = [Example(image=file) for file in sorted(path.iterdir()) if _is_image(file)]
    classes = sorted(folder for folder in path.iterdir() if folder.is_dir() and not folder.name.startswith("."))
    labeled = [Example(label=folder.name, image=file) for folder in classes
               for file in sorted(folder.iterdir()) if _is_image(file)]
    if top and labeled:
        raise InputError(f"--data {path}: has image files both at its top and in class subfolders; put every "
                         f"image in its class's subfolder (labeled), or all at the top (unlabeled)")
    if not top and not labeled:
        raise InputError(f"--data {path}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)}), at its "
                         f"top or in one subfolder per class, and is not a datasets.save_to_disk folder")
    return top or labeled


def open_image(path: Path) -> Any:
    """The image in ``path`` as an RGB ``PIL.Image``, or an InputError naming the file."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError(f"--data: reading images ({path}) needs Pillow, which is not installed: "
                         f"pip install pillow") from None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # unidentified, truncated, a decompression bomb: all bad input
        raise InputError(f"--data: {path} is not an image Pillow can read ({described(error)})") from None


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
    shifted right (teacher forcing); a classifier's labels ride along as ``batch.labels``: one class
    an example, or for token classification one a token (each word's label on its first token,
    ``UNSCORED`` elsewhere)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None and options.batch_size > 1:
            raise InputError("--data: the checkpoint's tokenizer has no pad token (nor eos token) to pad "
                             "batches with; use --batch-size 1")
        tokenizer.pad_token = tokenizer.eos_token
    from precsearch.runtime.hf import task_of

    task = task_of(model)
    labels = _label_ids(examples, model) if task in LABELED_TASKS else None
    word_labels = _word_label_ids(examples, model) if task == "token-classification" else None
    if word_labels is not None and not getattr(tokenizer, "is_fast", False):
        raise InputError(f"--data: aligning {WORD_LABELS!r} to tokens needs a fast tokenizer (tokenizer.json); "
                         f"save the checkpoint's tokenizer as a PreTrainedTokenizerFast, or drop the labels")
    batches = []
    for start in range(0, len(examples), options.batch_size):
        chunk = examples[start:start + options.batch_size]
        settings = {"padding": True, "truncation": True, "return_tensors": "pt",
                    "max_length": _max_length(model, options.max_length)}
        if word_labels is None:
            encoded = tokenizer([example.text for example in chunk], **settings)
        else:  # the words the labels name, so that word_ids() maps every token to its word
            try:
                encoded = tokenizer([(example.text or "").split() for example in chunk],
                                    is_split_into_words=True, **settings)
            except Exception as error:  # e.g. a byte-level BPE tokenizer saved without add_prefix_space
                raise InputError(f"--data: the checkpoint's tokenizer cannot split the labelled words into tokens "
                                 f"({described(error)})") from None
        batch = _inputs(encoded, model)
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if "decoder_input_ids" in _parameters(model) and prepare is not None:
            batch["decoder_input_ids"] = prepare(labels=batch["input_ids"])
        if labels is not None:
            batch.labels = torch.tensor(labels[start:start + options.batch_size])
        if word_labels is not None:
            batch.labels = _token_labels(encoded, word_labels[start:start + options.batch_size])
        batches.append(batch)
    return batches


def _parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _inputs(encoded: Any, model: nn.Module) -> LabeledBatch:
    """The encoded tensors ``model.forward`` takes."""
    accepted = _parameters(model)
    return LabeledBatch({key: value for key, value in encoded.items() if key in accepted})


def _token_labels(encoded: Any, word_labels: list[list[int]]) -> torch.Tensor:
    """Each word's label on its first token; ``UNSCORED`` on every other token."""
    labels = torch.full(encoded["input_ids"].shape, UNSCORED, dtype=torch.long)
    for row, words in enumerate(word_labels):
        previous = None
        for column, word in enumerate(encoded.word_ids(row)):
            if word is not None and word != previous:
                labels[row, column] = words[word]
            previous = word
    return labels


def takes_images(model: nn.Module) -> bool:
    """Whether ``model``'s main input is an image (``pixel_values``)."""
    return getattr(model, "main_input_name", None) == "pixel_values"


def process_images(examples: list[Example], processor: Any, model: nn.Module,
                   options: DataOptions) -> list[LabeledBatch]:
    """Batches of ``options.batch_size`` images made by the checkpoint's image ``processor``; a
    classifier's labels ride along as ``batch.labels``."""
    from precsearch.runtime.hf import task_of

    labels = _label_ids(examples, model) if task_of(model) in LABELED_TASKS else None
    batches = []
    for start in range(0, len(examples), options.batch_size):
        chunk = examples[start:start + options.batch_size]
        try:
            encoded = processor(images=[open_image(example.image) for example in chunk],  # type: ignore[arg-type]
                                return_tensors="pt")
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"--data: the checkpoint's image processor failed on {chunk[0].image} and the "
                             f"{len(chunk) - 1} images after it ({described(error)})") from None
        batch = _inputs(encoded, model)
        if labels is not None:
            batch.labels = torch.tensor(labels[start:start + options.batch_size])
        batches.append(batch)
    return batches


def _max_length(model: nn.Module, requested: int) -> int:
    """``--max-length``, within the positions the model has."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(requested, positions) if isinstance(positions, int) and positions > 0 else requested


def _class_ids(model: nn.Module) -> Any:
    """``label -> class id`` for ``model``: a class name through its ``label2id``, or an id."""
    config = getattr(model, "config", None)
    label2id = {str(name): index for name, index in (getattr(config, "label2id", None) or {}).items()}
    classes = getattr(config, "num_labels", None)

    def class_id(given: int | str) -> int:
        label: int | None = given if not isinstance(given, str) else label2id.get(
            given, int(given) if given.strip().lstrip("-").isdigit() else None)
        if label is None or (classes is not None and not 0 <= label < classes):
            raise InputError(f"--data: label {given!r} is not one of the model's {classes} classes "
                             f"(0..{(classes or 1) - 1}{', or ' + ', '.join(label2id) if label2id else ''})")
        return int(label)

    return class_id


def _label_ids(examples: list[Example], model: nn.Module) -> list[int] | None:
    """Class ids of the examples' labels (names through the model's ``label2id``), or None without labels."""
    if examples[0].label is None:
        return None
    class_id = _class_ids(model)
    return [class_id(example.label) for example in examples]  # type: ignore[arg-type]


def _word_label_ids(examples: list[Example], model: nn.Module) -> list[list[int]] | None:
    """Class ids of each example's word labels (``UNSCORED`` for null or -100), or None without them."""
    if examples[0].word_labels is None:
        return None
    class_id = _class_ids(model)
    return [[UNSCORED if label in (None, UNSCORED, str(UNSCORED)) else class_id(label)  # type: ignore[arg-type]
             for label in example.word_labels or ()] for example in examples]


def read(spec: str, checkpoint: str | None, options: DataOptions) -> list[Example]:
    """The examples of ``--data FILE`` chosen by ``options``, checked before any model is loaded."""
    from precsearch.runtime import hf
    if checkpoint is None or not hf.is_checkpoint(checkpoint):
        raise InputError(f"--data {spec}: a data file is read with the checkpoint's tokenizer or image "
                         f"processor; give --model hf:DIR, or --data MODULE:FUNC with your own batches")
    examples = read_examples(Path(spec).expanduser(), options.text_field, options.image_field)
    chosen = choose(examples, options.samples, options.seed)
    for example in chosen:  # a broken image fails now, before the model loads
        if example.image is not None:
            open_image(example.image)
    return chosen


def load(spec: str, checkpoint: str | None, model: nn.Module, options: DataOptions,
         device: torch.device | str | None = None,
         examples: list[Example] | None = None) -> list[LabeledBatch]:
    """``--data FILE`` for ``--model hf:DIR``: the batches, on ``device`` (``examples``: already ``read``)."""
    from precsearch.runtime import hf
    if examples is None:
        examples = read(spec, checkpoint, options)
    images = examples[0].image is not None
    if images != takes_images(model):
        raise InputError(f"--data {spec}: holds images, and {checkpoint} takes text; give it a text file"
                         if images else
                         f"--data {spec}: holds text, and {checkpoint} takes images (pixel_values); give it a "
                         f"folder of image files (one subfolder per class for labels) or a .jsonl with an "
                         f"{options.image_field!r} field")
    if images:
        processor = hf.load_image_processor(checkpoint)  # type: ignore[arg-type]
        batches = process_images(examples, processor, model, options)
    else:
        batches = tokenize(examples, hf.load_tokenizer(checkpoint), model, options)  # type: ignore[arg-type]
    return batches if device is None else [to_device(batch, device) for batch in batches]


def to_device(batch: LabeledBatch, device: torch.device | str) -> LabeledBatch:
    """``batch`` with its inputs and labels on ``device``."""
    moved = LabeledBatch({key: value.to(device) for key, value in batch.items()})
    moved.labels = None if batch.labels is None else batch.labels.to(device)
    return moved
