"""The model-based proposal: the exact solver, the calibration of both models, and a case where
greedy's sensitivity order is a trap and the exact solution is not."""

import itertools
import math
import random

import pytest

from precsearch.search.proposal import ErrorModel, LatencyModel, Observation, Option, Proposal, solve


def _cost(dtypes, items, price):
    chain = ["fp32", *dtypes, "fp32"]
    chosen = [next(o for o in options if o.dtype == d) for d, options in zip(dtypes, items)]
    boundaries = sum(a != b for a, b in itertools.pairwise(chain))
    return 1 - sum(o.saving for o in chosen) + price * boundaries, sum(o.weight for o in chosen)


def _brute_force(items, capacity, price):
    costs = [_cost([o.dtype for o in combo], items, price) for combo in itertools.product(*items)]
    return min(cost for cost, weight in costs if weight <= capacity)


def _random_items(rng, count):
    return [[Option("fp32", 0, 0.0)] + [Option(d, rng.randint(0, 12), rng.uniform(-0.05, 0.3))
                                        for d in rng.sample(["bf16", "fp16"], rng.randint(0, 2))]
            for _ in range(count)]


def test_the_exact_solver_matches_brute_force_on_small_random_instances():
    rng = random.Random(0)
    for _ in range(150):
        items, price, capacity = _random_items(rng, rng.randint(1, 6)), rng.choice([0.0, 0.02, 0.1]), 20
        dtypes, predicted = solve(items, capacity, price, resolution=capacity)  # integer weights: exact
        cost, weight = _cost(dtypes, items, price)
        assert weight <= capacity and cost == pytest.approx(predicted)
        assert predicted == pytest.approx(_brute_force(items, capacity, price))


def test_rounded_weights_keep_the_answer_within_the_budget():
    rng = random.Random(1)
    for _ in range(50):
        items = [[Option("fp32", 0, 0.0), Option("bf16", rng.random(), rng.random())] for _ in range(8)]
        dtypes, _ = solve(items, 1.5, 0.01, resolution=37)
        assert _cost(dtypes, items, 0.01)[1] <= 1.5


def test_hundreds_of_units_solve_at_once():
    rng = random.Random(2)
    items = [[Option("fp32", 0, 0.0), Option("bf16", rng.random(), rng.random() / 300),
              Option("fp16", rng.random(), rng.random() / 300)] for _ in range(400)]
    dtypes, predicted = solve(items, 10.0, 0.001)
    assert len(dtypes) == 400 and predicted < 1


def test_an_option_that_overflows_is_never_chosen():
    items = [[Option("fp32", 0, 0.0), Option("fp16", math.inf, 0.9), Option("bf16", 0.5, 0.2)]]
    assert solve(items, 1.0) == (["bf16"], pytest.approx(0.8))


def test_nothing_fits_is_an_error():
    with pytest.raises(ValueError):
        solve([[Option("bf16", 5, 0.5)]], 1.0)


# -- the trap: one unit with a large error but a huge saving ------------------------------------
CHOICES = ["big", "s1", "s2", "s3", "s4"]
SENS = {"bf16": {"big": 0.008, "s1": 0.0045, "s2": 0.0045, "s3": 0.0045, "s4": 0.0045}}
FLOPS = {"big": 0.8, "s1": 0.05, "s2": 0.05, "s3": 0.05, "s4": 0.05}


def _proposal(gain=1.0, alpha=0.6):
    return Proposal({c: ("bf16", "fp32") for c in CHOICES}, ErrorModel(SENS, {"bf16": gain}),
                    LatencyModel(FLOPS, {c: 0.0 for c in CHOICES}, CHOICES, {"bf16": alpha}, {"bf16": 0.0}))


def _greedy(proposal, limit):
    """All low, then back to FP32 most sensitive first until the prediction holds."""
    lowered = dict.fromkeys(CHOICES, "bf16")
    for choice in sorted(CHOICES, key=lambda c: -SENS["bf16"][c]):
        if proposal.error.predict(lowered) <= limit:
            break
        lowered[choice] = "fp32"
    return lowered


def test_greedy_order_is_a_trap_the_exact_solution_avoids():
    proposal, limit = _proposal(), 0.01
    greedy = _greedy(proposal, limit)
    assert greedy["big"] == "fp32"                                   # the riskiest goes back first
    exact = proposal.best(limit * limit)
    # the big saving and one small unit fit; any one small unit is as good as another
    assert exact["big"] == "bf16" and sum(exact[c] == "bf16" for c in CHOICES[1:]) == 1
    assert proposal.error.predict(exact) <= limit
    assert proposal.latency.predict(exact) < proposal.latency.predict(greedy) - 0.3


def test_the_front_tightens_with_the_budget():
    plans = _proposal().front(0.01)
    errors = [_proposal().error.predict(p) for p in plans]
    assert errors == sorted(errors) and all(e <= 0.01 for e in errors)
    assert plans[-1] == _proposal().best(0.01 ** 2)


# -- calibration on synthetic trials (a fake measurement, no clock) ----------------------------
def _synthetic_trials(rng, truth_gain, alpha, beta, gamma, count=40):
    model = LatencyModel(FLOPS, {"big": 0.1, "s1": 0.3, "s2": 0.2, "s3": 0.2, "s4": 0.2}, CHOICES,
                         {"bf16": alpha}, {"bf16": beta}, gamma)
    errors = ErrorModel(SENS, {"bf16": truth_gain})
    trials = []
    for _ in range(count):
        plan = {c: rng.choice(["bf16", "fp32"]) for c in CHOICES}
        noise = math.exp(rng.gauss(0, 0.05))
        trials.append(Observation(plan, errors.predict(plan) * noise, model.predict(plan) + rng.gauss(0, 0.005)))
    return model, trials


def test_calibration_converges_on_synthetic_trials():
    rng = random.Random(3)
    truth, trials = _synthetic_trials(rng, truth_gain=2.5, alpha=0.5, beta=0.2, gamma=0.3)
    start = Proposal({c: ("bf16", "fp32") for c in CHOICES}, ErrorModel(SENS, {"bf16": 1.0}),
                     LatencyModel(FLOPS, truth.bytes, CHOICES, {"bf16": 0.1}, {"bf16": 0.0}))
    fitted = start.calibrated(trials)
    assert fitted.error.gains["bf16"] == pytest.approx(2.5, rel=0.05)
    assert fitted.latency.alpha["bf16"] == pytest.approx(0.5, abs=0.05)
    assert fitted.latency.beta["bf16"] == pytest.approx(0.2, abs=0.05)
    assert fitted.latency.gamma == pytest.approx(0.3, abs=0.1)
    for trial in trials[:5]:
        assert fitted.latency.predict(trial.by_choice) == pytest.approx(truth.predict(trial.by_choice), abs=0.03)


def test_calibration_without_trials_keeps_the_prior():
    start = _proposal(gain=1.7, alpha=0.4)
    assert start.calibrated([]) == start


# -- how the report scores the predictions ------------------------------------------------------
def test_prediction_quality_ranks_and_ratios():
    import pandas as pd

    from precsearch.report.summary import prediction_quality

    trials = pd.DataFrame({"speedup": [1.0, 1.2, 1.5, 1.4, None], "error": [0.0, 0.002, 0.006, 0.004, 0.01],
                           "predicted_speedup": [1.0, 1.1, 1.6, 1.3, 1.2],
                           "predicted_error": [0.0, 0.001, 0.003, 0.002, None]})
    quality = prediction_quality(trials)
    assert quality == {"trials": 4, "speedup_rank_correlation": 1.0, "error_rank_correlation": 1.0,
                       "error_ratio": 2.0}
    assert prediction_quality(trials.drop(columns=["predicted_error", "predicted_speedup"])) is None
