import pytest
import torch
from conftest import build_bert, token_batches

from precsearch import Plan, PlanError, apply_plan, audit, walk
from precsearch.batches import call


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
        planned = module.forward

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
        assert all(p.dtype == torch.float32 for p in model.parameters())
        handle.remove()
        after = [_first_tensor(call(model, batch)) for batch in batches]
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
