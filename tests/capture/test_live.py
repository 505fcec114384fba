"""Live capture of real traffic across a veth pair, and clean shutdown on SIGTERM.

A network namespace holds one end of a veth pair; packets sent from inside it are captured
on the other end by gims-capture, exactly as on a node's capture interface.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (REPO, env_without, data_files, metadata, module_cmd, need_tool,
                           pcap_count, sh, veth_pair, wait_for)

pytestmark = pytest.mark.integration


@pytest.fixture
def veth():
    """(host end, namespace) of a fresh veth pair: 10.201.0.1 / fd00:201::1 on the host end."""
    with veth_pair("gcap", "10.201.0", "fd00:201::") as pair:
        yield pair


@pytest.fixture(params=["C", "pcapy-ng"])
def reader(request, tmp_path):
    """The environment for gims-capture with the live reader under test: _accel_live, or the
    pcapy-ng fallback (as where _accel_live was not built)."""
    if request.param == "C":
        from capture_daemon import source
        if source._accel_live is None:
            pytest.skip("_accel_live not built (make build)")
        return {}
    return env_without(str(tmp_path / "no-accel-live"), "capture_daemon._accel_live")


def start_capture(out, iface, *extra, prefix=None, env=None):
    """prefix: a command to run instead of `python -m capture_daemon.cli` (given the same flags);
    env: more environment (e.g. reader's)."""
    env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    cmd = module_cmd("capture_daemon.cli", "--interface", iface, "--output-dir", out,
                     "--experiment", "live", "--site", "veth", "--snaplen", "256",
                     "--stats-interval", "1", *extra)
    if prefix:
        cmd = prefix + cmd[3:]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    status = os.path.join(out, ".gims-status.json")
    deadline = time.time() + 20
    while not os.path.exists(status):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"capture did not start: {proc.stderr.read()}")
        time.sleep(0.1)
    return proc


SENDER = r"""
import socket, sys, time
n = int(sys.argv[1])
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for i in range(n):
    s4.sendto(b"gims-test-%06d" % i, ("10.201.0.1", 9999))
    s6.sendto(b"gims-test-%06d" % i, ("fd00:201::1", 9999))
    time.sleep(0.001)
"""


def test_live_capture_gets_every_packet(tmp_path, veth, reader):
    host, ns = veth
    out = str(tmp_path / "spool")
    proc = start_capture(out, host, "--filter", "udp port 9999", env=reader)
    n = 300
    sh("ip", "netns", "exec", ns, "python3", "-c", SENDER, str(n))
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    files = data_files(out)
    assert files
    written = sum(metadata(f)["packets_written"] for f in files)
    assert written == 2 * n == sum(pcap_count(f) for f in files)
    last = metadata(files[-1])
    assert last["pcap_stats"]["ps_drop"] == 0
    assert last["pcap_stats"]["ps_recv"] >= 2 * n
    assert last["device"] == host
    assert last["wire_lengths_estimated"] == 0  # all IP: exact either way
    from capture_daemon import source
    if not reader:  # the libpcap capturing is the one _accel_live links
        assert last["software"]["libpcap"] == source._accel_live.lib_version()
    # The status file says the capture stopped, with the same totals.
    status = json.load(open(os.path.join(out, ".gims-status.json")))
    assert status["state"] == "stopped" and status["packets_written"] == 2 * n


def test_sigterm_mid_run_leaves_only_complete_files(tmp_path, veth):
    """Stop a busy capture: every visible data file has its metadata and reads cleanly."""
    host, ns = veth
    out = str(tmp_path / "spool")
    proc = start_capture(out, host, "--max-file-bytes", "20000", "--rollover", "1")
    sender = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", SENDER, "5000"])
    time.sleep(2.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    sender.kill()
    sender.wait()
    names = os.listdir(out)
    assert not [n for n in names if n.endswith(".tmp")], names
    files = data_files(out)
    visible = [n for n in names if not n.startswith(".") and not n.endswith(".meta.json")]
    assert len(visible) == len(files) >= 2
    for f in files:
        meta = metadata(f)
        assert pcap_count(f) == meta["packets_written"]
        assert os.path.getsize(f) == meta["size"] <= 20000


def test_sighup_rotates(tmp_path, veth):
    host, ns = veth
    out = str(tmp_path / "spool")
    proc = start_capture(out, host, "--rollover", "3600")
    sh("ip", "netns", "exec", ns, "python3", "-c", SENDER, "20")
    time.sleep(1.2)
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    sh("ip", "netns", "exec", ns, "python3", "-c", SENDER, "20")
    time.sleep(1.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    files = data_files(out)
    assert len(files) == 2
    assert sum(metadata(f)["packets_written"] for f in files) >= 80


def test_interface_vanishing_is_a_clear_failure_not_a_hang(tmp_path, veth, reader):
    """Deleting the capture interface mid-run: the process exits non-zero promptly, files intact."""
    host, ns = veth
    out = str(tmp_path / "spool")
    proc = start_capture(out, host, env=reader)
    sh("ip", "netns", "exec", ns, "python3", "-c", SENDER, "50")
    time.sleep(1.2)
    sh("ip", "link", "del", host)
    try:
        rc = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("capture hung after its interface disappeared")
    err = proc.stderr.read()
    assert rc != 0
    assert host in err or "went down" in err or "No such device" in err, err
    files = data_files(out)
    assert files and sum(metadata(f)["packets_written"] for f in files) >= 100
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# gims-capture with reads never coalesced: each next_batch result is one batch, as before
# capture_daemon/coalesce.py existed.
ONE_READ_PER_BATCH = r"""
import sys
from capture_daemon import source
source.COALESCE_BYTES, source.COALESCE_SECONDS = 1, 0.0
from capture_daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _records(path):
    """(caplen, wirelen, bytes) of every record of a pcap file: all but the timestamps."""
    from tests.anon.pcapio import read_pcap
    b = read_pcap(path)[0]
    buf = b.buf.tobytes()
    return [(int(c), int(w), buf[int(o):int(o + c)]) for o, c, w in zip(b.off, b.caplen, b.wirelen)]


def test_coalesced_reads_write_what_one_read_per_batch_writes(tmp_path, veth):
    """A burst replayed at top speed, captured with reads coalesced into batches (the default)
    and with one batch per read, each by the C reader and by the pcapy-ng fallback: the same
    records (anonymized, truncated; wire lengths libpcap's or estimated from the IP headers)
    and the same counters."""
    need_tool("tcpreplay")
    host, ns = veth
    trace = os.path.join(REPO, "tests", "data", "zeek__modbusBig.pcap")
    expected = 13622  # tests/data/MANIFEST.tsv: all TCP
    key = tmp_path / "key.hex"
    key.write_text(os.urandom(32).hex() + "\n")
    fallback = env_without(str(tmp_path / "no-accel-live"), "capture_daemon._accel_live")
    results = {}
    for reader in ("C", "pcapy-ng"):
        for batching in ("coalesced", "one read per batch"):
            mode = f"{reader}, {batching}"
            out = str(tmp_path / mode.replace(" ", "-").replace(",", ""))
            prefix = None if batching == "coalesced" else [sys.executable, "-c", ONE_READ_PER_BATCH]
            proc = start_capture(out, host, "--filter", "tcp", "--snaplen", "64",
                                 "--anon-key-file", str(key), prefix=prefix,
                                 env=fallback if reader == "pcapy-ng" else None)
            sh("ip", "netns", "exec", ns, "tcpreplay", "-i", f"{host[:-1]}p", "--topspeed", trace)
            status = os.path.join(out, ".gims-status.json")
            wait_for(lambda: json.load(open(status)).get("packets_observed") == expected,
                     timeout=20, what=f"{expected} packets observed ({mode})")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
            files = data_files(out)
            metas = [metadata(f) for f in files]
            assert all(m["pcap_stats"]["ps_drop"] == 0 for m in metas)
            counters = {k: sum(m[k] for m in metas) for k in
                        ("packets_observed", "bytes_observed", "packets_written",
                         "malformed_packets")}
            # these two are the process's running totals: the last file has them
            counters["wire_lengths_estimated"] = metas[-1]["wire_lengths_estimated"]
            anon = {k: metas[-1]["anonymization"][k] for k in
                    ("packets_anonymized", "not_anonymized", "checksums_corrected")}
            results[mode] = ([r for f in files for r in _records(f)], counters, anon)
    first = results["C, coalesced"]
    assert len(first[0]) == expected
    for mode, result in results.items():
        assert result == first, mode


# Frames sent from inside the namespace through a packet socket on the peer end: ARP requests
# (42 bytes) and frames of an experimental ethertype (0x88b5, 100-1000 bytes), numbered.
RAW_SENDER = r"""
import socket, struct, sys
iface, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((iface, 0))
mac = s.getsockname()[4]
for i in range(n):
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, bytes([10, 9, 0, 2]), bytes(6),
                      struct.pack("!I", i))
    s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
    size = 100 + (i * 97) % 901
    s.send((b"\xff" * 6 + mac + b"\x88\xb5" + b"%06d" % i).ljust(size, b"."))
"""


def test_truncated_non_ip_frames_keep_their_wire_length(tmp_path, veth, reader):
    """ARP and raw-ethertype frames longer than the snaplen: the C reader writes libpcap's
    wire length (the frame's real length); the fallback can only count them at their captured
    length and says how many it could not tell (wire_lengths_estimated)."""
    host, ns = veth
    out = str(tmp_path / "spool")
    n = 200
    proc = start_capture(out, host, "--snaplen", "40", "--filter", "arp or ether proto 0x88b5",
                         env=reader)
    sh("ip", "netns", "exec", ns, "python3", "-c", RAW_SENDER, f"{host[:-1]}p", str(n))
    status = os.path.join(out, ".gims-status.json")
    wait_for(lambda: json.load(open(status)).get("packets_observed") == 2 * n, timeout=20,
             what=f"{2 * n} frames observed")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    files = data_files(out)
    records = [r for f in files for r in _records(f)]
    sizes = [s for i in range(n) for s in (42, 100 + (i * 97) % 901)]
    assert [c for c, _, _ in records] == [40] * (2 * n)
    meta = metadata(files[-1])
    bytes_observed = sum(metadata(f)["bytes_observed"] for f in files)
    if not reader:
        assert [w for _, w, _ in records] == sizes
        assert meta["wire_lengths_estimated"] == 0 and bytes_observed == sum(sizes)
    else:
        assert [w for _, w, _ in records] == [40] * (2 * n)
        assert meta["wire_lengths_estimated"] == 2 * n and bytes_observed == 40 * 2 * n


PACED_SENDER = r"""
import socket, sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.monotonic()
for i in range(n):
    s4.sendto(b"gims-stall-%06d" % i, ("10.201.0.1", 9999))
    if i % 200 == 0:
        time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
"""


@pytest.fixture
def frozen_spool(tmp_path):
    """A spool on an ext4 of its own (a loop device), and freeze(seconds, at=None) to stop it
    taking writes (fsfreeze) for that long, from wall-clock time at (now if None)."""
    need_tool("mkfs.ext4")
    need_tool("fsfreeze")
    image, mnt = tmp_path / "spool.img", tmp_path / "mnt"
    mnt.mkdir()
    sh("truncate", "-s", "256M", str(image))
    sh("mkfs.ext4", "-q", "-F", str(image))
    sh("mount", "-o", "loop", str(image), str(mnt))

    def freeze(seconds, at=None):
        if at is not None:
            time.sleep(max(0.0, at - time.time()))
        sh("fsfreeze", "-f", str(mnt))
        try:
            time.sleep(seconds)
        finally:
            sh("fsfreeze", "-u", str(mnt))

    try:
        yield str(mnt / "spool"), freeze
    finally:
        sh("fsfreeze", "-u", str(mnt), check=False)
        sh("umount", str(mnt), check=False)


def _capture_through_a_freeze(veth, out, freeze, n, extra=(), at=None):
    """n packets at 40k packets/s into a capture with 1 MiB of kernel buffer (~8k small
    frames, a fifth of a second), the spool frozen for 1.5 s meanwhile (from time at, else
    after 1 s): every packet sent must be in the files, none dropped."""
    host, ns = veth
    proc = start_capture(out, host, "--filter", "udp port 9999", "--buffer-bytes", str(1 << 20), *extra)
    sender = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", PACED_SENDER, str(n), "40000"])
    if at is None:
        time.sleep(1.0)
    freeze(1.5, at)
    assert sender.wait(timeout=60) == 0
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    files = data_files(out)
    written = sum(metadata(f)["packets_written"] for f in files)
    drops = metadata(files[-1])["pcap_stats"]["ps_drop"]
    assert (written, drops) == (n, 0)
    assert sum(pcap_count(f) for f in files) == n
    return files


def test_a_stalled_spool_disk_loses_no_packet(veth, frozen_spool):
    """The spool's file system stops taking writes for 1.5 s in the middle of a live capture
    whose kernel buffer holds well under that much traffic: the capture thread goes on
    reading (data waits in the writer's memory backlog, the status file's write in a thread
    of its own), and every packet sent is in the files. Before, the capture thread waited for
    the frozen disk and the kernel dropped."""
    out, freeze = frozen_spool
    _capture_through_a_freeze(veth, out, freeze, 120_000)


def test_a_rotation_on_a_stalled_spool_disk_loses_no_packet(veth, frozen_spool):
    """The same with files rotated every 2 s and the freeze starting 0.3 s before a
    rotation: the closed file is committed by a thread of its own, and the next one was
    created ahead (Spool.prepare), so the capture thread makes no file system call at the
    rotation. Before, it waited in the next file's create until the disk thawed, and the
    kernel dropped."""
    out, freeze = frozen_spool
    t = time.time() + 1.0
    boundary = (int(t // 2) + 1) * 2
    files = _capture_through_a_freeze(veth, out, freeze, 200_000, ("--rollover", "2"), at=boundary - 0.3)
    assert len(files) >= 3
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the last prepared one removed
