"""The test harness itself: what its subprocesses run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import shadowgate_common
import shadowgate_operator
import shadowgate_router


def test_subprocesses_run_this_checkouts_code_whichever_venv_runs_the_tests() -> None:
    """`shadowgate operator`, the router and the model servers are started as `python -m ...`: they must import
    the code under test (tests/conftest.py puts pyproject's pythonpath on PYTHONPATH), not the copy a venv made in
    another checkout has installed."""
    modules = (shadowgate_operator, shadowgate_router, shadowgate_common)
    probe = "; ".join(["import " + module.__name__ for module in modules] + [
        "print(" + ", ".join(f"{module.__name__}.__file__" for module in modules) + ", sep='\\n')"
    ])  # fmt: skip
    started = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    here = [str(Path(module.__file__ or "").resolve()) for module in modules]
    assert [str(Path(line).resolve()) for line in started.stdout.split()] == here
