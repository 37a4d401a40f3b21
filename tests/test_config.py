import pytest

from precsearch.config import SearchConfig
from precsearch.errors import InputError
from precsearch.space import SearchSpace
from precsearch.strategies import STRATEGIES


def test_names_resolve_once_when_the_config_is_built():
    config = SearchConfig(space="transformer", strategy="greedy", mode="train")
    assert isinstance(config.space, SearchSpace) and config.space.name == "transformer"
    assert config.strategy is STRATEGIES["greedy"]
    assert config.mode == "training" and config.training and config.runtime.weights == "fp32"
    assert SearchConfig().runtime.weights == "low"


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
        SearchConfig(**fields)
