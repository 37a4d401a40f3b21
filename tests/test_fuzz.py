"""Malformed plans, spaces and command lines meet one-line errors and exit code 2, never a
traceback; and input that must be refused *is* refused, while valid input is accepted
(property-based, seeded).

Each "never crashes" property passes whenever an input is accepted, so it cannot catch bad input
let through. The "refused" properties take a valid input, put exactly one defect into it, and
assert the error; the "accepted" properties guard against a validator that refuses everything.
"""

import argparse
import datetime as dt
import functools
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from precsearch import Plan, PlanError, model_fingerprint, walk
from precsearch.cli import build_parser, main
from precsearch.runtime.errors import InputError
from precsearch.examples import demo
from precsearch.runtime.precisions import AUTOCAST, NAMES
from precsearch.search.space import SearchSpace

PLAN_FORMAT, SPACE_FORMAT = "precsearch-plan/2", "precsearch-space/1"
BEFORE_STORAGE_UNITS = "precsearch-plan/1"   # read too
PLAN_FIELDS = {"format", "created", "model", "target", "mode", "default", "layers", "loss_scaling", "constraint",
               "metrics", "search"}
SPACE_FIELDS = {"format", "name", "dtypes", "rules", "groups"}
MODES = ("inference", "training")
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

VALID_PLAN = Plan(default="bf16", layers={"shift": "fp32"}, constraint={"metric": "rel_l2", "limit": 0.01}).to_dict()
VALID_SPACE = {"format": "precsearch-space/1", "name": "x", "dtypes": ["fp16", "bf16", "fp32"],
               "rules": [{"name": "^shift$", "dtypes": ["fp32"]}], "groups": ["^(blocks\\.\\d+)\\."]}
# Names with control characters (a newline) are left to test_error_messages_stay_one_line below.
text = functools.partial(st.text, alphabet=st.characters(blacklist_categories=("Cc", "Cs")))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), text(max_size=12),
                    st.sampled_from(["fp16", "bf16", "fp32", "fp12", "precsearch-plan/1", "precsearch-plan/2",
                                     "precsearch-space/1", "(", "^stem$", "[", "inference", "training"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def mutated(base):
    return st.fixed_dictionaries({}).flatmap(lambda _: st.dictionaries(
        st.sampled_from(sorted(base) + ["extra"]), values, max_size=4).map(lambda changes: {**base, **changes}))


MODEL = demo.small_model()
GRAPH = walk(MODEL, demo.data(batches=1)[0])
MODULE_NAMES = [name for name, _ in MODEL.named_modules()]
FINGERPRINT = model_fingerprint(MODEL)


# -- never a crash ----------------------------------------------------------------------------------
@seed(1)
@FUZZ
@given(data=st.one_of(mutated(VALID_PLAN), values))
def test_malformed_plans_raise_only_plan_errors(data):
    try:
        Plan.from_dict(data, "fuzz.yaml").validate_for(MODEL)
    except PlanError as error:
        assert "\n" not in str(error) and str(error)


@seed(2)
@FUZZ
@given(data=st.one_of(mutated(VALID_SPACE), values))
def test_malformed_spaces_raise_only_input_errors(data):
    try:
        SearchSpace.parse(data, "fuzz.yaml").choices(GRAPH, "cpu")
    except InputError as error:
        assert "\n" not in str(error) and str(error)


# -- building blocks for valid inputs and their defects ---------------------------------------------
def with_field(key, value, data):
    return {**data, key: value}


def without_field(key, data):
    return {k: v for k, v in data.items() if k != key}


def with_entry(field, key, value, data):
    """``data[field][key] = value`` (a unit in ``layers``)."""
    return {**data, field: {**(data.get(field) or {}), key: value}}


def appended(field, item, data):
    """``data[field] + [item]`` (a rule or a group of a space)."""
    return {**data, field: [*(data.get(field) or []), item]}


def defect(function, *arguments):
    """A strategy for one defect: ``function`` with drawn leading arguments, applied to the input."""
    return st.tuples(*arguments).map(lambda drawn: functools.partial(function, *drawn))


NOT_A_DTYPE = st.one_of(
    st.sampled_from(["fp12", "FP16", "float16", "bfloat16", "half", "fp32 ", " bf16", "f", "h", "", "int8"]),
    text(max_size=8).filter(lambda s: s not in NAMES),
    st.integers(), st.floats(), st.booleans(), st.lists(st.sampled_from(NAMES), max_size=2))
NOT_A_NAME = st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False), st.none())
NOT_A_MAPPING = st.one_of(st.lists(values, max_size=3), text(max_size=8), st.integers(), st.floats(),
                          st.booleans())  # null means "absent" for the optional sections
NOT_A_FIELD_NAME = st.one_of(text(max_size=10), st.integers(), st.booleans(), st.none())
NOT_THE_PLAN_FORMAT = st.one_of(values, st.sampled_from(
    ["precsearch-plan/2", "precsearch-plan/0", "precsearch-space/1", "precsearch-plan/1 ", "PRECSEARCH-PLAN/1",
     "precsearch-plan", "1"])).filter(lambda value: value not in (PLAN_FORMAT, BEFORE_STORAGE_UNITS))
NOT_THE_SPACE_FORMAT = st.one_of(values, st.sampled_from(
    ["precsearch-space/2", "precsearch-plan/1", "precsearch-space", " precsearch-space/1"])).filter(
    lambda value: value != SPACE_FORMAT)
POSITIVE = st.floats(min_value=1e-3, max_value=1e6)

VALID_PLANS = st.fixed_dictionaries({"format": st.just(PLAN_FORMAT)}, optional={
    "created": st.one_of(st.none(), st.just("2026-01-01T00:00:00Z"), st.dates(), st.datetimes()),
    "model": st.fixed_dictionaries({}, optional={"name": text(max_size=8), "fingerprint": st.just(FINGERPRINT),
                                                 "units": st.integers(0, 50)}),
    "target": st.dictionaries(st.sampled_from(["device", "device_name", "torch"]), text(max_size=8)),
    "mode": st.sampled_from(MODES),
    "default": st.sampled_from(AUTOCAST),
    "layers": st.one_of(st.none(), st.dictionaries(st.sampled_from(MODULE_NAMES), st.sampled_from(AUTOCAST),
                                                   max_size=4)),
    "loss_scaling": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "init_scale": POSITIVE, "growth_factor": st.floats(1.01, 10), "backoff_factor": st.floats(0.01, 0.99),
        "growth_interval": st.integers(1, 5000)})),
    "constraint": st.one_of(st.none(), st.fixed_dictionaries({"metric": st.sampled_from(["rel_l2", "cosine"]),
                                                              "limit": st.floats(0, 1)})),
    "metrics": st.one_of(st.none(), st.dictionaries(st.sampled_from(["latency_ms", "speedup", "error", "trial"]),
                                                    st.one_of(st.none(), st.floats(0, 100), st.integers(0, 9)))),
    "search": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "space": text(max_size=8), "trials": st.integers(0, 100), "sampler": st.just("tpe"), "storage": st.none()})
        .filter(bool)),  # `search: {}` is test_empty_search_round_trips below
})

BAD_CONSTRAINT = st.one_of(
    st.fixed_dictionaries({"metric": st.just("rel_l2")}),                                  # no limit
    st.fixed_dictionaries({"limit": st.floats(0, 1)}),                                     # no metric
    st.fixed_dictionaries({"metric": st.just("rel_l2"), "limit": st.one_of(
        st.floats(max_value=-1e-9), st.just(math.nan), st.just(math.inf), text(max_size=4), st.booleans(),
        st.none())}),
    st.fixed_dictionaries({"metric": st.one_of(st.integers(), st.none(), st.lists(text(max_size=3))),
                           "limit": st.just(0.01)}),
    text(min_size=1, max_size=8).filter(lambda k: k not in ("metric", "limit")).map(
        lambda key: {"metric": "rel_l2", "limit": 0.01, key: 1}),                            # unknown field
)
BAD_LOSS_SCALING = st.one_of(
    st.fixed_dictionaries({"init_scale": st.one_of(st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan),
                                                   text(max_size=3), st.booleans(), st.none())}),
    st.fixed_dictionaries({"growth_factor": st.one_of(st.floats(max_value=1.0), st.just(math.inf),
                                                      st.just(math.nan), st.booleans())}),
    st.fixed_dictionaries({"backoff_factor": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0),
                                                       st.just(math.nan), st.booleans(), text(max_size=3))}),
    st.fixed_dictionaries({"growth_interval": st.one_of(st.integers(max_value=0), st.floats(), st.booleans(),
                                                        text(max_size=3))}),
    NOT_A_FIELD_NAME.filter(lambda k: k not in ("init_scale", "growth_factor", "backoff_factor",
                                                "growth_interval")).map(lambda key: {key: 1}),
)
PLAN_DEFECTS = st.one_of(
    defect(with_entry, st.just("layers"), st.sampled_from(MODULE_NAMES), NOT_A_DTYPE),   # unknown dtype
    defect(with_entry, st.just("layers"), NOT_A_NAME, st.sampled_from(NAMES)),           # non-string unit name
    defect(with_field, st.just("layers"), NOT_A_MAPPING),
    defect(with_field, st.just("default"), NOT_A_DTYPE),
    defect(with_field, NOT_A_FIELD_NAME.filter(lambda key: key not in PLAN_FIELDS), values),
    defect(with_field, st.just("format"), NOT_THE_PLAN_FORMAT),
    defect(without_field, st.just("format")),
    defect(with_field, st.just("mode"), values.filter(lambda v: v is not None and v not in MODES)),
    defect(with_field, st.sampled_from(["model", "target", "constraint", "metrics", "search", "loss_scaling"]),
           NOT_A_MAPPING),
    defect(with_field, st.just("constraint"), BAD_CONSTRAINT),
    defect(with_field, st.just("loss_scaling"), BAD_LOSS_SCALING),
    defect(with_entry, st.just("target"), text(max_size=6), st.one_of(st.integers(), st.floats(), st.booleans(),
                                                                       st.lists(text(max_size=3), max_size=2))),
    defect(with_entry, st.just("model"), st.just("fingerprint"), st.one_of(text(max_size=8).filter(
        lambda s: not s.startswith("sha256:")), st.integers())),
    defect(with_entry, st.just("model"), st.just("units"), st.one_of(st.integers(max_value=-1), st.floats(),
                                                                     text(max_size=3))),
    defect(with_entry, st.just("metrics"), text(max_size=6), st.one_of(text(max_size=4), st.lists(st.integers()),
                                                                        st.booleans())),
    defect(with_entry, st.sampled_from(["model", "target", "constraint", "metrics", "search"]), NOT_A_NAME, st.none()),
    defect(with_field, st.just("created"), st.one_of(st.integers(), st.floats(), st.booleans(),
                                                     st.lists(text(max_size=3), max_size=2))),
)


# -- plans: refused and accepted --------------------------------------------------------------------
@seed(4)
@FUZZ
@given(base=VALID_PLANS, spoil=PLAN_DEFECTS)
def test_plans_with_a_defect_are_refused(base, spoil):
    bad = spoil(base)
    with pytest.raises(PlanError) as error:
        Plan.from_dict(bad, "fuzz.yaml")
    message = str(error.value)
    assert message.startswith("fuzz.yaml: ") and "\n" not in message


@seed(5)
@FUZZ
@given(data=st.one_of(NOT_A_MAPPING, st.none()))
def test_anything_but_a_mapping_is_not_a_plan(data):
    with pytest.raises(PlanError, match=r"^fuzz.yaml: not a precsearch plan"):
        Plan.from_dict(data, "fuzz.yaml")


@seed(6)
@FUZZ
@given(base=VALID_PLANS, name=text(max_size=12).filter(lambda name: name not in MODULE_NAMES),
       dtype=st.sampled_from(AUTOCAST))
def test_plans_naming_a_unit_the_model_lacks_are_refused_for_it(base, name, dtype):
    plan = Plan.from_dict(with_entry("layers", name, dtype, base), "fuzz.yaml")  # well-formed ...
    with pytest.raises(PlanError, match="the model has no module of that name") as error:
        plan.validate_for(MODEL)                                                  # ... but not for this model
    assert str(error.value).startswith(f"layers.{name}: ")


@seed(7)
@FUZZ
@given(base=VALID_PLANS, digest=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
def test_plans_made_for_another_model_are_refused(base, digest):
    plan = Plan.from_dict(with_entry("model", "fingerprint", f"sha256:{digest}", base), "fuzz.yaml")
    with pytest.raises(PlanError, match="made for another model"):
        plan.validate_for(MODEL)
    with pytest.warns(UserWarning, match="made for another model"):
        plan.validate_for(MODEL, fingerprint_mismatch="warn")
    plan.validate_for(MODEL, fingerprint_mismatch="ignore")


@seed(8)
@FUZZ
@given(data=VALID_PLANS)
def test_valid_plans_are_accepted_and_round_trip(data):
    plan = Plan.from_dict(data, "fuzz.yaml")
    plan.validate_for(MODEL)
    assert plan.default == data.get("default", "fp32")
    assert plan.layers == (data.get("layers") or {})
    assert plan.mode == data.get("mode", "inference")
    assert Plan.from_dict(plan.to_dict(), "again.yaml") == plan
    assert Plan.from_dict(yaml.safe_load(plan.dumps()), "again.yaml") == plan


# -- spaces: refused and accepted -------------------------------------------------------------------
GOOD_REGEXES = ["^shift$", "amplify", "^blocks\\.\\d+\\.", "fc[12]$", ".*", "^$", "head|stem", "norm"]
GOOD_GROUPS = ["^(blocks\\.\\d+)\\.", "^(blocks)\\.", "(fc)\\d", "^(stem|head)$", "(?:x)?(amplify)", "(z)?"]
BAD_REGEXES = ["(", "[", "*", "a{2,1}", "(?P<x", "\\", "+a", "(?<=a+)b", "^(blocks\\.\\d+\\."]
NO_CAPTURE = ["^blocks\\.\\d+\\.", "(?:blocks)", "amplify", "", "(?:a)(?=b)"]
DTYPE_LISTS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)
CLASSES = ["Linear", "LayerNorm", "Conv2d", "TrapNet"]

def _valid_rule(dtypes: list[str]) -> st.SearchStrategy:
    """A rule narrowing ``dtypes`` (FP32 may always be named)."""
    within = sorted({*dtypes, "fp32"})
    return st.fixed_dictionaries(
        {"dtypes": st.lists(st.sampled_from(within), min_size=1, max_size=3, unique=True)},
        optional={"name": st.sampled_from(GOOD_REGEXES),
                  "type": st.one_of(st.none(), st.lists(st.sampled_from(CLASSES), max_size=2))})


VALID_SPACES = DTYPE_LISTS.flatmap(lambda dtypes: st.fixed_dictionaries({"format": st.just(SPACE_FORMAT),
                                                                          "dtypes": st.just(dtypes)}, optional={
    "name": text(max_size=8),
    "rules": st.one_of(st.none(), st.lists(_valid_rule(dtypes), max_size=3)),
    "groups": st.one_of(st.none(), st.lists(st.sampled_from(GOOD_GROUPS), max_size=2, unique=True)),
}))
NOT_A_LIST = st.one_of(st.sampled_from(NAMES), text(min_size=1, max_size=8), st.integers().filter(bool),
                       st.floats().filter(bool), st.just(True),
                       st.dictionaries(text(max_size=4), scalars, min_size=1, max_size=2))
WITH_A_BAD_DTYPE = st.tuples(st.lists(st.sampled_from(NAMES), max_size=2), NOT_A_DTYPE, st.booleans()).map(
    lambda drawn: [drawn[1], *drawn[0]] if drawn[2] else [*drawn[0], drawn[1]])
BAD_RULE = st.one_of(
    st.one_of(st.none(), text(max_size=6), st.integers(), st.lists(st.sampled_from(NAMES), max_size=2)),  # not a rule
    st.fixed_dictionaries({"name": st.sampled_from(GOOD_REGEXES)}),                                 # no dtypes
    st.fixed_dictionaries({"dtypes": st.one_of(WITH_A_BAD_DTYPE, st.just([]), NOT_A_LIST)}),
    st.fixed_dictionaries({"dtypes": DTYPE_LISTS, "name": st.sampled_from(BAD_REGEXES)}),
    st.fixed_dictionaries({"dtypes": DTYPE_LISTS, "name": st.one_of(st.none(), st.integers(), st.lists(
        st.sampled_from(GOOD_REGEXES), max_size=2))}),
    st.fixed_dictionaries({"dtypes": DTYPE_LISTS, "type": st.one_of(st.sampled_from(CLASSES), st.integers())}),
    NOT_A_FIELD_NAME.filter(lambda k: k not in ("name", "type", "dtypes")).map(
        lambda key: {"dtypes": ["fp32"], key: "x"}),                                            # unknown field
)
SPACE_DEFECTS = st.one_of(
    defect(with_field, st.just("dtypes"), st.one_of(WITH_A_BAD_DTYPE, st.just([]), NOT_A_LIST)),
    defect(with_field, NOT_A_FIELD_NAME.filter(lambda key: key not in SPACE_FIELDS), values),
    defect(with_field, st.just("format"), NOT_THE_SPACE_FORMAT),
    defect(without_field, st.just("format")),
    defect(with_field, st.sampled_from(["rules", "groups"]), NOT_A_LIST),
    defect(appended, st.just("rules"), BAD_RULE),
    defect(appended, st.just("groups"), st.one_of(st.sampled_from(BAD_REGEXES + NO_CAPTURE), st.integers(),
                                                  st.lists(st.sampled_from(GOOD_GROUPS), min_size=1, max_size=2))),
)


@seed(9)
@FUZZ
@given(base=VALID_SPACES, spoil=SPACE_DEFECTS)
def test_spaces_with_a_defect_are_refused(base, spoil):
    bad = spoil(base)
    with pytest.raises(InputError) as error:
        SearchSpace.parse(bad, "fuzz.yaml")
    message = str(error.value)
    assert message.startswith("fuzz.yaml: ") and "\n" not in message


@seed(10)
@FUZZ
@given(data=st.one_of(NOT_A_MAPPING, st.none()))
def test_anything_but_a_mapping_is_not_a_space(data):
    with pytest.raises(InputError, match=r"^fuzz.yaml: not a search space"):
        SearchSpace.parse(data, "fuzz.yaml")


@seed(11)
@FUZZ
@given(data=VALID_SPACES)
def test_valid_spaces_are_accepted(data):
    space = SearchSpace.parse(data, "fuzz.yaml")
    assert space.dtypes == tuple(data.get("dtypes", AUTOCAST))
    assert len(space.rules) == len(data.get("rules") or []) and len(space.groups) == len(data.get("groups") or [])
    try:
        choices = space.choices(GRAPH, "cpu")
    except InputError as error:  # a group whose units' rules share no dtype: the one legitimate refusal
        assert "has no dtype all its units may take" in str(error)
        return
    assert sorted(u for choice in choices for u in choice.units) == sorted(GRAPH.units)   # a partition
    allowed = set(space.dtypes) | {d for rule in space.rules for d in rule.dtypes} | {"fp32"}
    for choice in choices:
        assert choice.dtypes and set(choice.dtypes) <= allowed
        assert list(choice.dtypes) == [d for d in NAMES if d in choice.dtypes]


# -- gaps found by fuzzing, kept closed ---------------------------------------------------------------
@pytest.mark.parametrize("data", [
    {"format": PLAN_FORMAT, "layers": {"a\nb": "fp12"}},
    {"format": PLAN_FORMAT, "metrics": {"a\nb": "x"}},
], ids=["layer", "metrics"])
def test_error_messages_stay_one_line(data):
    with pytest.raises(PlanError) as error:
        Plan.from_dict(data, "fuzz.yaml")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", [False, 0, "", {}], ids=["false", "zero", "empty_string", "empty_mapping"])
@pytest.mark.parametrize("field", ["rules", "groups"])
def test_spaces_refuse_falsy_non_lists(field, value):
    with pytest.raises(InputError, match=f"{field}: expected a list"):
        SearchSpace.parse({"format": SPACE_FORMAT, field: value}, "fuzz.yaml")


def test_empty_search_round_trips():
    plan = Plan(search={})
    assert Plan.from_dict(plan.to_dict()) == plan


# -- command lines ----------------------------------------------------------------------------------
FLAGS = ["--plan", "--model", "--data", "--device", "--json", "--storage", "--study", "--space", "--trials",
         "--max-error", "--metric", "--bogus", "-h"]
TOKENS = ["precsearch.examples.demo:small_model", "precsearch.examples.demo:data", "nope:f", "plan.yaml",
          "bad.yaml", "missing.yaml", "cpu", "cuda", "tpu", "-1", "0", "nan", "sqlite:///nowhere/x.db", ":", ""]


def _command_options() -> dict[str, set[str]]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(sub._option_string_actions) for name, sub in commands.choices.items()}


OPTIONS = _command_options()


def must_be_refused(command: str, rest: list[str]) -> bool:
    """Command lines that cannot be right whatever the files hold (argparse accepts prefixes)."""
    if command not in OPTIONS:
        return True
    if "-h" in rest:
        return False
    unknown = [t for t in rest if t.startswith("--") and not any(o.startswith(t) for o in OPTIONS[command])]
    alone = command in ("layers", "check") and ("--model" in rest) != ("--data" in rest)
    return bool(unknown) or alone or (command == "check" and "--plan" not in rest)


def test_must_be_refused_rule():
    assert must_be_refused("bogus", ["-h"]) and must_be_refused("layers", ["--plan", "x"])
    assert must_be_refused("layers", ["--model", "m:f"]) and must_be_refused("check", ["--json"])
    assert not must_be_refused("layers", ["--json"]) and not must_be_refused("check", ["--plan", "p", "-h"])
    assert not must_be_refused("compare", ["a.yaml", "b.yaml", "--json"])


@seed(3)
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=st.tuples(st.sampled_from(["layers", "check", "compare", "report", "bogus"]),
                      st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(TOKENS)), max_size=5)))
def test_random_command_lines_never_show_a_traceback(argv, tmp_path_factory, capsys, monkeypatch):
    folder = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(folder)
    Plan(default="bf16").save(folder / "plan.yaml")
    (folder / "bad.yaml").write_text("format: precsearch-plan/1\nlayers: !!python/object/apply:os.system ['echo x']\n")
    command, rest = argv
    refuse = must_be_refused(command, rest)
    try:
        code = main([command, *rest])
    except SystemExit as exit_:  # --help and --version exit through argparse
        assert exit_.code == 0 and not refuse, argv
        return
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    assert "Traceback" not in err and "internal error" not in err, err
    if refuse:
        assert code == 2, (argv, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("precsearch: error: "), err


def test_plan_written_by_fuzzed_yaml_round_trips(tmp_path):
    text_ = yaml.safe_dump(VALID_PLAN)
    path = tmp_path / "plan.yaml"
    path.write_text(text_)
    assert main(["check", "--plan", str(path), "--model", "precsearch.examples.demo:small_model",
                 "--data", "precsearch.examples.demo:data"]) == 0


def test_dates_and_datetimes_become_utc_strings():
    assert Plan.from_dict({"format": PLAN_FORMAT, "created": dt.date(2026, 1, 2)}).created == "2026-01-02T00:00:00Z"
