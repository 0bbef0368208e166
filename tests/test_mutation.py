"""The mutation check (scripts/mutation_check.py) as a slow test: every deliberate formula bug in the heads, losses
and metrics must make at least one test fail."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_mutation_is_killed():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "mutation_check.py")], capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
