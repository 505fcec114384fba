"""The C accelerators are built where the suite runs in CI, and their absence is reported."""
import os
import subprocess
import sys

import pytest

from capture_daemon import accel
from tests.helpers import REPO, TRACES

# Runs gims-capture with every capture_daemon._accel_* import failing, as on a machine where
# they were never built.
WITHOUT_ACCELERATORS = """
import sys, importlib.abc
class NotBuilt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith("capture_daemon._accel_"):
            raise ImportError(f"{name} not built")
sys.meta_path.insert(0, NotBuilt())
from capture_daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_every_accelerator_is_built_in_ci():
    assert "read" in accel.names()
    if not os.environ.get("GIMS_CI") and accel.missing():
        pytest.skip(f"not built here: {accel.missing()} (make build); CI requires them")
    assert accel.missing() == [], "C accelerators not built: run make build"


def test_a_capture_without_accelerators_says_so_and_still_works(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", WITHOUT_ACCELERATORS, "--read", TRACES[0],
                        "--output-dir", str(out), "--experiment", "x", "--site", "S"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "C accelerators not built (" in p.stderr and "read" in p.stderr
    [pcap] = out.glob("*.pcap")
    assert pcap.read_bytes() == open(TRACES[0], "rb").read()
