"""Recovery of files a killed capture process left in its spool.

A capture killed mid-file (SIGKILL, power loss) leaves ``.<name>.tmp`` behind, or — if it
died between the data file's rename and its metadata record — a visible data file without
``.meta.json``. Neither is ever uploaded as is (the uploader only takes files with a
metadata record). On the next start we recover them: the data is cut at the last whole
record (pcap record, CSV line, IPFIX message), renamed into place and given a metadata
record marked ``"recovered": true`` with what could be learned from the file itself.
A file with no whole record is removed (it holds no data, only a partial header).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time

from .atomic import fsync_dir, write_json_atomic
from .spool import utc_iso

log = logging.getLogger("gims-capture")

PCAP_HEADER = 24
PCAP_RECORD = 16
IPFIX_HEADER = 16


def _pcap_whole_length(data: bytes):
    """(length of the whole records, record count, first ts, last ts); None if not pcap."""
    if len(data) < PCAP_HEADER:
        return None
    magic = struct.unpack_from("<I", data)[0]
    if magic == 0xA1B2C3D4:
        endian, tsdiv = "<", 1e6
    elif magic == 0xD4C3B2A1:
        endian, tsdiv = ">", 1e6
    elif magic == 0xA1B23C4D:
        endian, tsdiv = "<", 1e9
    else:
        return None
    snaplen = struct.unpack_from(endian + "I", data, 16)[0]
    pos, count, first, last = PCAP_HEADER, 0, None, None
    rec = struct.Struct(endian + "IIII")
    while pos + PCAP_RECORD <= len(data):
        sec, frac, caplen, _ = rec.unpack_from(data, pos)
        if caplen > max(snaplen, 262144) or pos + PCAP_RECORD + caplen > len(data):
            break
        t = sec + frac / tsdiv
        first = t if first is None else first
        last = t
        pos += PCAP_RECORD + caplen
        count += 1
    return pos, count, first, last


def _csv_whole_length(data: bytes):
    end = data.rfind(b"\n") + 1
    lines = data[:end].count(b"\n")
    return end, max(lines - 1, 0), None, None


def _ipfix_whole_length(data: bytes):
    pos, count = 0, 0
    while pos + IPFIX_HEADER <= len(data):
        version, length = struct.unpack_from("!HH", data, pos)
        if version != 10 or length < IPFIX_HEADER or pos + length > len(data):
            break
        pos += length
        count += 1
    return pos, count, None, None


WHOLE_LENGTH = {"pcap": _pcap_whole_length, "csv": _csv_whole_length, "ipfix": _ipfix_whole_length}
DATA_TYPES = {"pcap": "pcap", "csv": "counts", "ipfix": "ipfix"}


def recover_spool(directory: str, prefix: str, base_meta: dict) -> list[str]:
    """Recover every left-over file of this experiment; returns the recovered data paths."""
    recovered = []
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return recovered
    names = set(entries)
    for entry in entries:
        if entry.startswith(".") and entry.endswith(".tmp") and ".meta.json." in entry:
            _unlink(os.path.join(directory, entry))  # a metadata record never finished
    for entry in entries:
        if entry.startswith(f".{prefix}_") and entry.endswith(".tmp") and ".meta.json" not in entry:
            final = entry[1:-len(".tmp")]
            if final in names:
                _unlink(os.path.join(directory, entry))
                continue
            path = recover_one(directory, os.path.join(directory, entry), final, base_meta)
        elif (entry.startswith(f"{prefix}_") and not entry.endswith(".meta.json")
              and f"{entry}.meta.json" not in names):
            path = recover_one(directory, os.path.join(directory, entry), entry, base_meta)
        else:
            continue
        if path:
            recovered.append(path)
    if recovered:
        fsync_dir(directory)
    return recovered


def recover_one(directory: str, src: str, final: str, base_meta: dict) -> str | None:
    """Recover one torn file (temp or unlabelled data file) under its final name."""
    ext = final.rsplit(".", 1)[-1]
    measure = WHOLE_LENGTH.get(ext)
    with open(src, "rb") as fh:
        data = fh.read()
    if not data:  # e.g. the next file, made ahead (Spool.prepare), never written to
        log.info("removing %s: empty", os.path.basename(src))
        _unlink(src)
        return None
    result = measure(data) if measure else None
    if result is None or result[0] == 0 or result[1] == 0:
        log.warning("removing %s: nothing whole to recover", os.path.basename(src))
        _unlink(src)
        return None
    length, records, first, last = result
    dropped = len(data) - length
    if dropped:
        with open(src, "r+b") as fh:
            fh.truncate(length)
            fh.flush()
            os.fsync(fh.fileno())
    else:
        with open(src, "rb") as fh:
            os.fsync(fh.fileno())
    final_path = os.path.join(directory, final)
    os.replace(src, final_path)
    kept = data[:length]
    meta = dict(base_meta)
    meta.update({
        "data_file": final, "data_type": DATA_TYPES.get(ext, ext),
        "recovered": True, "recovered_at": utc_iso(time.time()),
        "recovered_bytes_dropped": dropped, "records": records,
        "first_packet_time": utc_iso(first), "last_packet_time": utc_iso(last),
        "packets_written": records if ext == "pcap" else None,
        "size": length, "sha256": hashlib.sha256(kept).hexdigest(),
    })
    write_json_atomic(final_path + ".meta.json", meta)
    log.warning("recovered %s after an unclean stop: %d whole records kept, %d trailing bytes dropped",
                final, records, dropped)
    return final_path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
