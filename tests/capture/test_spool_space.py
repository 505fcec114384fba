"""A full spool or an experiment over its quota: capture stops writing cleanly, counts what it
could not write, and resumes when space returns. Nothing torn is ever shipped."""

import json
import os
import subprocess
import time

import pytest

from tests.helpers import DATA, REPO, data_files, metadata, module_cmd, pcap_count, run_capture

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs(tmp_path):
    """A 400 KiB tmpfs: the spool's file system runs out of space for real."""
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a tmpfs; CI runs as root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def status(spool):
    with open(os.path.join(spool, ".gims-status.json")) as fh:
        return json.load(fh)


def test_disk_full_stops_writing_cleanly_and_counts(small_fs):
    trace = os.path.join(DATA, "zeek__ssh.pcap")  # 1.3 MB, three times the file system
    spool = small_fs / "spool"
    proc = run_capture("--read", trace, "--output-dir", spool, "--max-file-bytes", "100000",
                       "--rollover", "0", "--experiment", "full", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "is full" in proc.stderr
    st = status(spool)
    files = data_files(spool)
    assert files, "files written before the disk filled are delivered"
    for f in files:
        assert pcap_count(f) == metadata(f)["packets_written"]
    assert st["packets_observed"] == 1797
    # every packet is either in a complete file or counted as unwritten
    in_files = sum(metadata(f)["packets_written"] for f in files)
    assert in_files == st["packets_written"]
    assert st["packets_written"] + st["packets_unwritten"] == 1797
    assert st["packets_unwritten"] > 0

    # Space comes back (uploads drained the spool): the next start recovers the torn file.
    for f in files:
        os.unlink(f)
        os.unlink(f + ".meta.json")
    run_capture("--read", os.path.join(DATA, "zeek__5-pings.pcap"), "--output-dir", spool,
                "--experiment", "full")
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp")]
    recovered = [f for f in data_files(spool) if metadata(f)["recovered"]]
    for f in recovered:
        assert pcap_count(f) == metadata(f)["packets_written"]


def test_quota_keeps_an_experiment_within_its_share(tmp_path):
    spool = tmp_path / "spool"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"read": os.path.join(DATA, "zeek__ssh.pcap"), "output_dir": str(spool),
                               "experiment": "quota", "spool_quota_bytes": 1 << 20, "rollover_seconds": 0,
                               "max_file_bytes": 100000}))
    proc = run_capture("--config", cfg, check=False)
    assert proc.returncode == 0, proc.stderr
    st = status(spool)
    files = data_files(spool)
    used = sum(os.path.getsize(f) for f in files)
    assert used <= (1 << 20) + 100000 + 5000  # the quota, plus at most the file being written
    assert st["packets_unwritten"] > 0
    assert st["packets_written"] + st["packets_unwritten"] == 1797
    assert sum(metadata(f)["packets_written"] for f in files) == st["packets_written"]


def test_live_capture_resumes_when_space_returns(small_fs, tmp_path):
    """On a live interface (lo), fill the spool, then free it: writing starts again."""
    spool = small_fs / "spool"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(module_cmd("capture_daemon.cli", "--interface", "lo", "--output-dir", spool,
                                       "--experiment", "resume", "--filter", "udp port 9",
                                       "--snaplen", "1500", "--rollover", "1"),
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            for _ in range(50):
                s.sendto(b"x" * 1200, ("127.0.0.1", 9))
            time.sleep(0.02)
            if os.path.exists(spool / ".gims-status.json") and status(spool).get("writing_suspended"):
                break
        assert status(spool)["writing_suspended"] == "disk full"
        before = status(spool)["files_written"]
        recovered_seen = []
        deadline = time.time() + 30
        while time.time() < deadline:
            for f in data_files(spool):  # play the uploader: check, then take them away
                assert pcap_count(f) == metadata(f)["packets_written"]
                recovered_seen.append(metadata(f)["recovered"])
                os.unlink(f)
                os.unlink(f + ".meta.json")
            s.sendto(b"y" * 200, ("127.0.0.1", 9))
            time.sleep(0.01)
            st = status(spool)
            if st["files_written"] > before + 1 and not st["writing_suspended"]:
                break
        assert not status(spool)["writing_suspended"]
        assert status(spool)["files_written"] > before + 1
        assert any(r for r in recovered_seen), "the torn file was recovered and shipped"
    finally:
        s.close()
        proc.terminate()
        proc.wait(timeout=30)
    # the file torn by the full disk was recovered when space returned
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp")]
    for f in data_files(spool):
        assert pcap_count(f) == metadata(f)["packets_written"]
