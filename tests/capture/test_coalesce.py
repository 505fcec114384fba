"""Live reads coalesced into larger batches (capture_daemon/coalesce.py).

The reads, the descriptor and both clocks are fakes: what is checked is which reads end up in
which batch and that a coalesced batch holds exactly the packets of its reads, never how long
anything takes. Every policy test runs with both readers the policy drives: the pcapy-ng
fallback (JoinedReads over next_batch results) and the C reader (RecordReads over
_accel_live's dispatch, played here by ModelDispatch over the same scripted reads). The live
end-to-end checks (same files with and without coalescing, with either reader, on a veth) are
in test_live.py; the real dispatch is tested in test_live_reader.py.
"""
import struct

import numpy as np
import pytest

from capture_daemon.batch import Batch
from capture_daemon.coalesce import CaptureError, RecordReads, coalesce, coalesced_reads, join
from capture_daemon.source import PcapSource

NOW = 1_700_000_000.0


def read_result(packets, t=NOW, dt=0.0):
    """(data, meta) as next_batch returns them for these packets (bytes), the first stamped t,
    the others dt seconds apart."""
    data, meta, pos = b"", b"", 0
    for i, p in enumerate(packets):
        ts = t + i * dt
        meta += struct.pack("=IIII", int(ts), int(round((ts % 1) * 1e6)), pos, len(p))
        data += p
        pos += len(p)
    return data, meta


class FakeCapture:
    """Scripted reads. Each script step is a read result, "wait" (reads find nothing until
    `step` seconds after the next wait began; that wait reports readable then, or times out
    first if it is shorter) or "idle" (nothing comes: the next wait times out)."""

    def __init__(self, script, step=0.001, wall_offset=0.0):
        self.script = list(script)
        self.t = 0.0
        self.step = step
        self.wall_offset = wall_offset
        self.reads, self.waits = [], []
        self.arrival = None

    def read(self, n):
        self.reads.append(n)
        if self.script and self.script[0] not in ("wait", "idle"):
            return self.script.pop(0)
        return b"", b""

    def wait(self, seconds):
        self.waits.append(seconds)
        if self.script and self.script[0] == "wait":
            if self.arrival is None:
                self.arrival = self.t + self.step
            if self.arrival <= self.t + seconds:
                self.t, self.arrival = self.arrival, None
                self.script.pop(0)
                return True
        elif self.script and self.script[0] == "idle":
            self.script.pop(0)
        self.t += seconds
        return False

    def clock(self):
        return self.t

    def wall(self):
        return NOW + self.wall_offset + self.t

    def batches(self, count, reader="joined", **kw):
        opts = dict(max_packets=1000, max_bytes=1 << 20, max_hold=0.05, timeout=1.0,
                    idle_wait=0.5, clock=self.clock, wall=self.wall)
        opts.update(kw)
        return held_packets(self.read, self.wait, count, reader, opts)


READERS = ["joined", "records"]


def held_packets(read, wait, count, reader, opts):
    """The packets (bytes) of each of the first `count` batches the policy hands over with
    this reader, None for an idle yield."""
    gen = policy(read, wait, reader, opts)
    return [next(gen) for _ in range(count)]


def policy(read, wait, reader, opts):
    """The policy's hand-overs with this reader, as packet lists (None: idle)."""
    if reader == "joined":
        for data, meta in coalesced_reads(read, wait, **opts):
            yield packets_of(data, meta) or None
        return
    opts = dict(opts)
    reads = RecordReads(ModelDispatch(read), 1, max_packets=opts.pop("max_packets"),
                        max_bytes=opts.pop("max_bytes"), max_caplen=100)
    for batch in coalesce(reads, wait, **opts):
        yield records_of(batch)


class ModelDispatch:
    """_accel_live.Live.dispatch's contract over scripted next_batch-like reads: a call takes
    one read (asking for as many packets as the arrays have room for), appends its packets as
    pcap records while they fit, and keeps the rest for the next call (full=True)."""

    def __init__(self, read):
        self.read = read
        self.pending = []  # (sec, usec, packet) not yet written

    def __call__(self, buf, pos, n, off, caplen, wirelen, sec, usec):
        if not self.pending:
            data, meta = self.read(len(off) - n)
            m = np.frombuffer(meta, dtype=np.uint32).reshape(-1, 4).tolist()
            self.pending = [(s, u, bytes(data[o:o + c])) for s, u, o, c in m]
        while self.pending:
            s, u, pkt = self.pending[0]
            if n == len(off) or pos + 16 + len(pkt) > len(buf):
                return n, pos, True, None
            buf[pos:pos + 16] = np.frombuffer(struct.pack("<IIII", s, u, len(pkt), len(pkt) + 1000),
                                              dtype=np.uint8)
            buf[pos + 16:pos + 16 + len(pkt)] = np.frombuffer(pkt, dtype=np.uint8)
            off[n], caplen[n], wirelen[n], sec[n], usec[n] = pos + 16, len(pkt), len(pkt) + 1000, s, u
            pos, n = pos + 16 + len(pkt), n + 1
            self.pending.pop(0)
        return n, pos, False, None


def records_of(batch):
    """The packets of a records batch (None: idle), checking that its buffer is exactly their
    pcap records."""
    if batch is None:
        return None
    assert batch.records and batch.buf.flags.writeable
    raw, pos, out = batch.buf.tobytes(), 0, []
    for i in range(len(batch)):
        s, u, c, w = struct.unpack_from("<IIII", raw, pos)
        assert (pos + 16, c, w, s, u) == (batch.off[i], batch.caplen[i], batch.wirelen[i],
                                          batch.ts_sec[i], batch.ts_usec[i])
        out.append(raw[pos + 16:pos + 16 + c])
        pos += 16 + c
    assert pos == len(raw)
    return out


def packets_of(data, meta):
    m = np.frombuffer(meta, dtype=np.uint32).reshape(-1, 4)
    raw = bytes(data)
    return [raw[o:o + c] for o, c in m[:, 2:4].tolist()]


def pkts(prefix, n, size=60):
    return [(prefix + b"%04d" % i).ljust(size, b".") for i in range(n)]


def test_join_rebases_offsets_and_gives_a_writable_buffer():
    a, b, c = pkts(b"a", 3), pkts(b"b", 1, 100), pkts(b"c", 5, 70)
    data, meta = join([read_result(a), read_result(b), read_result(c, NOW + 0.5)])
    assert packets_of(data, meta) == a + b + c
    assert isinstance(data, np.ndarray) and data.flags.writeable
    m = np.frombuffer(meta, dtype=np.uint32).reshape(-1, 4)
    assert m[-1, 1] == 500000  # timestamps and lengths travel unchanged


@pytest.mark.parametrize("reader", READERS)
def test_reads_ready_in_a_row_and_across_short_waits_make_one_batch(reader):
    a, b, c = pkts(b"a", 3), pkts(b"b", 4), pkts(b"c", 2)
    cap = FakeCapture([read_result(a), read_result(b), "wait", read_result(c), "idle"])
    assert cap.batches(1, reader) == [a + b + c]


@pytest.mark.parametrize("reader", READERS)
def test_a_batch_is_handed_over_when_packets_or_bytes_reach_the_cap(reader):
    a, b, c = pkts(b"a", 6), pkts(b"b", 6), pkts(b"c", 6)
    cap = FakeCapture([read_result(a), read_result(b), read_result(c), "idle"])
    first, second = cap.batches(2, reader, max_packets=10)
    if reader == "joined":  # a read never asks past the packet cap
        assert first == a + b and second == c
        assert cap.reads[:3] == [10, 4, 10]
    else:  # the packets that did not fit open the next batch
        assert first == a + b[:4] and second == b[4:] + c
        assert cap.reads[:2] == [10, 4]
    cap = FakeCapture([read_result(a), read_result(b), read_result(c), "idle"])
    # the fallback counts packet bytes, the C reader record bytes (16-byte header each)
    first, second = cap.batches(2, reader, max_bytes=6 * (60 if reader == "joined" else 76))
    assert first == a and second == b


def test_a_full_record_buffer_hands_over_and_the_packet_that_did_not_fit_comes_next():
    """The C reader's buffer holds max_bytes of records (16-byte header + packet): 5 of these
    76-byte records fit in 400 bytes, the sixth opens the next batch."""
    a, b = pkts(b"a", 6), pkts(b"b", 3)
    cap = FakeCapture([read_result(a), read_result(b), "idle"])
    first, second = cap.batches(2, "records", max_bytes=400)
    assert first == a[:5] and second == a[5:] + b


@pytest.mark.parametrize("reader", READERS)
def test_a_batch_is_held_at_most_max_hold(reader):
    a, b, c = pkts(b"a", 2), pkts(b"b", 2), pkts(b"c", 2)
    # each "wait" is 30 ms: b comes at 30 ms, c at 60 ms, past the 50 ms hold
    cap = FakeCapture([read_result(a), "wait", read_result(b), "wait", read_result(c), "idle"],
                      step=0.03)
    assert cap.batches(2, reader) == [a + b, c]
    assert abs(cap.waits[1] - 0.02) < 1e-6  # after b (at 30 ms), held for what was left of 50 ms


@pytest.mark.parametrize("reader", READERS)
def test_packets_already_as_old_as_the_read_timeout_are_not_held(reader):
    """A block the kernel retired on its timeout: its packets are handed over at once."""
    a, b = pkts(b"a", 2), pkts(b"b", 2)
    cap = FakeCapture([read_result(a, NOW - 1.0), "wait", read_result(b), "idle"])
    assert cap.batches(1, reader) == [a]
    assert cap.waits == []  # handed over without waiting for more


@pytest.mark.parametrize("reader", READERS)
def test_the_hold_is_what_the_timeout_leaves_of_the_first_packet(reader):
    a = pkts(b"a", 2)
    cap = FakeCapture([read_result(a, NOW - 0.98), "idle"])
    cap.batches(1, reader)
    assert len(cap.waits) == 1 and abs(cap.waits[0] - 0.02) < 1e-6


@pytest.mark.parametrize("reader", READERS)
def test_no_hold_with_a_zero_timeout(reader):
    a, b = pkts(b"a", 2), pkts(b"b", 2)
    cap = FakeCapture([read_result(a), "wait", read_result(b), "idle"])
    assert cap.batches(2, reader, timeout=0.0) == [a, b]


@pytest.mark.parametrize("reader", READERS)
def test_idle_reads_still_time_out_empty(reader):
    cap = FakeCapture(["idle", "idle"])
    assert cap.batches(2, reader) == [None, None]
    assert cap.waits == [0.5, 0.5]


@pytest.mark.parametrize("reader", READERS)
def test_a_wake_up_with_nothing_to_read_yields_rather_than_spins(reader):
    """A descriptor readable with nothing to read (an error pending, say) must not keep the
    generator from returning control to the capture loop (signals, watchdog)."""
    cap = FakeCapture(["wait", "wait", "wait"])
    assert cap.batches(3, reader) == [None] * 3


@pytest.mark.parametrize("reader", READERS)
def test_packets_after_an_idle_wait_are_coalesced_too(reader):
    a, b = pkts(b"a", 2), pkts(b"b", 3)
    cap = FakeCapture(["wait", read_result(a), "wait", read_result(b), "idle"])
    assert cap.batches(1, reader) == [a + b]


@pytest.mark.parametrize("reader", READERS)
def test_packets_held_when_a_read_fails_are_handed_over_before_the_error(reader):
    a, b = pkts(b"a", 2), pkts(b"b", 3)
    cap = FakeCapture([read_result(a), read_result(b), "boom"])
    real_read = cap.read

    def read(n):
        if cap.script and cap.script[0] == "boom":
            raise OSError("interface went down")
        return real_read(n)
    opts = dict(max_packets=1000, max_bytes=1 << 20, max_hold=0.05, timeout=1.0, idle_wait=0.5,
                clock=cap.clock, wall=cap.wall)
    gen = policy(read, cap.wait, reader, opts)
    assert next(gen) == a + b
    with pytest.raises(OSError, match="went down"):
        next(gen)


def test_a_dispatch_error_after_packets_hands_them_over_then_raises():
    """_accel_live reports libpcap's read error together with the packets it appended before
    it: those reach the pipeline, then the error is raised (CaptureError, libpcap's text)."""
    a = pkts(b"a", 3)
    model = ModelDispatch(FakeCapture([read_result(a)]).read)

    def dispatch(*args):
        n, pos, full, _ = model(*args)
        return n, pos, full, "The interface went down"
    reads = RecordReads(dispatch, 1, max_packets=100, max_bytes=1 << 20, max_caplen=100)
    gen = coalesce(reads, lambda s: False, max_hold=0.05, timeout=1.0, idle_wait=0.5)
    assert records_of(next(gen)) == a
    with pytest.raises(CaptureError, match="went down"):
        next(gen)


class TimedCapture:
    """Blocks that become readable at given times; a read returns every block that has come
    (as one next_batch does), a wait ends when the next block comes, a nap just passes time."""

    def __init__(self, blocks):
        self.blocks = list(blocks)  # (arrival time, read result)
        self.t = 0.0
        self.waits, self.naps, self.reads = [], [], 0

    def read(self, n):
        ready = [r for at, r in self.blocks if at <= self.t]
        self.blocks = [(at, r) for at, r in self.blocks if at > self.t]
        if not ready:
            return b"", b""
        self.reads += 1
        data, meta = join(ready)
        return bytes(data), bytes(meta)

    def wait(self, seconds):
        self.waits.append(seconds)
        if self.blocks and self.blocks[0][0] <= self.t + seconds:
            self.t = max(self.t, self.blocks[0][0])
            return True
        self.t += seconds
        return False

    def nap(self, seconds):
        self.naps.append(seconds)
        self.t += seconds

    def batches(self, count, reader="joined", **kw):
        opts = dict(max_packets=100000, max_bytes=1 << 30, max_hold=0.05, timeout=1.0,
                    idle_wait=0.5, nap=self.nap, clock=lambda: self.t,
                    wall=lambda: NOW + self.t)
        opts.update(kw)
        return held_packets(self.read, self.wait, count, reader, opts)


def blocks_every(interval, count, per_block=300):
    """count blocks of per_block packets, one every interval seconds, packets evenly spaced."""
    return [(i * interval, read_result(pkts(b"%d" % i, per_block), NOW + i * interval,
                                       interval / per_block)) for i in range(count)]


@pytest.mark.parametrize("reader", READERS)
def test_fast_blocks_are_collected_by_sleeping_between_reads(reader):
    """A block every millisecond: the reader sleeps POLL_SECONDS and then reads the several
    blocks that came meanwhile, rather than waking up for each."""
    from capture_daemon.coalesce import POLL_SECONDS
    cap = TimedCapture(blocks_every(0.001, 40))
    (held,) = cap.batches(1, reader, ring_bytes=32 << 20)
    assert len(held) == 40 * 300  # everything within the 50 ms hold
    assert cap.naps and all(0 < n <= POLL_SECONDS for n in cap.naps)
    assert len(cap.naps) + len(cap.waits) < 10 and cap.reads < 10  # not one per block


@pytest.mark.parametrize("reader", READERS)
def test_no_sleeping_when_the_ring_could_fill_meanwhile_or_blocks_are_slow(reader):
    cap = TimedCapture(blocks_every(0.001, 40))
    (held,) = cap.batches(1, reader, ring_bytes=4096)  # a quarter of it fills in ~3 us
    assert len(held) == 40 * 300
    assert cap.naps == [] and cap.reads == 40
    cap = TimedCapture(blocks_every(0.02, 3))  # a block every 20 ms: no more wake-ups than naps
    (held,) = cap.batches(1, reader, ring_bytes=32 << 20)
    assert len(held) == 3 * 300 and cap.naps == []
    cap = TimedCapture(blocks_every(0.001, 40))
    cap.batches(1, reader)  # ring size unknown
    assert cap.naps == []


class FakeHandle:
    def __init__(self, reads):
        self.reads = list(reads)

    def datalink(self):
        return 1

    def next_batch(self, n):
        return self.reads.pop(0) if self.reads else (b"", b"")


class ScriptedLive(PcapSource):
    """PcapSource.batches over given (data, meta) pairs, as a live source sees them."""
    live = True

    def __init__(self, pairs, snaplen):
        super().__init__(FakeHandle([]), snaplen, "fake")
        self.pairs = pairs

    def _raw_batches(self):
        return iter(self.pairs)


def _fields(batches):
    out = []
    for b in batches:
        buf = bytes(b.buf)
        for i in range(len(b)):
            o, c = int(b.off[i]), int(b.caplen[i])
            out.append((buf[o:o + c], int(b.wirelen[i]), int(b.ts_sec[i]), int(b.ts_usec[i])))
    return out


def test_a_coalesced_batch_is_the_same_packets_as_its_reads():
    """Wire lengths (estimated from truncated IP headers), times and bytes come out the same
    whether reads are handed over one by one or joined."""
    from tests.anon.pcapio import read_pcap
    from tests.helpers import DATA
    trace = read_pcap(f"{DATA}/zeek__wikipedia.pcap")[0]
    buf = trace.buf.tobytes()
    recs = [(int(trace.ts_sec[i]), int(trace.ts_usec[i]),
             buf[int(trace.off[i]):int(trace.off[i] + trace.caplen[i])]) for i in range(len(trace))]
    snaplen = 96
    reads = []
    for i in range(0, len(recs), 17):
        data, meta, pos = b"", b"", 0
        for sec, usec, pkt in recs[i:i + 17]:
            pkt = pkt[:snaplen]
            meta += struct.pack("=IIII", sec, usec, pos, len(pkt))
            data += pkt
            pos += len(pkt)
        reads.append((data, meta))
    one_by_one = list(ScriptedLive(reads, snaplen).batches())
    joined = list(ScriptedLive([join(reads[:3]), join(reads[3:])], snaplen).batches())
    assert len(one_by_one) == len(reads) and len(joined) == 2
    assert _fields(joined) == _fields(one_by_one)
    assert all(isinstance(b, Batch) and b.buf.flags.writeable for b in joined)
