"""Local transformers checkpoints (``--model hf:DIR``), data files (``--data FILE``) and the task
metrics: tiny checkpoints and tokenizers are built here with ``save_pretrained``; nothing is downloaded."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import yaml

from precsearch.runtime import accuracy
from precsearch.search import datafiles
from precsearch.search import factories
from precsearch.runtime import hf
from precsearch.cli import main
from precsearch.search.datafiles import DataOptions, Example, read_examples
from precsearch.runtime.errors import InputError

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from hf_fixtures import SENTENCES  # noqa: E402  (after the skips: it builds transformers models)
from hf_fixtures import bert as _bert  # noqa: E402
from hf_fixtures import gpt2 as _gpt2  # noqa: E402
from hf_fixtures import save_tokenizer as _save_tokenizer  # noqa: E402
from hf_fixtures import t5 as _t5  # noqa: E402


def _feature(vocab: int):
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))


def _token(vocab: int):
    return transformers.BertForTokenClassification(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))


def _vit(path):
    """A ViT classifier of 3 classes on 32x32 images, with its own image processor saved beside it."""
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3))


BUILDERS = {"bert": _bert, "gpt2": _gpt2, "t5": _t5, "feature": _feature, "token": _token}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{kind: "hf:DIR"}`` for each tiny checkpoint, built once for the module."""
    root = tmp_path_factory.mktemp("checkpoints")
    specs = {}
    for kind, build in BUILDERS.items():
        path = root / kind
        vocab = _save_tokenizer(path)
        torch.manual_seed(0)
        build(vocab).save_pretrained(path)
        specs[kind] = f"hf:{path}"
    torch.manual_seed(0)
    _vit(root / "vit").save_pretrained(root / "vit")
    specs["vit"] = f"hf:{root / 'vit'}"
    return specs


@pytest.fixture
def examples_jsonl(tmp_path):
    """Each sentence with a class ``label`` and, for token classification, one ``labels`` entry a word."""
    path = tmp_path / "examples.jsonl"
    rows = [{"text": text, "label": i % 2, "labels": [len(word) % 3 for word in text.split()]}
            for i, text in enumerate(SENTENCES)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _save_images(folder, count: int, seed: int = 0) -> list:
    """``count`` small random PNG images (sizes and a grey one vary) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        pixels = torch.randint(0, 256, (20 + 4 * i, 30, 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels).convert("L" if i == 1 else "RGB")
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture
def images_jsonl(tmp_path):
    """Six images under ``img/`` and an examples.jsonl naming them, relative to its folder, with labels."""
    pytest.importorskip("PIL")
    paths = _save_images(tmp_path / "img", 6)
    path = tmp_path / "images.jsonl"
    path.write_text("".join(json.dumps({"image": f"img/{p.name}", "label": i % 3}) + "\n"
                            for i, p in enumerate(paths)))
    return path


# --- data files: parsing ---------------------------------------------------------------------------

def test_txt_is_one_example_a_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\ufefffirst line\n\nsecond line\r\n")
    assert read_examples(path) == [Example("first line"), Example("second line")]


def test_jsonl_reads_the_text_field_and_labels(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x", "label": 1}\n\n{"text": "y", "label": "neg"}\n')
    assert read_examples(path) == [Example("x", 1), Example("y", "neg")]
    path.write_text('{"sentence": "x"}\n')
    assert read_examples(path, "sentence") == [Example("x")]


def test_csv_reads_the_text_column_and_labels(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,label\n"hello, world",1\nbye,0\n')
    assert read_examples(path) == [Example("hello, world", "1"), Example("bye", "0")]


def test_samples_are_a_seeded_choice_in_file_order():
    examples = [Example(str(i)) for i in range(20)]
    chosen = datafiles.choose(examples, 5, seed=3)
    assert chosen == datafiles.choose(examples, 5, seed=3) and len(chosen) == 5
    assert [int(e.text) for e in chosen] == sorted(int(e.text) for e in chosen)
    assert chosen != datafiles.choose(examples, 5, seed=4)
    assert datafiles.choose(examples, 50, seed=0) == examples


BAD_FILES = {
    "missing": (None, "no such file"),
    "empty.txt": (b"", "has no examples"),
    "blank.jsonl": (b"\n  \n", "has no examples"),
    "wrong_field.jsonl": (b'{"sentence": "x"}\n', "has no 'text' field"),
    "not_json.jsonl": (b'{"text": \n', "is not JSON"),
    "list.jsonl": (b'["x"]\n', "not an object"),
    "number.jsonl": (b'{"text": 3}\n', "not a string"),
    "blank_text.csv": (b'text,label\n"  ",1\n', "'text' is empty"),
    "latin1.txt": ("caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    "long.txt": (b"x" * (datafiles.MAX_LINE_BYTES + 1) + b"\n", "over the limit"),
    "no_column.csv": (b"sentence,label\nx,1\n", "no 'text' column"),
    "mixed.jsonl": (b'{"text": "x", "label": 1}\n{"text": "y"}\n', "some examples have a 'label'"),
    "bad_label.jsonl": (b'{"text": "x", "label": 1.5}\n', "give an integer class"),
    "data.parquet": (b"PAR1", "unknown format"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_every_bad_file_is_one_input_error_line(name, tmp_path):
    content, words = BAD_FILES[name]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=words) as error:
        read_examples(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_data_options_are_checked():
    with pytest.raises(InputError, match="--batch-size"):
        DataOptions(batch_size=0)
    with pytest.raises(InputError, match="--samples"):
        DataOptions(samples=0)


def test_data_file_detection():
    assert datafiles.is_data_file("examples.jsonl") and datafiles.is_data_file("data/x")
    assert not datafiles.is_data_file("precsearch.examples.demo:data")


def test_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a b", "c"], "label": [0, 1]}).save_to_disk(str(tmp_path / "saved"))
    assert read_examples(tmp_path / "saved") == [Example("a b", 0), Example("c", 1)]


# --- checkpoints -----------------------------------------------------------------------------------

def test_a_path_that_is_not_a_directory_says_download_it_first(tmp_path):
    for spec in ("hf:bert-base-uncased", f"hf:{tmp_path / 'nothing'}", "hf:"):
        with pytest.raises(InputError, match="is not a local directory: download it first"):
            hf.load_model(spec)


def test_without_transformers_hf_names_the_install(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError, match=r"pip install 'precsearch\[hf\]'"):
        hf.load_model(checkpoints["bert"])


def test_the_class_comes_from_the_architecture_or_the_task(checkpoints, tmp_path):
    assert type(hf.load_model(checkpoints["gpt2"])).__name__ == "GPT2LMHeadModel"
    assert hf.task_of(hf.load_model(checkpoints["t5"])) == "seq2seq-lm"
    assert type(hf.load_model(checkpoints["bert"], "feature-extraction")).__name__ == "BertModel"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="give --task"):
        hf.load_model(f"hf:{tmp_path}")
    with pytest.raises(InputError, match="--task 'speech'"):
        hf.load_model(checkpoints["bert"], "speech")


def test_a_factory_takes_no_task():
    with pytest.raises(InputError, match="--task"):
        factories.load_model(factories.DEMO_MODEL, "causal-lm")


def test_tokenized_batches_hold_the_models_inputs_and_labels(checkpoints, examples_jsonl):
    for kind, keys in (("bert", {"input_ids", "attention_mask"}),
                       ("t5", {"input_ids", "attention_mask", "decoder_input_ids"})):
        model = hf.load_model(checkpoints[kind])
        batches = factories.load_data(str(examples_jsonl), model=model, model_spec=checkpoints[kind],
                                      options=DataOptions(batch_size=4, max_length=5))
        assert [len(b["input_ids"]) for b in batches] == [4, 2]
        assert keys <= set(batches[0]) and batches[0]["input_ids"].shape[1] <= 5
        assert (batches[0].labels is not None) == (kind == "bert")
        model(**batches[0])


def test_a_data_file_needs_a_checkpoint(examples_jsonl):
    with pytest.raises(InputError, match="give --model hf:DIR"):
        factories.load_data(str(examples_jsonl), model=torch.nn.Linear(2, 2), model_spec=factories.DEMO_MODEL)


# --- task metrics ----------------------------------------------------------------------------------

def _batches_for(checkpoints, kind, path):
    model = hf.load_model(checkpoints[kind])
    return model, factories.load_data(str(path), model=model, model_spec=checkpoints[kind],
                                      options=DataOptions(batch_size=3))


@pytest.mark.parametrize("kind, metric", [("bert", "label_accuracy"), ("gpt2", "perplexity"),
                                          ("t5", "token_agreement"), ("feature", "embedding_cosine")])
def test_the_default_metric_fits_the_head_and_is_zero_for_fp32(checkpoints, examples_jsonl, kind, metric):
    model, batches = _batches_for(checkpoints, kind, examples_jsonl)
    assert accuracy.task_metric(hf.task_of(model), batches) == metric
    fidelity = accuracy.Fidelity.builtin(model, batches, metric, 0.01)
    assert fidelity.error(model) == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert 0.0 <= fidelity.error(model) < math.inf


def test_without_labels_a_classifier_is_judged_by_top1(checkpoints, tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("\n".join(SENTENCES))
    model, batches = _batches_for(checkpoints, "bert", path)
    assert accuracy.task_metric("sequence-classification", batches) == "top1"
    with pytest.raises(InputError, match="needs labels"):
        accuracy.Fidelity.builtin(model, batches, "label_accuracy", 0.01)


def test_fp32_values_are_an_accuracy_and_a_perplexity(checkpoints, examples_jsonl):
    model, batches = _batches_for(checkpoints, "bert", examples_jsonl)
    assert 0.0 <= accuracy.Fidelity.builtin(model, batches, "label_accuracy", 0.01).reference_value <= 1.0
    model, batches = _batches_for(checkpoints, "gpt2", examples_jsonl)
    assert accuracy.Fidelity.builtin(model, batches, "perplexity", 0.01).reference_value > 1.0
    assert accuracy.Fidelity.builtin(model, batches, "token_agreement", 0.01).reference_value is None


def test_label_accuracy_counts_the_drop_only():
    batch = datafiles.LabeledBatch(input_ids=torch.zeros(2, 1))
    batch.labels = torch.tensor([0, 1])
    right, wrong = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert accuracy.label_accuracy([[wrong]], [[right]], [batch]) == 0.5
    assert accuracy.label_accuracy([[right]], [[wrong]], [batch]) == 0.0


def test_token_agreement_skips_padding():
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0]])}
    reference = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    got = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    assert accuracy.token_agreement([[got]], [[reference]], [batch]) == 0.5


# --- the command line ------------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("precsearch: error:"), err
    return err[0]


BAD_INPUT_WORDS = {
    "hub_id": "download it first", "no_transformers": "precsearch[hf]", "empty": "no examples",
    "wrong_field": "'text' field", "bad_bytes": "not UTF-8", "long_line": "over the limit",
    "unknown_task": "--task", "factory_data_options": "--batch-size", "file_with_factory_model": "hf:DIR",
    "missing_image": "image 'img/none.png' not found", "broken_image": "not an image Pillow can read",
    "empty_image_folder": "holds no image files", "text_for_images": "takes images",
    "images_for_text": "takes text", "word_label_count": "2 'labels' for 3 words",
    "unknown_word_label": "label 'B-PER' is not one of the model's 3 classes",
}


@pytest.mark.parametrize("case", list(BAD_INPUT_WORDS))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(case, checkpoints, examples_jsonl, tmp_path,
                                                            monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes({"empty": b"", "wrong_field": b'{"sentence": "x"}\n', "bad_bytes": b'{"text": "\xff"}\n',
                      "long_line": b"x" * (datafiles.MAX_LINE_BYTES + 1),
                      "missing_image": b'{"image": "img/none.png"}\n',
                      "broken_image": b'{"image": "img/0.png"}\n',
                      "images_for_text": b'{"image": "img/0.png"}\n',
                      "word_label_count": b'{"text": "the cat sat", "labels": [0, 1]}\n',
                      "unknown_word_label": b'{"text": "the cat sat", "labels": [0, "B-PER", null]}\n',
                      }.get(case, examples_jsonl.read_bytes()))
    if case in ("broken_image", "images_for_text"):
        (tmp_path / "img").mkdir()
        (tmp_path / "img" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated" if case == "broken_image" else b"")
        if case == "images_for_text":
            _save_images(tmp_path / "img", 1)
    if case == "empty_image_folder":
        data = tmp_path / "folder"
        data.mkdir()
        (data / "notes.md").write_text("no images here")
    model = {"hub_id": "hf:bert-base-uncased", "file_with_factory_model": factories.DEMO_MODEL,
             "broken_image": checkpoints["vit"], "missing_image": checkpoints["vit"],
             "empty_image_folder": checkpoints["vit"], "text_for_images": checkpoints["vit"],
             "word_label_count": checkpoints["token"], "unknown_word_label": checkpoints["token"]}.get(
        case, checkpoints["bert"])
    extra = {"unknown_task": ["--task", "speech"],
             "factory_data_options": ["--batch-size", "4"]}.get(case, [])
    if case == "no_transformers":
        monkeypatch.setitem(sys.modules, "transformers", None)
    if case == "factory_data_options":
        data = factories.DEMO_DATA
    out = tmp_path / "out"
    code = main(["optimize", "--model", model, "--data", str(data), "--trials", "1", "--out", str(out), *extra])
    line = _one_error_line(capsys)
    assert code == 2 and not out.exists(), line
    assert BAD_INPUT_WORDS[case] in line


def test_layers_lists_a_checkpoints_units(checkpoints, examples_jsonl, capsys):
    assert main(["layers", "--model", checkpoints["gpt2"], "--data", str(examples_jsonl), "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)]
    assert "lm_head" in names and "transformer.h.0.attn.c_attn" in names


@pytest.mark.slow
@pytest.mark.parametrize("kind, metric, fp32", [("bert", "label_accuracy", True), ("gpt2", "perplexity", True),
                                                ("t5", "token_agreement", False), ("vit", "label_accuracy", True),
                                                ("token", "label_accuracy", True)])
def test_optimize_a_checkpoint_on_a_data_file(kind, metric, fp32, checkpoints, examples_jsonl, tmp_path, capsys,
                                              request):
    """Every tiny checkpoint kind, searched on an examples.jsonl with its task's default metric."""
    data = request.getfixturevalue("images_jsonl") if kind == "vit" else examples_jsonl
    task = ["--task", "image-classification"] if kind == "vit" else []
    out = tmp_path / "out"
    code = main(["optimize", "--model", checkpoints[kind], "--data", str(data), "--trials", "3",
                 "--batch-size", "3", "--out", str(out), *task])
    assert code == 0, capsys.readouterr().err
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["constraint"] == {"metric": metric, "limit": 0.01}
    assert plan["model"]["name"] == checkpoints[kind]
    assert ("fp32_metric" in plan["metrics"]) == fp32
    if fp32 and metric == "label_accuracy":
        assert 0.0 <= plan["metrics"]["fp32_metric"] <= 1.0
    assert main(["check", "--plan", str(out / "plan.yaml"), "--model", checkpoints[kind],
                 "--data", str(data), "--batch-size", "3", *task]) == 0


def test_labels_may_be_class_names_of_the_checkpoint(checkpoints, tmp_path):
    model = hf.load_model(checkpoints["bert"])
    path = tmp_path / "named.jsonl"
    path.write_text('{"text": "a dog ran", "label": "LABEL_1"}\n{"text": "the cat", "label": 0}\n')
    batches = factories.load_data(str(path), model=model, model_spec=checkpoints["bert"], options=DataOptions())
    assert batches[0].labels.tolist() == [1, 0]
    path.write_text('{"text": "a dog ran", "label": "positive"}\n')
    with pytest.raises(InputError, match="'positive' is not one of the model's 2 classes"):
        factories.load_data(str(path), model=model, model_spec=checkpoints["bert"], options=DataOptions())


def test_a_bad_data_file_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hf, "load_model", lambda *args: pytest.fail("the model was loaded"))
    (tmp_path / "empty.txt").write_text("")
    assert main(["layers", "--model", "hf:bert-base-uncased", "--data", str(tmp_path / "empty.txt")]) == 2
    assert "has no examples" in _one_error_line(capsys)


# --- images and token labels -----------------------------------------------------------------------

def test_an_image_folder_is_labeled_by_its_class_subfolders(tmp_path):
    pytest.importorskip("PIL")
    _save_images(tmp_path / "flat", 2)
    assert read_examples(tmp_path / "flat") == [Example(image=tmp_path / "flat" / "0.png"),
                                                Example(image=tmp_path / "flat" / "1.png")]
    _save_images(tmp_path / "classes" / "LABEL_2", 2)
    _save_images(tmp_path / "classes" / "0", 1)
    (tmp_path / "classes" / "0" / "notes.txt").write_text("not an image: skipped")
    assert [(e.label, e.image.name) for e in read_examples(tmp_path / "classes")] == [
        ("0", "0.png"), ("LABEL_2", "0.png"), ("LABEL_2", "1.png")]
    _save_images(tmp_path / "classes", 1)
    with pytest.raises(InputError, match="both at its top and in class subfolders"):
        read_examples(tmp_path / "classes")


def test_image_paths_in_a_jsonl_are_relative_to_its_folder(images_jsonl, tmp_path):
    examples = read_examples(images_jsonl)
    assert examples[0] == Example(label=0, image=tmp_path / "img" / "0.png")
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"image": "img/0.png"}\n{"text": "a"}\n')
    with pytest.raises(InputError, match="some examples have an image and others not"):
        read_examples(path)
    path = tmp_path / "pics.csv"
    path.write_text("picture,label\nimg/1.png,2\n")
    assert read_examples(path, image_field="picture") == [Example(label="2", image=tmp_path / "img" / "1.png")]


def test_images_are_batched_by_the_checkpoints_image_processor(checkpoints, images_jsonl):
    model = hf.load_model(checkpoints["vit"])
    options = DataOptions(batch_size=4, samples=5)
    examples = factories.read_data_file(str(images_jsonl), checkpoints["vit"], options)
    batches = factories.load_data(str(images_jsonl), model=model, model_spec=checkpoints["vit"], options=options,
                                  examples=examples)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(4, 3, 32, 32), (1, 3, 32, 32)]
    assert set(batches[0]) == {"pixel_values"} and batches[0].labels.tolist() == [0, 1, 2, 0]
    assert accuracy.task_metric(hf.task_of(model), batches) == "label_accuracy"
    fidelity = accuracy.Fidelity.builtin(model, batches, "label_accuracy", 0.01)
    assert fidelity.error(model) == 0.0 and 0.0 <= fidelity.reference_value <= 1.0
    folder = images_jsonl.parent / "img"   # the same images as a folder: no labels, so top-1 agreement
    batches = factories.load_data(str(folder), model=model, model_spec=checkpoints["vit"], options=options)
    assert batches[0].labels is None and accuracy.task_metric("image-classification", batches) == "top1"


def test_word_labels_score_the_first_token_of_each_word(checkpoints, tmp_path):
    model = hf.load_model(checkpoints["token"])
    path = tmp_path / "ner.jsonl"
    path.write_text('{"text": "the cat   zebra", "labels": [1, "LABEL_2", null]}\n'
                    '{"text": "a dog", "labels": [0, -100]}\n')
    assert read_examples(path)[0].word_labels == (1, "LABEL_2", None)
    batches = factories.load_data(str(path), model=model, model_spec=checkpoints["token"], options=DataOptions())
    # [CLS]-free word-level tokenizer: one token a word; padding and unscored words are -100
    assert batches[0].labels.tolist() == [[1, 2, -100], [0, -100, -100]]
    assert accuracy.task_metric("token-classification", batches) == "label_accuracy"
    fidelity = accuracy.Fidelity.builtin(model, batches, "label_accuracy", 0.01)
    predicted = model(**batches[0]).logits.argmax(-1)
    hits = int(predicted[0, 0] == 1) + int(predicted[0, 1] == 2) + int(predicted[1, 0] == 0)
    assert fidelity.reference_value == hits / 3


def test_a_token_classifier_without_labels_is_judged_by_token_agreement(checkpoints, tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("\n".join(SENTENCES))
    _, batches = _batches_for(checkpoints, "token", path)
    assert batches[0].labels is None
    assert accuracy.task_metric("token-classification", batches) == "token_agreement"


def test_label_accuracy_skips_unscored_tokens():
    batch = datafiles.LabeledBatch(input_ids=torch.zeros(1, 3))
    batch.labels = torch.tensor([[0, -100, 1]])
    logits = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    assert accuracy.label_accuracy_value([[logits]], [batch]) == 0.5


def test_the_example_checkpoint_is_a_directory_and_a_data_file(tmp_path):
    from precsearch.examples import checkpoint

    spec = f"hf:{checkpoint.build(tmp_path, steps=1)}"
    examples = read_examples(tmp_path / "examples.jsonl")
    assert len(examples) == len(checkpoint.sentences(0)) // 2
    assert {example.label for example in examples} == set(checkpoint.LABELS)
    model = hf.load_model(spec)
    batches = factories.load_data(str(tmp_path / "examples.jsonl"), model=model, model_spec=spec,
                                  options=DataOptions(batch_size=16, samples=32))
    assert accuracy.task_metric(hf.task_of(model), batches) == "label_accuracy"


@pytest.mark.slow
def test_export_a_checkpoint_on_a_data_file_and_check_the_package(checkpoints, examples_jsonl, tmp_path, capsys):
    from precsearch import Plan

    plan = tmp_path / "plan.yaml"
    Plan(mode="inference", default="bf16", layers={"classifier": "fp32"},
         constraint={"metric": "label_accuracy", "limit": 0.5}).save(plan)
    package = tmp_path / "model.pt2"
    given = ["--plan", str(plan), "--model", checkpoints["bert"], "--data", str(examples_jsonl), "--batch-size", "3"]
    assert main(["export", *given, "--out", str(package), "--dynamic"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "input_ids dims [0, 1]" in out and "package: ok, label_accuracy" in out
    assert main(["check", *given, "--package", str(package)]) == 0
    assert capsys.readouterr().out.startswith("package: ok, label_accuracy")
