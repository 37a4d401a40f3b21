"""Bad input over the command line: exit 2, one line on stderr naming the culprit, no traceback,
and nothing left behind (no output folder, no study)."""

from __future__ import annotations

import textwrap

import pytest

from precsearch.cli import main

FACTORIES = textwrap.dedent('''
    import sys
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def data():
        return [torch.randn(4, 8, generator=torch.Generator().manual_seed(0))]

    def wrong_shape():
        return [torch.randn(4, 5)]

    def empty():
        return []

    def not_a_model():
        return "a string"

    def exits():
        sys.exit(3)

    class NaN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(x) * float("nan")

    def nan_model():
        return NaN()
''')

GOOD = ["--model", "nets:model", "--data", "nets:data"]
PLAN_HEAD = "format: precsearch-plan/1\n"
BOMB = "format: precsearch-plan/1\ncreated: &a0 [x, x]\n" + "".join(
    f"c{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]\n" for i in range(1, 9))
SPACE_HEAD = "format: precsearch-space/1\nname: s\n"

# (files to create: name -> text or bytes, argv, a word the message must contain)
CASES = {
    "plan missing": ({}, ["check", "--plan", "nope.yaml", *GOOD], "nope.yaml"),
    "plan not yaml": ({"p.yaml": "format: [unclosed\n"}, ["check", "--plan", "p.yaml", *GOOD], "line"),
    "plan binary": ({"p.yaml": b"\xff\xfe\x00binary"}, ["check", "--plan", "p.yaml", *GOOD], "p.yaml"),
    "plan duplicate layer": ({"p.yaml": PLAN_HEAD + "layers: {0: bf16, 0: fp32}\n"},
                             ["check", "--plan", "p.yaml", *GOOD], "duplicate"),
    "plan duplicate default": ({"p.yaml": PLAN_HEAD + "default: bf16\ndefault: fp32\n"},
                               ["check", "--plan", "p.yaml", *GOOD], "default"),
    "plan alias bomb": ({"p.yaml": BOMB}, ["check", "--plan", "p.yaml", *GOOD], "alias"),
    "plan anchor": ({"p.yaml": PLAN_HEAD + "default: &d bf16\nlayers: {0: *d}\n"},
                    ["check", "--plan", "p.yaml", *GOOD], "anchor"),
    "plan fingerprint int": ({"p.yaml": PLAN_HEAD + "model: {fingerprint: 12345}\n"},
                             ["check", "--plan", "p.yaml", *GOOD], "fingerprint"),
    "plan created list": ({"p.yaml": PLAN_HEAD + "created: [1, 2]\n"}, ["check", "--plan", "p.yaml", *GOOD],
                          "created"),
    "plan unknown dtype": ({"p.yaml": PLAN_HEAD + "default: fp8x\n"}, ["check", "--plan", "p.yaml", *GOOD], "fp8x"),
    "plan unknown field": ({"p.yaml": PLAN_HEAD + "colour: red\n"}, ["check", "--plan", "p.yaml", *GOOD], "colour"),
    "plan wrong format": ({"p.yaml": "format: precsearch-plan/9\n"}, ["check", "--plan", "p.yaml", *GOOD],
                          "precsearch-plan/9"),
    "plan unknown layer": ({"p.yaml": PLAN_HEAD + "layers: {encoder: bf16}\n"},
                           ["check", "--plan", "p.yaml", *GOOD], "encoder"),
    "plan other model": ({"p.yaml": PLAN_HEAD + "model: {fingerprint: 'sha256:0123'}\n"},
                         ["check", "--plan", "p.yaml", *GOOD], "fingerprint"),
    "plan python tag": ({"p.yaml": PLAN_HEAD + "layers: !!python/object/apply:os.system ['echo x']\n"},
                        ["check", "--plan", "p.yaml", *GOOD], "p.yaml"),
    "plan bad loss scaling": ({"p.yaml": PLAN_HEAD + "mode: training\nloss_scaling: {growth_factor: 0.5}\n"},
                              ["check", "--plan", "p.yaml", *GOOD], "growth_factor"),
    "plan training weights low": ({"p.yaml": PLAN_HEAD + "mode: training\nruntime: {weights: low}\n"},
                                  ["check", "--plan", "p.yaml", *GOOD], "master weights"),
    "plan bad runtime": ({"p.yaml": PLAN_HEAD + "runtime: {weights: int4}\n"}, ["check", "--plan", "p.yaml", *GOOD],
                         "runtime.weights"),
    "training with low weights": ({}, ["optimize", "--mode", "train", "--weights", "low", *GOOD], "--weights"),
    "plan bad mode": ({"p.yaml": PLAN_HEAD + "mode: serving\n"}, ["check", "--plan", "p.yaml", *GOOD], "mode"),
    "space binary": ({"s.yaml": b"\xff\xfe\x00"}, ["optimize", "--space", "s.yaml", *GOOD], "s.yaml"),
    "space missing": ({}, ["optimize", "--space", "missing.yaml", *GOOD], "missing.yaml"),
    "space unknown name": ({}, ["optimize", "--space", "galaxy", *GOOD], "galaxy"),
    "space duplicate key": ({"s.yaml": SPACE_HEAD + "dtypes: [bf16]\ndtypes: [fp32]\n"},
                            ["optimize", "--space", "s.yaml", *GOOD], "dtypes"),
    "space unknown dtype": ({"s.yaml": SPACE_HEAD + "dtypes: [fp12]\n"}, ["optimize", "--space", "s.yaml", *GOOD],
                            "fp12"),
    "space bad regex": ({"s.yaml": SPACE_HEAD + "rules: [{name: '(', dtypes: [fp32]}]\n"},
                        ["optimize", "--space", "s.yaml", *GOOD], "regular expression"),
    "data wrong shape": ({}, ["optimize", "--model", "nets:model", "--data", "nets:wrong_shape"], "FP32 reference"),
    "layers data wrong shape": ({}, ["layers", "--model", "nets:model", "--data", "nets:wrong_shape"],
                                "FP32 reference"),
    "fp32 outputs not finite": ({}, ["optimize", "--model", "nets:nan_model", "--data", "nets:data"], "not finite"),
    "out is a file": ({"taken": "x"}, ["optimize", "--out", "taken", *GOOD], "not a directory"),
    "out under a file": ({"taken": "x"}, ["optimize", "--out", "taken/run", *GOOD], "not a directory"),
    "factory exits": ({}, ["optimize", "--model", "nets:exits", "--data", "nets:data"], "SystemExit"),
    "model spec form": ({}, ["optimize", "--model", "nets", "--data", "nets:data"], "MODULE:FUNC"),
    "model module missing": ({}, ["optimize", "--model", "nowhere:model", "--data", "nets:data"], "nowhere"),
    "model attribute missing": ({}, ["optimize", "--model", "nets:resnet", "--data", "nets:data"], "resnet"),
    "model not a module": ({}, ["optimize", "--model", "nets:not_a_model", "--data", "nets:data"], "nn.Module"),
    "data empty": ({}, ["optimize", "--model", "nets:model", "--data", "nets:empty"], "empty"),
    "data without model": ({}, ["optimize", "--data", "nets:data"], "--model and --data"),
    "journal two slashes": ({}, ["optimize", "--storage", "journal://rel.journal", *GOOD], "journal:///"),
    "storage unknown scheme": ({}, ["optimize", "--storage", "bogus://x", *GOOD], "--storage"),
    "storage missing dir": ({}, ["optimize", "--storage", "sqlite:////nonexistent/dir/x.db", *GOOD], "--storage"),
    "trials zero": ({}, ["optimize", "--trials", "0", *GOOD], "--trials"),
    "max error negative": ({}, ["optimize", "--max-error", "-1", *GOOD], "--max-error"),
    "metric name unknown": ({}, ["optimize", "--metric-name", "psnr", *GOOD], "psnr"),
    "max drop without metric": ({}, ["optimize", "--max-drop", "0.1", *GOOD], "--max-drop"),
    "loss in inference": ({}, ["optimize", "--loss", "nets:model", *GOOD], "--loss"),
    "mode unknown": ({}, ["optimize", "--mode", "serve", *GOOD], "serve"),
    "strategy unknown": ({}, ["optimize", "--strategy", "annealing", *GOOD], "annealing"),
    "device unknown": ({}, ["optimize", "--device", "tpu", *GOOD], "--device"),
    "compare one plan": ({"a.yaml": PLAN_HEAD}, ["compare", "a.yaml"], "two"),
    "compare itself": ({"a.yaml": PLAN_HEAD}, ["compare", "a.yaml", "a.yaml"], "itself"),
    "report without study": ({}, ["report", "."], "study"),
    "space rule dtype outside dtypes": (
        {"s.yaml": SPACE_HEAD + "dtypes: [bf16]\nrules: [{name: '0', dtypes: [fp16]}]\n"},
        ["optimize", "--space", "s.yaml", *GOOD], "fp16 is not in the top-level"),
    "space invalid date": ({"s.yaml": "format: precsearch-space/1\nname: 2026-02-30\n"},
                           ["optimize", "--space", "s.yaml", *GOOD], "2026-02-30"),
    "plan invalid date": ({"p.yaml": PLAN_HEAD + "created: 2026-13-45\n"},
                          ["check", "--plan", "p.yaml", *GOOD], "2026-13-45"),
    "compare plan invalid date": ({"a.yaml": PLAN_HEAD, "b.yaml": PLAN_HEAD + "created: 2026-13-45T10:00:00Z\n"},
                                  ["compare", "a.yaml", "b.yaml"], "2026-13-45"),
    "unknown command": ({}, ["optimise"], "optimise"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(name, tmp_path, monkeypatch, capsys):
    files, argv, word = CASES[name]
    (tmp_path / "nets.py").write_text(FACTORIES)
    for file, content in files.items():
        (tmp_path / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = _tree(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("precsearch: searching")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("precsearch: error: ") and "Traceback" not in err, err
    assert word in lines[0], err
    assert _tree(tmp_path) == before, "the failed run left files behind"


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts)


def test_the_matrix_covers_at_least_forty_cases():
    assert len(CASES) >= 40


def _study_directory(root):
    """A study as optimize leaves it, set up for ``nets:model`` (units 0 and 2), without trials."""
    import optuna

    from precsearch.search.trials import Settings, StudySetup

    study = optuna.create_study(study_name="mine", storage=f"sqlite:///{root / 'study.db'}")
    settings = Settings(model="nets:model", space="default", mode="inference",
                        constraint={"metric": "rel_l2", "limit": 0.01}, device="cpu", device_name="cpu",
                        torch="2.13.0", trials=2, seed=0, strategy="optuna", sampler="TPESampler",
                        parametrisation="categorical")
    units = [{"name": name, "type": "Linear", "params": 1, "flops": 1} for name in ("0", "2")]
    StudySetup(settings, "sha256:0", units, [["0", "2"]], {}, {}, baseline_ms=1.0).save(study)


@pytest.mark.parametrize("plan,word", [
    ({"search": {"study": "theirs"}, "layers": {"0": "bf16"}}, "its search.study is 'theirs'"),
    ({"model": {"name": "nets:other"}}, "made for model 'nets:other'"),
    ({"model": {"units": 9}}, "counts 9 units"),
    ({"layers": {"encoder.fc": "bf16"}}, "names unit 'encoder.fc'"),
])
def test_report_refuses_a_plan_of_another_study(plan, word, tmp_path, monkeypatch, capsys):
    from precsearch.runtime.plan import Plan

    _study_directory(tmp_path)
    Plan(**plan).save(tmp_path / "plan.yaml")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    capsys.readouterr()
    code = main(["report", "."])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("precsearch: error: plan.yaml: not a plan of study 'mine'") and word in err, err
    assert _tree(tmp_path) == before
