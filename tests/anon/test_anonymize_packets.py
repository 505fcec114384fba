"""Packet rewriting against an independent reference: each case is built twice with scapy
(Debian python3-scapy), once with the original addresses and once with their Crypto-PAn images,
scapy computing every checksum itself. Anonymizing the original must give the reference, also
for every truncation of it (the snaplen cutting anywhere), in one batch."""
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from capture_daemon.anonymize import Anonymizer
from capture_daemon.batch import from_packets
from capture_daemon.cryptopan import CryptoPAn
from capture_daemon.parse import parse

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from scapy.layers.inet import (ICMP, IP, TCP, UDP, IPerror, IPOption_LSRR, IPOption_NOP,
                                   IPOption_RR, IPOption_Timestamp, TCPerror, UDPerror, fragment)
    from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6ND_NA,
                                    ICMPv6ND_NS, ICMPv6ND_Redirect, ICMPv6TimeExceeded,
                                    IPerror6, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                    IPv6ExtHdrRouting, fragment6)
    from scapy.layers.l2 import ARP, CookedLinux, Dot1Q, Ether
    from scapy.packet import Raw

KEY = bytes.fromhex("1522178d33a4cf80130a5b1649907d10d8988f837979652762574c2d2a842202")
CP = CryptoPAn(KEY)
S4, D4, R4 = "192.0.2.10", "198.51.100.77", "203.0.113.1"
S6, D6, R6 = "2001:db8:1::10", "2001:db8:ff::1:77", "2001:db8:1::1"
ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def ident(a):
    return a


def anon(a):
    return CP.anonymize_str(a)


# name -> (linktype, builder(f) -> list of packets as bytes)
CASES = {
    "v4_tcp": (1, lambda f: [Ether(**ETH) / IP(src=f(S4), dst=f(D4)) /
                             TCP(sport=40000, dport=80, flags="PA", seq=7) / Raw(b"x" * 101)]),
    "v4_udp": (1, lambda f: [Ether(**ETH) / IP(src=f(S4), dst=f(D4)) / UDP(sport=5353, dport=53) /
                             Raw(b"y" * 33)]),
    "v4_udp_no_checksum": (1, lambda f: [Ether(**ETH) / IP(src=f(S4), dst=f(D4)) /
                                         UDP(sport=1, dport=2, chksum=0) / Raw(b"z" * 10)]),
    "v4_icmp_echo": (1, lambda f: [Ether(**ETH) / IP(src=f(S4), dst=f(D4)) / ICMP() / Raw(b"p" * 56)]),
    "v4_options_tcp": (1, lambda f: [Ether(**ETH) / IP(src=f(S4), dst=f(D4), options=[b"\x01\x01\x01\x00"]) /
                                     TCP(sport=1, dport=2) / Raw(b"o" * 9)]),
    "v4_record_route_udp": (1, lambda f: [Ether(**ETH) / IP(src=f(S4), dst=f(D4), options=[
        IPOption_NOP(), IPOption_RR(pointer=12, routers=[f(R4), f("10.1.2.3"), "0.0.0.0"])]) /
        UDP(sport=1, dport=2) / Raw(b"R" * 9)]),
    "v4_timestamp_tcp": (1, lambda f: [Ether(**ETH) / IP(src=f(S4), dst=f(D4), options=[
        IPOption_Timestamp(flg=1, pointer=13, internet_address=f(R4), timestamp=77)]) /
        TCP(sport=1, dport=2)]),
    "v4_loose_source_route_icmp": (1, lambda f: [Ether(**ETH) / IP(src=f(S4), dst=f(R4), options=[
        IPOption_LSRR(pointer=4, routers=[f(R4), f(D4)])]) / ICMP() / Raw(b"L" * 8)]),
    "vlan_tcp": (1, lambda f: [Ether(**ETH) / Dot1Q(vlan=5) / IP(src=f(S4), dst=f(D4)) /
                               TCP(sport=3, dport=4) / Raw(b"v" * 20)]),
    "qinq_udp": (1, lambda f: [Ether(**ETH) / Dot1Q(vlan=7) / Dot1Q(vlan=9) /
                               IP(src=f(S4), dst=f(D4)) / UDP(sport=3, dport=4) / Raw(b"q" * 21)]),
    "sll_tcp": (113, lambda f: [CookedLinux(pkttype=0, lladdrtype=1, lladdrlen=6, src=b"\x02" * 6) /
                                IP(src=f(S4), dst=f(D4)) / TCP(sport=5, dport=6) / Raw(b"s" * 30)]),
    "raw_ipv6_udp": (101, lambda f: [IPv6(src=f(S6), dst=f(D6)) / UDP(sport=7, dport=8) / Raw(b"r" * 17)]),
    "raw_ipv4_icmp": (101, lambda f: [IP(src=f(S4), dst=f(D4)) / ICMP(type=8) / Raw(b"r" * 8)]),
    "v6_tcp": (1, lambda f: [Ether(**ETH) / IPv6(src=f(S6), dst=f(D6)) /
                             TCP(sport=40000, dport=443, flags="S") / Raw(b"t" * 51)]),
    "v6_udp": (1, lambda f: [Ether(**ETH) / IPv6(src=f(S6), dst=f(D6)) / UDP(sport=1, dport=2) /
                             Raw(b"u" * 40)]),
    "v6_icmpv6_echo": (1, lambda f: [Ether(**ETH) / IPv6(src=f(S6), dst=f(D6)) /
                                     ICMPv6EchoRequest(data=b"e" * 24)]),
    "v6_hbh_udp": (1, lambda f: [Ether(**ETH) / IPv6(src=f(S6), dst=f(D6)) / IPv6ExtHdrHopByHop() /
                                 UDP(sport=1, dport=2) / Raw(b"h" * 12)]),
    "v6_atomic_fragment_tcp": (1, lambda f: [Ether(**ETH) / IPv6(src=f(S6), dst=f(D6)) /
                                             IPv6ExtHdrFragment(offset=0, m=0, id=5) /
                                             TCP(sport=1, dport=2) / Raw(b"a" * 12)]),
    "v6_routing_no_addresses": (1, lambda f: [Ether(**ETH) / IPv6(src=f(S6), dst=f(D6)) /
                                              IPv6ExtHdrRouting(addresses=[], segleft=0) /
                                              TCP(sport=1, dport=2)]),
    "v4_fragments": (1, lambda f: [Ether(**ETH) / p for p in fragment(
        IP(src=f(S4), dst=f(D4), id=99) / UDP(sport=9, dport=10) / Raw(b"F" * 300), fragsize=64)]),
    "v6_fragments": (1, lambda f: [Ether(**ETH) / p for p in fragment6(
        IPv6(src=f(S6), dst=f(D6)) / IPv6ExtHdrFragment(id=77) / UDP(sport=9, dport=10) /
        Raw(b"G" * 300), 120)]),
    "arp": (1, lambda f: [Ether(**ETH) / ARP(op=1, psrc=f(S4), pdst=f(D4), hwsrc=ETH["src"]),
                          Ether(**ETH) / Dot1Q(vlan=3) / ARP(op=2, psrc=f(D4), pdst=f(S4))]),
    "icmp_error_udp": (1, lambda f: [Ether(**ETH) / IP(src=f(R4), dst=f(S4)) / ICMP(type=3, code=3) /
                                     IPerror(src=f(S4), dst=f(D4)) / UDPerror(sport=5000, dport=53) /
                                     Raw(b"Q" * 20)]),
    "icmp_error_tcp": (1, lambda f: [Ether(**ETH) / IP(src=f(R4), dst=f(S4)) / ICMP(type=11, code=0) /
                                     IPerror(src=f(S4), dst=f(D4)) /
                                     TCPerror(sport=5000, dport=80, flags="S") / Raw(b"T" * 7)]),
    "icmpv6_error_udp": (1, lambda f: [Ether(**ETH) / IPv6(src=f(R6), dst=f(S6)) / ICMPv6DestUnreach() /
                                       IPerror6(src=f(S6), dst=f(D6)) / UDPerror(sport=1, dport=2) /
                                       Raw(b"W" * 10)]),
    "icmpv6_time_exceeded_tcp": (1, lambda f: [Ether(**ETH) / IPv6(src=f(R6), dst=f(S6)) /
                                               ICMPv6TimeExceeded() / IPerror6(src=f(S6), dst=f(D6)) /
                                               TCPerror(sport=1, dport=2)]),
    "nd_ns_na_redirect": (1, lambda f: [
        Ether(**ETH) / IPv6(src=f(S6), dst=f("ff02::1:ff01:77")) / ICMPv6ND_NS(tgt=f(D6)),
        Ether(**ETH) / IPv6(src=f(D6), dst=f(S6)) / ICMPv6ND_NA(tgt=f(D6)),
        Ether(**ETH) / IPv6(src=f(R6), dst=f(S6)) / ICMPv6ND_Redirect(tgt=f(R6), dst=f(D6))]),
}


def build(name, f):
    linktype, builder = CASES[name]
    return linktype, [bytes(p) for p in builder(f)]


def run(linktype, packets, wirelens=None, sel=None, anonymizer=None):
    batch = from_packets(packets, linktype=linktype, wirelens=wirelens)
    anonymizer = anonymizer or Anonymizer(CryptoPAn(KEY))
    sel = np.ones(len(batch), dtype=bool) if sel is None else sel
    anonymizer.apply(batch, parse(batch), sel)
    return [batch.buf[o:o + n].tobytes() for o, n in zip(batch.off, batch.caplen)], anonymizer


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_packets_equal_reference(name):
    linktype, orig = build(name, ident)
    _, ref = build(name, anon)
    out, a = run(linktype, orig)
    assert out == ref
    assert a.not_anonymized == 0 and a.checksums_corrected == 0
    assert a.packets_anonymized == len(orig)


CHECKSUM_OFFSETS = {IP: 10, IPerror: 10, TCP: 16, TCPerror: 16, UDP: 6, UDPerror: 6, ICMP: 2}


def checksum_positions(linktype, data):
    """Absolute offsets of every checksum field scapy finds in the packet."""
    pkt = (Ether(data) if linktype == 1 else CookedLinux(data) if linktype == 113
           else IP(data) if data[0] >> 4 == 4 else IPv6(data))
    pos, layer = set(), pkt
    while layer and not isinstance(layer, Raw):
        start = len(data) - len(bytes(layer))
        off = CHECKSUM_OFFSETS.get(type(layer))
        if off is None and "cksum" in [f.name for f in layer.fields_desc]:
            off = 2  # ICMPv6 messages
        if off is not None:
            pos.update((start + off, start + off + 1))
        layer = layer.payload
    return pos


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_truncation_matches_truncated_reference(name):
    """The snaplen cutting anywhere: captured bytes equal the reference's. Checksums are exact
    once every byte that anonymization changes is captured; before that, a checksum whose
    coverage was cut through changed bytes cannot be known and is not compared."""
    linktype, orig = build(name, ident)
    _, ref = build(name, anon)
    for o, r in zip(orig, ref):
        changed = [i for i in range(len(o)) if o[i] != r[i]]
        last_changed = max(changed)
        cuts = list(range(len(o) + 1))
        out, a = run(linktype, [o[:k] for k in cuts], wirelens=[len(o)] * len(cuts))
        cks = checksum_positions(linktype, r)
        for k, got in zip(cuts, out):
            want = r[:k]
            assert len(got) == k
            if k > last_changed:
                assert got == want, k
            else:
                diff = [i for i in range(k) if got[i] != want[i]]
                assert set(diff) <= cks, (k, diff)


def test_truncated_address_keeps_exact_prefix():
    linktype, (o,) = build("v4_udp", ident)
    _, (r,) = build("v4_udp", anon)
    for k in range(14 + 12 + 1, 14 + 20):  # cut inside src or dst
        (got,), a = run(linktype, [o[:k]], wirelens=[len(o)])
        assert got[26:k] == r[26:k]
        assert a.addresses_truncated == (0 if k == 30 else 1)
        assert a.not_anonymized == 0


def test_selection_is_respected_and_neighbours_untouched():
    linktype, orig = build("v4_tcp", ident)
    _, ref = build("v4_tcp", anon)
    _, orig6 = build("v6_udp", ident)
    _, ref6 = build("v6_udp", anon)
    packets = [orig[0], orig6[0], orig[0], orig6[0]]
    out, a = run(1, packets, sel=np.array([True, False, False, True]))
    assert out == [ref[0], orig6[0], orig[0], ref6[0]]
    assert a.packets_anonymized == 2


def _fix_ip_checksum(pkt: bytearray, l3=14):
    pkt[l3 + 10:l3 + 12] = b"\0\0"
    s = sum(int.from_bytes(pkt[l3 + i:l3 + i + 2], "big") for i in range(0, 20, 2))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    pkt[l3 + 10:l3 + 12] = (~s & 0xFFFF).to_bytes(2, "big")


def test_wrong_checksums_on_whole_packets_are_corrected_and_counted():
    linktype, (o,) = build("v4_tcp", ident)
    _, (r,) = build("v4_tcp", anon)
    bad = bytearray(o)
    bad[14 + 10] ^= 0x55          # IP header checksum
    bad[14 + 20 + 16] ^= 0x0F     # TCP checksum
    (got,), a = run(linktype, [bytes(bad)])
    assert got == r
    assert a.checksums_corrected == 2


def test_offloaded_checksum_on_truncated_packet_leaks_nothing():
    """NIC offload leaves the pseudo-header sum in the TCP checksum field. On a truncated packet
    it is replaced by the pseudo-header sum of the new addresses."""
    linktype, (o,) = build("v6_tcp", ident)
    _, (r,) = build("v6_tcp", anon)

    def pseudo_sum(p):
        words = [int.from_bytes(p[22 + i:24 + i], "big") for i in range(0, 32, 2)]
        s = sum(words) + 6 + (len(p) - 54)
        while s > 0xFFFF:
            s = (s & 0xFFFF) + (s >> 16)
        return s

    off = bytearray(o)
    off[54 + 16:54 + 18] = pseudo_sum(o).to_bytes(2, "big")
    (got,), a = run(linktype, [bytes(off[:80])], wirelens=[len(o)])
    assert int.from_bytes(got[70:72], "big") == pseudo_sum(r)
    assert got[:70] == r[:70] and got[72:] == r[72:80]
    assert a.offload_checksums == 1


def test_udp_checksum_computed_as_zero_is_sent_as_ffff():
    # Choose a payload word so that the anonymized packet's UDP checksum comes out as 0.
    ref0 = bytes(Ether(**ETH) / IP(src=anon(S4), dst=anon(D4)) / UDP(sport=1, dport=2) /
                 Raw(b"\0\0abcd"))
    c = int.from_bytes(ref0[40:42], "big")
    word = c  # adding the checksum value to a zero word makes the one's complement sum 0xFFFF
    ref = bytes(Ether(**ETH) / IP(src=anon(S4), dst=anon(D4)) / UDP(sport=1, dport=2) /
                Raw(word.to_bytes(2, "big") + b"abcd"))
    assert ref[40:42] == b"\xff\xff"  # scapy's own rule
    orig = bytes(Ether(**ETH) / IP(src=S4, dst=D4) / UDP(sport=1, dport=2) /
                 Raw(word.to_bytes(2, "big") + b"abcd"))
    (got,), _ = run(1, [orig])
    assert got == ref
    # and the incremental path (truncated packet) applies the same rule
    (got,), _ = run(1, [orig[:43]], wirelens=[len(orig)])
    assert got == ref[:43]


def test_header_without_addresses_or_with_foreign_version():
    _, (o,) = build("v4_udp", ident)
    short = o[:14 + 11]  # IP header cut before the addresses: nothing to leak, nothing to do
    wrong = bytearray(o)
    wrong[14] = 0x65  # ethertype says IPv4, header says version 6
    out, a = run(1, [short, bytes(wrong)])
    assert out == [short, bytes(wrong)]
    assert a.not_anonymized == 1


def test_routing_header_with_addresses_is_counted():
    pkt = bytes(Ether(**ETH) / IPv6(src=S6, dst=D6) /
                IPv6ExtHdrRouting(addresses=["2001:db8::99"], segleft=1) / UDP(sport=1, dport=2))
    (got,), a = run(1, [pkt])
    assert a.not_anonymized == 1
    assert got[22:54] != pkt[22:54]  # the fixed header's addresses are still rewritten


def test_counters_and_describe():
    a = Anonymizer(CryptoPAn(KEY))
    d = a.describe()
    assert d == {"scheme": "cryptopan", "key_fingerprint": CP.fingerprint}
    assert KEY.hex() not in str(d) and KEY.hex() not in str(a.counters())


ALL_PACKETS = [(lt, p) for name in sorted(CASES) for lt, ps in [build(name, ident)] for p in ps]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(ALL_PACKETS) - 1),
                          st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
                          st.integers(0, 300)), min_size=1, max_size=8),
       st.sampled_from([1, 113, 101]))
def test_mutated_packets_never_raise(specs, linktype):
    """Mutated and truncated packets (of any link type): no exception, batch layout intact."""
    packets = []
    for i, muts, cut in specs:
        p = bytearray(ALL_PACKETS[i][1])
        for pos, val in muts:
            if pos < len(p):
                p[pos] = val
        packets.append(bytes(p[:cut]))
    batch = from_packets(packets, linktype=linktype)
    before = batch.buf.copy()
    a = Anonymizer(CryptoPAn(KEY))
    a.apply(batch, parse(batch), np.ones(len(batch), dtype=bool))
    assert len(batch.buf) == len(before)
    # Only IP/ARP-bearing packets change; their link-layer bytes never do.
    for o, n in zip(batch.off, batch.caplen):
        if linktype == 1:
            assert (batch.buf[o:o + min(n, 12)] == before[o:o + min(n, 12)]).all()
