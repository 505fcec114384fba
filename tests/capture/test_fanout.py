"""Multi-core live capture: --workers N shares one interface through a PACKET_FANOUT group.

Real parts only: a veth pair with one end in a network namespace, UDP traffic of many flows
sent from inside it, gims-capture --workers 2 capturing on the host end, SIGTERM, and the
files read back byte by byte (every packet carries its sequence number in its payload).
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import (REPO, data_files, env_without, metadata, module_cmd, pcap_count,
                           run_capture, sh, veth_pair)

PAYLOAD_RE = re.compile(rb"gims-fanout-(\d{7})")


@pytest.fixture
def veth():
    """(host end, namespace) of a fresh veth pair, 10.203.0.1 (host) <-> 10.203.0.2 (ns)."""
    with veth_pair("gfan", "10.203.0") as pair:
        yield pair


# n packets round-robin over `flows` UDP sockets (one source port each), numbered 0..n-1.
SENDER = r"""
import socket, sys, time
n, flows = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(flows)]
for i in range(n):
    socks[i % flows].sendto(b"gims-fanout-%07d" % i, ("10.203.0.1", 9999))
    if i % 20 == 19:
        time.sleep(0.002)
"""


def start_workers(out, iface, notify_path, *extra, env=None):
    env = {**os.environ, "PYTHONPATH": REPO, "NOTIFY_SOCKET": notify_path, **(env or {})}
    return subprocess.Popen(module_cmd("capture_daemon.cli", "--interface", iface, "--output-dir", out,
                                       "--experiment", "fan", "--site", "veth", "--snaplen", "256",
                                       "--filter", "udp and dst port 9999", "--workers", "2",
                                       *extra),
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def wait_ready(sock, proc, timeout=30.0) -> list[str]:
    """Notifications received until READY=1 (AssertionError if it never comes)."""
    seen = []
    sock.settimeout(0.2)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            assert proc.poll() is None, f"capture exited early: {proc.stderr.read()}"
            continue
        seen.append(msg)
        if "READY=1" in msg.split("\n"):
            return seen
    proc.kill()
    raise AssertionError(f"no READY=1 within {timeout}s: {seen} {proc.stderr.read()}")


def pcap_packets(path):
    """[(UDP source port, sequence number)] of our test packets in a pcap file."""
    data = open(path, "rb").read()
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4
    pos, out = 24, []
    while pos < len(data):
        _, _, caplen, _ = struct.unpack_from("<IIII", data, pos)
        pkt = data[pos + 16:pos + 16 + caplen]
        pos += 16 + caplen
        ihl = (pkt[14] & 0x0F) * 4  # Ethernet, IPv4 (the filter admits only UDP to :9999)
        sport = struct.unpack_from("!H", pkt, 14 + ihl)[0]
        m = PAYLOAD_RE.search(pkt)
        assert m, f"foreign packet in {path}"
        out.append((sport, int(m.group(1))))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("reader", ["C", "pcapy-ng"])
def test_two_workers_capture_every_packet_once(tmp_path, veth, reader):
    """With either live reader: _accel_live (its own PACKET_FANOUT setsockopt) or the pcapy-ng
    fallback (set_fanout), as where _accel_live was not built."""
    host, ns = veth
    out = str(tmp_path / "spool")
    notify_path = str(tmp_path / "notify")
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(notify_path)
    env = (env_without(str(tmp_path / "no-accel-live"), "capture_daemon._accel_live")
           if reader == "pcapy-ng" else None)
    proc = start_workers(out, host, notify_path, "--rollover", "2", env=env)
    try:
        wait_ready(nsock, proc)  # READY=1 means every worker's handle is in the group
        n, flows = 6000, 64
        sh("ip", "netns", "exec", ns, "python3", "-c", SENDER, str(n), str(flows))
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    statuses = []
    nsock.settimeout(0.1)
    try:
        while True:
            statuses += [l for l in nsock.recv(4096).decode().split("\n") if l.startswith("STATUS=")]
    except socket.timeout:
        pass
    nsock.close()

    files = data_files(out)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    seqs, worker_of_port, per_worker = [], {}, {0: 0, 1: 0}
    for f in files:
        meta = metadata(f)
        fan = meta["fanout"]
        assert {k: fan[k] for k in ("workers", "mode")} == {"workers": 2, "mode": "hash"}
        assert fan["worker"] in (0, 1) and isinstance(fan["group"], int)
        if reader == "C":  # each worker read with _accel_live, on Debian's libpcap
            from capture_daemon import source
            assert meta["software"]["libpcap"] == source._accel_live.lib_version()
        pkts = pcap_packets(f)
        assert len(pkts) == meta["packets_written"] == pcap_count(f)
        per_worker[fan["worker"]] += len(pkts)
        for sport, seq in pkts:
            seqs.append(seq)
            # PACKET_FANOUT_HASH: a flow never changes worker
            assert worker_of_port.setdefault(sport, fan["worker"]) == fan["worker"]
    assert len({metadata(f)["fanout"]["group"] for f in files}) == 1
    # The union holds exactly the n packets: none lost, none twice.
    assert len(seqs) == n, f"{len(seqs)} captured, {len(set(seqs))} distinct, of {n}"
    assert sorted(seqs) == list(range(n))
    assert per_worker[0] > 0 and per_worker[1] > 0, per_worker
    assert len(worker_of_port) == flows

    # One status file, with the sum over workers.
    status = json.load(open(os.path.join(out, ".gims-status.json")))
    assert status["state"] == "stopped" and status["workers"] == 2
    assert status["packets_written"] == status["packets_observed"] == n
    assert status["files_written"] == len(files)
    assert status["pid"] == proc.pid
    assert any(f"packets_written={n} " in s for s in statuses), statuses[-3:]


@pytest.mark.integration
def test_a_dead_worker_stops_the_capture(tmp_path, veth):
    """SIGKILL one worker: the supervisor stops the other one cleanly and exits 1."""
    host, _ = veth
    out = str(tmp_path / "spool")
    notify_path = str(tmp_path / "notify")
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(notify_path)
    proc = start_workers(out, host, notify_path)
    try:
        wait_ready(nsock, proc)
        children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        workers = [int(c) for c in children
                   if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        assert len(workers) >= 2, children
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
    finally:
        nsock.close()
        if proc.poll() is None:
            proc.kill()
    assert "worker" in proc.stderr.read()
    # the survivor finished its file with metadata; nothing half-written is visible
    visible = [n for n in os.listdir(out) if not n.startswith(".") and not n.endswith(".meta.json")]
    assert visible and len(data_files(out)) == len(visible)


ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.203.0.1", 9999))
s.settimeout(float(sys.argv[1]))
try:
    while True:
        data, peer = s.recvfrom(100)
        s.sendto(data, peer)
except socket.timeout:
    pass
"""

# one socket (one flow) per request, each waiting for its echo
ASKER = r"""
import socket, sys
for i in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"gims-fanout-%07d" % i, ("10.203.0.1", 9999))
    s.recv(100)
    s.close()
"""


@pytest.mark.integration
def test_both_directions_of_a_flow_go_to_one_worker(tmp_path, veth):
    """The metadata says "symmetric": true; requests and their echoes share a worker."""
    host, ns = veth
    out = str(tmp_path / "spool")
    notify_path = str(tmp_path / "notify")
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(notify_path)
    echo = subprocess.Popen([sys.executable, "-c", ECHO, "20"])
    proc = subprocess.Popen(module_cmd("capture_daemon.cli", "--interface", host, "--output-dir", out,
                                       "--experiment", "sym", "--snaplen", "256", "--filter",
                                       "udp port 9999", "--workers", "2"),
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, NOTIFY_SOCKET=notify_path),
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(nsock, proc)
        n = 100
        sh("ip", "netns", "exec", ns, "python3", "-c", ASKER, str(n))
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        nsock.close()
        echo.kill()
        echo.wait()
        if proc.poll() is None:
            proc.kill()
    worker_of_seq = {}
    for f in data_files(out):
        w = metadata(f)["fanout"]["worker"]
        for _, seq in pcap_packets(f):
            worker_of_seq.setdefault(seq, set()).add(w)
    assert sorted(worker_of_seq) == list(range(n))  # every request and echo was captured
    assert all(len(ws) == 1 for ws in worker_of_seq.values()), worker_of_seq
    assert {w for ws in worker_of_seq.values() for w in ws} == {0, 1}


def notifications(sock, seconds) -> list[str]:
    lines, end = [], time.monotonic() + seconds
    sock.settimeout(0.1)
    while time.monotonic() < end:
        try:
            lines += sock.recv(4096).decode().split("\n")
        except socket.timeout:
            pass
    return lines


@pytest.mark.integration
def test_watchdog_only_while_every_worker_progresses(tmp_path, veth):
    """A stopped (SIGSTOP) worker starves the watchdog; it resumes when the worker does."""
    host, _ = veth
    out = str(tmp_path / "spool")
    notify_path = str(tmp_path / "notify")
    nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    nsock.bind(notify_path)
    env = dict(os.environ, PYTHONPATH=REPO, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="3000000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(module_cmd("capture_daemon.cli", "--interface", host, "--output-dir", out,
                                       "--workers", "2"),
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        wait_ready(nsock, proc)
        assert "WATCHDOG=1" in notifications(nsock, 2.5)
        children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        worker = next(int(c) for c in children if "spawn_main" in open(f"/proc/{c}/cmdline").read())
        os.kill(worker, signal.SIGSTOP)
        notifications(nsock, 2.5)  # pings sent before the worker counted as stuck (2 s)
        assert "WATCHDOG=1" not in notifications(nsock, 2.0)
        os.kill(worker, signal.SIGCONT)
        assert "WATCHDOG=1" in notifications(nsock, 3.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        nsock.close()
        if worker:
            try:
                os.kill(worker, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()


def test_workers_with_read_is_a_usage_error(tmp_path):
    trace = tmp_path / "x.pcap"
    trace.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    r = run_capture("--workers", "2", "--read", str(trace), "--output-dir", str(tmp_path / "o"),
                    check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--workers" in r.stderr and "--read" in r.stderr
    assert not (tmp_path / "o").exists()


def test_workers_must_be_positive(tmp_path):
    r = run_capture("--workers", "0", "--interface", "lo", "--output-dir", str(tmp_path / "o"),
                    check=False)
    assert r.returncode == 2 and "--workers" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.integration
def test_bad_filter_with_workers_is_one_line_exit_2(tmp_path, veth):
    host, _ = veth
    r = run_capture("--workers", "2", "--interface", host, "--filter", "not a ((filter",
                    "--output-dir", str(tmp_path / "o"), check=False, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "does not compile" in r.stderr, r.stderr


def test_samplers_per_worker():
    from capture_daemon.sampling import parse_sample_spec
    every = parse_sample_spec("everyN:10")
    assert every.for_worker(0, 1) is every  # one worker: exactly as configured
    w = every.for_worker(1, 2)
    assert w.describe()["exact"] is False and w.describe()["n"] == 10
    assert len(w.select(100)) == 10  # every 10th of this worker's own share
    uni = parse_sample_spec("uniform:0.5:42")
    a, b = uni.for_worker(0, 2), uni.for_worker(1, 2)
    assert a.describe()["worker_seed"] == [42, 0] and b.describe()["worker_seed"] == [42, 1]
    sel_a, sel_b = a.select(1000), b.select(1000)
    assert not np.array_equal(sel_a, sel_b)  # different streams per worker
    assert np.array_equal(parse_sample_spec("uniform:0.5:42").for_worker(0, 2).select(1000), sel_a)
