"""Smoke tests of the benchmark harness (no timing assertions: benchmarks are not tests).

- the trace generator writes what it promises, checked by independent readers (tcpdump, tshark):
  packet count, IPv6 share, correct checksums on every packet captured whole, no malformed
  Ethernet/IP/TCP/UDP/ICMP headers, deterministic output for a seed;
- `bench/run.py --quick` produces its table, with a measured row for every tool that can run
  here and a stated reason for every one that cannot.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)

import gen_trace  # noqa: E402
import peers  # noqa: E402

N = 20_000
SNAPLEN = 128
L4_COLUMN = {"tcp": 2, "udp": 3, "icmp": 4, "icmpv6": 5}
LOW_LAYERS = {"eth", "ethertype", "vlan", "ip", "ipv6", "tcp", "udp", "icmp", "icmpv6"}


@pytest.fixture(scope="module")
def workdir():
    # Not /tmp (a sandboxed systemd elsewhere in the suite may empty it), not the repository.
    d = f"/var/tmp/gims-bench/test-{os.getpid()}"
    os.makedirs(d, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def trace(workdir):
    path = os.path.join(workdir, "small.pcap")
    stats = gen_trace.generate(path, N, N // 50, seed=7, snaplen=SNAPLEN, duration=10.0,
                               start=1_700_000_000.0)
    return path, stats


def read_records(path):
    """Record headers of a classic pcap, read independently of the generator."""
    with open(path, "rb") as f:
        data = f.read()
    magic, vmaj, vmin, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data, 0)
    assert (magic, vmaj, vmin, linktype) == (0xA1B2C3D4, 2, 4, 1)
    recs, off = [], 24
    while off < len(data):
        sec, usec, cap, wire = struct.unpack_from("<IIII", data, off)
        recs.append((sec, usec, cap, wire))
        off += 16 + cap
    assert off == len(data), "last record cut short"
    return snaplen, recs


def test_record_headers(trace):
    path, stats = trace
    snaplen, recs = read_records(path)
    assert snaplen == SNAPLEN
    assert len(recs) == N == stats["packets"]
    ts = [s * 1_000_000 + u for s, u, _, _ in recs]
    assert all(a <= b for a, b in zip(ts, ts[1:])), "timestamps must not go backwards"
    assert all(u < 1_000_000 for _, u, _, _ in recs)
    assert all(60 <= w <= 1514 and c == min(w, SNAPLEN) for _, _, c, w in recs)
    assert sum(1 for *_, w in recs if w <= SNAPLEN) == stats["whole"]
    assert 0 < stats["whole"] < N          # both whole and truncated packets are present


def test_deterministic(workdir, trace):
    path, _ = trace
    again = os.path.join(workdir, "again.pcap")
    other = os.path.join(workdir, "other.pcap")
    gen_trace.generate(again, N, N // 50, seed=7, snaplen=SNAPLEN, duration=10.0, start=1_700_000_000.0)
    gen_trace.generate(other, N, N // 50, seed=8, snaplen=SNAPLEN, duration=10.0, start=1_700_000_000.0)

    def digest(p):
        return hashlib.sha256(open(p, "rb").read()).hexdigest()
    assert digest(again) == digest(path)
    assert digest(other) != digest(path)


@pytest.mark.skipif(not shutil.which("tcpdump"), reason="tcpdump not installed")
def test_tcpdump_reads_every_packet(trace):
    path, stats = trace
    p = subprocess.run(["tcpdump", "-e", "-nn", "-r", path], capture_output=True, text=True,
                       check=True)
    lines = p.stdout.splitlines()
    assert len(lines) == N
    assert sum("ethertype IPv6" in ln for ln in lines) == stats["ipv6"]
    assert sum("vlan " in ln for ln in lines) == stats["vlan"] > 0
    assert any("Flags [S]," in ln for ln in lines) and any("Flags [F." in ln for ln in lines)
    assert any("Flags [R." in ln for ln in lines)
    assert any("ICMP echo request" in ln for ln in lines)
    assert any("ICMP6, echo request" in ln for ln in lines)
    assert any("unreachable" in ln for ln in lines)


def _tshark(path, *args):
    return subprocess.run(["tshark", "-n", "-r", path, "-o", "ip.check_checksum:TRUE",
                           "-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", *args],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not shutil.which("tshark"), reason="tshark not installed")
def test_tshark_checksums_ipv6_share_and_wellformed(trace):
    path, stats = trace
    rows = _tshark(path, "-T", "fields", "-E", "separator=;", "-e", "frame.protocols",
                   "-e", "ip.checksum.status", "-e", "tcp.checksum.status", "-e", "udp.checksum.status",
                   "-e", "icmp.checksum.status", "-e", "icmpv6.checksum.status",
                   "-e", "frame.len", "-e", "frame.cap_len").splitlines()
    assert len(rows) == N
    v6 = sum(":ipv6:" in r.split(";")[0] for r in rows)
    assert 0.10 <= v6 / N <= 0.20, f"IPv6 share {v6 / N:.3f}"
    assert v6 == stats["ipv6"]
    bad = good_l4 = 0
    for r in rows:
        f = r.split(";")
        statuses = [s for col in f[1:6] for s in col.split(",") if s]
        bad += statuses.count("0")                     # 0 = bad in Wireshark's checksum status
        whole = int(f[6]) == int(f[7])
        # The outer L4 header's checksum (an ICMP error also shows its quoted UDP header's,
        # which cannot be verified: it covers a datagram that is not there).
        chain = f[0].split(":")
        outer = next((c for c in chain if c in L4_COLUMN), None)
        if whole and outer:
            good_l4 += f[L4_COLUMN[outer]].split(",")[0] == "1"
    assert bad == 0, f"{bad} bad checksums"
    assert good_l4 == stats["whole"], "every packet captured whole must have a verified L4 checksum"
    # Malformed: the payload bytes are random, so an application dissector on a well-known port
    # (DNS on 53, NTP on 123...) may call them malformed; the headers we generate (Ethernet,
    # 802.1Q, IPv4/IPv6, TCP/UDP/ICMP) never may.
    malformed = _tshark(path, "-Y", "_ws.malformed", "-T", "fields", "-e", "frame.protocols").split()
    for chain in malformed:
        assert chain.split(":")[-1] not in LOW_LAYERS, f"malformed header: {chain}"
    expert = _tshark(path, "-Y", "_ws.expert.severity == error && !_ws.malformed", "-T", "fields",
                     "-e", "frame.number", "-e", "_ws.expert.message").strip()
    assert expert == "", expert


def test_bad_arguments(workdir):
    p = subprocess.run([sys.executable, os.path.join(BENCH, "gen_trace.py"), "--packets", "0",
                        "-o", os.path.join(workdir, "x.pcap")], capture_output=True, text=True)
    assert p.returncode == 2 and "--packets" in p.stderr
    p = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--paths", "one"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--paths" in p.stderr
    p = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--gims-repo", workdir],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "no capture_daemon/cli.py" in p.stderr


def test_run_quick_produces_table(workdir):
    out_json = os.path.join(workdir, "quick.json")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--size", "20000",
                        "--workdir", workdir, "--json", out_json, "--paths", "0,1,2,3,4,5,7"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    table = p.stdout
    assert "| path | tool | packets/s (median) |" in table
    with open(out_json) as f:
        res = json.load(f)
    rows = {(r["path"], r["tool"]): r for r in res["rows"]}
    for tool in peers.tools():
        row = rows[(tool.path, tool.name)]
        why = tool.check()
        line = next(ln for ln in table.splitlines()
                    if ln.startswith(f"| {tool.path} ") and f"| {tool.name} |" in ln)
        if why:
            # A tool that cannot run here is named, with its reason, in the table.
            assert row["skipped"] and f"skipped: {why}" in line
            continue
        if tool.is_gims and tool.path == 3 and not os.path.exists(
                os.path.join(REPO, "capture_daemon", "flows.py")):
            continue   # --aggregate flows lands with issue #5
        assert not row["error"], f"{tool.name} on path {tool.path}: {row['error']}"
        assert row["pps_median"] > 0 and row["rss_mb"] > 0
        assert line.rstrip().endswith("| ok |")
        assert row["command"] and shlex_join(row["command"]) in table
        assert "OUT" in shlex_join(row["command"]) or tool.path in (0, 4)
    # gims vs peer ratios exist exactly where both ran.
    for (path, name), row in rows.items():
        g = rows.get((path, "gims-capture"))
        if not row["is_gims"] and g and g["pps_median"] and row["pps_median"]:
            assert row["ratio"] > 0
    assert "Path 5" in table


def shlex_join(argv):
    import shlex
    return shlex.join(argv)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespace and veth pair")
@pytest.mark.skipif(not (shutil.which("tcpreplay") and shutil.which("tcpdump") and shutil.which("ip")),
                    reason="tcpreplay, tcpdump or iproute2 not installed")
def test_live_path_runs_one_step(workdir):
    """Path 6's machinery at one low rate: veth in a netns, tcpreplay, both capturers, their
    drop counters read back. What it captured is reported, not asserted (no timing in tests)."""
    def bench_netns():
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {ln.split()[0] for ln in out.splitlines() if ln.startswith("gims-bench-")}

    before = bench_netns()
    out_json = os.path.join(workdir, "live.json")
    p = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--size", "20000",
                        "--workdir", workdir, "--json", out_json, "--paths", "6",
                        "--live-rates", "5000"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out_json) as f:
        live = json.load(f)["live"]
    names = ["tcpdump -w"] + (["gims-capture"] if peers.gims_available() is None else [])
    for name in names:
        step = next(s for s in live["steps"] if s.startswith(f"{name}: asked 5000 pps"))
        # tcpreplay sent the whole step, and the capturer's own counters were read back.
        assert ", sent 15000, captured " in step, step   # max(10000, 3 s x 5000 pps)
        assert "captured None" not in step and "dropped None" not in step, step
    assert "Path 6" in p.stdout and "| capturer |" in p.stdout
    # the namespace (and with it the veth pair) is gone afterwards
    assert bench_netns() <= before
