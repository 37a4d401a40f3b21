"""Every architecture users bring: walked, applied (all-low and sparse mixed plans, weights held
low), checked by a recorder independent of the audit, restored bit for bit, deep-copied."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import zoo
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from precsearch import Plan, PlanError, apply_plan, audit, walk
from precsearch.runtime.accuracy import flatten_outputs
from precsearch.runtime.batches import call
from precsearch.cli import main
from precsearch.search.config import SearchConfig
from precsearch.runtime.plan import Runtime
from precsearch.runtime.ops import is_eligible, op_name
from precsearch.search.study_setup import find_ties

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp32"}


class DtypeWitness(TorchDispatchMode):
    """A second, independent recorder: the innermost module from per-module hooks, and the dtype
    of each eligible kernel's first floating output (and of each embedding table's rows)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.seen: list[tuple[str, str, str]] = []
        self.hooks = []
        self.tables = {name for name, module in model.named_modules()
                       if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is None}
        for name, module in model.named_modules():
            self.hooks.append(module.register_forward_pre_hook(self._enter(name)))
            self.hooks.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, name: str):
        def hook(module, args) -> None:
            self.stack.append(name)
        return hook

    def _leave(self, module, args, output) -> None:
        self.stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        table = op_name(func) in ("embedding", "_embedding_bag", "_embedding_bag_forward_only") and (
            self.stack and self.stack[-1] in self.tables)
        if is_eligible(op_name(func), "cpu") or table:
            leaves = output if isinstance(output, (tuple, list)) else (output,)
            first = next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
            if first is not None:
                self.seen.append((self.stack[-1] if self.stack else "", op_name(func), DTYPES[first.dtype]))
        return output

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _run(model, batch):
    with torch.no_grad():
        return flatten_outputs(call(model, batch))


def _witnessed(model, batch):
    witness = DtypeWitness(model)
    try:
        with witness:
            return _run(model, batch), witness
    finally:
        witness.remove()


def _equal(first, second):
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("name", zoo.NAMES)
def test_architecture_under_mixed_plans(name):
    model, batch = zoo.build(name)
    graph = walk(model, batch)
    units = graph.units
    assert units, name
    reference = _run(model, batch)
    ties = find_ties(model, batch, graph, SearchConfig(), "cpu")
    sparse = {unit: "fp32" for unit in units[::2]}
    sparse.update({unit: sparse.get(outer, "bf16") for unit, outer in ties.items()})  # as the search ties them
    for plan in (Plan(default="bf16"), Plan(default="bf16", layers=sparse)):
        report = audit(model, plan, [batch], units=units)
        assert report.ok, f"{name}: {report}"
        with apply_plan(model, dataclasses.replace(plan, runtime=Runtime(weights="fp32"))):
            cast_per_call = _run(model, batch)
        with apply_plan(model, plan):              # the README's path: no example_inputs
            first, witness = _witnessed(model, batch)   # the first call learns which weights to hold low
            later = _run(model, batch)
            assert model.__dict__["_precsearch_plan_handle"].weights.held, f"{name}: no weight held low"
            assert all(torch.isfinite(t).all() for t in first), name
            assert witness.seen and all(dtype == plan.precision(unit) for unit, _, dtype in witness.seen), name
            audited = {(e.unit, e.actual) for e in report.entries if e.phase == "forward"}
            assert {(unit, dtype) for unit, _, dtype in witness.seen} == audited, f"{name}: the audit disagrees"
            assert _equal(first, cast_per_call) and _equal(later, first), f"{name}: held weights changed outputs"
            twin = copy.deepcopy(model)
            assert _equal(_run(twin, batch), first), name
        assert all(torch.equal(a, b) for a, b in zip(_run(model, batch), reference)), f"{name}: not restored"


def test_the_zoo_covers_25_architectures_across_five_families():
    assert len(zoo.NAMES) == 25 and len(zoo.FAMILIES) == 5


def test_the_fused_encoder_layer_runs_its_units_and_recording_changes_nothing():
    model, batch = zoo.build("transformer-encoder-layer")
    units = walk(model, batch).units
    assert "encoder.layers.0.linear1" in units
    plan = Plan(default="bf16", layers={"encoder.layers.0.linear1": "fp32"})
    report = audit(model, plan, [batch], units=units)
    assert report.ok and set(report.by_unit()) == set(units)
    with apply_plan(model, plan, example_inputs=batch):
        plain = _run(model, batch)
        witness = DtypeWitness(model)
        with witness:
            recorded = _run(model, batch)
        witness.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert torch.backends.mha.get_fastpath_enabled()  # the fast path is back after the call


def test_the_audit_fails_when_a_unit_runs_no_op():
    model, batch = zoo.build("multihead-attention")
    report = audit(model, Plan(default="bf16"), [batch], units=["attention", "out", "ghost"])
    assert not report.ok and report.silent == ("ghost",) and "ghost: ran no eligible op" in str(report)


def test_units_that_must_share_a_precision_are_tied_in_the_search(tmp_path, monkeypatch, capfd):
    model, batch = zoo.build("deberta-v2")
    graph = walk(model, batch)
    ties = find_ties(model, batch, graph, SearchConfig(), "cpu")
    query = next(unit for unit in graph.units if unit.endswith("layer.0.attention.self.query_proj"))
    assert ties[query] == query.rsplit(".", 1)[0]      # the attention that fills its mask from query's dtype
    choices = SearchConfig().space.choices(graph, "cpu", ties)
    assert any({query, ties[query]} <= set(choice.units) for choice in choices)
    # a plan that carries the ties (as the search writes them) is refused before the model runs
    with pytest.raises(PlanError, match=f"ties: {query!r} must share the precision of {ties[query]!r}"):
        apply_plan(model, Plan(default="bf16", layers={query: "fp32"}, ties=ties))
    # a hand-written plan that splits them is refused by check with one line, not a traceback
    plan = Plan(default="bf16", layers={query: "fp32"})
    (tmp_path / "plan.yaml").write_text(plan.dumps())
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(zoo, "deberta", lambda: model, raising=False)
    monkeypatch.setattr(zoo, "deberta_data", lambda: [batch], raising=False)
    assert main(["check", "--plan", str(tmp_path / "plan.yaml"), "--model", "zoo:deberta", "--data",
                 "zoo:deberta_data"]) == 1
    err = capfd.readouterr().err
    assert "the model fails under this plan" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_compiled_mixed_plans_match_eager(name):
    model, batch = zoo.build(name)
    units = walk(model, batch).units
    plan = Plan(default="bf16", layers={unit: "fp32" for unit in units[::3]})
    with apply_plan(model, plan, example_inputs=batch):
        eager = _run(model, batch)
        torch._dynamo.reset()
        compiled = _run(torch.compile(model), batch)
        torch._dynamo.reset()
    assert all(torch.allclose(a.float(), b.float(), atol=0.05, rtol=0.05) for a, b in zip(eager, compiled))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "t5", "vit"])
def test_optimize_then_check_end_to_end(name, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    factories = ["--model", f"zoo:{name.replace('-', '_')}", "--data", f"zoo:{name.replace('-', '_')}_data"]
    out = tmp_path / name
    assert main(["optimize", *factories, "--trials", "4", "--out", str(out), "--space", "bf16_only"]) == 0
    assert main(["check", "--plan", str(out / "plan.yaml"), *factories]) == 0
