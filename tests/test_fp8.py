"""FP8 (E4M3) as a fourth precision: Linear units only, CUDA's shape rules checked everywhere,
numerics within what E4M3 implies, audited by its operands, searched like any other."""

import pytest
import torch
from torch import nn

from precsearch import Plan, PlanError, apply_plan, audit, load_plan, walk
from precsearch.runtime.accuracy import Fidelity
from precsearch.search.config import SearchConfig
from precsearch.runtime.errors import InputError
from precsearch.runtime.fp8 import Fp8Linear, quantize, unsuitable
from precsearch.search.trials import TrialRecord
from precsearch.search.loop import optimize
from precsearch.search.space import SearchSpace
from precsearch.search.study_setup import without_slow_dtypes
from precsearch.search.trials import DtypeProbe

# E4M3 keeps 3 mantissa bits: each quantised value is within 2^-4 of its own magnitude, and a
# dot product of such errors averages them down, so a GEMM's rel_l2 stays well under 2^-4.
E4M3_BOUND = 2.0**-4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.mark.parametrize(("module", "reason"), [
    (nn.Linear(64, 32), None), (nn.Linear(40, 32), "divisible by 16"), (nn.Linear(64, 10), "divisible by 16"),
    (nn.Conv2d(16, 16, 3), "nn.Linear units only"), (nn.Embedding(10, 16), "nn.Linear units only"),
])
def test_cuda_shape_rules_decide_which_units_may_run_fp8(module, reason):
    found = unsuitable(module)
    assert found is None if reason is None else reason in found


def test_an_fp8_linear_stays_within_what_e4m3_implies():
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    with torch.no_grad():
        error = float((Fp8Linear(layer)(x) - layer(x)).norm() / layer(x).norm())
    assert 0 < error < E4M3_BOUND
    quantized, inverse = quantize(x)
    assert quantized.dtype == torch.float8_e4m3fn and inverse.dtype == torch.float32


def test_fp8_units_follow_the_enclosing_autocast_and_the_audit_sees_fp8():
    model, x = mlp(), torch.randn(8, 64)
    plan = Plan(default="bf16", layers={"0": "fp8", "4": "fp32"})
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    with apply_plan(model, plan, example_inputs=x), torch.no_grad():
        model(x)
    assert seen[-1] == torch.bfloat16                   # _scaled_mm's out_dtype: the bf16 region's
    report = audit(model, plan, [x])
    assert report.ok and report.by_unit()["0"] == {"fp8": 1} and report.by_unit()["2"] == {"bf16": 1}


def test_plans_with_fp8_round_trip_and_bad_ones_are_refused(tmp_path):
    plan = Plan(default="bf16", layers={"0": "fp8"})
    assert load_plan(plan.save(tmp_path / "plan.yaml")) == plan
    assert Plan.compact({"0": "fp8", "2": "fp8", "4": "bf16"}).default == "bf16"  # fp8 is never the default
    with pytest.raises(PlanError, match="not as the default"):
        Plan(default="fp8")
    with pytest.raises(PlanError, match="inference plans only"):
        Plan(mode="training", layers={"0": "fp8"})
    with pytest.raises(PlanError, match="layers.4: fp8 needs Linear dimensions"):
        Plan(layers={"4": "fp8"}).validate_for(mlp())
    with pytest.raises(InputError, match="inference searches only"):
        SearchConfig.from_names(space="fp8", mode="training")


def test_the_space_keeps_fp8_to_units_that_suit_it():
    model, x = mlp(), torch.randn(8, 64)
    choices = SearchSpace.load("fp8").choices(walk(model, x), "cpu")
    assert {c.name: c.dtypes for c in choices} == {"0": ("fp8", "bf16", "fp32"), "2": ("fp8", "bf16", "fp32"),
                                                   "4": ("bf16", "fp32")}


def test_a_probe_that_finds_fp8_clearly_slower_leaves_it_out():
    model, x = mlp(), torch.randn(8, 64)
    choices = SearchSpace.load("fp8").choices(walk(model, x), "cpu")
    probe = {"fp8": DtypeProbe(relative_latency=6.0, speedup_low=0.15, speedup_high=0.18),
             "bf16": DtypeProbe(relative_latency=0.7, speedup_low=1.3, speedup_high=1.5)}
    with pytest.warns(UserWarning, match="fp8 left out"):
        kept = without_slow_dtypes(choices, probe, "cpu")
    assert all("fp8" not in c.dtypes for c in kept)


@pytest.mark.slow
def test_a_search_with_fp8_keeps_the_sensitive_layers_out_of_it():
    model = mlp()
    batches = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    space = SearchSpace.parse({"format": "precsearch-space/1", "name": "fp8-only", "dtypes": ["fp8", "fp32"]},
                              "inline")
    limit = 0.6 * _error(model, batches, {"0": "fp8", "2": "fp8"})
    result = optimize(model, batches, SearchConfig(space=space, max_error=limit, trials=8, progress=False,
                                                   repeats=3, drop_slow_dtypes=False))
    complete = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    plans = {TrialRecord.of(t, result.graph.units).code for t in complete}
    assert "eef" in plans                                          # all-fp8 was tried, and is infeasible
    assert result.plan is not None and result.plan.metrics.error <= limit
    assert audit(model, result.plan, batches).ok


def _error(model, batches, layers):
    fidelity = Fidelity.builtin(model, batches, "rel_l2", 1.0)
    with apply_plan(model, Plan(layers=layers)):
        return fidelity.error(model)


# -- corners: non-finite inputs, empty batches, weights edited through .data ---------------------
@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_row_leaves_the_other_rows_as_they_were(poison):
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 32), torch.randn(8, 64)
    poisoned = x.clone()
    poisoned[3, 5] = poison
    fp8 = Fp8Linear(layer)
    with torch.no_grad():
        clean, dirty = fp8(x), fp8(poisoned)
    assert torch.isnan(dirty[3]).all()                  # the row stays non-finite, as in FP32
    others = [i for i in range(8) if i != 3]
    assert torch.equal(dirty[others], clean[others])    # its neighbours keep the clean batch's scale


def test_quantize_scales_by_the_finite_values_and_never_saturates_inf():
    quantized, inverse = quantize(torch.tensor([float("inf"), 2.0, -4.0, float("nan")]))
    assert float(inverse) == pytest.approx(4.0 / 448)
    assert torch.isnan(quantized.float()[[0, 3]]).all()
    assert quantized.float()[1:3].tolist() == [224.0, -448.0]


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_an_empty_batch_gives_an_empty_output(shape):
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        output = Fp8Linear(layer)(torch.randn(*shape))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = Fp8Linear(layer)(torch.randn(*shape))
    assert output.shape == (*shape[:-1], 32) and output.dtype == torch.float32
    assert low.shape == output.shape and low.dtype == torch.bfloat16


@pytest.mark.parametrize("edit", ["assign .data", "copy into .data", "copy_ under no_grad"])
def test_a_weight_edit_reaches_the_fp8_forward(edit):
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 32), torch.randn(8, 64)
    fp8 = Fp8Linear(layer)
    with torch.no_grad():
        before = fp8(x)
        new = torch.randn(32, 64) * 3
        if edit == "assign .data":
            layer.weight.data = new
        elif edit == "copy into .data":
            layer.weight.data.copy_(new)
        else:
            layer.weight.copy_(new)
        after, fresh = fp8(x), Fp8Linear(layer)(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh)
