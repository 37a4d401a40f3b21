import copy
import pickle

import pytest
import torch
from conftest import Branchy, build_bert, token_batches
from torch import nn

from precsearch import Plan, PlanError, apply_plan, audit, walk
from precsearch.runtime.batches import call
from precsearch.runtime.apply import applied_plan, handle_of


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output.last_hidden_state


def _plans(units: list[str]) -> dict[str, Plan]:
    """All-bf16, all-fp32, and mixed plans with FP32 children inside BF16 parents and the reverse."""
    parents = {unit for unit in units if any(other.startswith(unit + ".") for other in units)}
    children = [unit for unit in units if any(unit.startswith(p + ".") for p in parents)]
    return {
        "all-bf16": Plan(default="bf16"),
        "all-fp32": Plan(default="fp32"),
        "alternating": Plan(default="fp32", layers={unit: "bf16" for unit in units[::2]}),
        "fp32-child-in-bf16-parent": Plan(default="bf16", layers={unit: "fp32" for unit in children}),
        "bf16-child-in-fp32-parent": Plan(default="fp32", layers={unit: "bf16" for unit in children}),
    }


@pytest.mark.parametrize("plan_name", list(_plans([])))
def test_audit_finds_every_op_in_its_planned_dtype(real_model, plan_name):
    name, model, batches = real_model
    graph = walk(model, batches[0])
    plan = _plans(graph.units)[plan_name]
    report = audit(model, plan, batches)
    assert report.ok, str(report)
    assert {entry.unit for entry in report.entries} == set(graph.units)
    if plan_name in ("fp32-child-in-bf16-parent", "bf16-child-in-fp32-parent") and name != "cnn":
        # The transformer attention modules own SDPA and have projection children.
        assert {entry.actual for entry in report.entries} == {"bf16", "fp32"}


def test_audit_catches_an_op_off_plan(real_model):
    _, model, batches = real_model
    unit = walk(model, batches[0]).units[-1]
    module = model.get_submodule(unit)
    with apply_plan(model, Plan(default="fp32")) as handle:
        planned = type(module).forward.__get__(module)   # past the plan's own wrapper

        def rogue(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return planned(*args, **kwargs)

        module.forward = rogue
        report = audit(model, handle.plan, batches)
        del module.forward
    assert not report.ok
    assert {entry.unit for entry in report.mismatches} == {unit}
    assert "ran in bf16, plan says fp32" in str(report)


def test_removing_the_plan_restores_bit_identical_outputs(real_model):
    _, model, batches = real_model
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        before = [_first_tensor(call(model, batch)) for batch in batches]
        handle = apply_plan(model, Plan(default="bf16"))
        during = [_first_tensor(call(model, batch)) for batch in batches]
        assert model.state_dict().keys() == state.keys()
        assert any(p.dtype == torch.bfloat16 for p in model.parameters())  # weights held low
        handle.remove()
        after = [_first_tensor(call(model, batch)) for batch in batches]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not all(torch.equal(a, b.float()) for a, b in zip(before, during))
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_exception_inside_forward_leaves_no_autocast_state(real_model):
    _, model, batches = real_model
    unit = walk(model, batches[0]).units[-1]

    def explode(module, args):
        raise RuntimeError("boom")

    hook = model.get_submodule(unit).register_forward_pre_hook(explode)
    with apply_plan(model, Plan(default="bf16", layers={unit: "fp32"})):
        with torch.autocast("cpu", dtype=torch.float16):  # the caller's own state must survive
            with pytest.raises(RuntimeError, match="boom"):
                call(model, batches[0])
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == torch.float16
        with pytest.raises(RuntimeError, match="boom"):
            call(model, batches[0])
    hook.remove()
    assert not torch.is_autocast_enabled("cpu")
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # torch's default, unchanged


def test_gradients_flow_in_training_mode(real_model):
    _, model, batches = real_model
    units = walk(model, batches[0]).units
    model.train()
    with apply_plan(model, Plan(default="bf16", layers={units[0]: "fp32"})):
        loss = _first_tensor(call(model, batches[0])).float().pow(2).mean()
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads if g is not None)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_sparse_plan_on_bert_runs_and_audits_clean():
    model, batches = build_bert(), token_batches()
    plan = Plan(default="fp32", layers={"encoder.layer.0.attention.self.query": "bf16"})
    report = audit(model, plan, batches)
    assert report.ok, str(report)
    query = [e for e in report.entries if e.unit == "encoder.layer.0.attention.self.query"]
    assert query and all(e.actual == "bf16" for e in query)
    assert all(e.actual == "fp32" for e in report.entries if e.unit != "encoder.layer.0.attention.self.query")


def test_naive_per_module_autocast_breaks_the_sparse_plan():
    """Why FP32 units cast their inputs: without it SDPA sees bf16 and fp32 operands."""
    model, batches = build_bert(), token_batches(1)
    query = model.get_submodule("encoder.layer.0.attention.self.query")
    original = query.forward

    def low(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(*args, **kwargs)

    query.forward = low
    with pytest.raises(RuntimeError):
        call(model, batches[0])


def test_plan_naming_a_missing_layer_is_refused():
    with pytest.raises(PlanError, match="layers.encoder.layer.9.output: the model has no module"):
        apply_plan(build_bert(), Plan(layers={"encoder.layer.9.output": "bf16"}))


def test_a_second_plan_on_the_same_model_is_refused():
    model = build_bert()
    with apply_plan(model, Plan(default="bf16")):
        with pytest.raises(PlanError, match="already applied"):
            apply_plan(model, Plan(default="fp32"))
    apply_plan(model, Plan(default="fp32")).remove()


def _outputs(model, batches):
    with torch.no_grad():
        return [_first_tensor(call(model, batch)) for batch in batches]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _zero_weights(model):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()


def _assert_audits_clean(model, plan, batches):
    report = audit(model, plan, batches)
    assert report.ok, str(report)
    for unit, dtypes in report.by_unit().items():
        assert set(dtypes) == {plan.precision(unit)}, unit


def test_deep_copy_of_bert_runs_its_own_modules_under_the_plan():
    """Issue #11: the copy's wrappers called the original's modules, all in bf16."""
    model, batches = build_bert(), token_batches()
    units = walk(model, batches[0]).units
    plan = Plan(default="bf16", layers={unit: "fp32" for unit in units[::5]})  # sparse fp32 units
    plain = copy.deepcopy(model)
    reference = _outputs(plain, batches)
    handle = apply_plan(model, plan)
    planned = _outputs(model, batches)

    clone = copy.deepcopy(model)
    clone_handle = handle_of(clone)
    assert clone_handle is not None and clone_handle is not handle and clone_handle.model is clone
    assert applied_plan(clone) is plan
    assert _same(_outputs(clone, batches), planned)
    _assert_audits_clean(clone, plan, batches)
    assert {entry.actual for entry in audit(clone, plan, batches).entries} == {"bf16", "fp32"}
    assert handle_of(clone) is clone_handle  # the audit reused the copy's handle
    with pytest.raises(PlanError, match="already applied"):
        apply_plan(clone, plan)
    assert clone.state_dict().keys() == plain.state_dict().keys()
    assert [name for name, _ in clone.named_modules()] == [name for name, _ in plain.named_modules()]

    _zero_weights(clone)
    assert _same(_outputs(model, batches), planned)
    assert not _same(_outputs(clone, batches), planned)

    # A copy's handle removes the plan from the copy only.
    other = copy.deepcopy(model)
    handle_of(other).remove()
    assert handle_of(other) is None and not any("forward" in m.__dict__ for m in other.modules())
    assert _same(_outputs(other, batches), reference)
    assert handle_of(model) is handle
    _assert_audits_clean(model, plan, batches)

    # Removing the original's handle leaves the copy applied; zeroing the original leaves it alone.
    handle.remove()
    assert _same(_outputs(model, batches), reference)
    assert handle_of(clone) is clone_handle
    _assert_audits_clean(clone, plan, batches)
    _zero_weights(model)
    assert _same(_outputs(other, batches), reference)


def test_deep_copy_of_branchy_model_runs_its_own_modules():
    torch.manual_seed(0)
    model = Branchy().eval()
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain = copy.deepcopy(model)
    plan = Plan(default="bf16", layers={"pos": "fp32", "out": "fp32"})
    handle = apply_plan(model, plan)
    planned = _outputs(model, batches)
    clone = copy.deepcopy(model)
    assert _same(_outputs(clone, batches), planned)
    _assert_audits_clean(clone, plan, batches)
    _zero_weights(clone)
    assert _same(_outputs(model, batches), planned)
    assert not _same(_outputs(clone, batches), planned)
    handle_of(clone).remove()
    assert applied_plan(model) is plan and applied_plan(clone) is None
    _assert_audits_clean(model, plan, batches)
    handle.remove()
    assert _same(_outputs(model, batches), _outputs(plain, batches))


def test_deep_copy_of_sequential_is_removable_on_its_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)))
    batches = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plain = copy.deepcopy(model)
    plan = Plan(default="fp32", layers={"2.0": "bf16"})  # bf16 child returning into fp32 parent
    handle = apply_plan(model, plan)
    planned = _outputs(model, batches)
    assert not _same(planned, _outputs(plain, batches))
    clone = copy.deepcopy(model)
    assert _same(_outputs(clone, batches), planned)
    with pytest.raises(PlanError, match="already applied"):
        apply_plan(clone, Plan(default="bf16"))
    handle_of(clone).remove()
    assert _same(_outputs(clone, batches), _outputs(plain, batches))
    assert _same(_outputs(model, batches), planned)
    apply_plan(clone, Plan(default="bf16")).remove()  # the copy takes another plan now
    with pytest.raises(TypeError, match="remove the plan first"):
        pickle.dumps(model)
    handle.remove()
    pickle.dumps(model)


def test_deep_copy_inside_suspended_is_a_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    batches = [torch.randn(4, 8)]
    plain = copy.deepcopy(model)
    plan = Plan(default="bf16", layers={"1": "fp32"})
    with apply_plan(model, plan) as handle:
        planned = _outputs(model, batches)
        with handle.suspended():
            clone = copy.deepcopy(model)
        assert applied_plan(model) is plan and _same(_outputs(model, batches), planned)
    assert handle_of(clone) is None and not any("forward" in m.__dict__ for m in clone.modules())
    assert _same(_outputs(clone, batches), _outputs(plain, batches))
    apply_plan(clone, plan).remove()
