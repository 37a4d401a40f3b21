"""``precsearch.check`` from Python, the ``optimize`` request, and the CLI without the search extra."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import precsearch
from precsearch import Plan
from precsearch.runtime.errors import InputError
from precsearch.search.check import PlanBreaksModel
from precsearch.search.request import SearchRequest, study_name_for


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=generator) for _ in range(2)]


class NeedsFP32(nn.Module):
    """Fails when its layer does not compute in FP32."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        if out.dtype != torch.float32:
            raise RuntimeError(f"expected float32, got {out.dtype}")
        return out


def test_check_audits_a_plan_and_restores_the_model_modes():
    model = tiny_model().train()
    result = precsearch.check(model, Plan(default="bf16", layers={"3": "fp32"}), batches())
    assert isinstance(result, precsearch.CheckResult)
    assert result.ok and result.audit.ok and result.within_budget is None and result.compiled is None
    assert str(result) == "audit ok: 4 eligible ops in 2 units ran in their planned dtype"
    assert result.to_dict()["ok"] is True and result.to_dict()["ops"] == 4
    assert model.training and model[2].training   # audited in eval mode, the caller's modes restored


def test_check_fails_a_plan_over_its_memory_budget():
    plan = Plan(default="bf16", constraint={"metric": "rel_l2", "limit": 0.01, "max_weight_mb": 0.001})
    result = precsearch.check(tiny_model(), plan, batches())
    assert result.audit.ok and result.within_budget is False and not result.ok
    assert result.lines()[-1].startswith("weights as applied: ")
    assert "OVER the plan's memory budget of 0.001 MB (max_weight_mb)" in str(result)
    roomy = Plan(default="bf16", constraint={"metric": "rel_l2", "limit": 0.01, "max_weight_mb": 1.0})
    assert precsearch.check(tiny_model(), roomy, batches()).ok


def test_check_audits_a_training_plan_backward_in_train_mode():
    model = tiny_model().eval()
    data = [(batch, torch.randint(0, 4, (8,))) for batch in batches()]
    result = precsearch.check(model, Plan(mode="training", default="bf16"), data)
    assert result.ok and {entry.phase for entry in result.audit.entries} == {"forward", "backward"}
    assert not model.training


def test_check_raises_when_the_model_fails_under_the_plan():
    with pytest.raises(PlanBreaksModel, match="the model fails under this plan: RuntimeError: expected float32"):
        precsearch.check(NeedsFP32(), Plan(default="bf16"), batches())
    assert precsearch.check(NeedsFP32(), Plan(default="fp32"), batches()).ok


def test_check_refuses_a_plan_for_another_model_unless_told():
    plan = Plan(default="bf16", model={"fingerprint": "sha256:" + "1" * 64})
    with pytest.raises(InputError, match="model.fingerprint"):
        precsearch.check(tiny_model(), plan, batches())
    with pytest.warns(UserWarning):
        assert precsearch.check(tiny_model(), plan, batches(), fingerprint_mismatch="warn").ok


@pytest.mark.slow
def test_check_compiled_fails_a_plan_over_its_limit():
    plan = Plan(default="bf16", constraint={"metric": "rel_l2", "limit": 1e-9})
    result = precsearch.check(tiny_model(), plan, batches(), compile=True)
    assert result.audit.ok and result.compiled.within_limit is False and not result.ok
    assert result.lines()[-1].startswith("compiled: FAILED, rel_l2 ")
    assert result.to_dict()["compiled"]["limit"] == 1e-9


def test_a_request_names_its_study_and_output_before_the_model():
    request = SearchRequest.of(model="zoo.nets:resnet", space="cnn", max_error=0.02, trials=3)
    assert request.out == Path("reports/nets-resnet") and request.config.study_name == "nets-resnet"
    assert request.config.storage == "sqlite:///reports/nets-resnet/study.db"
    assert request.config.model_name == "zoo.nets:resnet" and request.config.space.name == "cnn"
    assert SearchRequest.of().model_spec == "precsearch.examples.demo:model"
    assert SearchRequest.of(out="x", storage="journal:///j.log").config.storage == "journal:///j.log"
    assert [study_name_for(spec) for spec in ("precsearch.examples.demo:model", "zoo.nets:resnet", "hf:ckpt/bert")] \
        == ["demo", "nets-resnet", "hf-bert"]
    with pytest.raises(InputError, match="--loss applies to --mode train"):
        SearchRequest.of(loss="torch.nn.functional:cross_entropy")


def test_a_request_fits_its_config_to_the_model():
    config = SearchRequest.of(max_error=0.05).config_for(tiny_model(), batches(), "cpu")
    assert config.metric == "rel_l2" and config.fidelity is None and config.holdout_data is None
    with pytest.raises(InputError, match="--max-drop/--max-rel-drop bound a --metric M:F"):
        SearchRequest.of(max_drop=0.1).config_for(tiny_model(), batches(), "cpu")


BLOCKED = '''
import sys
for name in {blocked!r}:
    sys.modules[name] = None   # import fails with ModuleNotFoundError, as if not installed
from precsearch.cli import main
sys.exit(main({argv!r}))
'''


def run_without(blocked: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = BLOCKED.format(blocked=blocked, argv=argv)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd,
                          check=False)


@pytest.mark.parametrize("blocked,argv,command", [
    (["optuna"], ["optimize", "--trials", "2"], "optimize"),
    (["networkx"], ["layers"], "layers"),
])
def test_a_command_says_it_needs_the_search_extra(tmp_path, blocked, argv, command):
    done = run_without(blocked, argv, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"precsearch: error: {command!r} needs the search extra: "
                                   f"pip install 'precsearch[search]'")


def test_check_runs_without_optuna_pandas_and_matplotlib(tmp_path):
    from precsearch.examples import demo

    Plan(default="bf16", layers={"shift": "fp32", "amplify": "bf16"},
         model={"fingerprint": precsearch.model_fingerprint(demo.model())}).save(tmp_path / "plan.yaml")
    done = run_without(["optuna", "pandas", "matplotlib"], ["check", "--plan", "plan.yaml"], tmp_path)
    assert done.returncode == 0 and "audit ok" in done.stdout, done.stderr
