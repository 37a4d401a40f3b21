"""``precsearch export`` and ``check --package``: AOTInductor packages of a model with a plan
applied. Each export compiles C++ (tens of seconds on two cores): every export is made once per
module and shared by the tests that read it."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_bert, token_batches
from torch import nn

from precsearch import Plan, apply_plan
from precsearch.runtime.accuracy import flatten_outputs
from precsearch.cli import main
from precsearch.search.export import export_plan

BERT = ["--model", "conftest:build_bert", "--data", "conftest:token_batches"]
# Mixed: the embeddings, the last feed-forward output and the pooler stay FP32, the rest is BF16.
BERT_PLAN = {"default": "bf16", "layers": {"embeddings.word_embeddings": "fp32", "pooler.dense": "fp32",
                                           "encoder.layer.1.output.dense": "fp32"}}


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def save_plan(path, limit: float, **fields) -> str:
    return str(Plan(mode="inference", constraint={"metric": "rel_l2", "limit": limit}, **fields).save(path))


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory):
    """The tiny BERT exported through the CLI with a mixed plan and dynamic shapes:
    (folder, plan path, package path, exit code, stdout, stderr)."""
    folder = tmp_path_factory.mktemp("bert")
    plan = save_plan(folder / "plan.yaml", 0.05, **BERT_PLAN)
    package = folder / "bert.pt2"
    code, out, err = run_cli("export", "--plan", plan, *BERT, "--out", str(package), "--dynamic")
    return folder, plan, package, code, out, err


def eager_plan_outputs(batch) -> list[torch.Tensor]:
    model = build_bert()
    apply_plan(model, Plan(mode="inference", **BERT_PLAN), example_inputs=batch)
    with torch.no_grad():
        return flatten_outputs(model(**batch))


@pytest.mark.slow
def test_export_writes_a_verified_package(bert_export):
    folder, _, package, code, out, err = bert_export
    assert code == 0, err
    assert package.is_file() and sorted(p.name for p in folder.iterdir()) == ["bert.pt2", "plan.yaml"]
    assert f"package: {package}" in out and "MB on disk" in out and "bf16" in out
    assert "input_ids dims [0, 1]" in out                      # batch and sequence dynamic
    assert "max abs difference against the eager plan" in out
    assert "package: ok, rel_l2" in out and "within the limit 0.05" in out
    for form in ("fp32 eager", "plan eager", "package"):
        assert form in out


@pytest.mark.slow
def test_package_matches_the_eager_plan_on_other_shapes(bert_export):
    package = torch._inductor.aoti_load_package(str(bert_export[2]))
    batch = {"input_ids": torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(5))}
    got, want = package(**batch), eager_plan_outputs(batch)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        # inductor fuses and rounds differently from eager autocast: loosely equal
        assert (g.float() - w.float()).abs().max() <= 1e-2 * w.float().abs().max()


@pytest.mark.slow
def test_package_runs_with_torch_alone(bert_export, tmp_path):
    batch = token_batches(1)[0]
    torch.save({"inputs": batch, "expected": eager_plan_outputs(batch)}, tmp_path / "case.pt")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path[:] = [p for p in sys.path if "editable" not in p and not p.startswith({os.getcwd()!r})]
        assert importlib.util.find_spec("precsearch") is None, "precsearch is importable"
        import torch
        package = torch._inductor.aoti_load_package({str(bert_export[2])!r})
        case = torch.load("case.pt")
        got = package(**case["inputs"])
        worst = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, case["expected"]))
        scale = max(float(w.float().abs().max()) for w in case["expected"])
        assert worst <= 1e-2 * scale, (worst, scale)
        loaded = [name for name in sys.modules if name.split(".")[0] in ("precsearch", "transformers")]
        assert not loaded, loaded
        print("ok", worst)
    """)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path))}
    done = subprocess.run([sys.executable, "-I", "-c", script], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok")


@pytest.mark.slow
def test_check_package_within_and_over_the_limit(bert_export):
    folder, plan, package, *_ = bert_export
    code, out, _ = run_cli("check", "--plan", plan, *BERT, "--package", str(package))
    assert code == 0 and out.startswith("package: ok") and len(out.splitlines()) == 1
    tiny = save_plan(folder / "tiny.yaml", 1e-9, **BERT_PLAN)
    code, out, _ = run_cli("check", "--plan", tiny, *BERT, "--package", str(package))
    assert code == 1 and out.startswith("package: FAILED") and "over the limit 1e-09" in out
    (folder / "tiny.yaml").unlink()


@pytest.mark.slow
def test_check_package_missing_is_bad_input(bert_export, tmp_path):
    code, _, err = run_cli("check", "--plan", bert_export[1], *BERT, "--package", str(tmp_path / "none.pt2"))
    assert code == 2 and "no such file" in err and len(err.splitlines()) == 1


class WideMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(256, 512), nn.Linear(512, 512), nn.Linear(512, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.slow
def test_bf16_weights_make_the_package_smaller(tmp_path):
    batches = [torch.randn(4, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sizes = {}
    for name, plan in {"fp32": Plan(mode="inference"),
                       "mixed": Plan(default="bf16", layers={"head": "fp32"}, mode="inference")}.items():
        result = export_plan(WideMLP().eval(), plan, batches, tmp_path / f"{name}.pt2", repeats=4)
        sizes[name] = result.size_bytes
        if name == "mixed":
            assert result.weight_bytes["bf16"] == (256 * 512 + 512 + 512 * 512 + 512) * 2
            assert result.verification.max_diff < 1e-2
    weights_fp32 = sum(p.numel() for p in WideMLP().parameters()) * 4
    print(f"package sizes: {sizes}, FP32 weights {weights_fp32} bytes")
    assert sizes["fp32"] - sizes["mixed"] > 0.4 * weights_fp32


def branchy_data():
    return [torch.randn(4, 16, generator=torch.Generator().manual_seed(0))]


@pytest.mark.slow
def test_unexportable_model_is_one_line_and_leaves_nothing(tmp_path):
    plan = save_plan(tmp_path / "plan.yaml", 0.05, default="bf16")
    out = tmp_path / "branchy.pt2"
    code, stdout, err = run_cli("export", "--plan", plan, "--model", "conftest:Branchy",
                                "--data", "test_export:branchy_data", "--out", str(out))
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "cannot be exported" in err and "data-dependent" in err
    assert stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


@pytest.mark.parametrize("out, word", [("model.bin", "*.pt2"), ("missing/model.pt2", "does not exist")])
def test_bad_out_is_refused_before_the_model_is_built(tmp_path, out, word):
    plan = save_plan(tmp_path / "plan.yaml", 0.05, default="bf16")
    code, _, err = run_cli("export", "--plan", plan, "--model", "no_such_module:model",
                           "--data", "no_such_module:data", "--out", str(tmp_path / out))
    assert code == 2 and word in err and len(err.splitlines()) == 1
