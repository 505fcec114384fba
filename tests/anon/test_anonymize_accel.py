"""The C accelerator of Anonymizer.apply (capture_daemon/_accel_anon.c) against the numpy
reference (Anonymizer(..., accelerated=False)): byte-identical packets and identical counters
on every trace in tests/data (whole and cut to several snaplens, under every link type), on
hundreds of thousands of mutated packets, and on every truncation of packets of each kind
(ICMP errors, ND, ARP, IPv4 options, IPv6 extension headers, offloaded and wrong checksums)."""
import os
import struct
import warnings

import numpy as np
import pytest

from capture_daemon import anonymize
from capture_daemon import checksum as ck
from capture_daemon.anonymize import Anonymizer
from capture_daemon.batch import Batch, from_packets
from capture_daemon.cryptopan import CryptoPAn
from capture_daemon.parse import parse, parse_c
from capture_daemon.source import OfflineSource
from tests.fuzz.packet_mutation import DATA, LINKTYPES, _relink, build_pools, mutated_batch

from .pcapio import read_pcap

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.layers.inet import (ICMP, IP, TCP, UDP, IPerror, IPOption_NOP, IPOption_RR,
                                   IPOption_SSRR, IPOption_Timestamp, TCPerror, UDPerror)
    from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6PacketTooBig, IPerror6, IPv6,
                                    IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                    IPv6ExtHdrRouting)
    from scapy.layers.l2 import Dot1Q, Ether
    from scapy.packet import Raw

KEY = bytes.fromhex("1522178d33a4cf80130a5b1649907d10d8988f837979652762574c2d2a842202")
CP = CryptoPAn(KEY)  # the reference's, shared: the cache must not change any result
SNAPLENS = (None, 14, 30, 34, 42, 54, 58, 62, 68, 74, 96, 128)
TRACES = sorted(p for p in os.listdir(DATA) if p.endswith(".pcap"))

needs_accel = pytest.mark.skipif(not anonymize.ACCELERATED, reason="capture_daemon._accel_anon not built")


def test_accelerator_is_built_and_used():
    """CI (GIMS_CI=1) must build it (make build / setup.py build_ext --inplace)."""
    if not anonymize.ACCELERATED:
        if os.environ.get("GIMS_CI") == "1":
            pytest.fail("capture_daemon._accel_anon is not built under CI: run `make build`")
        pytest.skip("capture_daemon._accel_anon not built")
    assert Anonymizer(CP).accelerated
    assert not Anonymizer(CP, accelerated=False).accelerated


def _copy(b: Batch) -> Batch:
    return Batch(b.buf.copy(), b.off.copy(), b.caplen.copy(), b.wirelen.copy(), b.ts_sec, b.ts_usec,
                 b.linktype, records=b.records)


def assert_same(batch: Batch, sel=None, recompute_whole=True, headers=None):
    """Apply both implementations to copies of batch; compare every byte and counter.

    The C side gets a fresh CryptoPAn: it computes every image itself (in C, over OpenSSL),
    none comes from a cache the numpy side filled."""
    h = parse(batch) if headers is None else headers
    sel = np.ones(len(batch), dtype=bool) if sel is None else sel
    out = []
    for accelerated in (False, True):
        b = _copy(batch)
        cp = CryptoPAn(KEY, max_cache_v4=1 << 12, max_cache_v6=1 << 10) if accelerated else CP
        a = Anonymizer(cp, recompute_whole=recompute_whole, accelerated=accelerated)
        a.apply(b, h, sel)
        out.append((b.buf, a.counters()))
    (ref, ref_counts), (acc, acc_counts) = out
    if not np.array_equal(ref, acc):
        d = np.flatnonzero(ref != acc)
        pkt = np.searchsorted(batch.off, d, side="right") - 1
        raise AssertionError(f"{len(d)} bytes differ, first at {d[:5]} (packets {np.unique(pkt)[:10]}, "
                             f"offsets {d[:5] - batch.off[pkt[:5]]})")
    assert acc_counts == ref_counts
    if sel is None and headers is None:
        _assert_one_pass_same(batch, recompute_whole, ref, ref_counts, h)
    return acc_counts


def _assert_one_pass_same(batch, recompute_whole, ref, ref_counts, h):
    """The one-pass parse and rewrite (Anonymizer.apply_parsing, what a pcap or counts
    pipeline runs) gives the reference's bytes and counters, and parse()'s malformed count."""
    b = _copy(batch)
    a = Anonymizer(CryptoPAn(KEY, max_cache_v4=1 << 12, max_cache_v6=1 << 10),
                   recompute_whole=recompute_whole, accelerated=True)
    malformed = a.apply_parsing(b)
    if malformed is None:  # only for what the C parser does not take: nothing may be written
        assert parse_c(batch) is None
        assert np.array_equal(b.buf, batch.buf)
        return
    assert malformed == int(np.count_nonzero(h.malformed))
    if not np.array_equal(ref, b.buf):
        d = np.flatnonzero(ref != b.buf)
        raise AssertionError(f"one pass: {len(d)} bytes differ, first at {d[:5]}")
    assert a.counters() == ref_counts


def cut(b: Batch, snap) -> Batch:
    if snap is None:
        return b
    caplen = np.minimum(b.caplen, snap)
    off = np.zeros(len(b), dtype=np.int64)
    np.cumsum(caplen[:-1], out=off[1:])
    idx = np.repeat(b.off - off, caplen) + np.arange(int(caplen.sum()))
    return Batch(b.buf[idx].copy(), off, caplen, b.wirelen.copy(), b.ts_sec, b.ts_usec, b.linktype)


@pytest.fixture(scope="module")
def trace_packets():
    """Every packet of every trace (all Ethernet) with its wire length."""
    pkts, wire = [], []
    for name in TRACES:
        batch, _ = read_pcap(os.path.join(DATA, name))
        assert batch.linktype == 1
        raw = batch.buf.tobytes()
        for o, c, w in zip(batch.off.tolist(), batch.caplen.tolist(), batch.wirelen.tolist()):
            pkts.append(raw[o:o + c])
            wire.append(w)
    return pkts, wire


@needs_accel
@pytest.mark.parametrize("name", TRACES)
@pytest.mark.parametrize("snap", SNAPLENS)
def test_each_trace_identical(name, snap):
    batch, _ = read_pcap(os.path.join(DATA, name))
    assert_same(cut(batch, snap))


@needs_accel
@pytest.mark.parametrize("linktype", LINKTYPES)
def test_all_traces_under_every_link_type_identical(trace_packets, linktype):
    pkts, wire = trace_packets
    rng = np.random.default_rng(linktype)
    rel = [_relink(p, linktype, rng) for p in pkts]
    wl = [max(w + len(q) - len(p), len(q)) for p, q, w in zip(pkts, rel, wire)]
    batch = from_packets(rel, linktype=linktype, wirelens=wl)
    totals = {}
    for snap in SNAPLENS:
        counts = assert_same(cut(batch, snap))
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    # a subset of the packets and incremental-only checksums, too
    assert_same(batch, sel=rng.random(len(batch)) < 0.5)
    assert_same(cut(batch, 96), recompute_whole=False)
    assert totals["packets_anonymized"] > 0 and totals["checksums_corrected"] > 0
    assert totals["addresses_truncated"] > 0


@needs_accel
def test_offline_source_record_batches_identical():
    """Batches as the capture path reads them (records between packets, read-only buffer)."""
    for name in ("zeek__ipv6.pcap", "zeek__icmp_dot1q.pcap", "tcpdump__afs.pcap"):
        src = OfflineSource(os.path.join(DATA, name))
        try:
            for batch in src.batches():
                if batch is None or len(batch) == 0:
                    continue
                assert_same(batch)
                assert_same(batch.slice(1, len(batch)) if len(batch) > 1 else batch)
        finally:
            src.close()


@needs_accel
def test_mutated_packets_identical():
    """>= 200k mutated packets (tests/fuzz/packet_mutation.py), every link type, lying wire
    lengths, random selections."""
    rng = np.random.default_rng(20261127)
    pools, _ = build_pools(rng)
    n = 0
    totals = {}
    for rnd in range(3):
        for lt in LINKTYPES:
            batch = mutated_batch(pools[lt], lt, 7000, rng, 1000.0 + rnd, sane_lengths=rnd == 1)
            sel = np.ones(len(batch), dtype=bool) if rnd == 0 else rng.random(len(batch)) < 0.8
            counts = assert_same(batch, sel=sel, recompute_whole=rnd != 2 or lt != LINKTYPES[0])
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            n += len(batch)
    assert n >= 200_000
    assert all(v > 0 for v in totals.values()), totals


# --- every truncation of packets of each kind -----------------------------------------------
E = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
S4, D4, R4 = "192.0.2.10", "198.51.100.77", "203.0.113.1"
S6, D6, R6 = "2001:db8:1::10", "2001:db8:ff::1:77", "2001:db8:1::1"


def _with_checksum(data: bytes, pos: int, value: int) -> bytes:
    return data[:pos] + struct.pack("!H", value & 0xFFFF) + data[pos + 2:]


def _offload_v4(p) -> bytes:
    """The TCP/UDP checksum field holding just the pseudo-header sum (NIC offload)."""
    data = bytes(p)
    l3 = 14
    ihl = (data[l3] & 15) * 4
    proto, total = data[l3 + 9], struct.unpack("!H", data[l3 + 2:l3 + 4])[0]
    s = ck.word_sum(np.frombuffer(data[l3 + 12:l3 + 20], np.uint8)[None])[0] + proto + total - ihl
    return _with_checksum(data, l3 + ihl + (16 if proto == 6 else 6), int(ck.fold(s)))


def _offload_v6(p) -> bytes:
    data = bytes(p)
    l3 = 14
    proto, plen = data[l3 + 6], struct.unpack("!H", data[l3 + 4:l3 + 6])[0]
    s = ck.word_sum(np.frombuffer(data[l3 + 8:l3 + 40], np.uint8)[None])[0] + proto + plen
    return _with_checksum(data, l3 + 40 + (16 if proto == 6 else 6), int(ck.fold(s)))


def kinds():
    from tests.anon.test_anonymize_packets import CASES  # noqa: PLC0415  (scapy-built cases)
    out = []
    for name, (lt, builder) in sorted(CASES.items()):
        if lt == 1:
            out += [bytes(p) for p in builder(lambda a: a)]
    ip4 = IP(src=S4, dst=D4)
    out += [
        bytes(Ether(**E) / IP(src=S4, dst=D4, options=[IPOption_Timestamp(flg=3, pointer=13, internet_address=R4,
                                                                             timestamp=9)]) / UDP() / Raw(b"t" * 5)),
        bytes(Ether(**E) / IP(src=S4, dst=D4, options=[IPOption_SSRR(pointer=4, routers=[R4, D4])]) / TCP()),
        bytes(Ether(**E) / IP(src=S4, dst=D4, options=[IPOption_RR(pointer=40, routers=[R4] * 9)]) / TCP()),
        bytes(Ether(**E) / IP(src=R4, dst=S4) / ICMP(type=3, code=4) /
              IPerror(src=S4, dst=D4, options=[IPOption_NOP()] * 4) / UDPerror(sport=1, dport=2) / Raw(b"x" * 8)),
        bytes(Ether(**E) / IP(src=R4, dst=S4) / ICMP(type=11) / IPerror(src=S4, dst=D4, frag=5, proto=17) /
              Raw(b"f" * 16)),
        bytes(Ether(**E) / IP(src=R4, dst=S4) / ICMP(type=12) / IPerror(src=S4, dst=D4) /
              UDPerror(sport=1, dport=2, chksum=0) / Raw(b"z" * 4)),
        bytes(Ether(**E) / Dot1Q(vlan=4) / IP(src=R4, dst=S4) / ICMP(type=5) / IPerror(src=S4, dst=D4) /
              TCPerror(sport=7, dport=8)),
        bytes(Ether(**E) / IPv6(src=R6, dst=S6) / ICMPv6PacketTooBig() / IPerror6(src=S6, dst=D6) /
              UDPerror(sport=1, dport=2, chksum=0)),
        bytes(Ether(**E) / IPv6(src=R6, dst=S6) / ICMPv6DestUnreach() / IPerror6(src=S6, dst=D6) /
              TCPerror(sport=1, dport=2) / Raw(b"q" * 30)),
        bytes(Ether(**E) / IPv6(src=S6, dst=D6) / IPv6ExtHdrRouting(addresses=[R6], segleft=1) / TCP()),
        bytes(Ether(**E) / IPv6(src=S6, dst=D6) / IPv6ExtHdrRouting(addresses=[R6], segleft=0) / UDP()),
        bytes(Ether(**E) / IPv6(src=S6, dst=D6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() /
              IPv6ExtHdrFragment(offset=0, m=1) / UDP() / Raw(b"m" * 20)),
        bytes(Ether(**E) / IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(offset=3, m=0) / Raw(b"l" * 20)),
        _offload_v4(Ether(**E) / IP(src=S4, dst=D4) / TCP() / Raw(b"o" * 30)),
        _offload_v4(Ether(**E) / IP(src=S4, dst=D4) / UDP() / Raw(b"o" * 30)),
        _offload_v6(Ether(**E) / IPv6(src=S6, dst=D6) / TCP() / Raw(b"o" * 30)),
        _offload_v6(Ether(**E) / IPv6(src=S6, dst=D6) / UDP() / Raw(b"o" * 30)),
        _with_checksum(bytes(Ether(**E) / ip4 / TCP() / Raw(b"w" * 10)), 14 + 20 + 16, 0x1234),
        _with_checksum(bytes(Ether(**E) / ip4 / UDP() / Raw(b"w" * 10)), 14 + 10, 0xBEEF),
        bytes(Ether(**E) / IP(src=S4, dst=D4, ihl=4) / TCP()),          # bogus header length
        bytes(Ether(**E) / IP(src=S4, dst=D4, len=12) / TCP()),         # total length < header
        bytes(Ether(**E, type=0x0800) / IPv6(src=S6, dst=D6) / UDP()),  # version contradicts type
        bytes(Ether(**E, type=0x86DD) / IP(src=S4, dst=D4) / UDP()),
        bytes(Ether(**E, type=0x0806)) + struct.pack("!HHBBH", 1, 0x0800, 6, 6, 1) + b"\x01" * 28,  # plen 6
        bytes(Ether(**E, type=0x0806)) + struct.pack("!HHBBH", 1, 0x0800, 8, 4, 1) + b"\x02" * 24,  # hlen 8
    ]
    # IPv6 jumbogram: payload length 0, hop-by-hop jumbo option
    body = struct.pack("!HHHH", 53, 53, 0, 0) + b"j" * 40
    hbh = bytes([17, 0, 0xC2, 4]) + struct.pack("!I", 8 + len(body))
    out.append(bytes(Ether(**E, type=0x86DD)) + bytes(IPv6(src=S6, dst=D6, nh=0, plen=0))[:40] + hbh + body)
    return out


@needs_accel
def test_every_truncation_of_each_kind_identical():
    packets = kinds()
    cuts, wire = [], []
    for p in packets:
        for n in range(len(p) + 1):
            cuts.append(p[:n])
            wire.append(len(p))
        # wrong checksums everywhere in the first 80 bytes' checksum-looking places: flip bytes
        for pos in range(10, min(len(p), 90), 7):
            cuts.append(p[:pos] + bytes([p[pos] ^ 0x5A]) + p[pos + 1:])
            wire.append(len(p))
    batch = from_packets(cuts, linktype=1, wirelens=wire)
    counts = assert_same(batch)
    assert all(v > 0 for v in counts.values()), counts
    assert_same(batch, recompute_whole=False)


def _field_values(p: bytes, pos: int) -> list[bytes]:
    return [p[:pos] + struct.pack("!H", v) + p[pos + 2:] for v in range(65536)]


@needs_accel
@pytest.mark.parametrize("case", ["udp4_cut", "udp6_cut", "tcp4_cut", "udp4_whole", "icmp4_quoted_udp",
                                  "icmp6_quoted_udp", "icmp4_quoted_header"])
def test_every_checksum_value_identical(case):
    """All 65536 values of one checksum field: hits the rare rules (a computed UDP checksum of
    0 written as 0xFFFF, the offload signature, the fold's zero) for sure."""
    udp4 = bytes(Ether(**E) / IP(src=S4, dst=D4) / UDP(sport=1, dport=2) / Raw(b"u" * 40))
    udp6 = bytes(Ether(**E) / IPv6(src=S6, dst=D6) / UDP(sport=1, dport=2) / Raw(b"u" * 40))
    tcp4 = bytes(Ether(**E) / IP(src=S4, dst=D4) / TCP() / Raw(b"u" * 40))
    q4 = bytes(Ether(**E) / IP(src=R4, dst=S4) / ICMP(type=3) / IPerror(src=S4, dst=D4) /
               UDPerror(sport=1, dport=2) / Raw(b"x" * 8))
    q6 = bytes(Ether(**E) / IPv6(src=R6, dst=S6) / ICMPv6DestUnreach() / IPerror6(src=S6, dst=D6) /
               UDPerror(sport=1, dport=2))
    p, pos, caplen = {
        "udp4_cut": (udp4, 14 + 20 + 6, 60), "udp6_cut": (udp6, 14 + 40 + 6, 80),
        "tcp4_cut": (tcp4, 14 + 20 + 16, 64), "udp4_whole": (udp4, 14 + 20 + 6, None),
        "icmp4_quoted_udp": (q4, 14 + 20 + 8 + 20 + 6, None),
        "icmp6_quoted_udp": (q6, 14 + 40 + 8 + 40 + 6, None),
        "icmp4_quoted_header": (q4, 14 + 20 + 8 + 10, 14 + 20 + 8 + 20 + 4),
    }[case]
    pkts = _field_values(p, pos)
    if caplen is not None:
        pkts = [x[:caplen] for x in pkts]
    batch = from_packets(pkts, linktype=1, wirelens=[len(p)] * len(pkts))
    assert_same(batch)


@needs_accel
def test_headers_that_lie_do_not_crash():
    """The C code checks every access against the packet's end and the buffer itself, so even
    headers that contradict the bytes (not what parse produces) cannot make it crash. (Its two
    passes may then disagree, as one packet's rewrite can move another's claimed headers: that
    is a clean RuntimeError.)"""
    from capture_daemon.parse import Headers  # noqa: PLC0415
    rng = np.random.default_rng(7)
    pools, _ = build_pools(rng)
    for lt in LINKTYPES[:3]:
        batch = mutated_batch(pools[lt], lt, 20000, rng, 10.0)
        h = parse(batch)
        n, blen = len(batch), len(batch.buf)
        pick = rng.random(n) < 0.5
        lie = Headers(**{k: np.copy(getattr(h, k)) for k in h.__dataclass_fields__})
        lie.l3[pick] = rng.integers(-5, blen + 100, int(pick.sum()))
        lie.l4[pick] = rng.integers(-5, blen + 100, int(pick.sum()))
        lie.iplen[pick] = rng.integers(-100_000, 1 << 20, int(pick.sum()))
        lie.ipver[pick] = rng.choice(np.array([0, 4, 6, 5], np.uint8), int(pick.sum()))
        lie.proto[pick] = rng.choice(np.array([1, 6, 17, 58, 0], np.uint8), int(pick.sum()))
        lie.ethertype[pick] = rng.choice(np.array([0x0800, 0x86DD, 0x0806, 0], np.uint16), int(pick.sum()))
        b = _copy(batch)
        b.caplen[rng.random(n) < 0.01] += 50  # caplens past the buffer's end, too
        try:
            Anonymizer(CP, accelerated=True).apply(b, lie, np.ones(n, dtype=bool))
        except RuntimeError as e:
            assert "do not match" in str(e) or "disagree" in str(e)


@needs_accel
def test_large_whole_packets_identical():
    """Whole-packet L4 checksums over long segments (the C code sums 8 bytes at a time in 16-bit
    lanes, emptied every 2048 bytes): lengths around those boundaries, every byte 0xFF (the
    largest lane sums) or pseudo-random, TCP and UDP over IPv4 and IPv6, up to an IP maximum."""
    rng = np.random.default_rng(11)
    pkts = []
    for n in (0, 1, 7, 8, 9, 15, 16, 17, 2031, 2039, 2040, 2041, 2047, 2048, 2049, 2055, 2056, 2057,
              4095, 4096, 4097, 6143, 6144, 6145, 9000, 65000):
        for fill in (b"\xff" * n, rng.integers(0, 256, n, dtype=np.uint8).tobytes()):
            pkts.append(bytes(Ether(**E) / IP(src=S4, dst=D4) / UDP(sport=1, dport=2) / Raw(fill)))
            pkts.append(bytes(Ether(**E) / IP(src=S4, dst=D4) / TCP() / Raw(fill)))
            if n <= 65000 - 40:
                pkts.append(bytes(Ether(**E) / IPv6(src=S6, dst=D6) / UDP(sport=1, dport=2) / Raw(fill)))
                pkts.append(bytes(Ether(**E) / IPv6(src=S6, dst=D6) / TCP() / Raw(fill)))
    # wrong checksums too: each one is recomputed over the whole segment and counted
    bad = [p[:14 + 20 + 16] + b"\x12\x34" + p[14 + 20 + 18:] for p in pkts[1::4]]
    counts = assert_same(from_packets(pkts + bad, linktype=1))
    assert counts["checksums_corrected"] >= len(bad)
