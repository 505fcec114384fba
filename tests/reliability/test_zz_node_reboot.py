"""The whole node rebooted mid-experiment: experiments that were running resume.

The sandbox's /etc, /var and /srv normally live in in-memory overlays that vanish with the
node, so this test brings the node up with GIMS_SANDBOX_KEEP (sandbox/boot.sh: the overlays'
upper layers in a host directory), starts an experiment, cuts the power (sandbox/down.sh
SIGKILLs the node's PID 1: every process dies at once, nothing is shut down cleanly), boots
it again with the same directory and checks that gimsd, started at boot, starts the capture
again (gimsd.api.restore_after_boot against the real systemd) and that the file cut short by
the power cut is recovered and delivered with the rest. Named zz so it runs last: it replaces
the session's node, and leaves a fresh plain one for whatever comes after."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import read_state

from .conftest import (REPO_ROOT, NodeConfig, SpoolWatcher, paced_blast, check_delivered_pcaps, configure_local, delivered_pcaps,
                       gimsd_answering, lost, record, unit_failures, stats, stop_and_drain, wait_for)

pytestmark = pytest.mark.integration


def _down():
    res = subprocess.run([str(REPO_ROOT / "sandbox/down.sh")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _up(sandbox, keep: str | None):
    env = dict(os.environ, GIMS_SANDBOX_PYTHON=sys.executable)
    env.pop("GIMS_SANDBOX_KEEP", None)
    if keep:
        env["GIMS_SANDBOX_KEEP"] = keep
    res = subprocess.run([str(REPO_ROOT / "sandbox/up.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    sandbox.__init__(read_state())  # the session's handle now points at the new node
    assert wait_for(gimsd_answering, 30)


def test_node_reboot_resumes_running_experiments(sandbox, am, upload_units):
    keep = f"/tmp/gims-reliab-keep.{os.getpid()}"  # outside /etc /var /srv /run (boot.sh)
    exp = "reboot1"
    try:
        _down()
        _up(sandbox, keep)
        cfg = NodeConfig(sandbox)
        cfg.set(cfg.with_full_snaplen())  # kept across the reboot, like the rest of /etc
        ident = configure_local(am, exp, rollover_min=0.25)  # 15 s files: the cut lands mid-file
        with SpoolWatcher(sandbox, exp) as watch:
            am.startExperiment(ident)
            before = stats(am, exp)
            assert before["state"] == "running", before
            # data on disk in the current file (past the writer's 1 MiB buffer), early in a file
            assert wait_for(lambda: time.time() % 15 < 6, 16, 0.1)
            paced_blast(1600 << 10, 2.0)
            assert wait_for(lambda: any(s > 256 << 10 for s in watch.partial.values()), 10), watch.partial
        produced_before = watch.produced()
        assert produced_before, "nothing was being written before the power cut"
        t_cut = time.monotonic()
        _down()  # power cut
        _up(sandbox, keep)  # boot
        s = wait_for(lambda: (lambda s: s if s["state"] == "running" and s["capture_pid"] > 0 else None)(
            stats(am, exp)), 60)
        assert s, stats(am, exp)
        resumed_after = time.monotonic() - t_cut
        assert s["capture_pid"] != before["capture_pid"]
        assert sandbox.journal("SYSLOG_IDENTIFIER=gimsd", f"EXPERIMENT={exp}").count("started again after a node restart") == 1
        with SpoolWatcher(sandbox, exp) as watch2:
            assert wait_for(lambda: stats(am, exp)["packets_observed"] > 0, 20)
            time.sleep(3)
            stop_and_drain(am, exp, timeout=90)
        files = delivered_pcaps(sandbox.path(f"/srv/gims/{exp}"))
        figures = check_delivered_pcaps(files)
        produced = produced_before | watch2.produced()
        missing = lost(produced, files)
        assert not missing, (missing, [p.name for p, _ in files])
        assert figures["recovered"] >= 1, "the file cut short by the power cut was not recovered"
        crashes = unit_failures(sandbox, [exp], 0)  # this boot's journal only (volatile)
        assert crashes == 0, crashes
        record("test_zz_node_reboot::power_cut", faults_injected=1, files_seen_in_spool=len(produced),
               files_lost=len(missing), resumed_after_seconds=round(resumed_after, 1), crashes=crashes, **figures)
    finally:
        _down()
        shutil.rmtree(keep, ignore_errors=True)
        _up(sandbox, None)
