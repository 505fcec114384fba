"""The offline reader: the C record walker (_accel_read) against pcapy-ng's next_batch.

Both paths must hand out the same packets, byte for byte, with the same lengths and times, for
every trace and every savefile flavour (little/big-endian, micro/nanosecond), and refuse a
corrupt file with a reason after delivering every whole record before the damage.
"""
import os
import struct

import numpy as np
import pytest

from capture_daemon import source
from capture_daemon.source import OfflineSource, SourceError
from tests.helpers import TRACES


def _packets(src):
    """Every packet of a source as (bytes, caplen, wirelen, sec, usec) tuples."""
    out = []
    for batch in src.batches():
        buf = batch.buf.tobytes()
        for i in range(len(batch)):
            o, c = int(batch.off[i]), int(batch.caplen[i])
            out.append((buf[o:o + c], c, int(batch.wirelen[i]), int(batch.ts_sec[i]),
                        int(batch.ts_usec[i])))
    return out


def _read(path, direct, monkeypatch):
    if not direct:
        monkeypatch.setattr(source, "_accel_read", None)
    src = OfflineSource(str(path))
    try:
        assert src.direct == direct
        return _packets(src)
    finally:
        src.close()
        monkeypatch.undo()


def _records(path):
    """(ts_sec, ts_usec, data, wirelen) of every record, read with struct (the oracle)."""
    data = open(path, "rb").read()
    pos, recs = 24, []
    while pos + 16 <= len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, pos)
        recs.append((sec, usec, data[pos + 16:pos + 16 + incl], orig))
        pos += 16 + incl
    return data[:24], recs


def _write(path, header, recs, endian="<", nsec=False):
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    _, vmaj, vmin, zone, sig, snap, link = struct.unpack("<IHHiIII", header)
    with open(path, "wb") as fh:
        fh.write(struct.pack(endian + "IHHiIII", magic, vmaj, vmin, zone, sig, snap, link))
        for sec, usec, pkt, orig in recs:
            frac = usec * 1000 + 999 if nsec else usec
            fh.write(struct.pack(endian + "IIII", sec, frac, len(pkt), orig) + pkt)


@pytest.mark.parametrize("trace", TRACES, ids=os.path.basename)
def test_direct_reader_equals_next_batch(trace, monkeypatch):
    if source._accel_read is None:
        pytest.skip("C accelerator not built (make build)")
    direct = _read(trace, True, monkeypatch)
    via_pcapy = _read(trace, False, monkeypatch)
    assert len(direct) == len(_records(trace)[1]) > 0
    assert direct == via_pcapy


@pytest.mark.parametrize("endian,nsec", [(">", False), ("<", True), (">", True)])
def test_other_savefile_flavours_read_the_same(tmp_path, monkeypatch, endian, nsec):
    if source._accel_read is None:
        pytest.skip("C accelerator not built (make build)")
    trace = next(t for t in TRACES if "wikipedia" in t)
    header, recs = _records(trace)
    path = tmp_path / "flavour.pcap"
    _write(path, header, recs, endian, nsec)
    for direct in (True, False):
        got = _read(path, direct, monkeypatch)
        assert [(p, w, s, u) for p, _, w, s, u in got] == [(p, w, s, u) for s, u, p, w in recs]


def test_many_chunks_and_records_cut_by_chunk_ends(tmp_path, monkeypatch):
    if source._accel_read is None:
        pytest.skip("C accelerator not built (make build)")
    trace = next(t for t in TRACES if "wikipedia" in t)
    monkeypatch.setattr(source, "CHUNK_BYTES", 4099)  # odd: records straddle every chunk end
    monkeypatch.setattr(source, "MAX_CAPLEN", 1600)
    src = OfflineSource(trace)
    batches = list(src.batches())
    src.close()
    assert len(batches) > 3
    got = [(b.buf[int(b.off[i]):int(b.off[i] + b.caplen[i])].tobytes(), int(b.wirelen[i]))
           for b in batches for i in range(len(b))]
    assert got == [(p, w) for _, _, p, w in _records(trace)[1]]
    for b in batches:  # records layout: the buffer is exactly the batch's records
        assert b.records and len(b.buf) == int((b.caplen + 16).sum())


def _packets_before_error(path, message) -> int:
    """Packets the reader delivers from a damaged file before it raises SourceError(message)."""
    src = OfflineSource(str(path))
    seen = 0
    with pytest.raises(SourceError, match=message):
        for batch in src.batches():
            seen += len(batch)
    src.close()
    return seen


@pytest.mark.parametrize("cut", [5, 16, 30])
def test_truncated_file_delivers_whole_records_then_fails(tmp_path, cut, monkeypatch):
    if source._accel_read is None:
        pytest.skip("C accelerator not built (make build)")
    trace = next(t for t in TRACES if "5-pings" in t)
    data = open(trace, "rb").read()
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[:-cut])
    whole = len(_records(path)[1]) - (1 if cut > 16 else 0)
    seen = _packets_before_error(path, "truncated dump file")
    assert seen == min(whole, len(_records(trace)[1]) - 1)


def test_bogus_capture_length_is_refused_with_a_reason(tmp_path):
    if source._accel_read is None:
        pytest.skip("C accelerator not built (make build)")
    trace = next(t for t in TRACES if "5-pings" in t)
    header, recs = _records(trace)
    path = tmp_path / "bogus.pcap"
    _write(path, header, recs[:2])
    with open(path, "ab") as fh:
        fh.write(struct.pack("<IIII", 1, 2, 10_000_000, 60) + b"x" * 100)
    assert _packets_before_error(path, "invalid packet capture length 10000000") == 2


def test_batches_are_writable_without_a_copy():
    if source._accel_read is None:
        pytest.skip("C accelerator not built (make build)")
    src = OfflineSource(TRACES[0])
    batch = next(iter(src.batches()))
    src.close()
    buf = batch.buf
    batch.make_writable()
    assert batch.buf is buf
    assert np.shares_memory(batch.buf, buf)


def test_tiny_records_filling_every_batch_to_capacity(tmp_path, monkeypatch):
    """Records of a few bytes (snaplen 14, or nothing captured) fill the packet arrays before
    the bytes run out: what is left at end of file is walked, not taken for a truncated record."""
    if source._accel_read is None:
        pytest.skip("C accelerator not built (make build)")
    trace = next(t for t in TRACES if "wikipedia" in t)
    header, recs = _records(trace)
    header = header[:16] + struct.pack("<II", 14, 1)
    recs = [(s, u, p[:14 * (i % 2)], w) for i, (s, u, p, w) in enumerate(recs * 20)]
    path = tmp_path / "tiny.pcap"
    _write(path, header, recs)
    monkeypatch.setattr(source, "CHUNK_BYTES", 3000)
    monkeypatch.setattr(source, "MAX_CAPLEN", 64)
    src = OfflineSource(str(path))
    got = [(b.buf[int(b.off[i]):int(b.off[i] + b.caplen[i])].tobytes(), int(b.wirelen[i]))
           for b in src.batches() for i in range(len(b))]
    src.close()
    assert got == [(p, w) for _, _, p, w in recs]


def test_pcap_records_in_c_equal_the_numpy_reference():
    if source._accel_read is None:
        pytest.skip("C accelerator not built (make build)")
    from capture_daemon.batch import from_packets
    from capture_daemon.outputs import pcap_records, pcap_records_numpy
    rng = np.random.default_rng(5)
    packets = [rng.integers(0, 256, int(k), dtype=np.uint8).tobytes()
               for k in rng.integers(0, 300, 2000)]
    batch = from_packets(packets, start=1_700_000_000.5, step=0.000137,
                         wirelens=[len(p) + int(x) for p, x in zip(packets, rng.integers(0, 9000, 2000))])
    batch.ts_sec[-1] = 2**32 + 5          # beyond 2106: both keep the low 32 bits
    assert pcap_records(batch).tobytes() == pcap_records_numpy(batch).tobytes()
    part = batch.slice(100, 1900)          # offsets not starting at 0
    assert pcap_records(part).tobytes() == pcap_records_numpy(part).tobytes()
    bad = batch.slice(0, 10)
    bad.off = bad.off.copy()
    bad.off[3] = len(batch.buf) + 1
    with pytest.raises(ValueError, match="outside the buffer"):
        pcap_records(bad)
