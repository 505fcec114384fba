"""gimsd as a process: main() with a config file, sd_notify READY/STATUS, the start-up line that
says how it listens, per-experiment log fields, SIGTERM. The systemd side is the FakeUnits test
double (see gimsd_fake_units.py); the journal itself is exercised in the sandbox tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gimsd_process_notifies_ready_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    (tmp_path / "srv").mkdir()
    cfg = tmp_path / "gimsd.toml"
    cfg.write_text(f"""
[server]
port = {port}
reconcile_interval = 0.2
[node]
site_location = "lab"
allowed_interfaces = ["lo"]
[paths]
spool_dir = "{tmp_path}/spool"
state_dir = "{tmp_path}/state"
local_storage_roots = ["{tmp_path}/srv"]
""")
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=notify_path)
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "gimsd" / "run_gimsd_with_fake_units.py"),
                             "--config", str(cfg)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        msg = notify.recv(4096).decode()
        assert msg.startswith("READY=1\nSTATUS=listening on port") and "no experiments" in msg
        p = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/")
        assert p.configureExperiment({"ExperimentId": "d1"}).startswith("OK")
        # the reconcile loop reports a summary in STATUS=
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = notify.recv(4096).decode()
            if "1 configured" in msg:
                break
        assert msg == "STATUS=experiments: 1 configured"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert notify.recv(4096) == b"STOPPING=1"
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert f"listening on http://127.0.0.1:{port}/ (plain HTTP, no TLS: serving loopback peers only)" in err
    assert "experiment d1 configured" in err and "[EXPERIMENT=d1]" in err
