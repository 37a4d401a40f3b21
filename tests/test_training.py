
import pytest
import torch
from conftest import build_cnn, image_batches
from torch import nn

from precsearch import LossScaling, Plan, audit, load_plan
from precsearch.cli import main
from precsearch.search.config import SearchConfig
from precsearch.examples import digits, train_digits
from precsearch.search.trials import load_diagnostics
from precsearch.search.loop import optimize
from precsearch.runtime.training import Trainer, default_loss, diagnose, grad_scaler


@pytest.mark.slow
def test_searched_plan_with_fp16_trains_digits_as_well_as_fp32():
    result = train_digits.run(epochs=6, trials=6)
    plan = result["plan"]
    assert plan.mode == "training" and plan.precision("fc2") == "fp16" and plan.loss_scaling == LossScaling()
    assert result["scales"] and result["fp32_accuracy"] > 0.9
    assert abs(result["plan_accuracy"] - result["fp32_accuracy"]) <= 0.01, result


def test_search_in_training_mode_moves_no_weight_and_records_diagnostics():
    torch.manual_seed(0)
    model = digits.DigitsMLP()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = optimize(model, digits.training_data()[:2], SearchConfig(space=train_digits.SPACE, mode="training",
                      max_error=0.05, trials=3, progress=False, repeats=3))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert result.plan.mode == "training"
    assert load_diagnostics(result.study).scales


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def _tiny_data():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 16, generator=generator), torch.randint(0, 4, (32,), generator=generator))
            for _ in range(4)]


def test_loss_scaling_rescues_gradients_that_underflow_in_fp16():
    def tiny_loss(output, target):  # gradients ~1e-10: below fp16's smallest subnormal (6e-8)
        return default_loss(output, target) * 1e-7

    plan = Plan(default="fp32", layers={"hidden": "fp16"}, mode="training",
                loss_scaling=LossScaling(init_scale=2.0**24))
    unscaled = Plan(default="fp32", layers={"hidden": "fp16"}, mode="training",
                    loss_scaling=LossScaling(init_scale=1.0, growth_interval=10_000))
    moved = {}
    for name, chosen in (("scaled", plan), ("unscaled", unscaled)):
        torch.manual_seed(0)
        model = Tiny()
        before = model.hidden.weight.detach().clone()
        with Trainer(model, chosen, torch.optim.SGD(model.parameters(), lr=1e6), loss_fn=tiny_loss) as trainer:
            for inputs, target in _tiny_data():
                trainer.step(inputs, target)
        moved[name] = float((model.hidden.weight - before).abs().max())
    assert moved["unscaled"] == 0.0     # every gradient of the fp16 unit underflowed to zero
    assert moved["scaled"] > 1e-3       # with the plan's scaling, the unit learns
    diagnostics = diagnose(Tiny(), plan, _tiny_data(), tiny_loss, steps=3)
    assert diagnostics.underflow.get("hidden", 0) > 0.5 and diagnostics.skipped == 0


def test_injected_overflow_skips_exactly_that_step_and_halves_the_scale():
    torch.manual_seed(0)
    model = Tiny()
    calls = {"n": 0}

    def loss_with_overflow(output, target):
        calls["n"] += 1
        loss = default_loss(output, target)
        return loss * float("inf") if calls["n"] == 3 else loss

    plan = Plan(default="fp16", mode="training", loss_scaling=LossScaling(init_scale=1024.0))
    snapshots = []
    with Trainer(model, plan, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_with_overflow) as trainer:
        for inputs, target in _tiny_data():
            snapshots.append(model.out.weight.detach().clone())
            trainer.step(inputs, target)
        snapshots.append(model.out.weight.detach().clone())
    assert trainer.skipped == 1
    assert trainer.scales == [1024.0, 1024.0, 512.0, 512.0]
    assert torch.equal(snapshots[2], snapshots[3])                      # step 3 was skipped
    assert not torch.equal(snapshots[1], snapshots[2]) and not torch.equal(snapshots[3], snapshots[4])


def test_bf16_and_fp32_plans_use_no_scaler():
    assert grad_scaler(Plan(default="bf16"), "cpu") is None
    assert grad_scaler(Plan(default="fp32"), "cpu") is None
    scaler = grad_scaler(Plan(layers={"x": "fp16"}, loss_scaling=LossScaling(init_scale=8.0, growth_interval=7)), "cpu")
    assert scaler.get_scale() == 8.0 and scaler.get_growth_interval() == 7


@pytest.mark.parametrize("plan", [
    Plan(default="bf16", layers={"conv2": "fp32"}),
    Plan(default="fp32", layers={"conv1": "fp16", "fc": "bf16"}),
])
def test_audit_confirms_planned_dtypes_in_backward(plan):
    model = build_cnn().train()
    batches = [(x, torch.randint(0, 10, (x.shape[0],))) for x in image_batches()]
    report = audit(model, plan, batches, loss_fn=default_loss)
    assert report.ok, str(report)
    backward = [e for e in report.entries if e.phase == "backward"]
    assert {e.unit for e in backward} == {"conv1", "conv2", "fc"}
    assert all(e.actual == plan.precision(e.unit) for e in backward)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "trainfactories.py").write_text(
        "import torch\n"
        "from precsearch.examples import digits\n"
        "def data():\n    return digits.training_data()[:3]\n"
        "def inputs_only():\n    return [x for x, _ in digits.training_data()[:3]]\n"
        "def vector_loss(output, target):\n    return output.sum(dim=1)\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_cli_optimize_train_then_check(factories, capsys):
    code = main(["optimize", "--mode", "train", "--model", "precsearch.examples.digits:model",
                 "--data", "trainfactories:data", "--trials", "6", "--max-error", "0.05", "--out", "out"])
    assert code == 0, capsys.readouterr().err
    plan = load_plan(factories / "out" / "plan.yaml")
    assert plan.mode == "training" and plan.constraint.metric == "grad_rel_l2"
    assert "Training: loss scaling and gradient health" in (factories / "out" / "report.md").read_text()
    capsys.readouterr()
    assert main(["check", "--plan", "out/plan.yaml", "--model", "precsearch.examples.digits:model",
                 "--data", "trainfactories:data"]) == 0
    assert "audit ok" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--data", "trainfactories:inputs_only"], "training mode needs each batch as (inputs, target)"),
    (["--data", "trainfactories:data", "--loss", "trainfactories:vector_loss"], "the loss must be a scalar tensor"),
])
def test_cli_optimize_train_bad_input(factories, capsys, argv, message):
    code = main(["optimize", "--mode", "train", "--model", "precsearch.examples.digits:model", "--trials", "2",
                 "--out", "out", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not any(line.startswith("Traceback") for line in err.splitlines())


def test_check_refuses_invalid_loss_scaling(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text("format: precsearch-plan/1\nmode: training\ndefault: fp16\nloss_scaling: {growth_factor: 0.5}\n")
    assert main(["check", "--plan", str(path)]) == 2
    assert "loss_scaling.growth_factor: 0.5 must be a finite number > 1" in capsys.readouterr().err
