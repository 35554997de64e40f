"""The layer contract of ../shared/DESIGN.md (pyproject's [tool.importlinter]): no module
imports from a layer above its own, function-level imports included. The same check as
``make lint``, so that CI (which runs ``make test``) enforces it too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_no_module_imports_from_a_layer_above_it():
    executable = Path(sys.executable).with_name("lint-imports")
    if not executable.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([str(executable), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
