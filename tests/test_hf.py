"""Local transformers checkpoints (``--model hf:DIR``), data files (``--data FILE``) and the task
metrics: tiny checkpoints and tokenizers are built here with ``save_pretrained``; nothing is downloaded."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import yaml

from precsearch import accuracy, datafiles, factories, hf
from precsearch.cli import main
from precsearch.datafiles import DataOptions, Example, read_examples
from precsearch.errors import InputError

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "precision search finds fast plans",
             "bf16 keeps the range of fp32", "the quick brown fox jumps over the lazy dog",
             "a plan holds each layer in its dtype"]


def _save_tokenizer(path) -> int:
    """A word-level tokenizer trained on SENTENCES, saved as the checkpoint's own; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="</s>")
    fast.save_pretrained(path)
    return fast.vocab_size


def _bert(vocab: int):
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2))


def _gpt2(vocab: int):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=2))


def _t5(vocab: int):
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=2))


def _feature(vocab: int):
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))


BUILDERS = {"bert": _bert, "gpt2": _gpt2, "t5": _t5, "feature": _feature}


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
    return specs


@pytest.fixture
def examples_jsonl(tmp_path):
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": i % 2}) + "\n" for i, text in enumerate(SENTENCES)))
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


@pytest.mark.parametrize("case", ["hub_id", "no_transformers", "empty", "wrong_field", "bad_bytes", "long_line",
                                  "unknown_task", "factory_data_options", "file_with_factory_model"])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(case, checkpoints, examples_jsonl, tmp_path,
                                                            monkeypatch, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes({"empty": b"", "wrong_field": b'{"sentence": "x"}\n', "bad_bytes": b'{"text": "\xff"}\n',
                      "long_line": b"x" * (datafiles.MAX_LINE_BYTES + 1)}.get(case, examples_jsonl.read_bytes()))
    model = {"hub_id": "hf:bert-base-uncased", "file_with_factory_model": factories.DEMO_MODEL}.get(
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
    assert {"hub_id": "download it first", "no_transformers": "precsearch[hf]", "empty": "no examples",
            "wrong_field": "'text' field", "bad_bytes": "not UTF-8", "long_line": "over the limit",
            "unknown_task": "--task", "factory_data_options": "--batch-size",
            "file_with_factory_model": "hf:DIR"}[case] in line


def test_layers_lists_a_checkpoints_units(checkpoints, examples_jsonl, capsys):
    assert main(["layers", "--model", checkpoints["gpt2"], "--data", str(examples_jsonl), "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)]
    assert "lm_head" in names and "transformer.h.0.attn.c_attn" in names


@pytest.mark.slow
@pytest.mark.parametrize("kind, metric, fp32", [("bert", "label_accuracy", True), ("gpt2", "perplexity", True),
                                                ("t5", "token_agreement", False)])
def test_optimize_a_checkpoint_on_a_data_file(kind, metric, fp32, checkpoints, examples_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["optimize", "--model", checkpoints[kind], "--data", str(examples_jsonl), "--trials", "3",
                 "--batch-size", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["constraint"] == {"metric": metric, "limit": 0.01}
    assert plan["model"]["name"] == checkpoints[kind]
    assert ("fp32_metric" in plan["metrics"]) == fp32
    assert main(["check", "--plan", str(out / "plan.yaml"), "--model", checkpoints[kind],
                 "--data", str(examples_jsonl), "--batch-size", "3"]) == 0


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
