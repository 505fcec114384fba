"""Minimal classic-pcap reading/writing for the anonymization tests (whole file → one Batch),
independent of the capture path's own source and output code."""
from __future__ import annotations

import struct

import numpy as np

from capture_daemon.batch import Batch

_MAGICS = {0xA1B2C3D4: ("<", 1), 0xA1B23C4D: ("<", 1000), 0xD4C3B2A1: (">", 1), 0x4D3CB2A1: (">", 1000)}


def read_pcap(path) -> tuple[Batch, dict]:
    data = open(path, "rb").read()
    magic = struct.unpack("<I", data[:4])[0]
    endian, div = _MAGICS[magic]
    _, _, _, _, snaplen, linktype = struct.unpack(endian + "HHiIII", data[4:24])
    pos, recs = 24, []
    hdr = struct.Struct(endian + "IIII")
    while pos + 16 <= len(data):
        sec, frac, incl, orig = hdr.unpack_from(data, pos)
        recs.append((sec, frac // div, pos + 16, incl, orig))
        pos += 16 + incl
    # a file with no records (a capture's idle interval) is a valid pcap: an empty batch
    sec, usec, start, incl, orig = (np.array(c, dtype=np.int64) for c in (zip(*recs) if recs else [()] * 5))
    raw = np.frombuffer(data, dtype=np.uint8)
    buf = np.concatenate([raw[s:s + n] for s, n in zip(start, incl)] or [raw[:0]])
    off = np.zeros(len(incl), dtype=np.int64)
    np.cumsum(incl[:-1], out=off[1:])
    return Batch(buf, off, incl, orig, sec, usec, int(linktype)), {"snaplen": snaplen}


def write_pcap(path, batch: Batch, snaplen: int = 262144) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, batch.linktype))
        buf = batch.buf.tobytes()
        for i in range(len(batch)):
            o, n = int(batch.off[i]), int(batch.caplen[i])
            f.write(struct.pack("<IIII", int(batch.ts_sec[i]), int(batch.ts_usec[i]), n,
                                int(batch.wirelen[i])))
            f.write(buf[o:o + n])


def concat(batches) -> Batch:
    """One batch holding the packets of several batches of the same link type."""
    bufs, offs, base = [], [], 0
    for b in batches:
        bufs.append(b.buf)
        offs.append(b.off + base)
        base += len(b.buf)
    cat = lambda name: np.concatenate([getattr(b, name) for b in batches])  # noqa: E731
    return Batch(np.concatenate(bufs), np.concatenate(offs), cat("caplen"), cat("wirelen"),
                 cat("ts_sec"), cat("ts_usec"), batches[0].linktype)
