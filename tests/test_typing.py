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
def test_mypy_passes(arguments: list[str], request: pytest.FixtureRequest) -> None:
    cache = ROOT / ".mypy_cache" / request.node.callspec.id   # one per strictness, or each run undoes the other's
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *arguments], cwd=ROOT,
                            capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
