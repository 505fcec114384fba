"""Processes killed with SIGKILL in the running node: the capture process mid-file, and gimsd
mid-experiment. What was produced is compared with what reached storage (target: nothing lost,
no truncated file delivered as complete)."""
import time

import pytest

from .conftest import (NodeConfig, unit_failures, SpoolWatcher, paced_blast, check_delivered_pcaps, configure_local, delivered_pcaps,
                       gimsd_answering, lost, record, stats, stop_and_drain, wait_for)

pytestmark = pytest.mark.integration


def test_capture_sigkill_mid_file_recovers_and_delivers(sandbox, am, exp_id, upload_units):
    exp = exp_id
    cfg = NodeConfig(sandbox)
    cfg.set(cfg.with_full_snaplen())
    try:
        _capture_sigkill(sandbox, am, exp)
    finally:
        cfg.restore()


def _capture_sigkill(sandbox, am, exp):
    t_start = time.time()
    ident = configure_local(am, exp, rollover_min=0.25)  # 15 s files: the kill lands mid-file
    unit = f"capture@{exp}.service"
    with SpoolWatcher(sandbox, exp) as watch:
        am.startExperiment(ident)
        pid1 = stats(am, exp)["capture_pid"]
        # a file is being written and already holds packets on disk: past the writer's 1 MiB
        # buffer (capture_daemon/spool.py), which the steady sandbox traffic takes minutes to fill
        assert wait_for(lambda: watch.partial, 20)
        # files rotate on 15 s wall-clock boundaries: blast early in one
        assert wait_for(lambda: time.time() % 15 < 6, 16, 0.1)
        paced_blast(1600 << 10, 2.0)
        assert wait_for(lambda: any(s > 256 << 10 for s in watch.partial.values()), 10), watch.partial
        sandbox.systemctl("kill", "-s", "KILL", unit)
        # systemd restarts it (Restart=on-failure, RestartSec=5); it recovers the partial file
        s = wait_for(lambda: (lambda s: s if s["state"] == "running" and s["capture_pid"] not in (0, pid1)
                              else None)(stats(am, exp)), 30)
        assert s, stats(am, exp)
        assert int(sandbox.show(unit, "NRestarts")["NRestarts"]) >= 1
        time.sleep(4)
        stop_and_drain(am, exp)
    files = delivered_pcaps(sandbox.path(f"/srv/gims/{exp}"))
    figures = check_delivered_pcaps(files)  # every delivered file whole, counts match metadata
    assert figures["recovered"] >= 1, [m.get("recovered") for _, m in files]
    missing = lost(watch.produced(), files)
    assert not missing, missing
    journal = sandbox.journal(f"EXPERIMENT={exp}", f"_SYSTEMD_UNIT={unit}")
    assert "recover" in journal.lower(), journal[-2000:]
    crashes = unit_failures(sandbox, [exp], t_start) - 1  # the injected SIGKILL
    assert crashes == 0, crashes
    record("test_process_faults::capture_sigkill", faults_injected=1,
           files_seen_in_spool=len(watch.produced()), files_lost=len(missing), crashes=crashes, **figures)


def test_gimsd_sigkill_mid_experiment_capture_and_uploads_carry_on(sandbox, am, exp_id, upload_units):
    exp = exp_id
    t_start = time.time()
    ident = configure_local(am, exp, rollover_min=0.05)  # 3 s files
    with SpoolWatcher(sandbox, exp) as watch:
        am.startExperiment(ident)
        before = wait_for(lambda: (lambda s: s if s["files_uploaded"] >= 1 else None)(stats(am, exp)), 30)
        assert before, stats(am, exp)
        gimsd_pid = sandbox.show("gimsd.service", "MainPID")["MainPID"]
        sandbox.systemctl("kill", "-s", "KILL", "gimsd.service")
        assert wait_for(lambda: not gimsd_answering() or
                        sandbox.show("gimsd.service", "MainPID")["MainPID"] != gimsd_pid, 10)
        # while gimsd is down the capture unit keeps running
        assert sandbox.show(f"capture@{exp}.service", "MainPID")["MainPID"] == str(before["capture_pid"])
        assert wait_for(gimsd_answering, 30), "gimsd was not restarted by systemd"
        assert sandbox.show("gimsd.service", "MainPID")["MainPID"] != gimsd_pid
        after = stats(am, exp)  # right afterwards: the truth from systemd and the spool
        assert after["state"] == "running" and after["capture_pid"] == before["capture_pid"], after
        assert after["packets_observed"] >= before["packets_observed"]
        # uploads carry on
        assert wait_for(lambda: stats(am, exp)["files_uploaded"] >= after["files_uploaded"] + 2, 30), stats(am, exp)
        stop_and_drain(am, exp)
    files = delivered_pcaps(sandbox.path(f"/srv/gims/{exp}"))
    figures = check_delivered_pcaps(files)
    missing = lost(watch.produced(), files)
    assert not missing, missing
    assert int(sandbox.show(f"capture@{exp}.service", "NRestarts")["NRestarts"]) == 0
    crashes = unit_failures(sandbox, [exp], t_start) - 1  # the injected SIGKILL of gimsd
    assert crashes == 0, crashes
    record("test_process_faults::gimsd_sigkill", faults_injected=1, files_seen_in_spool=len(watch.produced()),
           files_lost=len(missing), crashes=crashes, **figures)


def test_gimsd_restart_does_not_restart_a_capture_stopped_by_hand(sandbox, am, exp_id, upload_units):
    """Only a node reboot brings a running experiment's capture back: a capture unit an operator
    stopped (and systemd then forgot) stays stopped across a gimsd restart, reported as such."""
    exp = exp_id
    ident = configure_local(am, exp)
    am.startExperiment(ident)
    unit = f"capture@{exp}.service"
    sandbox.systemctl("stop", unit)
    sandbox.systemctl("reset-failed", unit, check=False)
    sandbox.systemctl("restart", "gimsd.service")
    assert wait_for(gimsd_answering, 30)
    time.sleep(2)
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "inactive"
    s = stats(am, exp)
    assert s["state"] == "exited" and "ended on its own" in s["failure_reason"], s
    assert "started again after a node restart" not in sandbox.journal("SYSLOG_IDENTIFIER=gimsd", f"EXPERIMENT={exp}")
    am.stopExperiment(ident)
