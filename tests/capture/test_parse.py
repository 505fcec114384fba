"""The parser agrees with tshark on every bundled trace, across link types: parse() (the C
accelerator when built) and the numpy reference parse_numpy alike."""

import ipaddress
import os
import struct

import numpy as np
import pytest

from capture_daemon.batch import Batch, from_packets
from capture_daemon.parse import parse, parse_numpy
from capture_daemon.source import open_source
from tests.helpers import TRACES, tshark_fields


def read_all(path):
    src = open_source(read=path, interface=None)
    batches = list(src.batches())
    src.close()
    return batches


def first(value):
    return value.split(",")[0] if value else ""


IMPLS = pytest.mark.parametrize("parse", [parse, parse_numpy], ids=["parse", "numpy"])


@IMPLS
@pytest.mark.parametrize("trace", TRACES, ids=os.path.basename)
def test_parse_agrees_with_tshark(trace, parse):
    rows = tshark_fields(trace, "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport",
                         "tcp.dstport", "udp.srcport", "udp.dstport", "vlan.id", "ip.frag_offset",
                         "ipv6.fraghdr.offset", "icmp.type", "icmpv6.type",
                         extra=["-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE"])
    ours = []
    for b in read_all(trace):
        h = parse(b)
        for i in range(len(b)):
            ours.append((h.ipver[i], h.src4[i], h.dst4[i], bytes(h.src6[i]), bytes(h.dst6[i]),
                         h.sport[i], h.dport[i], h.vlan[i], h.proto[i], h.frag_later[i], h.l4[i]))
    assert len(ours) == len(rows)
    checked = 0
    for row, (ipver, s4, d4, s6, d6, sport, dport, vlan, proto, later, l4) in zip(rows, ours):
        ip_src, ip_dst, ip6_src, ip6_dst, tsp, tdp, usp, udp_, vid, fo, fo6, it, it6 = map(first, row)
        if ip_src:
            assert ipver == 4 and str(ipaddress.IPv4Address(int(s4))) == ip_src
            assert str(ipaddress.IPv4Address(int(d4))) == ip_dst
        elif ip6_src:
            assert ipver == 6
            assert ipaddress.IPv6Address(s6) == ipaddress.IPv6Address(ip6_src)
            assert ipaddress.IPv6Address(d6) == ipaddress.IPv6Address(ip6_dst)
        else:
            assert ipver == 0
        if vid:
            assert vlan == int(vid)
        else:
            assert vlan == -1
        if it or it6:  # ICMP: tshark's ports are the quoted packet's; ours are type/code
            assert dport >> 8 == int(it or it6)
        elif tsp and not later:
            assert (sport, dport) == (int(tsp), int(tdp))
            checked += 1
        elif usp and not later:
            assert (sport, dport) == (int(usp), int(udp_))
            checked += 1
        if (fo and int(fo) > 0) or (fo6 and int(fo6) > 0):
            assert later and l4 == -1
    assert checked or not any(r[4] or r[6] for r in rows)


def relink(batch: Batch, linktype: int) -> Batch:
    """The same packets re-framed: raw IP (Ethernet header dropped) or Linux SLL."""
    pkts = []
    for i in range(len(batch)):
        data = batch.buf[batch.off[i]:batch.off[i] + batch.caplen[i]].tobytes()
        ethertype = data[12:14]
        if linktype == 101:
            pkts.append(data[14:])
        else:
            pkts.append(struct.pack("!HHH8s", 0, 1, 6, data[6:12].ljust(8, b"\0")) + ethertype + data[14:])
    return from_packets(pkts, linktype=linktype)


@IMPLS
@pytest.mark.parametrize("linktype", [101, 113])
def test_other_link_types_give_the_same_headers(linktype, parse):
    trace = [t for t in TRACES if t.endswith("zeek__mdns.pcap")][0]
    [b] = read_all(trace)
    eth = parse(b)
    other = parse(relink(b, linktype))
    for field in ("ipver", "src4", "dst4", "src6", "dst6", "proto", "sport", "dport", "iplen"):
        assert np.array_equal(getattr(eth, field), getattr(other, field)), field


@IMPLS
def test_truncated_and_garbage_packets_never_raise(parse):
    rng = np.random.default_rng(7)
    pkts = [rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 80, 5000)]
    # make many of them look like IP so deeper code paths run
    pkts = [(p[:12] + b"\x08\x00" + b"\x45" + p[15:]) if i % 3 == 0 and len(p) > 15 else
            (p[:12] + b"\x86\xdd" + b"\x60" + p[15:]) if i % 3 == 1 and len(p) > 15 else p
            for i, p in enumerate(pkts)]
    h = parse(from_packets(pkts))
    assert len(h) == len(pkts)
    assert h.malformed.any()
    assert (h.l4 < np.array([0] + list(np.cumsum([len(p) for p in pkts])))[1:] + 1).all()
