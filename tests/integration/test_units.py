"""The units in the sandbox's real systemd: capture@'s sandbox gives gims-capture what it
needs and nothing more, systemd-analyze's exposure scores, UnitManager (gimsd/systemd.py)
driving capture units over D-Bus as user gims under the polkit rule, failures reported."""

import json
import re
import subprocess
import time

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.integration




def probe_result(sandbox, exp):
    p = sandbox.path(f"/var/spool/gims/{exp}/probe.json")
    assert wait_for(p.exists), f"the probe wrote no {p}"
    return json.loads(p.read_text())


def test_capture_unit_sandbox_gives_what_capture_needs(sandbox, exp_id):
    # Another experiment's spool with a file in it, which this one must not see.
    sandbox.sh("install -d -o gims-capture -g gims-spool -m 2770 /var/spool/gims/other-exp && "
               "touch /var/spool/gims/other-exp/secret.pcap")
    sandbox.install_probe(exp_id, {"secret_marker": "anon-key-would-be-here"})
    sandbox.systemctl("start", f"capture@{exp_id}.service")
    r = probe_result(sandbox, exp_id)
    ids = {u: sandbox.ids(u) for u in ("gims-capture",)}
    gid_spool = int(sandbox.path("/etc/group").read_text().split("gims-spool:x:")[1].split(":")[0])
    assert r["uid"] == ids["gims-capture"][0] and r["gid"] == gid_spool
    # the settings arrive as a systemd credential, not from /var/lib/gims
    assert r["credentials_directory"] == f"/run/credentials/capture@{exp_id}.service"
    assert r["config"]["secret_marker"] == "anon-key-would-be-here"
    # CAP_NET_RAW (bit 13) and nothing else, ambient; a live capture on gims-sb0 works
    assert r["CapEff"] == r["CapBnd"] == r["CapAmb"] == f"{1 << 13:016x}"
    assert r["live_capture"]["ok"] and r["live_capture"]["value"] >= 3, r["live_capture"]
    # numpy and pcapy work under MemoryDenyWriteExecute
    assert r["numpy"] == {"ok": True, "value": 1498500}
    # only its own spool is visible and writable; files are created 0640 (UMask=0027)
    assert r["list_spool_root"] == {"ok": True, "value": [exp_id]}
    assert r["umask_file_mode"] == {"ok": True, "value": "0o640"}
    for forbidden in ("read_state_dir", "write_etc", "write_srv", "read_shadow"):
        assert not r[forbidden]["ok"], (forbidden, r[forbidden])
    spool = sandbox.path(f"/var/spool/gims/{exp_id}").stat()
    assert oct(spool.st_mode & 0o7777) == "0o2770"
    assert spool.st_uid == ids["gims-capture"][0] and spool.st_gid == gid_spool


def _exposure(sandbox, unit):
    res = sandbox.run("systemd-analyze", "security", "--offline=true", "--no-pager", unit, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    return float(m.group(1))


def test_security_exposure_scores(sandbox):
    """`systemd-analyze security --offline=true` for every service in units/ (templates as
    instance "x"); ours must stay at 1.5 or below, the others' are printed for the record."""
    names = sorted(p.name.replace("@.", "@x.") for p in (sandbox.state_repo / "units").glob("*.service"))
    scores = {u: _exposure(sandbox, u) for u in names}
    print("systemd-analyze security --offline=true:", scores)
    for ours in ("capture@x.service", "gimsd.service", "gims-spool@x.service"):
        assert scores[ours] <= 1.5, (ours, scores[ours])


def test_unit_manager_start_status_stop(sandbox, exp_id):
    sandbox.install_probe(exp_id, {"linger": 60})
    unit = f"capture@{exp_id}.service"
    res = sandbox.py(f"""
import json, time
from gimsd.systemd import UnitManager
um = UnitManager(job_timeout=30)
out = {{"start": um.start_unit({unit!r})}}
time.sleep(0.5)
out["running"] = um.unit_status({unit!r})
out["listed"] = um.list_units("capture@*")
out["stop"] = um.stop_unit({unit!r})
out["stopped"] = um.unit_status({unit!r})
print(json.dumps(out))
""", user="gims")
    out = json.loads(res.stdout)
    assert out["start"] == "done" and out["stop"] == "done"
    run = out["running"]
    assert (run["active_state"], run["sub_state"]) == ("active", "running")
    assert run["main_pid"] > 0
    assert run["status_text"].startswith("packets_observed=")
    assert 0 < run["memory_bytes"] < 2**40
    assert 0 <= run["cpu_user_usec"] < 2**63 and 0 <= run["cpu_system_usec"] < 2**63
    assert run["cpu_user_usec"] + run["cpu_system_usec"] > 0
    assert abs(run["active_enter_time"] / 1e6 - time.time()) < 120
    assert unit in out["listed"]
    assert out["stopped"]["active_state"] == "inactive"


def test_unit_manager_refuses_foreign_names_before_dbus(sandbox):
    res = sandbox.py("""
import json
from gimsd.systemd import UnitManager, UnitError
um = UnitManager()
out = {}
for name in ["ssh.service", "capture@x.service.d", "capturex@y.service", "capture@../x.service",
             "capture@x/../../ssh.service", "capture@.service", "gims-upload@x.timer", "capture@-x.service"]:
    try:
        um.start_unit(name); out[name] = "started"
    except UnitError as e:
        out[name] = str(e)
print(json.dumps(out))
""", user="gims")
    for name, why in json.loads(res.stdout).items():
        assert why.startswith("refused unit name"), (name, why)


def test_unit_manager_reports_polkit_refusal(sandbox):
    # Bypass the name check to show the second line of defence: polkit says no.
    res = sandbox.py("""
from gimsd.systemd import UnitManager, UnitError
um = UnitManager()
try:
    um._run(um._job("StartUnit", "systemd-journald.service")); print("started")
except UnitError as e:
    print(e)
""", user="gims")
    assert "Permission denied" in res.stdout or "Access denied" in res.stdout, res.stdout


def test_crashing_capture_unit_shows_failed_with_reason(sandbox, exp_id):
    sandbox.install_probe(exp_id, {"fail": "bad setting"})
    unit = f"capture@{exp_id}.service"
    res = sandbox.py(f"""
import json
from gimsd.systemd import UnitManager, UnitError
um = UnitManager(job_timeout=30)
out = {{}}
try:
    um.start_unit({unit!r}); out["start"] = "done"
except UnitError as e:
    out["start"] = str(e)
out["status"] = um.unit_status({unit!r})
um.reset_failed({unit!r})
out["after_reset"] = um.unit_status({unit!r})["active_state"]
print(json.dumps(out))
""", user="gims")
    out = json.loads(res.stdout)
    assert "failed" in out["start"] and "exit status 3" in out["start"], out["start"]
    st = out["status"]
    assert (st["active_state"], st["result"], st["exec_main_status"]) == ("failed", "exit-code", 3)
    assert out["after_reset"] == "inactive"
    assert "failing as asked: bad setting" in sandbox.journal("-u", unit)


def test_missing_capture_settings_fail_the_unit(sandbox, exp_id):
    # gimsd never wrote capture.json: systemd refuses to start (LoadCredential), reported.
    unit = f"capture@{exp_id}.service"
    res = sandbox.py(f"""
from gimsd.systemd import UnitManager, UnitError
um = UnitManager(job_timeout=30)
try:
    um.start_unit({unit!r}); print("started")
except UnitError as e:
    print(e)
""", user="gims")
    assert "failed" in res.stdout and "243/CREDENTIALS" in res.stdout, res.stdout
    assert sandbox.show(unit, "ActiveState")["ActiveState"] == "failed"  # no restart loop


def test_capture_logs_carry_experiment_field(sandbox, exp_id):
    sandbox.install_probe(exp_id, {"linger": 5})
    sandbox.systemctl("start", f"capture@{exp_id}.service")
    assert wait_for(lambda: "probe running" in sandbox.journal(f"EXPERIMENT={exp_id}"), 10)


def test_gims_sb0_carries_v4_v6_icmp_tcp_udp(sandbox):
    """The sandbox's traffic generator, seen by an independent reader (tcpdump on the host)."""
    res = subprocess.run(["timeout", "4", "tcpdump", "-n", "-l", "-i", "gims-sb0", "-c", "200"],
                         capture_output=True, text=True)
    text = res.stdout
    assert re.search(r"IP 198\.18\.203\.\d+ > 198\.18\.203\.\d+: ICMP echo", text), text[:2000]
    assert re.search(r"IP6 fd67:696d:7362::\d > fd67:696d:7362::\d: ICMP6, echo", text), text[:2000]
    assert re.search(r"IP 198\.18\.203\.\d+\.\d+ > 198\.18\.203\.\d+\.\d+: UDP", text), text[:2000]
    assert re.search(r"IP6 fd67:696d:7362::\d\.\d+ > fd67:696d:7362::\d\.\d+: UDP", text), text[:2000]
    assert re.search(r"IP 198\.18\.203\.\d+\.\d+ > 198\.18\.203\.\d+\.\d+: Flags \[S\]", text), text[:2000]
    assert re.search(r"IP6 fd67:696d:7362::\d\.\d+ > fd67:696d:7362::\d\.\d+: Flags \[S\]", text), text[:2000]


def test_unit_manager_serves_concurrent_threads(sandbox, exp_id):
    """gimsd's XML-RPC handlers are threads: one UnitManager, many callers at once."""
    sandbox.install_probe(exp_id, {"linger": 60})
    unit = f"capture@{exp_id}.service"
    res = sandbox.py(f"""
import json, threading
from gimsd.systemd import UnitManager, UnitError
um = UnitManager(job_timeout=30)
results, errors = [], []
def worker(i):
    try:
        if i == 0:
            results.append(um.start_unit({unit!r}))
        for _ in range(5):
            results.append(um.unit_status({unit!r})["load_state"])
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
[t.start() for t in threads]; [t.join(60) for t in threads]
final = um.unit_status({unit!r})["active_state"]
um.stop_unit({unit!r})
print(json.dumps({{"results": results, "errors": errors, "final": final}}))
""", user="gims")
    out = json.loads(res.stdout)
    assert out["errors"] == [] and out["final"] == "active"
    assert out["results"].count("loaded") == 40 and out["results"].count("done") == 1
