"""Output formats for the spool: pcap (the default) and per-interval counts.

An output format writes one file at a time; the spool opens and closes files (rotation,
atomic rename, metadata) and hands the format the packets that belong in the current one.
Interface (also implemented by capture_daemon.flow_output.FlowOutput):
    ext, data_type
    start_file(f, start_time)          a new file is open: write its header
    observe(times, wirelen)            every packet observed, before sampling (optional)
    add(batch, headers, keep)          the sampled (and anonymized) packets where keep is True
    advance(now)                       time moved on, packets or not
    end_file(end_time, final) -> dict  flush what belongs in this file; extra metadata
    close()
"""

from __future__ import annotations

import struct

import numpy as np

from .batch import Batch, back_to_back_offsets
from .parse import DLT_RAW_BSD, DLT_RAW_OBSD, LINKTYPE_RAW

try:
    from . import _accel_read  # records(): packed batches (live capture) as pcap records
except ImportError:
    _accel_read = None

PCAP_GLOBAL_HEADER = struct.Struct("<IHHiIII")
PCAP_MAGIC_USEC = 0xA1B2C3D4
PCAP_RECORD_HEADER_BYTES = 16


def pcap_records(batch: Batch) -> np.ndarray:
    """The packets of a packed batch as pcap records (header + data), one uint8 array."""
    if _accel_read is None:
        return pcap_records_numpy(batch)
    out = np.empty(int((batch.caplen + PCAP_RECORD_HEADER_BYTES).sum()), dtype=np.uint8)
    fields = [np.ascontiguousarray(a, dtype=np.int64) for a in
              (batch.off, batch.caplen, batch.wirelen, batch.ts_sec, batch.ts_usec)]
    _accel_read.records(batch.buf, *fields, out)
    return out


def pcap_records_numpy(batch: Batch) -> np.ndarray:
    """pcap_records without the C accelerator (the reference the tests compare it with).

    Built with one boolean mask instead of a loop: header bytes go where the mask is set,
    packet bytes (already contiguous in the batch buffer) fill the rest in order.
    """
    n = len(batch)
    sizes = batch.caplen + PCAP_RECORD_HEADER_BYTES
    total = int(sizes.sum())
    starts = back_to_back_offsets(sizes)
    headers = np.empty((n, 4), dtype="<u4")
    headers[:, 0] = batch.ts_sec
    headers[:, 1] = batch.ts_usec
    headers[:, 2] = batch.caplen
    headers[:, 3] = batch.wirelen
    is_header = np.zeros(total, dtype=bool)
    is_header[(starts[:, None] + np.arange(PCAP_RECORD_HEADER_BYTES)).ravel()] = True
    out = np.empty(total, dtype=np.uint8)
    out[is_header] = headers.view(np.uint8).ravel()
    data_len = int(batch.caplen.sum())
    first = int(batch.off[0]) if n else 0
    out[~is_header] = batch.buf[first:first + data_len]
    return out


# libpcap reports raw IP as DLT_RAW, which is 12 on most systems and 14 on OpenBSD; a savefile
# must say LINKTYPE_RAW (101) instead, as libpcap's own pcap_dump does: 14 in a file header is
# "unknown data link type" to every reader off OpenBSD (tcpdump refused our file).
SAVEFILE_LINKTYPES = {DLT_RAW_BSD: LINKTYPE_RAW, DLT_RAW_OBSD: LINKTYPE_RAW}


class PcapOutput:
    ext = "pcap"
    data_type = "pcap"
    needs_headers = False

    def __init__(self, linktype: int, snaplen: int):
        self.linktype = SAVEFILE_LINKTYPES.get(linktype, linktype)
        self.snaplen = snaplen
        self.f = None

    def start_file(self, f, start_time: float) -> None:
        self.f = f
        f.write(PCAP_GLOBAL_HEADER.pack(PCAP_MAGIC_USEC, 2, 4, 0, 0, self.snaplen, self.linktype))

    def record_sizes(self, batch: Batch) -> np.ndarray:
        return batch.caplen + PCAP_RECORD_HEADER_BYTES

    def observe(self, batch: Batch) -> None:
        pass

    def add(self, batch: Batch, headers, keep: np.ndarray | None = None) -> None:
        if keep is not None and not keep.all():
            batch = batch.take(np.nonzero(keep)[0])
        if batch.records:  # the savefile's own records, possibly rewritten in place
            self.f.write(batch.buf)
        elif len(batch):
            self.f.write(pcap_records(batch))

    def advance(self, now: float) -> None:
        pass

    def end_file(self, end_time: float, final: bool) -> dict:
        self.f = None
        return {}

    def close(self) -> None:
        pass


class CountsOutput:
    """Packets and bytes per interval, as CSV: one row per interval of the file's time span.

    Columns: interval_start (UTC seconds), interval_seconds, packets_observed, bytes_observed,
    packets_sampled, bytes_sampled. Intervals with no traffic are written as zero rows, so a
    reader sees time advance.
    """

    ext = "csv"
    data_type = "counts"
    needs_headers = False
    COLUMNS = ("interval_start", "interval_seconds", "packets_observed", "bytes_observed",
               "packets_sampled", "bytes_sampled")
    MAX_ZERO_ROWS = 1_000_000  # per file: about 40 MB of CSV (see _slots_to_write)

    def __init__(self, interval: float = 1.0):
        if interval <= 0:
            raise ValueError("counts interval must be > 0")
        self.interval = float(interval)
        self.f = None
        self.rows: dict[int, np.ndarray] = {}
        self.first_slot = None

    def start_file(self, f, start_time: float) -> None:
        self.f = f
        self.rows = {}
        self.first_slot = int(start_time // self.interval)
        f.write((",".join(self.COLUMNS) + "\n").encode())

    def _slots(self, times) -> np.ndarray:
        times = np.asarray(times)
        if self.interval.is_integer():
            # floor() of a packet time is its whole second exactly (usec <= 999999 stays below
            # the next second in float64), and integer division is exact: no float // (slow).
            return np.floor(times).astype(np.int64) // int(self.interval)
        return (times // self.interval).astype(np.int64)

    def _accumulate(self, times, wirelen, column: int) -> None:
        slots = self._slots(times)
        if not len(slots):
            return
        if np.all(slots[1:] >= slots[:-1]):  # time-ordered (the usual case): runs, no sort
            starts = np.concatenate(([0], np.flatnonzero(slots[1:] != slots[:-1]) + 1))
            uniq = slots[starts]
            packets = np.diff(np.append(starts, len(slots)))
            nbytes = np.add.reduceat(np.asarray(wirelen, dtype=np.int64), starts)
        else:
            uniq, inv = np.unique(slots, return_inverse=True)
            packets = np.bincount(inv, minlength=len(uniq))
            nbytes = np.bincount(inv, weights=wirelen, minlength=len(uniq))
        for slot, p, b in zip(uniq.tolist(), packets.tolist(), nbytes.tolist()):
            row = self.rows.setdefault(slot, np.zeros(4, dtype=np.int64))
            row[column] += p
            row[column + 1] += int(b)

    def observe(self, batch: Batch) -> None:
        self._accumulate(batch.times, batch.wirelen, 0)

    def add(self, batch: Batch, headers, keep: np.ndarray | None = None) -> None:
        times, wirelen = batch.times, batch.wirelen
        if keep is not None and not keep.all():
            times, wirelen = times[keep], wirelen[keep]
        self._accumulate(times, wirelen, 2)

    def advance(self, now: float) -> None:
        pass

    def end_file(self, end_time: float, final: bool) -> dict:
        last_slot = int(np.ceil(end_time / self.interval)) - 1
        if self.rows:
            last_slot = max(last_slot, max(self.rows))
        first = self.first_slot if self.first_slot is not None else last_slot
        if first > last_slot:  # a file closed at the instant it opened: only rows with traffic
            slots, omitted = sorted(self.rows), 0
        else:
            slots, omitted = self._slots_to_write(first, last_slot)
        lines = []
        zero = np.zeros(4, dtype=np.int64)
        for slot in slots:
            row = self.rows.get(slot, zero)
            start = slot * self.interval
            lines.append(f"{start:.6f},{self.interval:g},{row[0]},{row[1]},{row[2]},{row[3]}\n"
                         .replace(".000000,", ","))
        self.f.write("".join(lines).encode())
        self.rows = {}
        self.f = None
        counts = {"interval_seconds": self.interval, "rows": len(lines)}
        if omitted:
            counts["zero_rows_omitted"] = omitted
        return {"counts": counts}

    def _slots_to_write(self, first: int, last: int) -> tuple[list[int], int]:
        """Every slot with traffic, and zero rows for the quiet slots of the file's own span
        [first, last], at most MAX_ZERO_ROWS of them per file.

        Why bounded: a packet stamped far off (a clock stepped back, a damaged savefile record
        at time 0) once made a file "span" decades, and writing a zero row per second of that
        ran out of memory and killed the capture. Out-of-order slots before the file's start
        get their own row, no zero fill; a quiet spell longer than the budget leaves a jump in
        interval_start, and the metadata record says how many zero rows were left out."""
        slots = set(self.rows)
        points = sorted({s for s in slots if first <= s <= last} | {first, last})
        budget, omitted = self.MAX_ZERO_ROWS, 0
        for a, b in zip(points, points[1:]):
            gap = b - a - 1
            take = min(gap, budget)
            slots.update(range(a + 1, a + 1 + take))
            budget -= take
            omitted += gap - take
        slots.update((first, last))
        return sorted(slots), omitted

    def close(self) -> None:
        pass
