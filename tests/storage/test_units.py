"""The upload units as systemd reads them (systemd-analyze, offline)."""
from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "units"


def _parse(path: Path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, [])
            continue
        k, _, v = line.partition("=")
        out[section].append((k, v))
    return out


def test_path_unit_watches_the_experiment_spool():
    p = _parse(UNITS / "gims-upload@.path")["Path"]
    assert ("DirectoryNotEmpty", "/var/spool/gims/%i") in p
    assert ("Unit", "gims-upload@%i.service") in p


def test_service_gets_only_its_own_credential_and_spool():
    s = _parse(UNITS / "gims-upload@.service")["Service"]
    assert ("LoadCredential", "storage.json:/var/lib/gims/experiments/%i/storage.json") in s
    assert ("ExecStart", "/usr/bin/gims-upload --experiment %i") in s
    assert ("User", "gims-upload") in s and ("Group", "gims-spool") in s
    assert ("ReadWritePaths", "/var/spool/gims/%i") in s
    assert ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX") in s
    assert ("CapabilityBoundingSet", "") in s and ("NoNewPrivileges", "yes") in s


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_security_exposure_offline(tmp_path):
    # systemd-analyze needs a concrete instance to expand %i
    shutil.copy(UNITS / "gims-upload@.service", tmp_path / "gims-upload@exp1.service")
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                        "gims-upload@exp1.service"], cwd=tmp_path, capture_output=True, text=True)
    m = re.search(r"Overall exposure level for gims-upload@exp1.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 1.5, r.stdout
