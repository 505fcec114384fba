"""The sandbox itself: a real systemd as PID 1 of its own namespaces, gims installed into
it, and the host left exactly as it was (users, units, polkit rules, state, /tmp)."""

import subprocess

import pytest

from .conftest import host_snapshot

pytestmark = pytest.mark.integration


def test_node_runs_systemd_with_gims_installed(sandbox):
    assert sandbox.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert sandbox.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded")
    passwd = sandbox.path("/etc/passwd").read_text()
    for user in ("gims", "gims-capture", "gims-upload"):
        assert f"\n{user}:" in passwd
    group = sandbox.path("/etc/group").read_text()
    members = next(line for line in group.splitlines() if line.startswith("gims-spool:")).split(":")[3]
    assert set(members.split(",")) == {"gims", "gims-capture", "gims-upload"}
    assert sandbox.path("/etc/polkit-1/rules.d/50-gims.rules").exists()
    for d, mode, owner in (("/var/lib/gims", 0o750, "gims"), ("/var/spool/gims", 0o750, "root"),
                           ("/srv/gims", 0o2775, "gims-upload")):
        st = sandbox.path(d).stat()
        assert st.st_mode & 0o7777 == mode, d
        assert st.st_uid == (0 if owner == "root" else sandbox.ids(owner)[0]), d
    # the node's units: only what units/ holds, plus the masks of early-boot units
    units = sandbox.run("systemctl", "list-unit-files", "--no-legend", "capture@*", "gimsd*", "gims-*").stdout
    assert "capture@.service" in units and "gimsd.service" in units


def test_host_is_left_alone(sandbox):
    if sandbox.host_before is None:
        pytest.skip("the sandbox was already up before this session: no snapshot of the host before it")
    assert host_snapshot() == sandbox.host_before
    assert sandbox.tmp_marker.read_text() == "must survive the sandbox"  # the host's /tmp kept


def test_up_again_says_already_up(sandbox):
    res = subprocess.run([str(sandbox.state_repo / "sandbox/up.sh")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "already up" in res.stdout, res.stdout + res.stderr
