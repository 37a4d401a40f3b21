"""The search's decisions: plan codes, Optuna parameters (per choice or ranked) and seed plans."""

import math
import random

import pytest
from optuna.trial import FixedTrial

from precsearch.search.decisions import Decisions, decode, encode
from precsearch.runtime.precisions import NAMES
from precsearch.search.space import Choice

ALL = ("fp16", "bf16", "fp32")
CHOICES = [
    Choice("a", ("a",), ALL),
    Choice("b", ("b",), ALL),
    Choice("c", ("c",), ALL),
    Choice("g", ("g.0", "g.1"), ALL),            # a group: its units share one dtype
    Choice("fixed", ("fixed",), ("fp32",)),     # no decision to make
]
UNITS = ["a", "b", "c", "g.0", "g.1", "fixed"]
SENSITIVITY = {
    "a": {"bf16": 0.02, "fp16": 0.002},
    "b": {"bf16": 0.01, "fp16": math.inf},        # overflows fp16
    "c": {"bf16": None, "fp16": 0.001},           # unknown in bf16: ranked at the median, 0.002
    "g.0": {"bf16": 0.003, "fp16": 0.0003},
    "g.1": {"bf16": 0.004, "fp16": 0.0004},       # group error: sqrt(0.003^2 + 0.004^2) = 0.005
    "fixed": {"bf16": 0.0, "fp16": 0.0},
}
FLOPS = {"a": 10_000, "b": 100, "c": 200, "g.0": 50, "g.1": 50, "fixed": 100}


def decisions(ranked=False, limit=math.inf, **options):
    return Decisions(CHOICES, SENSITIVITY, FLOPS, ranked=ranked, limit=limit, **options)


# -- plan codes -----------------------------------------------------------------------------------
def test_encode_and_decode():
    assert encode({"a": "bf16", "c": "fp16"}, ["a", "b", "c"]) == "bfh"
    assert encode({}, ["a", "b"], default="bf16") == "bb"
    assert encode({"b": "fp32"}, ["a", "b"], default="fp16") == "hf"
    assert decode("bfh", ["a", "b", "c"]) == {"a": "bf16", "b": "fp32", "c": "fp16"}
    assert encode({}, []) == "" and decode("", []) == {}


def test_encode_decode_round_trip():
    rng = random.Random(0)
    for _ in range(50):
        units = [f"u{i}" for i in range(rng.randint(0, 12))]
        layers = {u: rng.choice(NAMES) for u in units if rng.random() < 0.7}
        code = encode(layers, units)
        assert len(code) == len(units)
        assert decode(code, units) == {u: layers.get(u, "fp32") for u in units}
        assert encode(decode(code, units), units) == code


def test_decode_rejects_bad_codes():
    with pytest.raises(ValueError):
        decode("bf", ["a", "b", "c"])            # one letter per unit
    with pytest.raises(ValueError):
        decode("bfh", ["a", "b"])
    with pytest.raises(KeyError):
        decode("bx", ["a", "b"])                 # no precision has the code x
    with pytest.raises(KeyError):
        encode({"a": "fp12"}, ["a"])


# -- structure ----------------------------------------------------------------------------------
def test_low_precisions_and_cost_aware_order():
    d = decisions()
    assert d.low == ["bf16", "fp16"]                                 # by preference
    # squared error per FLOP saved, cheapest first; the fp16-unsafe b last
    assert [c.name for c in d.order["bf16"]] == ["c", "a", "g", "b"]
    assert [c.name for c in d.order["fp16"]] == ["a", "g", "c", "b"]
    assert d.errors["bf16"]["g"] == pytest.approx(0.005)
    assert d.errors["bf16"]["c"] == pytest.approx(0.002)              # the median of the known values
    assert d.errors["fp16"]["b"] == math.inf
    assert d.most_sensitive(2) == [("b", "fp16", math.inf), ("a", "bf16", pytest.approx(0.02))]


def test_low_only_counts_dtypes_some_choice_allows():
    only_bf16 = [Choice("a", ("a",), ("bf16", "fp32")), Choice("b", ("b",), ("fp32",))]
    d = Decisions(only_bf16, SENSITIVITY, FLOPS, ranked=False)
    assert d.low == ["bf16"] and list(d.order) == ["bf16"]
    none = Decisions([Choice("b", ("b",), ("fp32",))], SENSITIVITY, FLOPS, ranked=False)
    assert none.low == [] and none.preferred_low is None


def test_preferred_low():
    assert decisions().preferred_low == "bf16"                         # unmeasured: by preference
    assert decisions(speed={"fp16": 0.5, "bf16": 0.8}).preferred_low == "fp16"
    assert decisions(speed={"fp16": 0.9, "bf16": 0.6}).preferred_low == "bf16"


def test_param_names():
    assert Decisions.param(Choice("", ("",), ALL)) == "<root>"
    assert Decisions.param(CHOICES[3]) == "g"


# -- expand and suggest ---------------------------------------------------------------------------
def test_expand_fills_fp32_or_the_only_dtype():
    d = decisions()
    assert d.expand({}) == {u: "fp32" for u in UNITS}
    assert d.expand({"g": "bf16", "a": "fp16"}) == {
        "a": "fp16", "b": "fp32", "c": "fp32", "g.0": "bf16", "g.1": "bf16", "fixed": "fp32"}
    only = Decisions([Choice("x", ("x", "y"), ("bf16",))], {}, {}, ranked=False)
    assert only.expand({}) == {"x": "bf16", "y": "bf16"}               # no fp32 to fall back on


def test_suggest_per_choice():
    d = decisions()
    layers = d.suggest(FixedTrial({"a": "bf16", "b": "fp32", "c": "fp16", "g": "fp16"}))
    assert layers == {"a": "bf16", "b": "fp32", "c": "fp16", "g.0": "fp16", "g.1": "fp16", "fixed": "fp32"}
    with pytest.raises(ValueError):
        d.suggest(FixedTrial({"a": "bf16"}))                            # every open choice is asked


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.25, 0.5, 0.6, 0.75, 1.0])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_ranked_suggest_lowers_a_cost_aware_prefix(dtype, fraction):
    d = decisions(ranked=True)
    layers = d.suggest(FixedTrial({"dtype": dtype, "fraction": fraction}))
    k = round(fraction * 4)
    lowered = [c.name for c in CHOICES if layers[c.units[0]] == dtype]
    assert sorted(lowered) == sorted(c.name for c in d.order[dtype][:k])
    assert all(layers[u] in (dtype, "fp32") for u in UNITS)
    assert layers["g.0"] == layers["g.1"] and layers["fixed"] == "fp32"


def test_ranked_without_low_dtypes_asks_nothing():
    d = Decisions([Choice("b", ("b",), ("fp32",))], SENSITIVITY, FLOPS, ranked=True)
    assert d.suggest(FixedTrial({})) == {"b": "fp32"}
    assert d.seeds() == [{}]


# -- predicted prefix and seeds ---------------------------------------------------------------------
def test_predicted_prefix_values():
    # bf16 prefix errors: c 0.002, +a 0.0201, +g 0.0207, +b 0.0230
    assert [decisions(limit=limit).predicted_prefix("bf16") for limit in (0.001, 0.01, 0.0202, 0.021, 0.03)] == [
        0, 1, 2, 3, 4]
    assert decisions(limit=0.03).predicted_prefix("fp16") == 3           # stops before the overflowing b
    assert decisions(limit=0.21, calibration={"bf16": 10.0}).predicted_prefix("bf16") == 3
    assert decisions(limit=0.21, calibration={"bf16": 10.0}).predicted_prefix("fp16") == 3  # not calibrated


def test_predicted_prefix_is_monotone_in_the_limit():
    rng = random.Random(1)
    units = [f"u{i}" for i in range(15)]
    choices = [Choice(u, (u,), ALL) for u in units]
    for _ in range(5):
        sensitivity = {u: {d: rng.choice([None, math.inf, rng.uniform(0, 0.05)]) for d in ("fp16", "bf16")}
                       for u in units}
        flops = {u: rng.randint(1, 1000) for u in units}
        limits = sorted(rng.uniform(0, 0.2) for _ in range(20)) + [math.inf]
        for dtype in ("fp16", "bf16"):
            sizes = [Decisions(choices, sensitivity, flops, ranked=False, limit=limit).predicted_prefix(dtype)
                     for limit in limits]
            assert sizes == sorted(sizes) and sizes[-1] == len(units)   # no limit: every choice
    assert decisions(limit=0.0).predicted_prefix("bf16") == 0


def test_seeds_per_choice():
    d = decisions(limit=0.021)
    seeds = d.seeds()
    open_params = {"a", "b", "c", "g"}
    assert all(set(seed) == open_params for seed in seeds)
    assert seeds[0] == {p: "fp32" for p in open_params}                 # the baseline first
    assert {p: "bf16" for p in open_params} in seeds                    # all low
    assert {p: "fp16" for p in open_params} in seeds
    assert {"c": "bf16", "a": "bf16", "g": "bf16", "b": "fp32"} in seeds   # the predicted best prefix
    assert {"a": "fp16", "g": "fp16", "c": "fp16", "b": "fp32"} in seeds
    assert len(seeds) == len({tuple(sorted(s.items())) for s in seeds})
    for seed in seeds:  # every seed is a plan the search can ask for
        assert d.suggest(FixedTrial(seed)) == d.expand(seed)


def test_seeds_ranked():
    d = decisions(ranked=True, limit=0.021)
    seeds = d.seeds()
    assert seeds[0] == {"dtype": "bf16", "fraction": 0.0}
    assert {"dtype": "bf16", "fraction": 1.0} in seeds and {"dtype": "fp16", "fraction": 1.0} in seeds
    assert {"dtype": "bf16", "fraction": 0.75} in seeds                  # the predicted best prefix, 3 of 4
    assert all(s["dtype"] in d.low and 0.0 <= s["fraction"] <= 1.0 for s in seeds)
    assert len(seeds) == len({tuple(sorted(s.items())) for s in seeds})
    assert d.suggest(FixedTrial(seeds[0])) == {u: "fp32" for u in UNITS}
