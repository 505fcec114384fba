"""The upload benchmark still runs (tiny file, one round). No timing is asserted."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.integration
def test_bench_upload_smoke():
    if os.geteuid() != 0:
        pytest.skip("the benchmark starts sshd, which needs root")
    r = subprocess.run([sys.executable, "bench/bench_upload.py", "--size-mb", "2", "--rounds", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "S3 (moto)" in r.stdout and "SFTP (OpenSSH sshd)" in r.stdout
    assert "gims-upload --once" in r.stdout
