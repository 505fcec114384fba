#!/usr/bin/env python3
"""Deterministic generator of a realistic benchmark trace (classic pcap, Ethernet).

What the trace looks like (issue #6's benchmark input):
- ~15 % of packets IPv6 (chosen per flow so the packet share lands close to the target),
- F flows with heavy-tailed (Pareto) sizes: a few elephants, many mice,
- TCP (SYN, SYN|ACK opening a flow; FIN|ACK or RST closing it), UDP, ICMP/ICMPv6 echo and
  ICMP/ICMPv6 errors that quote the offending IP header (exercises the anonymizer's inner rewrite),
- a few 802.1Q VLAN-tagged flows,
- wire lengths 60..1514, caplen = min(wirelen, snaplen),
- correct IPv4 header checksums and TCP/UDP/ICMP/ICMPv6 checksums; for packets truncated by the
  snaplen the checksum is the one of a packet whose unseen payload is all zero (unverifiable anyway),
- non-decreasing timestamps spread over --duration seconds.

Everything is vectorized with numpy (per chunk of packets, grouped by header layout), so 5 M packets
take seconds, not minutes. The same arguments always give the same bytes.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

GENERATOR_VERSION = 2        # bump when the same arguments start giving different bytes
ETH_HDR = 14
VLAN_HDR = 4
MIN_WIRE = 60                # Ethernet minimum frame without FCS
MAX_WIRE = 1514              # Ethernet MTU 1500 + 14; VLAN flows use a 1496-byte IP MTU to stay within it
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58

SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10


def _fold(s: np.ndarray) -> np.ndarray:
    """One's-complement fold of 64-bit sums to 16 bits."""
    s = s.astype(np.uint64)
    for _ in range(4):
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _words_sum(m: np.ndarray) -> np.ndarray:
    """Sum of big-endian 16-bit words of each row of an even-width uint8 matrix."""
    m = m.astype(np.uint64)
    return (m[:, 0::2] << 8).sum(axis=1) + m[:, 1::2].sum(axis=1)


def _put_be(m: np.ndarray, col: int, value: np.ndarray, nbytes: int) -> None:
    """Write integers big-endian into columns col..col+nbytes of each row."""
    v = np.asarray(value).astype(np.uint64)
    for k in range(nbytes):
        m[:, col + k] = ((v >> np.uint64(8 * (nbytes - 1 - k))) & np.uint64(0xFF)).astype(np.uint8)


class Flows:
    """Per-flow attributes, drawn once for the whole trace."""

    def __init__(self, rng: np.random.Generator, n_packets: int, n_flows: int, duration: float,
                 v6_share: float):
        f = n_flows
        # Protocol mix per flow: TCP 75 %, UDP 20 %, ICMP 5 % (a third of it errors).
        u = rng.random(f)
        self.proto = np.where(u < 0.75, TCP, np.where(u < 0.95, UDP, ICMP)).astype(np.uint8)
        self.icmp_err = (self.proto == ICMP) & (rng.random(f) < 0.33)
        # Heavy-tailed sizes: every flow gets at least one packet, the rest is spread by Pareto
        # weights (an ICMP error "flow" is a single packet).
        w = np.where(self.icmp_err, 0.0, rng.pareto(1.2, f) + 1.0)
        self.size = 1 + rng.multinomial(n_packets - f, w / w.sum()).astype(np.int64)
        # IPv6 flows: walk the flows in random order until their packets make up v6_share.
        perm = rng.permutation(f)
        cum = np.cumsum(self.size[perm])
        self.v6 = np.zeros(f, bool)
        self.v6[perm[cum <= v6_share * cum[-1]]] = True
        # A few VLAN-tagged flows.
        self.vlan = np.where(rng.random(f) < 0.02, rng.choice([10, 20, 100, 4001], f), -1).astype(np.int32)
        # Addresses: many clients, drawn evenly from a large pool, and fewer servers with Zipf
        # popularity, so addresses repeat the way they do on a real link (a cache helps, but
        # there are many never-seen ones too: ~49k distinct IPv4 and ~17k IPv6 addresses for 100k
        # flows).
        n_cli, n_srv = max(16, f // 2), max(8, f // 10)
        cli4 = rng.integers(0x01000000, 0xDF000000, n_cli, dtype=np.uint64)
        srv4 = rng.integers(0x01000000, 0xDF000000, n_srv, dtype=np.uint64)
        ci = rng.integers(0, n_cli, f)
        si = (rng.zipf(1.2, f) - 1) % n_srv
        self.src4, self.dst4 = cli4[ci], srv4[si]
        cli6 = rng.integers(0, 256, (n_cli, 16), dtype=np.uint8)
        srv6 = rng.integers(0, 256, (n_srv, 16), dtype=np.uint8)
        for pool in (cli6, srv6):            # global unicast 2000::/3, a few /32s
            pool[:, 0] = 0x20
            pool[:, 1] = 0x01
            pool[:, 2] = rng.choice([0x0d, 0x06, 0x4a, 0x12], len(pool))
        self.src6, self.dst6 = cli6[ci], srv6[si]
        self.smac = rng.integers(0, 256, (f, 6), dtype=np.uint8)
        self.dmac = rng.integers(0, 256, (f, 6), dtype=np.uint8)
        self.smac[:, 0] = (self.smac[:, 0] & 0xFC) | 0x02          # locally administered unicast
        self.dmac[:, 0] = (self.dmac[:, 0] & 0xFC) | 0x02
        self.sport = rng.integers(1024, 65536, f).astype(np.uint64)
        common = np.array([80, 443, 53, 22, 25, 123, 8080, 3478, 993, 5353])
        self.dport = np.where(rng.random(f) < 0.8, rng.choice(common, f),
                              rng.integers(1, 65536, f)).astype(np.uint64)
        self.isn = rng.integers(0, 2**32, f, dtype=np.uint64)
        self.ttl = rng.choice([64, 128, 255, 57, 118], f).astype(np.uint8)
        self.tos = np.where(rng.random(f) < 0.9, 0, rng.choice([0x10, 0x28, 0xB8], f)).astype(np.uint8)
        self.rst = rng.random(f) < 0.1
        # Timing: start anywhere in the run, packets spread over a per-flow span.
        self.start = rng.random(f) * duration
        gap = np.exp(rng.normal(np.log(0.01), 1.0, f))
        self.span = np.minimum(duration - self.start, self.size * gap)


def _packet_order(rng, flows: Flows, duration: float, t0: float):
    """Per packet (in time order): flow index, position in flow, direction, timestamp."""
    flow = np.repeat(np.arange(len(flows.size)), flows.size)
    t = flows.start[flow] + rng.random(len(flow)) * flows.span[flow]
    order = np.argsort(t, kind="stable")
    flow, t = flow[order], t[order]
    # Position of each packet inside its flow (time order): stable sort by flow keeps time order.
    by_flow = np.argsort(flow, kind="stable")
    first = np.concatenate(([0], np.cumsum(flows.size)[:-1]))
    pos = np.empty(len(flow), np.int64)
    pos[by_flow] = np.arange(len(flow)) - np.repeat(first, flows.size)
    us = np.round((t0 + np.clip(t, 0, duration)) * 1e6).astype(np.int64)
    us = np.maximum.accumulate(us)            # non-decreasing despite rounding
    return flow, pos, us


def _lengths(rng, flows: Flows, flow, pos, rev):
    """IP payload (L4 header + data) length and TCP flags per packet."""
    n = len(flow)
    proto = flows.proto[flow]
    v6 = flows.v6[flow]
    vlan = flows.vlan[flow] >= 0
    size = flows.size[flow]
    last = pos == size - 1
    ip_hdr = np.where(v6, 40, 20)
    mtu = np.where(vlan, 1496, 1500)
    u = rng.random(n)
    # TCP: opening/closing/pure ACKs carry no data; other segments: full MSS or a random size.
    mss = mtu - ip_hdr - 20
    tcp_data = np.where(u < 0.40, 0, np.where(u < 0.75, mss, rng.integers(1, 1461, n) % mss + 1))
    flags = np.full(n, ACK, np.uint8)
    flags[tcp_data > 0] = ACK | PSH
    flags[(pos == 1) & (size > 2)] = SYN | ACK
    closing = last & (size >= 2)
    flags[closing] = np.where(flows.rst[flow][closing], RST | ACK, FIN | ACK)
    flags[pos == 0] = SYN
    tcp_data[(flags & (SYN | FIN | RST)) != 0] = 0
    # UDP: mostly small (DNS-like), some larger datagrams.
    udp_data = np.where(rng.random(n) < 0.6, rng.integers(20, 200, n),
                        rng.integers(200, 1400, n))
    udp_data = np.minimum(udp_data, mtu - ip_hdr - 8)
    # ICMP echo: 8 + 56 bytes. ICMP errors: 8 + quoted header + 8 bytes of its L4 header.
    icmp_len = np.where(flows.icmp_err[flow], 8 + np.where(v6, 40, 20) + 8, 64)
    l4len = np.where(proto == TCP, 20 + tcp_data, np.where(proto == UDP, 8 + udp_data, icmp_len))
    return l4len.astype(np.int64), flags


def _build_group(rng, flows: Flows, flow, pos, rev, l4len, flags, v6: bool, vlan: bool,
                 width: int) -> np.ndarray:
    """Frames of one header layout (fixed offsets), as an (n, width) uint8 matrix."""
    n = len(flow)
    l3 = ETH_HDR + (VLAN_HDR if vlan else 0)
    ip_hdr = 40 if v6 else 20
    l4 = l3 + ip_hdr
    m = rng.integers(0, 256, (n, width), dtype=np.uint8)   # payload bytes: random
    # Ethernet (+ 802.1Q).
    smac, dmac = flows.smac[flow], flows.dmac[flow]
    r = rev[:, None]
    m[:, 0:6] = np.where(r, smac, dmac)
    m[:, 6:12] = np.where(r, dmac, smac)
    etype = 0x86DD if v6 else 0x0800
    if vlan:
        _put_be(m, 12, np.full(n, 0x8100), 2)
        _put_be(m, 14, flows.vlan[flow], 2)
    _put_be(m, l3 - 2, np.full(n, etype), 2)
    proto = flows.proto[flow].astype(np.uint64)
    if v6:
        proto = np.where(proto == ICMP, ICMP6, proto)
    ip_total = ip_hdr + l4len
    # Addresses: forward = client -> server; reversed packets swap them (and the ports).
    if v6:
        s, d = flows.src6[flow], flows.dst6[flow]
        src, dst = np.where(r, d, s), np.where(r, s, d)
        tos = flows.tos[flow].astype(np.uint64)
        _put_be(m, l3, (6 << 28) | (tos << 20) | (flow.astype(np.uint64) & 0xFFFFF), 4)
        _put_be(m, l3 + 4, l4len, 2)
        m[:, l3 + 6] = proto
        m[:, l3 + 7] = flows.ttl[flow]
        m[:, l3 + 8:l3 + 24] = src
        m[:, l3 + 24:l3 + 40] = dst
        pseudo = _words_sum(src) + _words_sum(dst) + l4len.astype(np.uint64) + proto
    else:
        s, d = flows.src4[flow], flows.dst4[flow]
        src, dst = np.where(rev, d, s), np.where(rev, s, d)
        m[:, l3] = 0x45
        m[:, l3 + 1] = flows.tos[flow]
        _put_be(m, l3 + 2, ip_total, 2)
        _put_be(m, l3 + 4, rng.integers(0, 65536, n), 2)
        _put_be(m, l3 + 6, np.where(proto == TCP, 0x4000, 0), 2)     # DF on TCP
        m[:, l3 + 8] = flows.ttl[flow]
        m[:, l3 + 9] = proto
        m[:, l3 + 10:l3 + 12] = 0
        _put_be(m, l3 + 12, src, 4)
        _put_be(m, l3 + 16, dst, 4)
        _put_be(m, l3 + 10, 0xFFFF - _fold(_words_sum(m[:, l3:l3 + 20])), 2)
        pseudo = (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) \
            + l4len.astype(np.uint64) + proto
    sport, dport = flows.sport[flow], flows.dport[flow]
    sp, dp = np.where(rev, dport, sport), np.where(rev, sport, dport)
    is_tcp, is_udp = proto == TCP, proto == UDP
    is_icmp = ~(is_tcp | is_udp)
    err = flows.icmp_err[flow]
    # L4 headers, written for every row and then selected by protocol (fixed columns per layout).
    t = m[is_tcp]
    _put_be(t, l4, sp[is_tcp], 2)
    _put_be(t, l4 + 2, dp[is_tcp], 2)
    _put_be(t, l4 + 4, (flows.isn[flow][is_tcp] + pos[is_tcp].astype(np.uint64) * 1448) & 0xFFFFFFFF, 4)
    _put_be(t, l4 + 8, np.where(flags[is_tcp] == SYN, 0,
                                rng.integers(0, 2**32, int(is_tcp.sum()), dtype=np.uint64)), 4)
    t[:, l4 + 12] = 0x50
    t[:, l4 + 13] = flags[is_tcp]
    _put_be(t, l4 + 14, np.full(len(t), 64240), 2)
    t[:, l4 + 16:l4 + 20] = 0           # checksum (filled below), urgent pointer
    m[is_tcp] = t
    u = m[is_udp]
    _put_be(u, l4, sp[is_udp], 2)
    _put_be(u, l4 + 2, dp[is_udp], 2)
    _put_be(u, l4 + 4, l4len[is_udp], 2)
    u[:, l4 + 6:l4 + 8] = 0
    m[is_udp] = u
    ic = m[is_icmp]
    e = err[is_icmp]
    echo_req = ~rev[is_icmp]
    if v6:
        typ = np.where(e, 1, np.where(echo_req, 128, 129))
        code = np.where(e, 4, 0)
    else:
        typ = np.where(e, 3, np.where(echo_req, 8, 0))
        code = np.where(e, 3, 0)
    ic[:, l4] = typ
    ic[:, l4 + 1] = code
    ic[:, l4 + 2:l4 + 4] = 0
    _put_be(ic, l4 + 4, np.where(e, 0, flow[is_icmp] & 0xFFFF), 2)     # echo id / unused
    _put_be(ic, l4 + 6, np.where(e, 0, pos[is_icmp] & 0xFFFF), 2)      # echo seq / unused
    # ICMP errors (server -> client) quote the client's datagram that caused them: its IP header
    # and the first 8 bytes of its UDP header.
    qe = ic[e]
    q = l4 + 8
    fe = flow[is_icmp][e]
    if len(qe):
        if v6:
            _put_be(qe, q, np.full(len(qe), 6 << 28), 4)
            _put_be(qe, q + 4, np.full(len(qe), 108), 2)
            qe[:, q + 6] = UDP
            qe[:, q + 7] = 64
            qe[:, q + 8:q + 24] = flows.src6[fe]
            qe[:, q + 24:q + 40] = flows.dst6[fe]
            qu = q + 40
        else:
            qe[:, q] = 0x45
            qe[:, q + 1] = 0
            _put_be(qe, q + 2, np.full(len(qe), 128), 2)
            qe[:, q + 6:q + 8] = 0
            qe[:, q + 8] = 64
            qe[:, q + 9] = UDP
            qe[:, q + 10:q + 12] = 0
            _put_be(qe, q + 12, flows.src4[fe], 4)
            _put_be(qe, q + 16, flows.dst4[fe], 4)
            _put_be(qe, q + 10, 0xFFFF - _fold(_words_sum(qe[:, q:q + 20])), 2)
            qu = q + 20
        _put_be(qe, qu, flows.sport[fe], 2)
        _put_be(qe, qu + 2, flows.dport[fe], 2)
        _put_be(qe, qu + 4, np.full(len(qe), 108), 2)
        ic[e] = qe
    m[is_icmp] = ic
    # Zero the Ethernet padding of short frames (bytes past the IP datagram).
    col = np.arange(width)
    m[col[None, :] >= (l3 + ip_total)[:, None]] = 0
    # L4 checksum over the segment (bytes the matrix does not hold count as zero).
    seg = m[:, l4:width]
    if seg.shape[1] % 2:
        seg = np.concatenate([seg, np.zeros((n, 1), np.uint8)], axis=1)
    ssum = _words_sum(seg)                       # padding is zero already
    csum = 0xFFFF - _fold(ssum + np.where(is_icmp & (not v6), 0, pseudo))
    csum = np.where(is_udp & (csum == 0), 0xFFFF, csum)
    off = np.where(is_tcp, l4 + 16, np.where(is_udp, l4 + 6, l4 + 2))
    rows = np.arange(n)
    m[rows, off] = (csum >> 8).astype(np.uint8)
    m[rows, off + 1] = (csum & 0xFF).astype(np.uint8)
    return m, l3 + ip_total


def generate(path: str, packets: int, flows: int, seed: int, snaplen: int, duration: float,
             start: float, v6_share: float = 0.15, chunk: int = 0) -> dict:
    """Write the trace to path; return a summary (counts) for the caller."""
    if packets < 1:
        raise ValueError("--packets must be at least 1")
    if snaplen < 1 or snaplen > 262144:
        raise ValueError("--snaplen must be 1..262144")
    flows = max(1, min(flows, packets // 2 if packets >= 2 else 1))
    rng = np.random.default_rng(seed)
    fl = Flows(rng, packets, flows, duration, v6_share)
    flow, pos, us = _packet_order(rng, fl, duration, start)
    width = max(128, min(snaplen, MAX_WIRE)) + 8     # no frame is longer than MAX_WIRE
    width += width % 2
    chunk = chunk or max(10_000, (256 << 20) // (width * 2))
    stats = {"packets": 0, "ipv6": 0, "vlan": 0, "tcp": 0, "udp": 0, "icmp": 0, "whole": 0,
             "flows": int(flows), "bytes_wire": 0}
    with open(path, "wb") as f:
        np.array([0xA1B2C3D4], "<u4").tofile(f)
        np.array([2, 4], "<u2").tofile(f)
        np.array([0, 0, snaplen, 1], "<u4").tofile(f)      # thiszone, sigfigs, snaplen, DLT_EN10MB
        for lo in range(0, packets, chunk):
            hi = min(packets, lo + chunk)
            cf, cp, cu = flow[lo:hi], pos[lo:hi], us[lo:hi]
            n = hi - lo
            # Direction: opening packet forward, SYN|ACK reverse, the rest either way.
            rev = rng.random(n) < 0.5
            rev[cp == 0] = False
            rev[cp == 1] = True
            icmp_e = fl.icmp_err[cf]
            rev[icmp_e] = True                      # errors go back to the sender
            l4len, flags = _lengths(rng, fl, cf, cp, rev)
            frames = np.zeros((n, width), np.uint8)
            frame_len = np.zeros(n, np.int64)
            v6 = fl.v6[cf]
            vl = fl.vlan[cf] >= 0
            for gv6 in (False, True):
                for gvl in (False, True):
                    sel = np.nonzero((v6 == gv6) & (vl == gvl))[0]
                    if len(sel) == 0:
                        continue
                    m, flen = _build_group(rng, fl, cf[sel], cp[sel], rev[sel], l4len[sel],
                                           flags[sel], gv6, gvl, width)
                    frames[sel] = m
                    frame_len[sel] = flen
            wire = np.maximum(frame_len, MIN_WIRE)
            cap = np.minimum(wire, snaplen)
            rec = np.zeros((n, 16 + width), np.uint8)
            hdr = rec[:, :16].view("<u4")
            hdr[:, 0] = cu // 1_000_000
            hdr[:, 1] = cu % 1_000_000
            hdr[:, 2] = cap
            hdr[:, 3] = wire
            rec[:, 16:] = frames
            keep = np.arange(16 + width)[None, :] < (16 + cap)[:, None]
            rec[keep].tofile(f)
            stats["packets"] += n
            stats["ipv6"] += int(v6.sum())
            stats["vlan"] += int(vl.sum())
            p = fl.proto[cf]
            stats["tcp"] += int((p == TCP).sum())
            stats["udp"] += int((p == UDP).sum())
            stats["icmp"] += int((p == ICMP).sum())
            stats["whole"] += int((wire <= snaplen).sum())
            stats["bytes_wire"] += int(wire.sum())
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=5_000_000)
    ap.add_argument("--flows", type=int, default=None,
                    help="number of flows (default: packets / 50, i.e. 100k for 5 M packets)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--snaplen", type=int, default=128)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds the trace spans")
    ap.add_argument("--start", type=float, default=1_700_000_000.0, help="epoch of the first second")
    ap.add_argument("--ipv6-share", type=float, default=0.15)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    flows = a.flows if a.flows is not None else max(1, a.packets // 50)
    t = time.monotonic()
    try:
        s = generate(a.output, a.packets, flows, a.seed, a.snaplen, a.duration, a.start, a.ipv6_share)
    except (ValueError, OSError) as e:
        print(f"gen_trace: {e}", file=sys.stderr)
        return 2
    dt = time.monotonic() - t
    print(f"gen_trace: {s['packets']} packets ({s['ipv6'] / s['packets']:.1%} IPv6, "
          f"{s['vlan']} VLAN-tagged, {s['whole']} whole), {s['flows']} flows -> {a.output} "
          f"in {dt:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
