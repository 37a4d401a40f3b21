#!/usr/bin/env bash
# Prove the runtime installs and works alone: a fresh venv (no system site packages) gets torch and
# `pip install .` with no extras, then saves, loads, applies and audits a plan with neither Optuna,
# pandas nor matplotlib importable.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# a copy of the files git would commit: an in-tree build would leave build/ behind, stale files and all
mkdir "$work/src"
git ls-files --cached --others --exclude-standard -z \
    | while IFS= read -r -d '' file; do if [[ -e $file ]]; then printf '%s\0' "$file"; fi; done \
    | xargs -0 cp --parents -t "$work/src"
venv="$work/venv"
python -m venv --without-pip "$venv"   # this pip installs into it: no pip of its own to set up
# -qq: no warnings; --no-compile: torch byte-compiles for a minute otherwise
pip=(python -m pip --python "$venv/bin/python" install -qq --no-compile --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" "$work/src"
cd "$work"   # import the installed package, not the working tree
"$venv/bin/python" - <<'PY'
import importlib.util
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")   # numpy is no dependency
import torch
from torch import nn

import precsearch

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
batch = torch.randn(2, 8)
plan = precsearch.Plan(layers={"0": "bf16"})
plan = precsearch.load_plan(plan.save("plan.yaml"))
with precsearch.apply_plan(model, plan):
    assert model(batch).shape == (2, 4)
report = precsearch.audit(model, plan, [batch])
assert report.ok, report
for extra in ("optuna", "pandas", "matplotlib"):
    assert importlib.util.find_spec(extra) is None, f"{extra} is installed without the search extra"
PY
echo "runtime alone: ok (torch + pyyaml)"
