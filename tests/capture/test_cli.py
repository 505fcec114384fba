"""gims-capture end to end on the bundled traces: files, names, metadata, rotation, errors."""

import hashlib
import json
import os
import re
import subprocess

import pytest

from tests.helpers import DATA, TRACES, data_files, metadata, pcap_count, run_capture, tshark_fields

NAME_RE = re.compile(r"^(?P<exp>[^_]+)_(?P<site>[A-Z0-9]+)_(?P<ts>\d{14})(_\d+)?\.(pcap|csv|ipfix)$")


def _malformed(path):
    return len(tshark_fields(path, "frame.number", extra=["-Y", "_ws.malformed"]))


@pytest.mark.parametrize("trace", TRACES, ids=os.path.basename)
def test_every_trace_copies_exactly(tmp_path, trace):
    """Default pcap output is the input's packets, byte for byte, with a metadata record."""
    run_capture("--read", trace, "--output-dir", tmp_path, "--experiment", "exp1", "--site", "lab",
                "--rollover", "0")
    files = data_files(tmp_path)
    assert len(files) == 1
    name = os.path.basename(files[0])
    m = NAME_RE.match(name)
    assert m and m["exp"] == "exp1" and m["site"] == "LAB"
    with open(trace, "rb") as a, open(files[0], "rb") as b:
        src, out = a.read(), b.read()
    # Same records (24-byte global header aside: we write our own, same link type/snaplen).
    assert out[24:] == src[24:]
    assert out[20:24] == src[20:24]  # link type
    meta = metadata(files[0])
    assert meta["packets_observed"] == meta["packets_written"] == pcap_count(trace)
    assert meta["size"] == len(out) and meta["sha256"] == hashlib.sha256(out).hexdigest()
    assert _malformed(files[0]) == _malformed(trace)


def test_metadata_fields(tmp_path):
    trace = os.path.join(DATA, "zeek__wikipedia.pcap")
    run_capture("--read", trace, "--output-dir", tmp_path, "--experiment", "meta1", "--site", "Lab2",
                "--sample", "everyN:2", "--filter", "ip or ip6")
    [f] = data_files(tmp_path)
    meta = metadata(f)
    for key in ("experiment", "site", "device", "filter", "snaplen", "sampling", "anonymization",
                "aggregation", "software", "start_time", "end_time", "first_packet_time",
                "last_packet_time", "packets_observed", "bytes_observed", "packets_sampled",
                "bytes_sampled", "packets_written", "pcap_stats", "malformed_packets", "size",
                "sha256", "user_text", "stats_updates", "summary", "data_file", "data_type"):
        assert key in meta, key
    assert meta["experiment"] == "meta1" and meta["site"] == "LAB2"
    assert meta["filter"] == "ip or ip6"
    assert meta["sampling"]["type"] == "everyN" and meta["sampling"]["n"] == 2
    assert meta["packets_observed"] == 126  # 136 packets, 10 of them not IP
    assert meta["packets_sampled"] == meta["packets_written"] == 63
    assert meta["sampling"]["packets_before"] == 126 and meta["sampling"]["packets_after"] == 63
    assert meta["anonymization"] == {"scheme": None, "key_fingerprint": None}
    assert set(meta["pcap_stats"]) == {"ps_recv", "ps_drop", "ps_ifdrop"}
    assert meta["software"]["libpcap"].startswith("libpcap version")
    assert meta["data_file"] == os.path.basename(f)
    assert meta["first_packet_time"] <= meta["last_packet_time"]
    assert pcap_count(f) == 63


def test_every_n_is_exact(tmp_path):
    trace = os.path.join(DATA, "zeek__modbusBig.pcap")  # 13622 packets
    run_capture("--read", trace, "--output-dir", tmp_path, "--sample", "everyN:7", "--rollover", "0")
    [f] = data_files(tmp_path)
    assert pcap_count(f) == 13622 // 7
    # The kept packets are exactly the 7th, 14th, ... of the input.
    src = tshark_fields(trace, "frame.time_epoch", "tcp.seq_raw")
    out = tshark_fields(f, "frame.time_epoch", "tcp.seq_raw")
    assert out == src[6::7]


def test_uniform_sampling_is_statistically_right_and_seedable(tmp_path):
    trace = os.path.join(DATA, "zeek__modbusBig.pcap")
    counts = []
    for run in ("a", "b"):
        out = tmp_path / run
        run_capture("--read", trace, "--output-dir", out, "--sample", "uniform:0.25:42", "--rollover", "0")
        [f] = data_files(out)
        counts.append((pcap_count(f), open(f, "rb").read()[24:]))
    n, p = 13622, 0.25
    k = counts[0][0]
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(k - n * p) < 5 * sigma  # a 5-sigma band: fails by chance ~1 in 1.7 million
    assert counts[0] == counts[1]  # same seed, same packets
    meta = metadata(data_files(tmp_path / "a")[0])
    assert meta["sampling"] == {"type": "uniformrandom", "p": 0.25, "seed": 42,
                                "packets_before": n, "packets_after": k}


def test_rotation_by_time_keeps_every_packet(tmp_path):
    trace = os.path.join(DATA, "zeek__wikipedia.pcap")  # spans ~6.4 s
    run_capture("--read", trace, "--output-dir", tmp_path, "--rollover", "2", "--experiment", "rot")
    files = data_files(tmp_path)
    assert len(files) >= 3
    total = 0
    for f in files:
        meta = metadata(f)
        assert meta["packets_written"] == pcap_count(f)
        total += meta["packets_written"]
        start, end = meta["start_time"], meta["end_time"]
        assert start <= end
        if meta["packets_written"]:
            assert start <= meta["first_packet_time"] <= meta["last_packet_time"] <= end
    assert total == 136
    # Consecutive files cover consecutive time: each starts where the previous ended.
    metas = [metadata(f) for f in files]
    for a, b in zip(metas, metas[1:]):
        assert a["end_time"] == b["start_time"]


def test_rotation_by_size(tmp_path):
    trace = os.path.join(DATA, "zeek__ssh.pcap")  # 1.3 MB
    run_capture("--read", trace, "--output-dir", tmp_path, "--max-file-bytes", "200000", "--rollover", "0")
    files = data_files(tmp_path)
    assert len(files) >= 6
    assert all(os.path.getsize(f) <= 200000 for f in files)
    assert sum(pcap_count(f) for f in files) == 1797
    assert len({os.path.basename(f) for f in files}) == len(files)


def test_gap_in_trace_closes_one_empty_file(tmp_path):
    """A quiet spell longer than the rollover leaves one valid empty file covering it."""
    from capture_daemon.batch import from_packets
    from capture_daemon.outputs import PcapOutput, pcap_records
    import struct
    pkt = bytes(60)
    b = from_packets([pkt, pkt], start=1000.0, step=100.0)  # 100 s apart, rollover 10 s
    trace = tmp_path / "gap.pcap"
    with open(trace, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        f.write(pcap_records(b).tobytes())
    out = tmp_path / "out"
    run_capture("--read", trace, "--output-dir", out, "--rollover", "10")
    metas = [metadata(f) for f in data_files(out)]
    assert [m["packets_written"] for m in metas] == [1, 0, 1]
    assert pcap_count(data_files(out)[1]) == 0  # empty but valid
    assert metas[1]["start_time"].startswith("1970-01-01T00:16:50")
    assert metas[1]["end_time"].startswith("1970-01-01T00:18:20")


def test_counts_output(tmp_path):
    trace = os.path.join(DATA, "zeek__wikipedia.pcap")
    run_capture("--read", trace, "--output-dir", tmp_path, "--aggregate", "counts", "--rollover", "0",
                "--sample", "everyN:2")
    [f] = data_files(tmp_path)
    assert f.endswith(".csv")
    lines = open(f).read().splitlines()
    assert lines[0] == "interval_start,interval_seconds,packets_observed,bytes_observed,packets_sampled,bytes_sampled"
    rows = [list(map(float, l.split(","))) for l in lines[1:]]
    assert sum(r[2] for r in rows) == 136 and sum(r[4] for r in rows) == 68
    assert sum(r[3] for r in rows) == 25260  # wire bytes (tcpdump -r: sum of lengths)
    starts = [r[0] for r in rows]
    assert starts == sorted(starts) and all(b - a == 1 for a, b in zip(starts, starts[1:]))
    meta = metadata(f)
    assert meta["data_type"] == "counts" and meta["packets_observed"] == 136


def test_empty_input_still_writes_a_valid_file(tmp_path):
    trace = os.path.join(DATA, "zeek__wikipedia.pcap")
    run_capture("--read", trace, "--output-dir", tmp_path, "--filter", "udp port 9")
    [f] = data_files(tmp_path)
    assert pcap_count(f) == 0 and metadata(f)["packets_observed"] == 0


@pytest.mark.parametrize("args, message", [
    (["--read", "x.pcap"], "--output-dir"),
    (["--output-dir", "/tmp/x"], "exactly one of"),
    (["--read", "/nonexistent.pcap", "--output-dir", "/tmp/x"], "no such file"),
    (["--read", TRACES[0], "--output-dir", "/tmp/x", "--filter", "tcp port"], "does not compile"),
    (["--read", TRACES[0], "--output-dir", "/tmp/x", "--sample", "everyN:0"], "N >= 1"),
    (["--read", TRACES[0], "--output-dir", "/tmp/x", "--sample", "uniform:1.5"], "0 < P <= 1"),
    (["--read", TRACES[0], "--output-dir", "/tmp/x", "--sample", "often"], "bad sampling spec"),
    (["--read", TRACES[0], "--output-dir", "/tmp/x", "--experiment", "../etc"], "experiment"),
    (["--read", TRACES[0], "--output-dir", "/tmp/x", "--snaplen", "-3"], "snaplen"),
    (["--read", TRACES[0], "--output-dir", "/tmp/x", "--aggregate", "nope"], "invalid choice"),
    (["--read", TRACES[0], "--interface", "lo", "--output-dir", "/tmp/x"], "not allowed with"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    proc = run_capture(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_config_file_and_flag_override(tmp_path):
    cfg = {"experiment": "cfgexp", "site": "cfg", "read": os.path.join(DATA, "zeek__5-pings.pcap"),
           "output_dir": str(tmp_path / "a"), "sample": "everyN:5", "user_text": "hello world"}
    path = tmp_path / "capture.json"
    path.write_text(json.dumps(cfg))
    run_capture("--config", path, "--sample", "everyN:2")
    [f] = data_files(tmp_path / "a")
    meta = metadata(f)
    assert meta["experiment"] == "cfgexp" and meta["user_text"] == "hello world"
    assert meta["packets_written"] == 5  # the flag (everyN:2) overrode the file (everyN:5)


@pytest.mark.parametrize("cfg, message", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"snaplen": "64"}, "snaplen has the wrong type"),
    ({"anon_key_hex": "abc"}, "anon_key_hex"),
])
def test_bad_config_names_the_field(tmp_path, cfg, message):
    base = {"read": os.path.join(DATA, "zeek__5-pings.pcap"), "output_dir": str(tmp_path)}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict(base, **cfg)))
    proc = run_capture("--config", path, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert "abc" not in proc.stderr or "anon_key_hex" not in cfg  # a key is never echoed


def test_counters_continue_across_capture_processes(tmp_path):
    """Pause/resume restarts the capture process: the experiment's totals carry on."""
    trace = os.path.join(DATA, "zeek__5-pings.pcap")
    for _ in range(2):
        run_capture("--read", trace, "--output-dir", tmp_path, "--experiment", "cont")
    status = json.load(open(tmp_path / ".gims-status.json"))
    assert status["packets_observed"] == 20 and status["files_written"] == 2
    assert len(data_files(tmp_path)) == 2
