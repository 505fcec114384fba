"""The capture interface disappears mid-capture (a veth made for this test is deleted): the
experiment shows a clear failed state with the reason in getExperimentStats, not a hang."""
import os
import re
import subprocess
import time

import pytest

from .conftest import NodeConfig, unit_failures, configure_local, record, stats, wait_for

pytestmark = pytest.mark.integration


def test_interface_deleted_mid_capture_is_a_clear_failure(sandbox, am, exp_id, upload_units):
    exp = exp_id
    ifname = f"gimsrl{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", ifname, "type", "veth", "peer", "name", ifname + "p"], check=True)
    cfg = NodeConfig(sandbox)
    try:
        for i in (ifname, ifname + "p"):
            subprocess.run(["ip", "link", "set", i, "up"], check=True)
        cfg.set(re.sub(r'allowed_interfaces = \[([^\]]*)\]', rf'allowed_interfaces = [\1, "{ifname}"]', cfg.original))
        ident = configure_local(am, exp, device=ifname)
        am.startExperiment(ident)
        s = stats(am, exp)
        assert s["state"] == "running" and s["capture_pid"] > 0, s
        time.sleep(2)
        t0 = time.monotonic()
        t_wall = time.time() - 1
        subprocess.run(["ip", "link", "del", ifname], check=True)
        # the capture process ends (libpcap's error), systemd restarts it once, the restarted one
        # finds no such interface and exits 2 (RestartPreventExitStatus): failed for good
        s = wait_for(lambda: (lambda s: s if s["state"] == "failed" and s["capture_unit"]["exec_main_status"] == 2
                              else None)(stats(am, exp)), 60, 1.0)
        took = time.monotonic() - t0
        assert s, stats(am, exp)
        reason = s["failure_reason"]
        assert f"capture@{exp}.service failed" in reason, reason
        assert f"cannot capture on '{ifname}': no such network interface" in reason, reason
        journal = sandbox.journal(f"EXPERIMENT={exp}", f"_SYSTEMD_UNIT=capture@{exp}.service")
        assert f"capture from interface {ifname} failed" in journal, journal[-3000:]
        # stable: no restart loop hidden behind it (RestartSec=5 would have fired by now)
        time.sleep(6)
        again = stats(am, exp)
        assert again["state"] == "failed" and again["capture_unit"]["active_state"] == "failed", again
        # expected: the capture that lost its interface and the restarted one that found none
        crashes = unit_failures(sandbox, [exp], t_wall) - 2
        assert crashes == 0, crashes
        record("test_interface_gone::veth_deleted", faults_injected=1, seconds_to_failed=round(took, 1),
               failure_reason=reason[:200], crashes=crashes)
        am.stopExperiment(ident)
    finally:
        subprocess.run(["ip", "link", "del", ifname], capture_output=True)
        cfg.restore()
