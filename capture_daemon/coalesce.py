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
"""

from __future__ import annotations

import struct
import time
from typing import Callable, Iterator

import numpy as np

META = struct.Struct("=IIII")  # next_batch's per-packet record: sec, usec, offset, caplen
POLL_SECONDS = 0.01     # the longest sleep between reads while a batch is held
MIN_PAUSE = 0.001       # a shorter sleep than this is not worth it: wait on the descriptor
RING_OVERHEAD = 80      # ring bytes per packet besides its data (tpacket3_hdr, sockaddr_ll, padding)


def coalesced_reads(read: Callable[[int], tuple], wait: Callable[[float], bool], *,
                    max_packets: int, max_bytes: int, max_hold: float, timeout: float,
                    idle_wait: float, ring_bytes: int = 0, nap=time.sleep,
                    clock=time.monotonic, wall=time.time) -> Iterator[tuple]:
    """(data, meta) pairs shaped like next_batch's, each holding one or more reads.

    read(n): next_batch(n), non-blocking. wait(seconds): True when the capture descriptor
    became readable within that time. An empty pair means nothing came within idle_wait (or
    the descriptor woke with nothing to read, as before: never a loop without a yield).
    ring_bytes: the kernel buffer's size (0: unknown, never sleep in place of a wait).
    """
    parts: list[tuple] = []
    packets = nbytes = 0
    deadline = 0.0
    try:
        while True:
            data, meta = read(max(1, max_packets - packets))
            if not meta and not parts:
                if wait(idle_wait):
                    data, meta = read(max_packets)
                if not meta:
                    yield b"", b""
                    continue
            if meta:
                if not parts:
                    deadline = clock() + _hold(meta, max_hold, timeout, wall)
                parts.append((data, meta))
                packets += len(meta) // META.size
                nbytes += len(data)
                if packets < max_packets and nbytes < max_bytes:
                    continue
            else:
                left = deadline - clock()
                if left > 0:
                    pause = _pause(parts, packets, nbytes, ring_bytes, left)
                    if pause:
                        nap(pause)
                        continue
                    if wait(left):
                        continue
            yield join(parts)
            parts, packets, nbytes = [], 0, 0
    except Exception:
        # A read that fails (the interface went away): the packets read before it still go
        # to the pipeline, as they did when every read was its own batch.
        if parts:
            held, parts = parts, []
            yield join(held)
        raise


def _hold(meta, max_hold: float, timeout: float, wall) -> float:
    """How long the first packet of meta may still wait: up to the read timeout after it was
    captured (the kernel may have held it for a while already), at most max_hold."""
    sec, usec, _, _ = META.unpack_from(meta, 0)
    age = wall() - (sec + usec * 1e-6)
    return min(max_hold, max(0.0, timeout - max(0.0, age)))


def _pause(parts: list[tuple], packets: int, nbytes: int, ring_bytes: int, left: float) -> float:
    """How long to sleep before the next read (0: wait on the descriptor instead).

    From the held packets' own timestamps: the packet rate while this batch was held, and so
    how often a block comes (taking the smallest read for one block: while every read held a
    backlog, blocks only look rarer, and the reader waits on the descriptor as before) and how
    soon the ring fills. Sleep only when blocks come more often than POLL_SECONDS (otherwise
    the descriptor wakes us no more often), and at most the time the ring takes to fill a
    quarter."""
    first = META.unpack_from(parts[0][1], 0)
    last_meta = parts[-1][1]
    last = META.unpack_from(last_meta, len(last_meta) - META.size)
    span = (last[0] - first[0]) + (last[1] - first[1]) * 1e-6
    if not ring_bytes or span <= 0:
        return 0.0
    rate = packets / span
    if min(len(m) for _, m in parts) // META.size / rate >= POLL_SECONDS:
        return 0.0
    ring_fill = ring_bytes / (rate * (nbytes / packets + RING_OVERHEAD))
    pause = min(POLL_SECONDS, left, ring_fill / 4)
    return pause if pause >= MIN_PAUSE else 0.0


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
