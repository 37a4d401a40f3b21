"""Malformed plans, spaces and command lines meet one-line errors and exit code 2, never a
traceback (property-based, seeded)."""

import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from precsearch import Plan, PlanError, walk
from precsearch.cli import main
from precsearch.errors import InputError
from precsearch.examples import demo
from precsearch.space import SearchSpace

VALID_PLAN = Plan(default="bf16", layers={"shift": "fp32"}, constraint={"metric": "rel_l2", "limit": 0.01}).to_dict()
VALID_SPACE = {"format": "precsearch-space/1", "name": "x", "dtypes": ["fp16", "bf16", "fp32"],
               "rules": [{"name": "^shift$", "dtypes": ["fp32"]}], "groups": ["^(blocks\\.\\d+)\\."]}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(["fp16", "bf16", "fp32", "fp8", "precsearch-plan/1", "precsearch-plan/2",
                                     "precsearch-space/1", "(", "^stem$", "[", "inference", "training"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def mutated(base):
    return st.fixed_dictionaries({}).flatmap(lambda _: st.dictionaries(
        st.sampled_from(sorted(base) + ["extra"]), values, max_size=4).map(lambda changes: {**base, **changes}))


MODEL = demo.small_model()
GRAPH = walk(MODEL, demo.data(batches=1)[0])


@seed(1)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated(VALID_PLAN), values))
def test_malformed_plans_raise_only_plan_errors(data):
    try:
        Plan.from_dict(data, "fuzz.yaml").validate_for(MODEL)
    except PlanError as error:
        assert "\n" not in str(error) and str(error)


@seed(2)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated(VALID_SPACE), values))
def test_malformed_spaces_raise_only_input_errors(data):
    try:
        SearchSpace.parse(data, "fuzz.yaml").choices(GRAPH, "cpu")
    except InputError as error:
        assert "\n" not in str(error) and str(error)


FLAGS = ["--plan", "--model", "--data", "--device", "--json", "--storage", "--study", "--space", "--trials",
         "--max-error", "--metric", "--bogus", "-h"]
TOKENS = ["precsearch.examples.demo:small_model", "precsearch.examples.demo:data", "nope:f", "plan.yaml",
          "bad.yaml", "missing.yaml", "cpu", "cuda", "tpu", "-1", "0", "nan", "sqlite:///nowhere/x.db", ":", ""]


@seed(3)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(argv=st.tuples(st.sampled_from(["layers", "check", "compare", "report", "bogus"]),
                      st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(TOKENS)), max_size=5)))
def test_random_command_lines_never_show_a_traceback(argv, tmp_path_factory, capsys, monkeypatch):
    folder = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(folder)
    Plan(default="bf16").save(folder / "plan.yaml")
    (folder / "bad.yaml").write_text("format: precsearch-plan/1\nlayers: !!python/object/apply:os.system ['echo x']\n")
    command, rest = argv
    try:
        code = main([command, *rest])
    except SystemExit as exit_:  # --help and --version exit through argparse
        assert exit_.code == 0
        return
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err


def test_plan_written_by_fuzzed_yaml_round_trips(tmp_path):
    text = yaml.safe_dump(VALID_PLAN)
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    assert main(["check", "--plan", str(path), "--model", "precsearch.examples.demo:small_model",
                 "--data", "precsearch.examples.demo:data"]) == 0
