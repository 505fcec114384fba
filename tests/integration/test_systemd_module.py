"""gimsd/systemd.py without a bus: the unit-name gate and the cgroup CPU readers."""

import pytest

from gimsd.systemd import UINT64_MAX, UnitError, UnitManager, check_unit_name, read_cgroup_cpu


@pytest.mark.parametrize("name", [
    "capture@exp1.service", "capture@A.service", "capture@a_b.c-d.service",
    "gims-upload@exp1.service", "gims-upload@exp1.path", "capture@" + "x" * 64 + ".service",
])
def test_own_unit_names_pass(name):
    assert check_unit_name(name) == name


@pytest.mark.parametrize("name", [
    "ssh.service", "capture@.service", "capture@x.service.d", "capturex@y.service",
    "xcapture@y.service", "capture@-x.service", "capture@.x.service", "capture@x/../y.service",
    "capture@x y.service", "capture@x\x00.service", "gims-upload@x.timer",
    "capture@x.service\n", "capture@é.service", "capture@" + "x" * 65 + ".service",
    "gims-spool@x.service", "", None, 5,
])
def test_other_names_are_refused(name):
    with pytest.raises(UnitError, match="refused unit name"):
        check_unit_name(name)


def test_manager_refuses_before_touching_dbus():
    # bus_address points nowhere: a refused name must fail on the name, not on the bus
    um = UnitManager(bus_address="unix:path=/nonexistent/gims-test-bus")
    try:
        for call in (um.start_unit, um.stop_unit, um.restart_unit, um.reset_failed, um.unit_status):
            with pytest.raises(UnitError, match="refused unit name"):
                call("ssh.service")
        with pytest.raises(UnitError, match="system bus"):
            um.unit_status("capture@x.service")
    finally:
        um.close()


def test_cpu_from_cgroup_v2(tmp_path):
    d = tmp_path / "system.slice" / "capture@x.service"
    d.mkdir(parents=True)
    (d / "cpu.stat").write_text("usage_usec 3000\nuser_usec 2000\nsystem_usec 1000\n")
    assert read_cgroup_cpu("/system.slice/capture@x.service", roots=(str(tmp_path),)) == (2000, 1000)


def test_cpu_unknown_when_no_cgroup(tmp_path):
    assert read_cgroup_cpu("", roots=(str(tmp_path),)) == (UINT64_MAX, UINT64_MAX)
    assert read_cgroup_cpu("/nope.service", roots=(str(tmp_path),)) == (UINT64_MAX, UINT64_MAX)
