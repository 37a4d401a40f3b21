"""The recording the graph walker and the audit share: which unit ran which op, in which dtype."""

import pytest
import torch
from torch import nn

from precsearch.runtime.recording import ModuleStack, OpRecord, OpRecorder


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class Probe(nn.Module):
    """Records the innermost module the stack reports while it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: ModuleStack | None = None
        self.seen: list[str] = []

    def forward(self, x):
        self.seen.append(self.stack.current)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2), Probe())
        self.probe = Probe()

    def forward(self, x):
        self.probe.seen.append(f"outer saw {self.probe.stack.current}")
        return self.probe(self.inner(x))


def test_module_stack_follows_the_innermost_module():
    model = Outer()
    with ModuleStack(model) as stack:
        model.inner[1].stack = model.probe.stack = stack
        assert stack.current == ""
        model(torch.ones(1, 2))
        assert stack.stack == [] and stack.current == ""
    assert model.inner[1].seen == ["inner.1"]
    assert model.probe.seen == ["outer saw ", "probe"]  # the root is ""


def test_module_stack_ignores_other_models_and_unhooks_on_exit():
    model, other = Outer(), nn.Linear(2, 2)
    with ModuleStack(model) as stack:
        other(torch.ones(1, 2))
        assert stack.stack == []
    model.inner[1].stack = model.probe.stack = stack
    model(torch.ones(1, 2))          # after exit nothing is pushed any more
    assert model.inner[1].seen == [""]


def test_module_stack_pops_when_a_module_raises():
    class Failing(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(2, 2), Failing())
    with ModuleStack(model) as stack:
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.ones(1, 2))
        assert stack.stack == []


def test_records_eligible_ops_with_unit_and_dtype_under_autocast():
    model, x = tiny(), torch.randn(3, 4)
    with OpRecorder(model, "cpu") as recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert [(r.unit, r.op, r.dtype, r.phase) for r in recorder.records] == [
        ("0", "addmm", torch.bfloat16, "forward"), ("2", "addmm", torch.bfloat16, "forward")]
    first = recorder.records[0]
    assert isinstance(first, OpRecord)
    assert first.shapes == ((8,), (3, 4), (4, 8), (3, 8))  # bias, input, weight.T, then the output


def test_records_fp32_without_autocast_and_skips_non_floating_outputs():
    model, x = tiny(), torch.randn(3, 4)
    with OpRecorder(model, "cpu") as recorder:
        model(x)
        torch.mm(torch.ones(2, 2, dtype=torch.int64), torch.ones(2, 2, dtype=torch.int64))  # no float output
        torch.relu(x)
    assert [(r.unit, r.op, r.dtype) for r in recorder.records] == [
        ("0", "addmm", torch.float32), ("2", "addmm", torch.float32)]


def test_on_op_sees_every_op_with_its_unit():
    model, x = tiny(), torch.randn(3, 4)
    seen = []
    with OpRecorder(model, "cpu", on_op=lambda func, args, output, unit: seen.append((str(func), unit))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.sum()
    assert ("aten.relu.default", "1") in seen                    # not eligible, still seen
    assert ("aten.addmm.default", "0") in seen and ("aten.addmm.default", "2") in seen
    assert ("aten.sum.default", "") in seen                       # outside any module: the root
    assert any(name.startswith("aten._to_copy") and unit == "0" for name, unit in seen)  # autocast's casts


def test_nothing_is_recorded_after_exit():
    model, x = tiny(), torch.randn(3, 4)
    seen = []
    recorder = OpRecorder(model, "cpu", on_op=lambda *a: seen.append(a))
    with recorder:
        model(x)
    assert len(recorder.records) == 2 and len(seen) > 2
    count = len(seen)
    model(x)
    assert len(recorder.records) == 2 and len(seen) == count


def _train_step(backward: bool) -> list[OpRecord]:
    model, x = tiny(), torch.randn(3, 4)
    recorder = OpRecorder(model, "cpu", backward=backward)
    with recorder:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        recorder.phase = "backward"
        y.float().sum().backward()
    return recorder.records


def test_backward_ops_are_attributed_to_the_unit_that_made_them():
    records = _train_step(backward=True)
    backward = [(r.unit, r.op, r.dtype) for r in records if r.phase == "backward"]
    # unit 2: grad of its input and of its weight; unit 0: its weight only (x needs no grad)
    assert backward == [("2", "mm", torch.bfloat16), ("2", "mm", torch.bfloat16), ("0", "mm", torch.bfloat16)]
    assert [r.unit for r in records if r.phase == "forward"] == ["0", "2"]


def test_without_backward_attribution_backward_ops_belong_to_the_root():
    records = _train_step(backward=False)
    backward = [r for r in records if r.phase == "backward"]
    assert len(backward) == 3 and {r.unit for r in backward} == {""}
