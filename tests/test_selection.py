"""The final race's decision: statistics, the tie rule, and never a plan slower than FP32."""

from precsearch.bench import Speedup
from precsearch.selection import race_winner


def _estimates(**intervals):
    return {code: Speedup((low + high) / 2, low, high, 15) for code, (low, high) in intervals.items()}


def test_a_clear_leader_wins_alone():
    code, ties = race_winner(_estimates(ff=(0.98, 1.02), bb=(1.5, 1.6), bf=(1.2, 1.3)), {"ff": 0, "bb": 0.004,
                             "bf": 0.001}, lambda code: 0, "ff")
    assert code == "bb" and ties == ["bb"]


def test_plans_that_cannot_be_told_apart_tie_and_headroom_breaks_the_tie():
    error = {"ff": 0.0, "bb": 0.008, "bf": 0.002}
    code, ties = race_winner(_estimates(ff=(0.98, 1.02), bb=(1.40, 1.60), bf=(1.35, 1.55)), error,
                             lambda code: 0, "ff")
    assert code == "bf" and sorted(ties) == ["bb", "bf"]


def test_cast_boundaries_break_a_tie_in_error():
    boundaries = {"bfb": 2, "bbf": 1}
    code, _ = race_winner(_estimates(bfb=(1.4, 1.6), bbf=(1.4, 1.6)), {"bfb": 0.001, "bbf": 0.001},
                          boundaries.get, "fff")
    assert code == "bbf"


def test_a_plan_clearly_slower_than_fp32_is_never_recommended():
    code, _ = race_winner(_estimates(ff=(0.97, 1.03), bb=(0.80, 0.95)), {"ff": 0.0, "bb": 0.001},
                          lambda code: 0, "ff")
    assert code == "ff"


def test_a_plan_tied_with_fp32_loses_to_it():
    code, ties = race_winner(_estimates(ff=(0.95, 1.05), bb=(1.00, 1.10)), {"ff": 0.0, "bb": 0.001},
                             lambda code: 0, "ff")
    assert code == "ff" and sorted(ties) == ["bb", "ff"]


def test_without_the_fp32_plan_the_best_there_is_wins():
    code, _ = race_winner(_estimates(hb=(0.80, 0.90), hh=(0.60, 0.70)), {"hb": 0.0, "hh": 0.0}, lambda code: 0, "ff")
    assert code == "hb"
