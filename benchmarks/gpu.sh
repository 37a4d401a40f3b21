#!/usr/bin/env bash
# The GPU check, for a lent H200 (device tool): install what the machine lacks, run, keep the log.
# Expected wall time: under 8 minutes. Results: $OUT/gpu.json and $OUT/gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps -e . 2>/dev/null || python3 -m pip install -q -e .
python3 -c "import optuna, transformers" 2>/dev/null || python3 -m pip install -q "optuna>=5,<6" transformers
PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --device cuda 2>&1 | tee "${OUT:-benchmarks/results}/gpu.log"
