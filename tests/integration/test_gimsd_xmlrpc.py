"""The original AM's call sequence against gimsd in the sandbox node, over real XML-RPC:
gimsd (user gims, no capabilities) starts capture@/gims-upload@ units over D-Bus under the
polkit rule; gims-capture records the live traffic on gims-sb0; gims-upload delivers it to
local storage under /srv/gims. Files are read with tshark, an independent reader."""

import json
import socket
import subprocess
import time
import xmlrpc.client

import pytest

from tests.helpers import wait_for
from tests.integration.conftest import stats

pytestmark = pytest.mark.integration






def delivered(sandbox, exp):
    d = sandbox.path(f"/srv/gims/{exp}")
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix == ".pcap" and p.with_name(p.name + ".meta.json").exists())


def protocols(files):
    seen = set()
    for f in files:
        res = subprocess.run(["tshark", "-r", str(f), "-T", "fields", "-e", "ip.proto", "-e", "ipv6.nxt",
                              "-e", "_ws.expert.message"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        for line in res.stdout.splitlines():
            ip_proto, v6_next, expert = (line.split("\t") + ["", "", ""])[:3]
            assert "Malformed" not in expert, (f.name, expert)
            seen.add(("4", ip_proto) if ip_proto else ("6", v6_next))
    return seen


def restart_gimsd(sandbox):
    sandbox.systemctl("restart", "gimsd.service")

    def answering():
        try:
            socket.create_connection(("127.0.0.1", 8001), timeout=1).close()
            return True
        except OSError:
            return False
    assert wait_for(answering, 30), "gimsd did not come back after a restart"


def test_am_call_sequence_captures_and_delivers(sandbox, am, exp_id, upload_units):
    exp = exp_id
    ident = {"ExperimentId": exp}
    # configure in several partial calls, as the AM does
    am.configureExperiment({**ident, "SiteLocation": "sandbox", "DeviceName": "node1",
                            "CaptureSpec": {"filterexpr": "", "device": "gims-sb0"}})
    am.configureExperiment({**ident, "MetaDataSpec": {"UserText": "gims sandbox run"},
                            "TransformSpec": {"SampleSpec": {}, "AnonSpec": {}, "AggregationSpec": {}}})
    am.ConfigureExperiment({**ident, "StorageSpec": {"storagetype": "local", "storageparams": {
        "local_storage_dir": f"/srv/gims/{exp}", "rollover_interval": 0.05}}})  # 3 s files
    am.startExperiment(ident)
    unit = f"capture@{exp}.service"
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "active"
    assert sandbox.show(unit, "User")["User"] == "gims-capture"

    s = wait_for(lambda: (lambda s: s if s["files_uploaded"] >= 2 else None)(stats(am, exp)), 40)
    assert s, stats(am, exp)
    assert s["state"] == "running" and s["capture_enabled"] and s["capture_started"]
    assert s["capture_pid"] > 0 and s["packets_observed"] > 0 and s["bytes_observed"] > 0
    assert s["packets_after_sampling"] == s["packets_observed"]
    assert s["memory_consumed"] > 0 and s["cpu_time_user"] + s["cpu_time_system"] > 0
    assert s["storage_type"] == "local" and s["local_staging_folder"] == f"/var/spool/gims/{exp}"
    log = am.getStorageLog(ident, 20)
    assert "delivered" in log, log

    # gimsd restarted mid-experiment: it learns the state from systemd, not from memory
    pid_before = s["capture_pid"]
    restart_gimsd(sandbox)
    s2 = stats(am, exp)
    assert s2["state"] == "running" and s2["capture_pid"] == pid_before, s2
    assert s2["packets_observed"] >= s["packets_observed"]

    am.pauseExperiment(ident)
    assert stats(am, exp)["state"] == "paused"
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "inactive"
    am.resumeExperiment(ident)
    assert wait_for(lambda: stats(am, exp)["state"] == "running", 15)
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "active"
    time.sleep(3.5)

    am.stopExperiment(ident)
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "inactive"
    s = wait_for(lambda: (lambda s: s if s["delivered_all"] and s["files_pending"] == 0 else None)(stats(am, exp)), 40)
    assert s and s["state"] in ("stopped", "delivered"), stats(am, exp)
    state = am.getState()
    assert exp in state["experiments"]
    assert state["experiments"][exp]["state"] in ("stopped", "delivered")
    assert state["storage_backends"]["local"]["available"]

    files = delivered(sandbox, exp)
    assert len(files) >= 3, files
    assert s["files_uploaded"] >= len(files)
    for f in files:
        assert f.name.startswith(f"{exp}_SANDBOX_")
        meta = json.loads(f.with_name(f.name + ".meta.json").read_text())
        assert meta["experiment"] == exp and meta["data_file"] == f.name and meta["user_text"] == "gims sandbox run"
        assert meta["size"] == f.stat().st_size
        assert meta["anonymization"]["scheme"] is None
        assert meta["pcap_stats"]["ps_drop"] == 0
        assert meta["upload"]["sha256"] == meta["sha256"]
    seen = protocols(files)
    for want in [("4", "1"), ("4", "6"), ("4", "17"), ("6", "58"), ("6", "6"), ("6", "17")]:
        assert want in seen, f"no {want} (IP version, protocol) packets in {sorted(seen)}"
    # nothing left in the spool but hidden status files
    spool = sandbox.path(f"/var/spool/gims/{exp}")
    assert not [p.name for p in spool.iterdir() if not p.name.startswith(".")]
    # the capture's own log lines, found by the experiment field
    assert sandbox.journal(f"EXPERIMENT={exp}", "_SYSTEMD_UNIT=" + unit).strip()


def test_crashed_capture_is_reported(sandbox, am, exp_id, upload_units):
    exp = exp_id
    ident = {"ExperimentId": exp}
    am.configureExperiment({**ident, "CaptureSpec": {"filterexpr": "icmp", "device": "gims-sb0"},
                            "StorageSpec": {"storagetype": "local",
                                            "storageparams": {"local_storage_dir": f"/srv/gims/{exp}"}}})
    am.startExperiment(ident)
    assert stats(am, exp)["state"] == "running"
    # The capture process dies; when systemd restarts it, its settings have become unusable
    # (as after a disk error): it exits 2 and systemd gives up (RestartPreventExitStatus).
    sandbox.sh(f"echo '{{\"bogus_setting\": 1}}' > /var/lib/gims/experiments/{exp}/capture.json")
    sandbox.systemctl("kill", "--signal=SIGKILL", f"capture@{exp}.service")
    # systemd restarts it after RestartSec=5 s; the restarted process exits 2 and stays failed
    s = wait_for(lambda: (lambda s: s if s["state"] == "failed" and s["capture_unit"]["active_state"] == "failed"
                          else None)(stats(am, exp)), 30)
    assert s, stats(am, exp)
    assert s["capture_unit"]["result"] == "exit-code" and s["capture_unit"]["exec_main_status"] == 2, s
    assert "exit status 2" in s["failure_reason"], s["failure_reason"]
    restart_gimsd(sandbox)
    s = stats(am, exp)
    assert s["state"] == "failed" and s["failure_reason"], s
    am.stopExperiment(ident)


def test_malformed_requests_get_faults_and_server_stays_up(sandbox, am, gimsd_url):
    with pytest.raises(xmlrpc.client.Fault):
        am.configureExperiment({"ExperimentId": "../etc"})
    with pytest.raises(xmlrpc.client.Fault):
        am.startExperiment({"ExperimentId": "ssh.service"})
    with pytest.raises(xmlrpc.client.Fault):
        am.configureExperiment({"ExperimentId": "x1", "StorageSpec": {
            "storagetype": "local", "storageparams": {"local_storage_dir": "/etc"}}})
    assert "experiments" in am.getState()
    assert sandbox.show("gimsd.service", "ActiveState")["ActiveState"] == "active"
