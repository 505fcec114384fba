"""The real gims-capture (capture_daemon.cli) in capture@<id>.service, started and stopped
over D-Bus by gimsd's user through UnitManager under the polkit rule, capturing the sandbox's
live traffic on gims-sb0. Files are checked with tshark, an independent reader."""

import json
import subprocess
import time

import pytest

pytestmark = pytest.mark.integration

RUN_UNIT = """
import json, sys, time
from gimsd.systemd import UnitManager, UnitError
um = UnitManager(job_timeout=60)
unit, action = sys.argv[1], sys.argv[2]
out = {}
try:
    out["job"] = getattr(um, action)(unit)
except UnitError as e:
    out["error"] = str(e)
out["status"] = um.unit_status(unit)
print(json.dumps(out))
"""


def unit_call(sandbox, unit, action):
    res = sandbox.run(sandbox.python, "-c", f"import sys; sys.path.insert(0, {str(sandbox.repo)!r})\n" + RUN_UNIT,
                      unit, action, user="gims", timeout=120)
    return json.loads(res.stdout)


def capture_settings(exp, **over):
    cfg = {"experiment": exp, "site": "SANDBOX", "interface": "gims-sb0", "read": None,
           "output_dir": f"/var/spool/gims/{exp}", "filter": "", "snaplen": 256,
           "promiscuous": True, "timeout_ms": 200, "buffer_bytes": 1 << 20, "sample": "none",
           "anon_key_hex": None, "aggregate": "pcap", "rollover_seconds": 3, "stats_interval": 1,
           "user_text": "integration test"}
    cfg.update(over)
    return cfg


def finished_files(sandbox, exp):
    d = sandbox.path(f"/var/spool/gims/{exp}")
    return sorted(p for p in d.iterdir() if not p.name.startswith(".") and not p.name.endswith(".meta.json")
                  and (d / (p.name + ".meta.json")).exists())


def tshark_fields(path):
    res = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "ip.proto", "-e", "ipv6.nxt",
                          "-e", "_ws.expert.message"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [line.split("\t") for line in res.stdout.splitlines()]


def test_capture_unit_records_live_traffic(sandbox, exp_id):
    sandbox.write_capture_config(exp_id, capture_settings(exp_id))
    unit = f"capture@{exp_id}.service"
    out = unit_call(sandbox, unit, "start_unit")
    assert out.get("job") == "done", out
    assert out["status"]["active_state"] == "active"
    # files rotate every 3 s; wait for a few with their metadata
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(finished_files(sandbox, exp_id)) < 2:
        time.sleep(0.5)
    running = unit_call(sandbox, unit, "unit_status")["status"]
    counters = dict(kv.split("=", 1) for kv in running["status_text"].split() if "=" in kv)
    assert int(counters.get("packets_observed", 0)) > 0, running["status_text"]
    out = unit_call(sandbox, unit, "stop_unit")
    assert out.get("job") == "done", out
    assert out["status"]["result"] == "success", out["status"]  # SIGTERM: clean exit 0
    files = finished_files(sandbox, exp_id)
    assert len(files) >= 2, [p.name for p in sandbox.path(f"/var/spool/gims/{exp_id}").iterdir()]
    protos = set()
    for f in files:
        assert f.name.startswith(f"{exp_id}_SANDBOX_") and f.suffix == ".pcap"
        meta = json.loads(f.with_name(f.name + ".meta.json").read_text())
        assert meta["experiment"] == exp_id and meta["data_file"] == f.name
        assert meta["size"] == f.stat().st_size
        assert meta["pcap_stats"]["ps_drop"] == 0
        st = f.stat()
        assert oct(st.st_mode & 0o777) == "0o640"  # UMask=0027: group gims-spool may read (upload)
        for ip_proto, v6_next, expert in tshark_fields(f):
            assert "Malformed" not in expert, (f.name, expert)
            protos.add(("4", ip_proto) if ip_proto else ("6", v6_next))
    for want in [("4", "1"), ("4", "6"), ("4", "17"), ("6", "58"), ("6", "6"), ("6", "17")]:
        assert want in protos, f"no {want} (IP version, protocol) packets in {sorted(protos)}"
    # the unit's own logs carry EXPERIMENT=<id>
    assert sandbox.journal(f"EXPERIMENT={exp_id}").strip(), "no journal entries with EXPERIMENT="


def test_capture_unit_with_bad_settings_fails_with_reason(sandbox, exp_id):
    sandbox.write_capture_config(exp_id, capture_settings(exp_id, no_such_setting=1))
    unit = f"capture@{exp_id}.service"
    out = unit_call(sandbox, unit, "start_unit")
    assert "error" in out and "exit status 2" in out["error"], out
    st = out["status"]
    assert (st["active_state"], st["result"], st["exec_main_status"]) == ("failed", "exit-code", 2)
    assert st["n_restarts"] == 0  # RestartPreventExitStatus=2: no retry loop on bad settings
    assert "no_such_setting" in sandbox.journal("-u", unit)


def test_capture_unit_bad_interface_fails(sandbox, exp_id):
    sandbox.write_capture_config(exp_id, capture_settings(exp_id, interface="gims-nope0"))
    out = unit_call(sandbox, f"capture@{exp_id}.service", "start_unit")
    assert "error" in out and out["status"]["active_state"] in ("failed", "activating"), out


def test_capture_loop_feeds_the_watchdog(sandbox, exp_id):
    """WatchdogSec shortened to 2 s for this instance only: a live capture keeps running on
    its own pings; a frozen one (SIGSTOP) is killed by systemd and restarted."""
    unit = f"capture@{exp_id}.service"
    sandbox.write_capture_config(exp_id, capture_settings(exp_id, rollover_seconds=60))
    sandbox.sh(f"mkdir -p /etc/systemd/system/{unit}.d && cat > /etc/systemd/system/{unit}.d/50-test-watchdog.conf"
               " && systemctl daemon-reload",
               input="[Service]\nWatchdogSec=2\nTimeoutAbortSec=1\nRestartSec=1\n")
    try:
        out = unit_call(sandbox, unit, "start_unit")
        assert out.get("job") == "done", out
        pid = out["status"]["main_pid"]
        time.sleep(6)  # three watchdog periods
        st = unit_call(sandbox, unit, "unit_status")["status"]
        assert (st["active_state"], st["main_pid"], st["n_restarts"]) == ("active", pid, 0), st
        sandbox.systemctl("kill", "--signal=SIGSTOP", unit)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = unit_call(sandbox, unit, "unit_status")["status"]
            if st["n_restarts"] >= 1 and st["active_state"] == "active":
                break
            time.sleep(0.5)
        assert st["n_restarts"] >= 1 and st["main_pid"] != pid, st
        assert "Watchdog timeout" in sandbox.journal("-u", unit)
    finally:
        sandbox.sh(f"rm -rf /etc/systemd/system/{unit}.d && systemctl daemon-reload")
