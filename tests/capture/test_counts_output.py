"""Regression tests for capture_daemon.outputs.CountsOutput found by the fuzzer (tests/fuzz):
a packet stamped far from its neighbours must not make a counts file zero-fill decades."""
import io
import os
import resource
import struct
import subprocess
import sys

import numpy as np

from capture_daemon.batch import from_packets
from capture_daemon.outputs import CountsOutput

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UDP = bytes.fromhex("020000000001020000000002" "0800" "4500001c000100004011" "0000" "0a010203" "c0a80709"
                    "0035003500080000")


def _rows(out: io.BytesIO) -> list[list[str]]:
    return [ln.split(",") for ln in out.getvalue().decode().splitlines()[1:]]


def test_a_packet_stamped_at_time_zero_gets_its_own_row_not_decades_of_zero_rows():
    c = CountsOutput(1.0)
    f = io.BytesIO()
    c.start_file(f, 1000.0)  # (the capture found this with 1.7e9 s: MemoryError)
    b = from_packets([UDP] * 3)
    b.ts_sec = np.array([1000, 0, 1002])
    c.observe(b)
    c.add(b, None)
    meta = c.end_file(1003.0, final=True)
    rows = _rows(f)
    assert [r[0] for r in rows] == ["0", "1000", "1001", "1002"]
    assert [int(r[2]) for r in rows] == [1, 1, 0, 1]
    assert meta["counts"]["rows"] == 4


def test_a_quiet_spell_longer_than_the_budget_leaves_a_jump_and_says_so():
    c = CountsOutput(1.0)
    c.MAX_ZERO_ROWS = 10
    f = io.BytesIO()
    c.start_file(f, 0.0)
    b = from_packets([UDP] * 2)
    b.ts_sec = np.array([0, 100])
    c.add(b, None)
    meta = c.end_file(101.0, final=True)
    rows = _rows(f)
    assert len(rows) == 12 and rows[0][0] == "0" and rows[-1][0] == "100"
    assert meta["counts"]["zero_rows_omitted"] == 89


def test_gims_capture_counts_survives_a_record_stamped_at_zero(tmp_path):
    src = tmp_path / "t.pcap"
    with open(src, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ts in (1_700_000_000, 0, 1_700_000_001):
            f.write(struct.pack("<IIII", ts, 0, len(UDP), len(UDP)) + UDP)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "capture_daemon.cli", "--read", str(src), "--output-dir", str(out),
                        "--aggregate", "counts"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=60,
                       # a regression must fail here, not take the CI machine's memory
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)))
    assert p.returncode == 0, p.stderr[-1000:]
    csvs = [n for n in os.listdir(out) if n.endswith(".csv")]
    assert csvs and all(os.path.exists(out / (n + ".meta.json")) for n in csvs)
    total = sum(int(r.split(",")[2]) for n in csvs for r in (out / n).read_text().splitlines()[1:])
    assert total == 3
