"""A batch of captured packets as numpy arrays: the unit of work on the capture path.

Packets are stored in one byte buffer, in capture order. Usually back to back without gaps
(``off[i + 1] == off[i] + caplen[i]``), as pcapy-ng's ``next_batch`` hands them over; or, when
``records`` is set, the buffer is exactly the little-endian microsecond pcap records of these
packets (16-byte record header before each packet) as read from a savefile, so a pcap writer
can write it as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


def back_to_back_offsets(lengths: np.ndarray) -> np.ndarray:
    """Where items of these lengths start when laid back to back from 0 (int64)."""
    off = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=off[1:])
    return off


def gather_packed(buf: np.ndarray, off: np.ndarray, caplen: np.ndarray,
                  new_off: np.ndarray) -> np.ndarray:
    """The packets at off/caplen in buf, copied back to back (new_off: their new offsets,
    back_to_back_offsets(caplen)); one fancy index, cost ~ the bytes copied."""
    return buf[np.repeat(off - new_off, caplen) + np.arange(int(caplen.sum()))]


@dataclass
class Batch:
    buf: np.ndarray      # uint8, the packets concatenated
    off: np.ndarray      # int64, offset of each packet in buf
    caplen: np.ndarray   # int64, bytes captured
    wirelen: np.ndarray  # int64, bytes on the wire
    ts_sec: np.ndarray   # int64
    ts_usec: np.ndarray  # int64, microseconds
    linktype: int
    records: bool = False  # buf is exactly these packets' pcap records (see module doc)

    def __len__(self) -> int:
        return len(self.off)

    @cached_property
    def times(self) -> np.ndarray:
        """Packet times as float seconds (enough precision for rotation and counts).

        Computed once per batch (the pipeline reads them several times per batch: ~7 % of an
        anonymized copy's CPU when recomputed each time); a slice shares its parent's.
        """
        return _seconds(self.ts_sec, self.ts_usec)

    def time_at(self, i: int) -> float:
        """Packet i's time, as times[i] (the same float arithmetic), without computing times."""
        if "times" in self.__dict__:
            return float(self.times[i])
        return float(_seconds(self.ts_sec[i], self.ts_usec[i]))

    def first_at_or_after(self, t: float, start: int = 0) -> int:
        """The index of the first packet from start on whose time is >= t, len(self) if none.

        A file boundary lies ahead of nearly every batch: then no packet can reach it, which the
        largest seconds and microseconds show (times rounds monotonically, so no packet's time
        exceeds that bound) without the times array (~2 % of an anonymized copy's CPU)."""
        n = len(self)
        if start >= n:
            return n
        if "times" not in self.__dict__:
            if float(_seconds(self.ts_sec[start:].max(), self.ts_usec[start:].max())) < t:
                return n
        later = np.flatnonzero(self.times[start:] >= t)
        return start + int(later[0]) if len(later) else n

    def make_writable(self) -> None:
        """Give the batch its own writable buffer (anonymization rewrites packets in place)."""
        if not self.buf.flags.writeable:
            self.buf = self.buf.copy()

    def slice(self, start: int, stop: int) -> "Batch":
        """Packets start..stop-1 as a view of the same buffer (no copy, layout kept)."""
        if (start, stop) == (0, len(self)):
            return self
        head = 16 if self.records else 0
        lo = int(self.off[start]) - head
        hi = int(self.off[stop - 1] + self.caplen[stop - 1])
        part = Batch(self.buf[lo:hi], self.off[start:stop] - lo, self.caplen[start:stop],
                     self.wirelen[start:stop], self.ts_sec[start:stop], self.ts_usec[start:stop],
                     self.linktype, records=self.records)
        if "times" in self.__dict__:  # already computed for the whole batch
            part.times = self.times[start:stop]
        return part

    def take(self, idx: np.ndarray) -> "Batch":
        """A new packed batch holding the packets at idx (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        caplen = self.caplen[idx]
        if len(idx) == len(self) and np.array_equal(idx, np.arange(len(self))):
            return self
        if not np.all(np.diff(idx) > 0):
            raise ValueError("take() needs increasing indices")
        off = back_to_back_offsets(caplen)  # the new, packed layout
        if len(idx) * 8 < len(self):
            # Few packets (sampling): gather their bytes directly, cost ~ bytes kept.
            buf = gather_packed(self.buf, self.off[idx], caplen, off)
        else:
            keep = np.zeros(len(self), dtype=bool)
            keep[idx] = True
            if self.records:
                # buf is [16-byte header][packet] per packet: skip every header, keep packets
                # where chosen; one np.repeat over 2n runs.
                runs = np.empty(2 * len(self), dtype=np.int64)
                runs[0::2] = 16
                runs[1::2] = self.caplen
                chosen = np.zeros(2 * len(self), dtype=bool)
                chosen[1::2] = keep
                buf = self.buf[np.repeat(chosen, runs)]
            else:
                buf = self.buf[np.repeat(keep, self.caplen)]
        return Batch(buf, off, caplen, self.wirelen[idx], self.ts_sec[idx],
                     self.ts_usec[idx], self.linktype)


def _seconds(sec, usec):
    """Packet times (arrays or one) as float seconds: the one formula of times, time_at and
    first_at_or_after's bound, which is exact only because it is the same arithmetic."""
    return sec + usec * 1e-6


def from_packets(packets, linktype: int = 1, start: float = 0.0, step: float = 0.001,
                 wirelens=None) -> Batch:
    """Build a batch from a list of bytes (tests, fuzzing, synthetic traffic)."""
    caplen = np.array([len(p) for p in packets], dtype=np.int64)
    off = back_to_back_offsets(caplen)
    buf = np.frombuffer(b"".join(packets), dtype=np.uint8).copy()
    t = start + step * np.arange(len(packets))
    sec = np.floor(t).astype(np.int64)
    usec = np.round((t - sec) * 1e6).astype(np.int64)
    wl = caplen.copy() if wirelens is None else np.asarray(wirelens, dtype=np.int64)
    return Batch(buf, off, caplen, wl, sec, usec, linktype)
