"""A small smoke run of bench/bench_flows.py (no timing assertions: benchmarks are not tests)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.flows.helpers import REPO, have


@pytest.mark.integration
@pytest.mark.skipif(not have("softflowd"), reason="softflowd not installed")
def test_bench_flows_smoke():
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_flows.py"),
                        "--packets", "20000", "--flows", "1000", "--rounds", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert any(line.startswith("gims ") for line in lines)
    assert any(line.startswith("softflowd ") and line.rstrip().endswith("x") for line in lines)
    assert "softflowd -r" in p.stdout      # the exact commands are printed
