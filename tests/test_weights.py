"""Weights held low while an inference plan is applied: a pure optimisation (bit-identical
outputs, exact bytes), undone exactly by remove(), and made permanent by materialize()."""

import copy
import gc
import weakref

import pytest
import torch
from conftest import Branchy, build_bert, build_cnn, build_gpt2, image_batches, token_batches

from precsearch import Plan, PlanError, apply_plan, audit, walk
from precsearch.runtime.accuracy import flatten_outputs
from precsearch.runtime.batches import call
from precsearch.runtime.plan import Runtime
from precsearch.runtime.weights import find_weight_uses, weight_bytes

CASES = {
    "bert": (build_bert, lambda: token_batches(1)[0]),
    "gpt2": (build_gpt2, lambda: token_batches(1)[0]),
    "cnn": (build_cnn, lambda: image_batches(1)[0]),
    "branchy": (lambda: Branchy().eval(), lambda: torch.randn(4, 16, generator=torch.Generator().manual_seed(0))),
}


def _sparse(model, batch, weights):
    units = walk(model, batch).units
    return Plan(default="bf16", layers={u: "fp32" for u in units[::3]}, runtime=Runtime(weights=weights))


def _outputs(model, plan, batch, **options):
    with apply_plan(model, plan, **options) as handle, torch.no_grad():
        return flatten_outputs(call(model, batch)), handle.weight_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_low_weights_give_bit_identical_outputs_and_remove_restores_everything(name):
    torch.manual_seed(0)
    build, data = CASES[name]
    model, batch = build(), data()
    before = model.state_dict(keep_vars=True)
    tied = [(a, b) for a, b in [("lm_head.weight", "transformer.wte.weight")] if a in before]
    reference, fp32_bytes = _outputs(model, _sparse(model, batch, "fp32"), batch)
    low, low_bytes = _outputs(model, _sparse(model, batch, "low"), batch, example_inputs=batch)
    assert all(torch.equal(a, b) for a, b in zip(reference, low))
    assert fp32_bytes == weight_bytes(model) and set(fp32_bytes) == {"fp32"}
    assert low_bytes.get("bf16", 0) > 0
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[key] is before[key] for key in before)  # by reference
    assert all(model.get_parameter(a) is model.get_parameter(b) for a, b in tied)              # ties back


def test_weight_bytes_are_exact_on_the_cnn():
    model, batch = build_cnn(), image_batches(1)[0]
    plan = Plan(default="fp32", layers={"conv1": "bf16", "fc": "fp16"})
    _, held = _outputs(model, plan, batch, example_inputs=batch)
    conv1, fc = 16 * 3 * 3 * 3 + 16, 32 * 10 + 10
    everything = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    assert held == {"bf16": 2 * conv1, "fp16": 2 * fc, "fp32": 4 * (everything - conv1 - fc)}


def test_a_weight_read_outside_its_unit_stays_fp32():
    model, batch = Branchy().eval(), torch.randn(4, 16)
    uses = find_weight_uses(model, batch, "cpu")
    with apply_plan(model, Plan(default="bf16"), weight_uses=uses):
        assert model.out.weight.dtype == torch.float32  # the root reads out.weight[:, :4] itself
        assert model.out.bias.dtype == model.inp.weight.dtype == torch.bfloat16


def test_a_tied_weight_gets_a_low_copy_of_its_own_and_is_tied_again():
    model, batch = build_gpt2(), token_batches(1)[0]
    # The embedding (a storage unit) kept FP32: the head holds a low copy of its own.
    with apply_plan(model, Plan(default="bf16", layers={"transformer.wte": "fp32"}), example_inputs=batch):
        assert model.lm_head.weight.dtype == torch.bfloat16           # its own low copy
        assert model.transformer.wte.weight.dtype == torch.float32    # the embedding reads FP32
    assert model.lm_head.weight is model.transformer.wte.weight
    # Both in BF16: one low tensor, shared as the FP32 one was.
    with apply_plan(model, Plan(default="bf16"), example_inputs=batch):
        assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.transformer.wte.weight


def test_weights_are_learnt_on_the_first_call_without_example_inputs():
    model, batch = build_bert(), token_batches(1)[0]
    plan = _sparse(model, batch, "low")
    eager, eager_bytes = _outputs(model, plan, batch, example_inputs=batch)
    lazy, lazy_bytes = _outputs(model, plan, batch)
    assert all(torch.equal(a, b) for a, b in zip(eager, lazy)) and eager_bytes == lazy_bytes
    assert audit(model, plan, [batch]).ok


def test_materialize_drops_the_fp32_copies():
    model, batch = build_cnn(), image_batches(1)[0]
    original = weakref.ref(model.conv1.weight)
    handle = apply_plan(model, Plan(default="bf16"), example_inputs=batch).materialize()
    gc.collect()
    assert original() is None and model.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(PlanError, match="materialized"):
        handle.remove()


def test_a_deep_copy_holds_its_own_low_weights():
    model, batch = build_cnn(), image_batches(1)[0]
    with apply_plan(model, Plan(default="bf16"), example_inputs=batch), torch.no_grad():
        twin = copy.deepcopy(model)
        assert twin.conv1.weight.dtype == torch.bfloat16 and twin.conv1.weight is not model.conv1.weight
        assert torch.equal(call(twin, batch), call(model, batch))
    assert model.conv1.weight.dtype == torch.float32


def test_training_keeps_fp32_master_weights():
    with pytest.raises(PlanError, match="runtime.weights"):
        Plan(mode="training", runtime=Runtime(weights="low"))
    assert Plan(mode="training").resolved_runtime.weights == "fp32"
    assert Plan().resolved_runtime.weights == "low"
