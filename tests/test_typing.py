"""The package type-checks: strictly where it ships alone (the runtime), by default elsewhere."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("arguments", [["--strict", "precsearch/runtime"], ["precsearch"]],
                         ids=["runtime-strict", "package"])
def test_mypy_passes(arguments: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", *arguments], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
