"""Live reads coalesced into batches big enough to amortize the pipeline's cost per batch.

With TPACKET_V3, libpcap hands over what the kernel has retired: usually one ring block per
``next_batch`` call, a few hundred packets at a small snaplen (~350 at snaplen 128 and 300 k
packets/s on the bench's veth), and the next block is rarely ready when the pipeline asks
again. Each batch cost the pipeline a fixed 0.2-0.8 ms (numpy calls, Crypto-PAn lookups, the
anonymizer's C passes, the writer hand-over; measured before the one-pass anonymizer), which at
350 packets is more than the
per-packet work itself (docs/PERFORMANCE.md, path 6). So a live source keeps reading blocks as
they come and hands the pipeline one batch when it holds ``max_packets`` packets or
``max_bytes`` bytes, or when holding on would make its oldest packet later than the read
timeout (libpcap's promise: a packet is delivered at most timeout_ms after it was captured),
and in any case after ``max_hold`` seconds, so that the capture loop's signals, watchdog and
status stay as prompt as before. Idle behaviour is unchanged: an empty read after
``idle_wait`` seconds without packets, so files still roll over on the wall clock.

While a batch is held, waking up for every block costs ~30 us of CPU per wake-up here (~0.05 us
a packet at 300 k packets/s); when blocks come faster than every ``POLL_SECONDS`` the reader
sleeps that long instead and then reads the blocks that came meanwhile, provided the ring
cannot fill up in the meantime (see _pause).

One policy (``coalesce``) drives both live readers: the C reader (_accel_live, RecordReads),
whose reads append pcap records to the batch's own buffer, and the pcapy-ng fallback
(JoinedReads), whose next_batch results are joined when the batch is handed over.
"""

from __future__ import annotations

import struct
import time
from typing import Callable, Iterator

import numpy as np

from .batch import Batch

META = struct.Struct("=IIII")  # next_batch's per-packet record: sec, usec, offset, caplen
POLL_SECONDS = 0.01     # the longest sleep between reads while a batch is held
MIN_PAUSE = 0.001       # a shorter sleep than this is not worth it: wait on the descriptor
RING_OVERHEAD = 80      # ring bytes per packet besides its data (tpacket3_hdr, sockaddr_ll, padding)


def coalesce(reads, wait: Callable[[float], bool], *, max_hold: float, timeout: float,
             idle_wait: float, ring_bytes: int = 0, nap=time.sleep, clock=time.monotonic,
             wall=time.time) -> Iterator:
    """The coalescing policy over a reader that accumulates packets: what reads.take() gives
    for each batch, None when nothing came within idle_wait (or the descriptor woke with
    nothing to read, as before: never a loop without a yield).

    reads: RecordReads (the C reader) or JoinedReads (pcapy-ng's next_batch). Its read()
    adds what is ready without blocking and returns how many packets that was; packets and
    nbytes are what it holds, full() says it can take no more, times() gives the first and
    last held packets' capture times, take() hands them over and starts anew.
    wait(seconds): True when the capture descriptor became readable within that time.
    ring_bytes: the kernel buffer's size (0: unknown, never sleep in place of a wait).
    """
    deadline = 0.0
    smallest = 0  # the fewest packets one read of the held batch brought (see _pause)
    try:
        while True:
            got = reads.read()
            if not reads.packets:
                if wait(idle_wait):
                    got = reads.read()
                if not reads.packets:
                    yield None
                    continue
            if got == reads.packets:  # the batch's first read
                deadline = clock() + _hold(reads.times()[0], max_hold, timeout, wall)
                smallest = got
            elif got:
                smallest = min(smallest, got)
            if not reads.full():
                if got:
                    continue
                left = deadline - clock()
                if left > 0:
                    pause = _pause(reads, smallest, ring_bytes, left)
                    if pause:
                        nap(pause)
                        continue
                    if wait(left):
                        continue
            yield reads.take()
    except Exception:
        # A read that fails (the interface went away): the packets read before it still go
        # to the pipeline, as they did when every read was its own batch.
        if reads.packets:
            yield reads.take()
        raise


def _hold(first: float, max_hold: float, timeout: float, wall) -> float:
    """How long the first packet (captured at `first`) may still wait: up to the read timeout
    after it was captured (the kernel may have held it for a while already), at most max_hold."""
    age = wall() - first
    return min(max_hold, max(0.0, timeout - max(0.0, age)))


def _pause(reads, smallest: int, ring_bytes: int, left: float) -> float:
    """How long to sleep before the next read (0: wait on the descriptor instead).

    From the held packets' own timestamps: the packet rate while this batch was held, and so
    how often a block comes (taking the smallest read for one block: while every read held a
    backlog, blocks only look rarer, and the reader waits on the descriptor as before) and how
    soon the ring fills. Sleep only when blocks come more often than POLL_SECONDS (otherwise
    the descriptor wakes us no more often), and at most the time the ring takes to fill a
    quarter."""
    first, last = reads.times()
    span = last - first
    if not ring_bytes or span <= 0:
        return 0.0
    rate = reads.packets / span
    if smallest / rate >= POLL_SECONDS:
        return 0.0
    ring_fill = ring_bytes / (rate * (reads.nbytes / reads.packets + RING_OVERHEAD))
    pause = min(POLL_SECONDS, left, ring_fill / 4)
    return pause if pause >= MIN_PAUSE else 0.0


class RecordReads:
    """The C reader's side (_accel_live.Live.dispatch): every read appends the packets as pcap
    records to one buffer, so the batch is ready to write as it is, with exact wire lengths
    and no join. A packet that does not fit stays in the reader and opens the next batch."""

    def __init__(self, dispatch, linktype: int, *, max_packets: int, max_bytes: int,
                 max_caplen: int):
        self.dispatch, self.linktype = dispatch, linktype
        self.max_packets, self.max_bytes = max_packets, max_bytes
        # max_bytes counts records (headers too: what the writer writes and the pipeline
        # walks); the buffer holds at least one whole record of the largest packet libpcap
        # may hand over, however small max_bytes is
        self.capacity = max(max_bytes, 16 + max_caplen)
        self._start()

    def _start(self):
        self.buf = np.empty(self.capacity, dtype=np.uint8)
        self.fields = np.empty((5, self.max_packets), dtype=np.int64)  # off caplen wirelen sec usec
        self.packets = self.pos = self.nbytes = 0
        self._full = False

    def read(self) -> int:
        n, pos, self._full, error = self.dispatch(self.buf, self.pos, self.packets, *self.fields)
        got = n - self.packets
        self.nbytes += pos - self.pos - 16 * got
        self.packets, self.pos = n, pos
        if error is not None:
            raise CaptureError(error)
        return got

    def full(self) -> bool:
        return self._full or self.packets >= self.max_packets or self.pos >= self.max_bytes

    def times(self) -> tuple[float, float]:
        sec, usec = self.fields[3], self.fields[4]
        last = self.packets - 1
        return sec[0] + usec[0] * 1e-6, sec[last] + usec[last] * 1e-6

    def take(self) -> Batch:
        off, caplen, wirelen, sec, usec = self.fields[:, :self.packets]
        batch = Batch(self.buf[:self.pos], off, caplen, wirelen, sec, usec, self.linktype,
                      records=True)
        self._start()
        return batch


class CaptureError(Exception):
    """libpcap could not read (its own message): the interface went down, say."""


class JoinedReads:
    """The pcapy-ng fallback: next_batch results held as they came, joined at hand-over."""

    def __init__(self, next_batch: Callable[[int], tuple], *, max_packets: int, max_bytes: int):
        self.next_batch, self.max_packets, self.max_bytes = next_batch, max_packets, max_bytes
        self.parts: list[tuple] = []
        self.packets = self.nbytes = 0

    def read(self) -> int:
        # never ask past the packet cap
        data, meta = self.next_batch(max(1, self.max_packets - self.packets))
        got = len(meta) // META.size
        if got:
            self.parts.append((data, meta))
            self.packets += got
            self.nbytes += len(data)
        return got

    def full(self) -> bool:
        return self.packets >= self.max_packets or self.nbytes >= self.max_bytes

    def times(self) -> tuple[float, float]:
        first = META.unpack_from(self.parts[0][1], 0)
        last_meta = self.parts[-1][1]
        last = META.unpack_from(last_meta, len(last_meta) - META.size)
        return first[0] + first[1] * 1e-6, last[0] + last[1] * 1e-6

    def take(self) -> tuple:
        held = join(self.parts)
        self.parts, self.packets, self.nbytes = [], 0, 0
        return held


def coalesced_reads(read: Callable[[int], tuple], wait: Callable[[float], bool], *,
                    max_packets: int, max_bytes: int, **policy) -> Iterator[tuple]:
    """(data, meta) pairs shaped like next_batch's, each holding one or more reads of
    read(n) (next_batch(n), non-blocking); an empty pair when idle (see coalesce)."""
    for held in coalesce(JoinedReads(read, max_packets=max_packets, max_bytes=max_bytes), wait,
                         **policy):
        yield (b"", b"") if held is None else held


def join(parts: list[tuple]) -> tuple:
    """One (data, meta) pair from several next_batch results (offsets moved to the joined
    buffer). The joined packets are a writable numpy buffer: the anonymizer rewrites them in
    place without the copy a read-only bytes object would need (Batch.make_writable)."""
    if len(parts) == 1:
        return parts[0]
    buf = np.empty(sum(len(d) for d, _ in parts), dtype=np.uint8)
    meta = np.frombuffer(b"".join(m for _, m in parts), dtype=np.uint32).reshape(-1, 4).copy()
    pos = row = 0
    for data, m in parts:
        n = len(m) // META.size
        buf[pos:pos + len(data)] = np.frombuffer(data, dtype=np.uint8)
        meta[row:row + n, 2] += pos
        pos += len(data)
        row += n
    return buf, meta
