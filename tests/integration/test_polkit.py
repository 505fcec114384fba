"""polkit/50-gims.rules against the real polkitd and systemd in the sandbox: gimsd's user
may start/stop/restart/reset-failed exactly capture@<id>.service and gims-upload@<id>.*,
nothing else. Calls go through busctl (not gimsd's code), as the users themselves."""

import pytest

pytestmark = pytest.mark.integration

MANAGER = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
REFUSALS = ("Interactive authentication required", "Access denied", "Permission denied")


def call(sandbox, user, method, signature, *args):
    return sandbox.run("busctl", "call", *MANAGER, method, signature, *args, user=user, check=False)


def test_gims_may_start_and_stop_a_capture_unit(sandbox, exp_id):
    sandbox.install_probe(exp_id, {"linger": 30})
    unit = f"capture@{exp_id}.service"
    res = call(sandbox, "gims", "StartUnit", "ss", unit, "replace")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("o "), res.stdout  # a job object path
    for _ in range(50):
        if sandbox.show(unit, "ActiveState")["ActiveState"] == "active":
            break
        sandbox.run("sleep", "0.2")
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "active"
    res = call(sandbox, "gims", "RestartUnit", "ss", unit, "replace")
    assert res.returncode == 0, res.stderr
    res = call(sandbox, "gims", "StopUnit", "ss", unit, "replace")
    assert res.returncode == 0, res.stderr


def test_gims_may_reset_a_failed_capture_unit(sandbox, exp_id):
    sandbox.install_probe(exp_id, {"fail": "on purpose"})
    unit = f"capture@{exp_id}.service"
    sandbox.systemctl("start", unit, check=False)
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "failed"
    res = call(sandbox, "gims", "ResetFailedUnit", "s", unit)
    assert res.returncode == 0, res.stderr
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "inactive"


@pytest.mark.parametrize("unit", [
    "ssh.service",
    "systemd-journald.service",
    "dbus.service",
    "gimsd.service",
    "gims-spool@x.service",       # our own helper: systemd pulls it in, gimsd may not start it
    "capturex@y.service",
    "xcapture@y.service",
    "capture@y.service.bak",
    "capture@y.socket",
    "capture@y.timer",
    "gims-upload@y.timer",
    "gims-upload@y.socket",
    "gims-uploadx@y.service",
    "capture@.service",
])
def test_gims_is_refused_any_other_unit(sandbox, unit):
    res = call(sandbox, "gims", "StartUnit", "ss", unit, "replace")
    assert res.returncode != 0, f"gims could start {unit}"
    assert any(r in res.stderr for r in REFUSALS + ("not valid", "missing the instance name")), res.stderr
    res = call(sandbox, "gims", "StopUnit", "ss", unit, "replace")
    assert res.returncode != 0, f"gims could stop {unit}"


def test_invalid_names_never_reach_a_unit(sandbox):
    for unit in ("capture@x.service.d", "capture@x.service/../ssh.service", "capture@../x.service"):
        res = call(sandbox, "gims", "StartUnit", "ss", unit, "replace")
        assert res.returncode != 0, unit


def test_gims_may_not_use_other_verbs_on_its_units(sandbox, exp_id):
    sandbox.install_probe(exp_id, {"linger": 30})
    unit = f"capture@{exp_id}.service"
    sandbox.systemctl("start", unit)
    # kill: not one of start/stop/restart/reset-failed
    res = call(sandbox, "gims", "KillUnit", "ssi", unit, "all", "9")
    assert res.returncode != 0 and any(r in res.stderr for r in REFUSALS), res.stderr
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "active"
    # a transient unit carries no "unit" detail for polkit: refused
    res = call(sandbox, "gims", "StartTransientUnit", "ssa(sv)a(sa(sv))", f"capture@{exp_id}x.service",
               "replace", "1", "ExecStart", "a(sasb)", "1", "/bin/true", "1", "/bin/true", "false", "0")
    assert res.returncode != 0 and any(r in res.stderr for r in REFUSALS), res.stderr
    # changing unit files / reloading systemd: refused
    res = call(sandbox, "gims", "Reload", "")
    assert res.returncode != 0 and any(r in res.stderr for r in REFUSALS), res.stderr


def test_other_users_are_refused_gims_units(sandbox, exp_id):
    sandbox.install_probe(exp_id, {"linger": 30})
    for user in ("gims-capture", "gims-upload", "nobody"):
        res = call(sandbox, user, "StartUnit", "ss", f"capture@{exp_id}.service", "replace")
        assert res.returncode != 0 and any(r in res.stderr for r in REFUSALS), (user, res.stderr)
    assert sandbox.show(f"capture@{exp_id}.service", "ActiveState")["ActiveState"] == "inactive"
