"""Per-unit sensitivity: the local error measure, its root-sum-square per choice, and both ways of
measuring it (end to end for small models, each unit on its own FP32 inputs for large ones)."""

import math

import pytest
import torch
from torch import nn

from precsearch.search import sensitivity as sensitivity_module
from precsearch.examples import demo
from precsearch.search.sensitivity import choice_error, local_error, unit_sensitivity


# -- local_error ---------------------------------------------------------------------------------
def test_local_error_is_relative_to_the_variation_not_the_magnitude():
    ref = torch.tensor([[1.0, 2.0, 3.0]])             # centred: [-1, 0, 1], spread 2
    bump = torch.tensor([[0.1, 0.0, 0.0]])
    assert local_error(ref + bump, [ref]) == pytest.approx(math.sqrt(0.01 / 2))
    # The same variation on a large common offset: the same error (a LayerNorm would remove the offset).
    assert local_error(ref + 100 + bump, [ref + 100]) == pytest.approx(math.sqrt(0.01 / 2), rel=1e-4)
    assert local_error(ref, [ref]) == 0.0


def test_local_error_centres_each_row():
    ref = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])   # spread 2 + 200
    got = ref + torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert local_error(got, [ref]) == pytest.approx(math.sqrt(4 / 202))


def test_local_error_constant_rows_fall_back_to_the_magnitude():
    ref = torch.full((1, 3), 5.0)                                # no variation: spread = 75
    assert local_error(ref + torch.tensor([[0.0, 0.0, 1.0]]), [ref]) == pytest.approx(math.sqrt(1 / 75))
    zeros = torch.zeros(2, 3)
    assert local_error(zeros, [zeros]) == 0.0
    assert local_error(zeros + 1, [zeros]) == math.inf


def test_local_error_scalar_and_several_outputs():
    assert local_error(torch.tensor(3.0), [torch.tensor(2.0)]) == pytest.approx(0.5)
    a, b = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 4.0]])   # spreads 2 and 8
    got = (a + torch.tensor([[1.0, 0.0]]), {"b": b, "ids": torch.tensor([1, 2])})  # integers are not outputs
    assert local_error(got, [a, b]) == pytest.approx(math.sqrt(1 / 10))


def test_local_error_non_finite_and_mismatches():
    ref = torch.tensor([[1.0, 2.0, 3.0]])
    assert local_error(torch.tensor([[1.0, math.inf, 3.0]]), [ref]) == math.inf
    assert local_error(torch.tensor([[1.0, math.nan, 3.0]]), [ref]) == math.inf
    assert math.isnan(local_error(torch.ones(1, 4), [ref]))          # another shape
    assert math.isnan(local_error((ref, ref), [ref]))                # another number of outputs
    assert math.isnan(local_error("no tensors", [ref]))


def test_local_error_computes_in_float64():
    # In fp16 the squares (~9e8) would overflow to inf; in float64 they do not.
    ref = torch.tensor([[0.0, 60000.0]], dtype=torch.float16)        # centred: [-30000, 30000]
    got = torch.tensor([[0.0, 59968.0]], dtype=torch.float16)
    assert local_error(got, [ref]) == pytest.approx(math.sqrt(32.0**2 / (2 * 30000.0**2)))
    assert local_error(ref.bfloat16(), [ref.float()]) == pytest.approx(0.0, abs=1e-2)  # dtypes may differ


# -- choice_error --------------------------------------------------------------------------------
def test_choice_error_is_the_root_sum_square():
    sensitivity = {"a": {"fp16": 3.0, "bf16": 1.0}, "b": {"fp16": 4.0, "bf16": None}, "c": {"fp16": math.inf}}
    assert choice_error(sensitivity, ("a", "b"), "fp16", unknown=0.0) == pytest.approx(5.0)
    assert choice_error(sensitivity, ("a",), "bf16", unknown=0.0) == pytest.approx(1.0)
    assert choice_error(sensitivity, (), "fp16", unknown=7.0) == 0.0


def test_choice_error_unknown_values_and_infinity():
    sensitivity = {"a": {"fp16": 3.0, "bf16": 1.0}, "b": {"fp16": 4.0, "bf16": None}, "c": {"fp16": math.inf}}
    assert choice_error(sensitivity, ("a", "b"), "bf16", unknown=2.0) == pytest.approx(math.sqrt(5))  # None
    assert choice_error(sensitivity, ("a", "missing"), "fp16", unknown=4.0) == pytest.approx(5.0)
    assert choice_error(sensitivity, ("c", "a"), "fp16", unknown=0.0) == math.inf
    assert choice_error(sensitivity, ("a",), "bf16", unknown=math.inf) == pytest.approx(1.0)
    assert choice_error(sensitivity, ("b",), "bf16", unknown=math.inf) == math.inf


# -- unit_sensitivity on the demo's traps -------------------------------------------------------
DEMO_UNITS = ["stem", "blocks.0.fc1", "blocks.0.fc2", "amplify", "shift", "head"]  # walk(demo.small_model())

@pytest.fixture(scope="module")
def demo_case():
    model, batch = demo.small_model(), demo.data(batches=1, batch_size=32)[0]
    return model, batch, DEMO_UNITS


@pytest.mark.parametrize("budget", [128, 0], ids=["end_to_end", "local"])
def test_unit_sensitivity_finds_both_demo_traps(demo_case, budget):
    model, batch, units = demo_case
    result = unit_sensitivity(model, units, batch, ["fp16", "bf16"], "cpu", end_to_end_budget=budget)
    assert set(result) == set(units) and all(set(per) == {"fp16", "bf16"} for per in result.values())
    assert math.isinf(result["amplify"]["fp16"])                       # ~1e5 overflows fp16
    assert all(math.isfinite(result[u]["fp16"]) for u in units if u != "amplify")
    assert all(math.isfinite(result[u]["bf16"]) for u in units)
    assert max(units, key=lambda u: result[u]["bf16"]) == "shift"         # signal on an offset
    assert result["shift"]["bf16"] > 5 * result["shift"]["fp16"]
    assert all(result[u]["bf16"] > result[u]["fp16"] for u in units if u != "amplify")  # 8 vs 11 bits


def test_budget_picks_the_method(demo_case, monkeypatch):
    model, batch, units = demo_case
    calls = []
    real = sensitivity_module._end_to_end
    monkeypatch.setattr(sensitivity_module, "_end_to_end", lambda *a: calls.append(1) or real(*a))
    pairs = len(units) * 2
    unit_sensitivity(model, units[:1], batch, ["fp16", "bf16"], "cpu", end_to_end_budget=2)
    assert calls == [1]                                                 # at the budget: end to end
    unit_sensitivity(model, units, batch, ["fp16", "bf16"], "cpu", end_to_end_budget=pairs - 1)
    assert calls == [1]                                                 # beyond it: local


class InPlace(nn.Linear):
    """Mutates its input before using it, like a unit updating a KV cache."""

    def __init__(self) -> None:
        super().__init__(8, 8)

    def forward(self, x):
        x.mul_(2.0)
        return super().forward(x)


class Fragile(nn.Module):
    """Cannot run under autocast at all."""

    def forward(self, x):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("no autocast here")
        return x * 1.0


class Parts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8)
        self.inplace = InPlace()
        self.fragile = Fragile()
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.fragile(self.inplace(self.first(x)))


def test_local_path_reruns_units_on_snapshots_and_reports_unknowns():
    model, batch = Parts().eval(), torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    units = ["first", "inplace", "fragile", "unused"]
    result = unit_sensitivity(model, units, batch, ["bf16"], "cpu", end_to_end_budget=0)
    assert 0 < result["first"]["bf16"] < 0.05
    # Re-run on the input as it was before the unit mutated it (else the error would be ~1).
    assert 0 < result["inplace"]["bf16"] < 0.05
    assert result["fragile"]["bf16"] is None       # cannot run in bf16 on its own: unknown
    assert result["unused"]["bf16"] is None        # never ran: no inputs to re-run it on


def test_end_to_end_path_marks_a_breaking_unit_infinite():
    model, batch = Parts().eval(), torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    result = unit_sensitivity(model, ["first", "fragile", "unused"], batch, ["bf16"], "cpu")
    assert 0 < result["first"]["bf16"] < 0.05
    assert result["fragile"]["bf16"] == math.inf
    assert result["unused"]["bf16"] == 0.0         # lowering a unit that never runs changes nothing
