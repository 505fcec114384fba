"""The C parser (capture_daemon/_accel_parse.c) gives exactly the numpy reference's Headers:
same dtypes, shapes and values in every field, on every trace (all link types, records and packed
layouts), on hundreds of thousands of mutated packets, and on every truncation of real packets."""

import os
import struct
from dataclasses import fields

import numpy as np
import pytest

from capture_daemon import parse as P
from capture_daemon.batch import Batch, from_packets
from capture_daemon.source import open_source
from tests.fuzz.packet_mutation import LINKTYPES, _relink, build_pools, mutated_batch
from tests.helpers import TRACES

needs_c = pytest.mark.skipif(not P.ACCELERATED, reason="capture_daemon._accel_parse not built (make build)")
FIELDS = [f.name for f in fields(P.Headers)]


def test_ci_runs_the_accelerator():
    """CI must not quietly fall back to the slow path: the extension has to be built there."""
    if os.environ.get("GIMS_CI") == "1":
        assert P.ACCELERATED, "capture_daemon._accel_parse did not import: run `make build`"
    else:
        assert P.ACCELERATED == (P._accel_parse is not None)


@needs_c
def test_parse_uses_the_accelerator(monkeypatch):
    b = from_packets([bytes(60)])
    monkeypatch.setattr(P, "parse_numpy", lambda batch: pytest.fail("numpy path ran"))
    assert len(P.parse(b)) == 1


def assert_same(b: Batch, what=""):
    c = P.parse_c(b)
    assert c is not None, f"{what}: the C parser refused the batch"
    ref = P.parse_numpy(b)
    for name in FIELDS:
        x, y = getattr(c, name), getattr(ref, name)
        assert x.dtype == y.dtype and x.shape == y.shape, (what, name, x.dtype, y.dtype, x.shape, y.shape)
        if not np.array_equal(x, y):
            bad = np.nonzero((x != y).reshape(len(x), -1).any(axis=1))[0]
            i = int(bad[0])
            pkt = b.buf[b.off[i]:b.off[i] + max(int(b.caplen[i]), 0)].tobytes().hex()
            raise AssertionError(f"{what}: field {name} differs in {len(bad)} packets; first #{i} "
                                 f"C={x[i]!r} numpy={y[i]!r} caplen={b.caplen[i]} wirelen={b.wirelen[i]} "
                                 f"linktype={b.linktype} packet={pkt}")


def packets_of(b: Batch) -> list[bytes]:
    return [b.buf[o:o + c].tobytes() for o, c in zip(b.off.tolist(), b.caplen.tolist())]


def as_records(b: Batch) -> Batch:
    """The same packets in the records layout: a 16-byte pcap record header before each one."""
    parts, off, pos = [], [], 0
    for i, p in enumerate(packets_of(b)):
        parts += [struct.pack("<IIII", int(b.ts_sec[i]) & 0xFFFFFFFF, int(b.ts_usec[i]), len(p),
                              int(b.wirelen[i]) & 0xFFFFFFFF), p]
        off.append(pos + 16)
        pos += 16 + len(p)
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return Batch(buf, np.array(off, dtype=np.int64), b.caplen, b.wirelen, b.ts_sec, b.ts_usec, b.linktype,
                 records=True)


def trace_batches(path):
    src = open_source(read=path, interface=None)
    try:
        return list(src.batches())
    finally:
        src.close()


@needs_c
@pytest.mark.parametrize("trace", TRACES, ids=os.path.basename)
def test_traces_identical_in_every_link_type_and_layout(trace):
    rng = np.random.default_rng(1)
    for b in trace_batches(trace):
        assert_same(b, "as read (records layout)" if b.records else "as read")
        pkts = packets_of(b)
        packed = from_packets(pkts, linktype=b.linktype, wirelens=b.wirelen)
        assert_same(packed, "packed")
        if len(b) > 2:
            assert_same(b.slice(1, len(b) - 1), "slice")
            assert_same(b.take(np.arange(0, len(b), 2)), "take")
        if b.linktype == P.DLT_EN10MB:
            for lt in LINKTYPES:
                other = [_relink(p, lt, rng) for p in pkts]
                wl = [w + len(q) - len(p) for p, q, w in zip(pkts, other, b.wirelen.tolist())]
                relinked = from_packets(other, linktype=lt, wirelens=wl)
                assert_same(relinked, f"relinked to {lt}")
                assert_same(as_records(relinked), f"relinked to {lt}, records layout")


def gapped(pkts, linktype, wirelens=None, fill=0xA5):
    """The packets with garbage between them and in front (offsets not contiguous)."""
    parts, off, pos = [], [], 0
    for i, p in enumerate(pkts):
        gap = bytes([fill]) * (7 + i % 5)
        parts += [gap, p]
        off.append(pos + len(gap))
        pos += len(gap) + len(p)
    parts.append(bytes([fill]) * 3)
    b = from_packets(pkts, linktype=linktype, wirelens=wirelens)
    return Batch(np.frombuffer(b"".join(parts), dtype=np.uint8), np.array(off, dtype=np.int64), b.caplen,
                 b.wirelen, b.ts_sec, b.ts_usec, linktype)


@needs_c
def test_every_truncation_of_real_packets():
    """Each of a few packets per trace cut at every length, in every link type, packed and with
    garbage between packets; wire lengths right, zero and too small."""
    rng = np.random.default_rng(3)
    samples = []
    for t in TRACES:
        pk = packets_of(trace_batches(t)[0])
        samples += [pk[0], pk[len(pk) // 2], pk[-1]]
    for lt in LINKTYPES:
        cuts, wl = [], []
        for p in samples:
            q = _relink(p, lt, rng)[:300]
            for k in range(len(q) + 1):
                cuts.append(q[:k])
                wl.append(len(q))
        for wirelens in (wl, None, [0] * len(cuts), [max(len(c) - 1, 0) for c in cuts]):
            assert_same(from_packets(cuts, linktype=lt, wirelens=wirelens), f"cuts lt={lt}")
            assert_same(gapped(cuts, lt, wirelens, fill=0xFF), f"gapped cuts lt={lt}")
            assert_same(as_records(from_packets(cuts, linktype=lt, wirelens=wirelens)), f"records cuts lt={lt}")


@needs_c
def test_mutated_packets():
    """200k mutated packets (tests/fuzz/packet_mutation.py) over all link types, every field."""
    rng = np.random.default_rng(int(os.environ.get("GIMS_FUZZ_SEED", "20261127")))
    pools, _ = build_pools(rng)
    total = 0
    while total < 200_000:
        for lt in LINKTYPES:
            b = mutated_batch(pools[lt], lt, 5000, rng, 0.0, sane_lengths=bool(rng.random() < 0.5))
            assert_same(b, f"mutated lt={lt}")
            total += len(b)


@needs_c
def test_random_bytes_and_ip_lookalikes():
    rng = np.random.default_rng(11)
    for lt in LINKTYPES:
        pkts = [rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 100, 3000)]
        head = {P.DLT_EN10MB: 12, P.DLT_LINUX_SLL: 14, P.DLT_LINUX_SLL2: 0}.get(lt)
        if head is not None:
            pkts = [p[:head] + (b"\x08\x00\x45" if i % 2 else b"\x86\xdd\x60") + p[head + 3:]
                    if len(p) > head + 3 else p for i, p in enumerate(pkts)]
        wl = rng.choice([0, 1, 60, 65535, 2**32 - 1, 2**62], size=len(pkts))
        assert_same(from_packets(pkts, linktype=lt, wirelens=wl), f"random lt={lt}")
        assert_same(gapped(pkts, lt, wl), f"random gapped lt={lt}")


def test_short_packets_do_not_read_their_neighbours():
    """A packet too short for its link-layer header parses the same whatever follows it in the
    buffer (both implementations: nothing past caplen is read)."""
    impls = [P.parse_numpy] + ([P.parse_c] if P.ACCELERATED else [])
    for lt in LINKTYPES:
        pkts = [bytes(k) for k in range(0, 24)]
        for impl in impls:
            a = impl(gapped(pkts, lt, fill=0x08))
            b = impl(gapped(pkts, lt, fill=0x86))
            c = impl(from_packets(pkts, linktype=lt))
            for name in FIELDS:
                fa, fb, fc = getattr(a, name), getattr(b, name), getattr(c, name)
                if name in ("l3", "l4"):  # absolute offsets: compare relative to the packet
                    fa, fb, fc = (np.where(f >= 0, f - bt.off, -1) for f, bt in
                                  ((fa, gapped(pkts, lt)), (fb, gapped(pkts, lt)), (fc, from_packets(pkts))))
                assert np.array_equal(fa, fb) and np.array_equal(fa, fc), (impl.__name__, lt, name)


@needs_c
def test_batches_it_does_not_take_go_to_numpy():
    b = from_packets([bytes.fromhex("45000014000000004006000001020304050607080000")] * 3, linktype=101)
    outside = Batch(b.buf, b.off + len(b.buf), b.caplen, b.wirelen, b.ts_sec, b.ts_usec, 101)
    assert P.parse_c(outside) is None
    negative = Batch(b.buf, b.off - 1, b.caplen, b.wirelen, b.ts_sec, b.ts_usec, 101)
    assert P.parse_c(negative) is None
    too_long = Batch(b.buf, b.off, b.caplen + 1, b.wirelen, b.ts_sec, b.ts_usec, 101)
    too_long.caplen[:2] -= 1  # only the last packet reaches past the buffer
    assert P.parse_c(too_long) is None
    odd_dtype = Batch(b.buf, b.off.astype(np.int32), b.caplen, b.wirelen, b.ts_sec, b.ts_usec, 101)
    assert P.parse_c(odd_dtype) is None and len(P.parse(odd_dtype)) == 3
    with pytest.raises(ValueError, match="unsupported link type"):
        P.parse(Batch(b.buf, b.off, b.caplen, b.wirelen, b.ts_sec, b.ts_usec, 147))
    # a negative caplen is inside the buffer (nothing captured): the C parser takes it
    neg_cap = Batch(b.buf, b.off, np.array([-5, 0, 20]), b.wirelen, b.ts_sec, b.ts_usec, 101)
    assert_same(neg_cap, "negative caplen")
    # strided (non-contiguous) offset arrays and an empty batch
    wide = np.stack([b.off, b.off], axis=1)[:, 0]
    assert not wide.flags.c_contiguous
    assert_same(Batch(b.buf, wide, b.caplen, b.wirelen, b.ts_sec, b.ts_usec, 101), "strided")
    for lt in LINKTYPES:
        assert_same(from_packets([], linktype=lt), "empty")


@needs_c
def test_vlan_stacks_and_ipv6_chains_at_the_limits():
    """Hand-built: 0..6 VLAN tags, IPv6 chains of 0..10 extension headers (fragment first/later,
    AH), jumbogram payload length 0, IPv4 IHL/total-length lies."""
    mac = bytes(12)
    pkts, wl = [], []
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 1, 2, 0x50, 0x12, 100, 0, 0)
    ip4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 40, 1, 0, 64, 6, 0, b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02")
    for ntags in range(7):
        tags = b"".join(struct.pack("!HH", (0x8100, 0x88A8, 0x9100)[k % 3], 100 + k) for k in range(ntags))
        pkts.append(mac + tags + b"\x08\x00" + ip4 + tcp)
    for nh_chain in ([], [0], [44], [51], [0, 43, 60, 44, 51, 135, 0, 43], [0] * 7 + [44], [0] * 6 + [44, 0], [0] * 9, [0] * 10):
        for frag in (0, 0x10, 1):
            chain, nh = b"", 6
            for t in reversed(nh_chain):
                body = (struct.pack("!BBH4s", nh, 0, frag, b"\0" * 4) if t == 44 else bytes([nh, 1]) + bytes(14))
                chain, nh = body + chain, t
            ip6 = struct.pack("!IHBB", 0x6AB00000, len(chain) + len(tcp), nh, 64) + bytes(range(32))
            pkts.append(mac + b"\x86\xdd" + ip6 + chain + tcp)
    ip6j = struct.pack("!IHBB", 0x60000000, 0, 6, 64) + bytes(32)
    pkts.append(mac + b"\x86\xdd" + ip6j + tcp)
    for ihl in range(16):
        for total in (0, 19, 20, ihl * 4, 40, 65535):
            pkts.append(mac + b"\x08\x00" + bytes([0x40 | ihl]) + ip4[1:2] + struct.pack("!H", total) + ip4[4:] + tcp)
    wl = [len(p) for p in pkts]
    for cut in (None, 14, 30, 54, 60, 70):
        these = [p[:cut] if cut else p for p in pkts]
        assert_same(from_packets(these, wirelens=wl), f"limits cut={cut}")
        assert_same(from_packets(these, wirelens=[w * 1000 for w in wl]), f"limits cut={cut} big wirelen")
