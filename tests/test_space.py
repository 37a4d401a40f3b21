import pytest
from conftest import build_bert, build_gpt2, token_batches

from precsearch import walk
from precsearch.runtime.errors import InputError
from precsearch.examples import demo
from precsearch.search.space import SearchSpace, available_spaces


def test_named_spaces_ship_and_parse():
    assert {"default", "transformer", "cnn", "bf16_only"} <= set(available_spaces())
    for name in available_spaces():
        assert SearchSpace.load(name).name == name


def test_transformer_space_groups_blocks_and_restricts_heads():
    graph = walk(build_bert(), token_batches(1)[0])
    choices = {c.name: c for c in SearchSpace.load("transformer").choices(graph, "cpu")}
    attention = choices["encoder.layer.0.attention"]
    assert set(attention.units) == {"encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
                                    "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
                                    "encoder.layer.0.attention.output.dense"}
    assert set(choices["encoder.layer.0"].units) == {"encoder.layer.0.intermediate.dense",
                                                     "encoder.layer.0.output.dense"}
    assert choices["pooler.dense"].dtypes == ("bf16", "fp32")
    assert len(choices) == 8  # 3 embedding tables (storage units) + 2 layers x (attention, mlp) + pooler
    assert choices["embeddings.word_embeddings"].dtypes == ("fp16", "bf16", "fp32")

    gpt = {c.name: c for c in SearchSpace.load("transformer").choices(walk(build_gpt2(), token_batches(1)[0]), "cpu")}
    assert "transformer.h.0.attn" in gpt["transformer.h.0.attn"].units
    assert gpt["lm_head"].dtypes == ("bf16", "fp32")


def test_rules_first_match_wins_and_types_match(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("format: precsearch-space/1\nname: mine\ndtypes: [fp16, bf16, fp32]\nrules:\n"
                    "  - {name: '^shift$', dtypes: [fp32]}\n  - {type: [Linear], dtypes: [bf16, fp32]}\n")
    space = SearchSpace.load(str(path))
    choices = {c.name: c.dtypes for c in space.choices(walk(demo.model(), demo.data()[0]), "cpu")}
    assert choices["shift"] == ("fp32",)
    assert choices["stem"] == ("bf16", "fp32")


@pytest.mark.parametrize("text,message", [
    ("format: precsearch-space/1\ndtypes: [fp12]\n", "unknown dtype 'fp12'"),
    ("format: precsearch-space/2\n", "format must be"),
    ("format: precsearch-space/1\nrules: [{name: '(', dtypes: [fp32]}]\n", "invalid regular expression"),
    ("format: precsearch-space/1\nrules: [{name: x}]\n", "rules[0]"),
    ("format: precsearch-space/1\ngroups: ['no_capture']\n", "needs a capture group"),
    ("format: precsearch-space/1\ncolour: blue\n", "unknown field 'colour'"),
    ("format: [unclosed\n", "not valid YAML"),
])
def test_invalid_spaces_name_the_culprit(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        SearchSpace.load(str(path))


def test_unknown_named_space_lists_the_named_ones():
    with pytest.raises(InputError, match="named spaces: bf16_only, cnn, default, fp8, transformer"):
        SearchSpace.load("nope")


@pytest.mark.parametrize("text,message", [
    ("format: precsearch-space/1\nrules:\n  - {name: '^a$', dtypes: [fp32], dtypes: [bf16]}\n",
     "duplicate key 'dtypes' at line 3 (first at line 3)"),
    ("format: precsearch-space/1\nrules:\n  - name: '^a$'\n    dtypes: [fp32]\n    name: '^b$'\n",
     "duplicate key 'name' at line 5 (first at line 3)"),
    ("format: precsearch-space/1\ndtypes: [fp32]\nname: x\ndtypes: [bf16]\n",
     "duplicate key 'dtypes' at line 4 (first at line 2)"),
    ("format: precsearch-space/1\ndtypes: &d [fp32]\nrules: [{type: [Linear], dtypes: *d}]\n",
     "YAML anchor or alias &d at line 2"),
    ("format: precsearch-space/1\n1: a\nx: b\n", "unknown field 1"),
])
def test_unsafe_or_ambiguous_spaces_are_refused(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        SearchSpace.load(str(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_binary_space_file_is_an_input_error(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(InputError) as caught:
        SearchSpace.load(str(path))
    assert str(caught.value).startswith(f"--space {path}: cannot read search space: not UTF-8 text (byte 0x89")


@pytest.mark.parametrize("rule,culprit", [
    ("{name: '^head$', dtypes: [fp16]}", "rules[0].dtypes: fp16 is not in the top-level dtypes [bf16, fp32]"),
    ("{type: [Linear], dtypes: [fp8, bf16]}", "rules[0].dtypes: fp8 is not in the top-level dtypes [bf16, fp32]"),
])
def test_a_rule_dtype_outside_the_top_level_dtypes_is_bad_input(tmp_path, rule, culprit):
    path = tmp_path / "space.yaml"
    path.write_text(f"format: precsearch-space/1\nname: s\ndtypes: [bf16, fp32]\nrules:\n  - {rule}\n")
    with pytest.raises(InputError) as caught:
        SearchSpace.load(str(path))
    assert culprit in str(caught.value) and str(path) in str(caught.value)


def test_a_rule_may_always_name_fp32_and_narrow_the_top_level_dtypes():
    space = SearchSpace.parse({"format": "precsearch-space/1", "dtypes": ["bf16"],
                               "rules": [{"name": "^shift$", "dtypes": ["fp32"]}, {"type": ["Linear"],
                                                                                   "dtypes": ["bf16", "fp32"]}]},
                              "inline")
    choices = {c.name: c.dtypes for c in space.choices(walk(demo.model(), demo.data()[0]), "cpu")}
    assert choices["shift"] == ("fp32",) and choices["stem"] == ("bf16", "fp32")
