#!/usr/bin/env bash
# The GPU check, for a lent H200 (device tool): run benchmarks/gpu.py, keep the log.
# That machine has no network: nothing is downloaded. Missing packages travel as wheels in .whl/
# (see the device tool's README) and are installed from there only.
# Expected wall time: under 8 minutes. Results: $OUT/gpu.json and $OUT/gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import optuna, transformers" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "optuna/transformers missing and no .whl/ wheels carried" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --device cuda 2>&1 | tee "${OUT:-benchmarks/results}/gpu.log"
