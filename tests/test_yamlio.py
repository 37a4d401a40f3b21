import datetime
import re
import time

import pytest

from precsearch.runtime.errors import InputError, PlanError
from precsearch.runtime.yamlio import MAX_DEPTH, load_yaml, load_yaml_file


def alias_bomb(levels: int = 9) -> str:
    """A billion-laughs document: each level is nine aliases of the one before (9**9 leaves)."""
    lines = ['  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        lines.append(f"  - &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "created:\n" + "\n".join(lines) + "\n"


def test_plain_yaml_loads_as_plain_data():
    text = "a: 1\nb: [x, 2.5, null, true]\nc: {d: e}\nwhen: 2026-11-28T12:00:00Z\n"
    assert load_yaml(text, "f.yaml") == {
        "a": 1, "b": ["x", 2.5, None, True], "c": {"d": "e"},
        "when": datetime.datetime(2026, 11, 28, 12, tzinfo=datetime.timezone.utc)}
    assert load_yaml("", "f.yaml") is None


@pytest.mark.parametrize("text,key,line,first", [
    ("default: fp32\nlayers: {}\ndefault: bf16\n", "'default'", 3, 1),
    ("layers: {stem: bf16, stem: fp32}\n", "'stem'", 1, 1),
    ("layers:\n  stem: bf16\n  head: fp32\n  stem: fp32\n", "'stem'", 4, 2),
    ("rules:\n  - {name: a, dtypes: [fp32]}\n  - name: b\n    dtypes: [bf16]\n    name: c\n", "'name'", 5, 3),
    ("a:\n  b:\n    c:\n      d: 1\n      d: 2\n", "'d'", 5, 4),
    ("1: a\n1.0: b\n", "1.0", 2, 1),
])
def test_duplicate_keys_are_refused_at_any_depth(text, key, line, first):
    with pytest.raises(PlanError) as caught:
        load_yaml(text, "plan.yaml", PlanError)
    expected = f"plan.yaml: duplicate key {key} at line {line} (first at line {first}); keep one"
    assert str(caught.value) == expected


@pytest.mark.parametrize("text,sign", [
    ("a: &x 1\nb: 2\n", "&x"),
    ("a: 1\nb: *x\n", "*x"),
    ("a: &x {k: v}\nb: *x\n", "&x"),
    ("- &item [1]\n", "&item"),
])
def test_anchors_and_aliases_are_refused(text, sign):
    with pytest.raises(InputError, match=re.escape(f"f.yaml: YAML anchor or alias {sign} at line")):
        load_yaml(text, "f.yaml")


def test_merge_keys_are_refused():
    with pytest.raises(InputError, match="merge key '<<' at line 1"):
        load_yaml("<<: {a: 1}\nb: 2\n", "f.yaml")


def test_alias_bomb_fails_fast_without_expanding():
    text = "format: precsearch-plan/1\n" + alias_bomb()
    assert len(text) < 1024
    started = time.perf_counter()
    with pytest.raises(PlanError, match=r"plan.yaml: YAML anchor or alias &l0 at line 3"):
        load_yaml(text, "plan.yaml", PlanError)
    assert time.perf_counter() - started < 1.0


def test_deep_nesting_is_refused_not_a_recursion_error():
    with pytest.raises(InputError, match=f"nested more than {MAX_DEPTH} levels deep at line 1"):
        load_yaml("[" * 5000 + "]" * 5000, "f.yaml")
    assert load_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH, "f.yaml") is not None


@pytest.mark.parametrize("text,message", [
    ("a: [unclosed\n", "f.yaml: not valid YAML at line 2: expected ',' or ']'"),
    ("a: 1\n b: 2\n", "f.yaml: not valid YAML at line 2: mapping values are not allowed here"),
    ("a: 1\n---\nb: 2\n", "f.yaml: not valid YAML at line 2"),
    ("a: b\nc: d\x00\n", "f.yaml: not valid YAML at line 2: character U+0000 is not allowed"),
    ("a: !!python/object/apply:os.system ['true']\n",
     "f.yaml: not valid YAML at line 1: could not determine"),
])
def test_syntax_errors_give_the_line_on_one_line(text, message):
    with pytest.raises(InputError) as caught:
        load_yaml(text, "f.yaml")
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_the_callers_error_class_is_raised():
    with pytest.raises(PlanError):
        load_yaml("a: [", "p", PlanError)
    with pytest.raises(InputError) as caught:
        load_yaml("a: [", "s")
    assert type(caught.value) is InputError


def test_files_missing_or_binary(tmp_path):
    with pytest.raises(PlanError, match=r"^.*missing.yaml: cannot read plan \(No such file"):
        load_yaml_file(tmp_path / "missing.yaml", PlanError, what="plan")
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(InputError, match=r"--space x: cannot read search space: not UTF-8 text \(byte 0x89"):
        load_yaml_file(binary, what="search space", source="--space x")
    good = tmp_path / "good.yaml"
    good.write_text("a: 1\n", encoding="utf-8")
    assert load_yaml_file(good) == {"a": 1}
