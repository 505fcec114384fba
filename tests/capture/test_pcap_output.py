"""Regression tests for capture_daemon.outputs.PcapOutput found by the fuzzer (tests/fuzz)."""
import io
import struct

from capture_daemon.outputs import PcapOutput


def _file_linktype(dlt: int) -> int:
    f = io.BytesIO()
    PcapOutput(dlt, 128).start_file(f, 0.0)
    return struct.unpack("<I", f.getvalue()[20:24])[0]


def test_raw_ip_is_written_as_linktype_raw():
    """DLT_RAW (12, or 14 on OpenBSD) was written into the savefile header as is; 14 is "unknown
    data link type" to tcpdump. libpcap's own pcap_dump writes LINKTYPE_RAW (101)."""
    assert [_file_linktype(d) for d in (12, 14, 101)] == [101, 101, 101]


def test_other_link_types_are_written_unchanged():
    assert [_file_linktype(d) for d in (0, 1, 108, 113, 228, 229, 276)] == [0, 1, 108, 113, 228, 229, 276]
