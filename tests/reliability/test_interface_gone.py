"""The capture interface disappears mid-capture (a veth made for this test is deleted): the
experiment shows a clear failed state with the reason in getExperimentStats, not a hang."""
import os
import re
import subprocess
import time

import pytest

from .conftest import NodeConfig, configure_local, record, stats, wait_for

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
        subprocess.run(["ip", "link", "del", ifname], check=True)
        s = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(stats(am, exp)), 90, 1.0)
        took = time.monotonic() - t0
        assert s, stats(am, exp)
        reason = s["failure_reason"]
        assert f"capture@{exp}.service failed" in reason, reason
        journal = sandbox.journal(f"EXPERIMENT={exp}", f"_SYSTEMD_UNIT=capture@{exp}.service")
        assert ifname in journal, journal[-3000:]
        # gimsd stays responsive; the state is stable (no restart loop hidden behind it)
        assert stats(am, exp)["state"] == "failed"
        record("test_interface_gone::veth_deleted", faults_injected=1, seconds_to_failed=round(took, 1),
               failure_reason=reason[:200], hang=False)
        am.stopExperiment(ident)
    finally:
        subprocess.run(["ip", "link", "del", ifname], capture_output=True)
        cfg.restore()
