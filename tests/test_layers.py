"""The package's shape holds: import-linter checks the contracts in pyproject.toml (stages import only from the
stages below them; no import cycle between the modules of a stage)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def test_the_layering_contracts_hold() -> None:
    lint = shutil.which("lint-imports")
    assert lint is not None, "import-linter is in the test extra: pip install -e '.[cpu,test]'"
    proc = subprocess.run([lint], cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 kept, 0 broken" in proc.stdout
