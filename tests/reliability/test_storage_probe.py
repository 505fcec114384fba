"""testExperimentStorage runs the storage probe the way uploads run: as
gims-upload-probe@<id>.service (user gims-upload, the storage.json credential, the upload
unit's sandbox), started by gimsd over D-Bus under the polkit rule — not inside gimsd, whose
ProtectSystem=strict sandbox made every local-storage test fail with a read-only file system
(the original's "testing local storage always failed" bug)."""
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT, configure_local, record

pytestmark = pytest.mark.integration


def test_probe_of_good_local_dir_says_ok(sandbox, am, exp_id, upload_units):
    exp = exp_id
    ident = configure_local(am, exp)
    answer = am.testExperimentStorage(ident)
    assert answer.startswith("OK: local storage"), answer
    assert f"/srv/gims/{exp}" in answer, answer
    unit = f"gims-upload-probe@{exp}.service"
    props = sandbox.show(unit, "User", "Result", "ExecMainStatus", "ActiveState")
    # it really ran as the upload user, in its own unit, and succeeded
    assert props["User"] == "gims-upload" and props["Result"] == "success", props
    assert props["ExecMainStatus"] == "0" and props["ActiveState"] == "inactive", props
    journal = sandbox.journal(f"EXPERIMENT={exp}", "SYSLOG_IDENTIFIER=gims-upload-probe")
    assert "OK: probe object written, read back and deleted" in journal, journal
    # the probe object is gone again; the probe left nothing visible in the spool
    left = [p.name for p in sandbox.path(f"/srv/gims/{exp}").iterdir()]
    assert not left, left
    assert not [p.name for p in sandbox.path(f"/var/spool/gims/{exp}").iterdir() if not p.name.startswith(".")]
    # a second test right away is not refused by a start limit
    assert am.testExperimentStorage(ident).startswith("OK:")
    record("test_storage_probe::good_dir", faults_injected=0, probes=2, probes_ok=2)


def test_probe_of_dir_upload_user_cannot_write_says_why(sandbox, am, exp_id, upload_units):
    exp = exp_id
    target = f"/srv/gims/{exp}-ro"
    # root-owned 0755: gimsd's config allows the root, but the upload user cannot write there
    sandbox.sh(f"install -d -o root -g root -m 0755 {target}")
    ident = configure_local(am, exp, storage_dir=target)
    answer = am.testExperimentStorage(ident)
    assert answer.startswith("FAILED: local storage"), answer
    assert "ermission denied" in answer and target in answer, answer
    assert "read-only file system" not in answer.lower(), answer
    props = sandbox.show(f"gims-upload-probe@{exp}.service", "User", "Result", "ExecMainStatus")
    assert props["User"] == "gims-upload" and props["Result"] == "exit-code" and props["ExecMainStatus"] == "1", props
    # gimsd stays up and the experiment is still usable
    assert "experiments" in am.getState()
    record("test_storage_probe::unwritable_dir", faults_injected=1, probes=1, probes_failed_with_reason=1)


def test_am_demo_storage_check_prints_ok(sandbox, gimsd_url, upload_units):
    exp = f"demo-reliab-{sandbox.node_pid}"
    try:
        res = subprocess.run([sys.executable, str(REPO_ROOT / "tools/am_demo.py"), "--url", gimsd_url,
                              "--experiment", exp, "--storage-dir", f"/srv/gims/{exp}", "--seconds", "4"],
                             capture_output=True, text=True, timeout=150)
    finally:
        for unit in (f"capture@{exp}.service", f"gims-upload@{exp}.path", f"gims-upload@{exp}.service"):
            sandbox.systemctl("stop", unit, check=False)
    lines = [ln for ln in res.stdout.splitlines() if "storage check:" in ln]
    assert lines and "storage check: OK: local storage" in lines[0], res.stdout + res.stderr
    assert res.returncode == 0, res.stdout + res.stderr


MANAGER = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
REFUSALS = ("Interactive authentication required", "Access denied", "Permission denied")


def test_polkit_lets_gimsd_start_the_probe_and_nothing_more(sandbox, exp_id):
    """The rule allows gims exactly StartUnit of gims-upload-probe@<id>.service (real polkitd)."""
    unit = f"gims-upload-probe@{exp_id}.service"

    def call(user, method, sig, *args):
        return sandbox.run("busctl", "call", *MANAGER, method, sig, *args, user=user, check=False)
    # allowed: a job is queued (the probe itself then fails: this experiment has no storage.json)
    res = call("gims", "StartUnit", "ss", unit, "replace")
    assert res.returncode == 0 and res.stdout.startswith("o "), res.stderr
    for method, sig, args in (("StopUnit", "ss", (unit, "replace")), ("RestartUnit", "ss", (unit, "replace")),
                              ("ResetFailedUnit", "s", (unit,)), ("KillUnit", "ssi", (unit, "all", "9"))):
        res = call("gims", method, sig, *args)
        assert res.returncode != 0 and any(r in res.stderr for r in REFUSALS), (method, res.stderr)
    for bad in ("gims-upload-probe@x.path", "gims-upload-probex@y.service", "gims-upload-probe@.service"):
        res = call("gims", "StartUnit", "ss", bad, "replace")
        assert res.returncode != 0, bad
    for user in ("gims-upload", "gims-capture", "nobody"):
        res = call(user, "StartUnit", "ss", unit, "replace")
        assert res.returncode != 0 and any(r in res.stderr for r in REFUSALS), (user, res.stderr)
    sandbox.systemctl("reset-failed", unit, check=False)
