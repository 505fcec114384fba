"""A capture killed mid-file: the partial file is recovered on the next start, never shipped torn."""

import os
import shutil

from tests.helpers import DATA, data_files, metadata, pcap_count, run_capture


def test_partial_pcap_is_cut_at_last_whole_record_and_marked(tmp_path):
    src = os.path.join(DATA, "zeek__ssh.pcap")
    data = open(src, "rb").read()
    torn = data[:700_001]  # somewhere inside a record
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / ".rec_LAB_20200101000000.pcap.tmp").write_bytes(torn)
    # ...and a data file renamed into place whose metadata record was never written
    shutil.copy(os.path.join(DATA, "zeek__5-pings.pcap"), spool / "rec_LAB_20200101000500.pcap")
    (spool / ".rec_LAB_20200101000500.pcap.meta.json.999.tmp").write_text("{")

    run_capture("--read", os.path.join(DATA, "zeek__5-pings.pcap"), "--output-dir", spool,
                "--experiment", "rec", "--site", "LAB")
    names = os.listdir(spool)
    assert not [n for n in names if n.endswith(".tmp")]
    files = data_files(spool)
    assert len(files) == 3  # two recovered + this run's file
    rec = metadata(str(spool / "rec_LAB_20200101000000.pcap"))
    assert rec["recovered"] is True and rec["recovered_bytes_dropped"] > 0
    n = pcap_count(str(spool / "rec_LAB_20200101000000.pcap"))
    assert n == rec["packets_written"] > 0
    assert os.path.getsize(spool / "rec_LAB_20200101000000.pcap") == rec["size"]
    assert open(spool / "rec_LAB_20200101000000.pcap", "rb").read() == data[:rec["size"]]
    pings = metadata(str(spool / "rec_LAB_20200101000500.pcap"))
    assert pings["recovered"] is True and pings["recovered_bytes_dropped"] == 0 and pings["packets_written"] == 10


def test_header_fragment_is_removed_not_shipped(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / ".rec_LAB_20200101000000.pcap.tmp").write_bytes(b"\xd4\xc3\xb2\xa1\x02\x00")
    run_capture("--read", os.path.join(DATA, "zeek__5-pings.pcap"), "--output-dir", spool,
                "--experiment", "rec", "--site", "LAB")
    [only] = data_files(spool)  # just this run's file: the fragment held no record
    assert metadata(only)["recovered"] is False
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp")]


def test_torn_file_without_a_whole_record_is_removed(tmp_path):
    """A temp file whose first record is already damaged holds no data: removed, not shipped."""
    import struct
    spool = tmp_path / "spool"
    spool.mkdir()
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    bad_record = struct.pack("<IIII", 1, 0, 0xFFFFFF, 60) + b"x" * 30
    (spool / ".rec_LAB_20200101000000.pcap.tmp").write_bytes(header + bad_record)
    run_capture("--read", os.path.join(DATA, "zeek__5-pings.pcap"), "--output-dir", spool,
                "--experiment", "rec", "--site", "LAB")
    [only] = data_files(spool)
    assert metadata(only)["recovered"] is False
    assert not (spool / "rec_LAB_20200101000000.pcap").exists()


def test_an_empty_temp_file_is_removed_quietly(tmp_path):
    """A live capture killed with its next file already made (Spool.prepare) leaves an empty
    temp file: removed at the next start, with no warning (nothing was torn)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / ".rec_LAB_20200101000000.pcap.tmp").write_bytes(b"")
    done = run_capture("--read", os.path.join(DATA, "zeek__5-pings.pcap"), "--output-dir", spool,
                       "--experiment", "rec", "--site", "LAB")
    [only] = data_files(spool)
    assert metadata(only)["recovered"] is False
    assert not [n for n in os.listdir(spool) if n.endswith(".tmp")]
    assert "removing .rec_LAB_20200101000000.pcap.tmp: empty" in done.stderr
    assert "WARNING" not in done.stderr
