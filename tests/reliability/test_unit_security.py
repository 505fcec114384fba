"""systemd's own view of each unit's sandbox: `systemd-analyze security --offline=true`
(systemd >= 252) on the unit files as shipped. The scores are recorded in docs/SECURITY.md
with the reasons for what remains; this test fails when a unit gets more exposed than that."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import record

REPO = Path(__file__).resolve().parents[2]
# exposure ceilings (0 = fully sandboxed, 10 = unprotected); the issue asks at most 1.5 for
# capture@; the others are held at what docs/SECURITY.md records
CEILINGS = {"capture@.service": 1.5, "gimsd.service": 1.3, "gims-upload@.service": 1.1,
            "gims-upload-probe@.service": 1.1, "gims-spool@.service": 1.4}


def exposure(unit: str) -> tuple[float, list[str]]:
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                          str(REPO / "units" / unit)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    open_items = [re.sub(r"\s+", " ", line.strip()) for line in res.stdout.splitlines() if line.lstrip().startswith("✗")]
    return float(m.group(1)), open_items


@pytest.mark.parametrize("unit", sorted(CEILINGS))
def test_unit_exposure_within_recorded_ceiling(unit):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    probe = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True)
    if "--offline" not in probe.stdout:
        pytest.skip("this systemd-analyze has no --offline (needs systemd >= 252)")
    score, open_items = exposure(unit)
    record(f"test_unit_security::{unit}", exposure=score, open_items=len(open_items))
    assert score <= CEILINGS[unit], (unit, score, open_items)
    # no capability but CAP_NET_RAW for capture, none at all for gimsd and the upload units
    if unit in ("gimsd.service", "gims-upload@.service", "gims-upload-probe@.service"):
        assert not [i for i in open_items if "Capabilit" in i], open_items
