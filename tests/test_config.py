import pytest

from precsearch.search.config import SearchConfig
from precsearch.runtime.errors import InputError
from precsearch.search.space import SearchSpace
from precsearch.search.strategies import STRATEGIES


def test_names_resolve_once_when_the_config_is_built():
    config = SearchConfig.from_names(space="transformer", strategy="greedy", mode="train")
    assert isinstance(config.space, SearchSpace) and config.space.name == "transformer"
    assert config.strategy is STRATEGIES["greedy"]
    assert config.mode == "training" and config.training and config.runtime.weights == "fp32"
    assert SearchConfig().runtime.weights == "low"


def test_the_plain_constructor_holds_objects_and_defaults_to_the_default_ones():
    config = SearchConfig(max_error=0.02)
    assert config.space == SearchSpace.load("default") and config.strategy is STRATEGIES["optuna"]
    transformer = SearchSpace.load("transformer")
    assert SearchConfig(space=transformer, strategy=STRATEGIES["greedy"]).space is transformer
    assert SearchConfig.from_names(space=transformer).space is transformer   # objects pass through


@pytest.mark.parametrize("fields", [{"space": "transformer"}, {"strategy": "greedy"}, {"space": None}])
def test_the_plain_constructor_refuses_a_name_and_points_at_from_names(fields):
    (field, value), = fields.items()
    hint = "SearchConfig.from_names" if isinstance(value, str) else ""
    with pytest.raises(TypeError, match=f"^SearchConfig\\({field}=.*must be a .*{hint}"):
        SearchConfig(**fields)


def test_the_config_is_frozen():
    config = SearchConfig()
    with pytest.raises(AttributeError):
        config.trials = 3  # type: ignore[misc]


@pytest.mark.parametrize(("fields", "flag"), [
    ({"trials": 0}, "--trials"), ({"trials": 2.5}, "--trials"), ({"trials": True}, "--trials"),
    ({"timeout": 0}, "--timeout"), ({"timeout": float("nan")}, "--timeout"), ({"heartbeat": -1}, "--heartbeat"),
    ({"max_error": -0.1}, "--max-error"), ({"max_error": float("inf")}, "--max-error"),
    ({"metric": "l1"}, "--metric-name"), ({"strategy": "annealing"}, "--strategy"), ({"mode": "eval"}, "--mode"),
    ({"space": "no-such-space"}, "--space"), ({"seed": "0"}, "--seed"), ({"study_name": ""}, "--study"),
    ({"loss_fn": lambda out, target: out.sum()}, "--loss"), ({"weights": "int4"}, "--weights"),
    ({"weights": "low", "mode": "training"}, "--weights"),
])
def test_invalid_configs_cannot_be_built(fields, flag):
    with pytest.raises(InputError, match=flag):
        SearchConfig.from_names(**fields)


@pytest.mark.parametrize(("fields", "flag"), [
    ({"margin": 1}, "--margin"), ({"margin": -0.1}, "--margin"), ({"margin": float("nan")}, "--margin"),
    ({"margin": "0.1"}, "--margin"), ({"holdout": 1.0}, "--holdout"), ({"holdout": -0.5}, "--holdout"),
    ({"holdout": True}, "--holdout"), ({"holdout": 0.2, "mode": "train"}, "--holdout"),
    ({"holdout_data": []}, "--holdout-data"), ({"holdout_data": [object()]}, "--holdout-data"),
    ({"holdout_data": [[1.0]], "holdout": 0.25}, "--holdout and --holdout-data"),
    ({"holdout_data": [[1.0]], "mode": "train"}, "--holdout-data"),
])
def test_invalid_unseen_data_settings_name_their_flag(fields, flag):
    with pytest.raises(InputError, match=flag):
        SearchConfig(**fields)


def test_holdout_defaults_to_a_quarter_from_eight_batches_on():
    config = SearchConfig()
    assert [config.holdout_count(n) for n in (1, 4, 7, 8, 10, 20)] == [0, 0, 0, 2, 2, 5]
    assert SearchConfig(holdout=0.0).holdout_count(20) == 0
    assert SearchConfig(mode="train").holdout_count(20) == 0   # held-out scoring is for inference
    assert [SearchConfig(holdout=0.5).holdout_count(n) for n in (2, 3, 9)] == [1, 2, 4]
    assert SearchConfig(holdout=0.9).holdout_count(2) == 1   # never every batch
    assert SearchConfig(holdout_data=[[1.0]]).holdout_count(20) == 0
    with pytest.raises(InputError, match="--holdout 0.5: one batch cannot be split"):
        SearchConfig(holdout=0.5).holdout_count(1)
    assert SearchConfig().margin == 0.0
