"""gims-capture with --anon-key-file on real traces, end to end (subprocess, as users run it):
tshark reads the output with no checksum errors and no new malformed packets, every address
is Crypto-PAn of the input's, and the metadata carries the key's fingerprint, never the key."""
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from capture_daemon.cryptopan import CryptoPAn, fingerprint

from .test_anonymize_traces import ADDRS, ALL, KEY, problems, tshark

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
TRACES = ["tcpdump__afs.pcap", "zeek__icmp_dot1q.pcap", "zeek__http-qinq-0.pcap",
          "zeek__ipv6-fragmented-dns.pcap", "zeek__timestamp.pcap", "zeek__modbusBig.pcap",
          "zeek__mdns.pcap"]


def run_capture(trace, out_dir, key_file, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "capture_daemon.cli", "--read", str(trace), "--output-dir",
         str(out_dir), "--anon-key-file", str(key_file), "--experiment", "anon", "--site", "T",
         *extra], cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert KEY.hex() not in proc.stdout + proc.stderr
    files = sorted(p for p in out_dir.iterdir() if p.suffix == ".pcap")
    assert len(files) == 1
    return files[0], proc


@pytest.mark.parametrize("name", TRACES)
def test_capture_cli_anonymizes_trace(tmp_path, name):
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex() + "\n")
    trace = DATA / name
    out, _ = run_capture(trace, tmp_path / "out", key_file)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    anon = meta["anonymization"]
    assert anon["scheme"] == "cryptopan" and anon["key_fingerprint"] == fingerprint(KEY)
    assert anon["packets_anonymized"] == meta["packets_written"] and anon["not_anonymized"] == 0
    assert KEY.hex() not in json.dumps(meta)
    bad_in, mal_in = problems(trace)
    bad_out, mal_out = problems(out)
    assert bad_out == set() and mal_out == mal_in
    cp = CryptoPAn(KEY)
    rin, rout = tshark(trace, ALL), tshark(out, ALL)
    assert len(rin) == len(rout)
    n = 0
    for a, b in zip(rin, rout):
        for vin, vout in zip(a[7:], b[7:]):
            vin, vout = vin.split(",") if vin else [], vout.split(",") if vout else []
            assert [cp.anonymize_str(x) for x in vin] == [str(ipaddress.ip_address(y)) for y in vout]
            n += len(vin)
    assert n > 0


def test_capture_cli_anonymizes_sampled_packets(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)  # raw form
    trace = DATA / "tcpdump__afs.pcap"
    out, _ = run_capture(trace, tmp_path / "out", key_file, "--sample", "everyN:3")
    rin = {int(r[0]): r for r in tshark(trace, ALL)}
    rout = tshark(out, ALL)
    assert len(rout) == len(rin) // 3
    cp = CryptoPAn(KEY)
    src = ADDRS.index("ip.src") + 7
    for i, row in enumerate(rout):
        orig = rin[3 * (i + 1)]  # everyN:3 keeps packets 3, 6, 9, ...
        assert [cp.anonymize_str(x) for x in orig[src].split(",") if x] == \
            [x for x in row[src].split(",") if x]
    assert problems(out)[0] == set()


def test_capture_cli_bad_key_file_is_a_clear_error(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("not a key " * 3)
    proc = subprocess.run(
        [sys.executable, "-m", "capture_daemon.cli", "--read", str(DATA / "zeek__5-pings.pcap"),
         "--output-dir", str(tmp_path / "out"), "--anon-key-file", str(key_file)],
        cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "not a key" not in proc.stderr
    assert "32 raw bytes or 64 hex" in proc.stderr
