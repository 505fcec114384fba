"""Mutated packet batches for the packet fuzzer, derived from the real traces in tests/data.

Seeds: every packet of the traces (read with tests/anon/pcapio.py, independent of the capture
path's reader), plus variants built from them once (in Python, a few thousand seeds): VLAN stacks
of up to 6 tags, IPv6 extension-header chains (right, wrong and endless lengths), ICMP/ICMPv6
errors quoting garbage, IPv4 options and fragments, ARP, runts. Seeds are stored per link type
(Ethernet, Linux SLL and SLL2, raw IP in its spellings, BSD NULL/LOOP), converted from Ethernet.

Mutation is per batch, vectorized with numpy (no per-packet Python): gather random seeds with a
random caplen cut, then bit flips anywhere, byte replacements at header offsets, wrong wire
lengths and out-of-order timestamps.
"""
from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass

import numpy as np

from capture_daemon.batch import Batch
from capture_daemon.parse import (DLT_EN10MB, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_LOOP,
                                  DLT_NULL, DLT_RAW_BSD, DLT_RAW_OBSD, LINKTYPE_RAW)
from tests.anon.pcapio import read_pcap

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
LINKTYPES = (DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2, LINKTYPE_RAW, DLT_RAW_BSD, DLT_RAW_OBSD, DLT_IPV4,
             DLT_IPV6, DLT_NULL, DLT_LOOP)
SEED_CAP = 9216  # seeds longer than a jumbo frame are cut here (wirelen keeps the truth)
# bytes worth writing into headers: versions/IHLs, protocol numbers, ethertype halves, TPIDs, 0/ff
INTERESTING = np.array([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x08, 0x0B, 0x11, 0x14, 0x28, 0x2B, 0x2C,
                        0x32, 0x33, 0x3A, 0x3B, 0x3C, 0x40, 0x41, 0x45, 0x46, 0x4F, 0x5F, 0x60, 0x6F, 0x7F,
                        0x80, 0x81, 0x84, 0x86, 0x87, 0x88, 0x91, 0xA8, 0xDD, 0xFE, 0xFF], dtype=np.uint8)

MAC = bytes.fromhex("020000000001020000000002")


def _eth(ethertype: int, payload: bytes) -> bytes:
    return MAC + struct.pack("!H", ethertype) + payload


def _ipv4(proto: int, payload: bytes, *, ihl: int = 5, frag: int = 0, total=None, options=b"") -> bytes:
    options = (options + b"\x00" * 40)[:max(0, ihl * 4 - 20)]
    total = 20 + len(options) + len(payload) if total is None else total
    return struct.pack("!BBHHHBBH4s4s", 0x40 | (ihl & 15), 0, total & 0xFFFF, 1, frag, 64, proto, 0,
                       bytes([10, 1, 2, 3]), bytes([192, 168, 7, 9])) + options + payload


def _ipv6(nh: int, payload: bytes, plen=None) -> bytes:
    plen = len(payload) if plen is None else plen
    return (struct.pack("!IHBB", 0x60000000, plen & 0xFFFF, nh, 64) + bytes.fromhex("20010db8" + "00" * 11 + "01")
            + bytes.fromhex("fe80" + "00" * 13 + "02") + payload)


def _variants(eth_packets: list[bytes], rng: np.random.Generator) -> list[bytes]:
    """Hostile structures the traces lack, built once from them and from scratch."""
    out: list[bytes] = []
    ip_pkts = [p for p in eth_packets if p[12:14] in (b"\x08\x00", b"\x86\xdd")] or eth_packets
    for _ in range(400):  # VLAN stacks, 1..6 tags, mixed TPIDs
        p = ip_pkts[rng.integers(len(ip_pkts))]
        tags = b"".join(struct.pack("!HH", int(rng.choice([0x8100, 0x88A8, 0x9100])), int(rng.integers(65536)))
                        for _ in range(int(rng.integers(1, 7))))
        out.append(p[:12] + tags + p[12:])
    ext_types = [0, 43, 60, 44, 51, 135, 139, 140, 253]
    for _ in range(500):  # IPv6 extension chains
        chain, nh = b"", int(rng.choice([6, 17, 58, 132, 59, 200]))
        for _ in range(int(rng.integers(0, 12))):
            t = int(rng.choice(ext_types))
            if t == 44:
                body = struct.pack("!BBH4s", nh, 0, int(rng.integers(65536)), rng.bytes(4))
            else:
                hlen = int(rng.integers(0, 4)) if rng.random() < 0.9 else 255
                body = bytes([nh, hlen]) + rng.bytes(6 + 8 * min(hlen, 3))
            chain, nh = body + chain, t
        l4 = rng.bytes(int(rng.integers(0, 40)))
        plen = None if rng.random() < 0.7 else int(rng.integers(65536))
        out.append(_eth(0x86DD, _ipv6(nh, chain + l4, plen)))
    for _ in range(500):  # ICMP errors quoting garbage (or a quoted packet cut anywhere)
        quoted = ip_pkts[rng.integers(len(ip_pkts))][14:]
        quoted = quoted[:int(rng.integers(0, 80))] if rng.random() < 0.5 else rng.bytes(int(rng.integers(0, 80)))
        if rng.random() < 0.3 and quoted:
            quoted = bytes([int(rng.choice([0x45, 0x4F, 0x60, 0x41, 0x00]))]) + quoted[1:]
        if rng.random() < 0.5:
            icmp = bytes([int(rng.choice([3, 4, 5, 11, 12])), int(rng.integers(16)), 0, 0, 0, 0, 0, 0]) + quoted
            out.append(_eth(0x0800, _ipv4(1, icmp, frag=int(rng.choice([0, 0, 0x2000, 5])))))
        else:
            icmp = bytes([int(rng.choice([1, 2, 3, 4, 128])), int(rng.integers(8)), 0, 0, 0, 0, 0, 0]) + quoted
            out.append(_eth(0x86DD, _ipv6(58, icmp)))
    for _ in range(300):  # IPv4 options, IHL/total-length lies, fragments
        payload = rng.bytes(int(rng.integers(0, 60)))
        out.append(_eth(0x0800, _ipv4(int(rng.choice([6, 17, 1, 47, 50, 132, 255])), payload,
                                      ihl=int(rng.integers(0, 16)), frag=int(rng.choice([0, 0x2000, 1, 0x1FFF, 0x4000])),
                                      total=None if rng.random() < 0.6 else int(rng.integers(65536)),
                                      options=rng.bytes(40))))
    for _ in range(100):  # ARP and other ethertypes with garbage
        out.append(_eth(int(rng.choice([0x0806, 0x8035, 0x88CC, 0x0000, 0xFFFF])), rng.bytes(int(rng.integers(0, 60)))))
    for _ in range(40):  # jumbo frames, IPv6 jumbograms (payload length 0 + hop-by-hop jumbo option)
        payload = rng.bytes(int(rng.integers(1500, 9000)))
        if rng.random() < 0.5:
            out.append(_eth(0x0800, _ipv4(17, struct.pack("!HHHH", 53, 53, (8 + len(payload)) & 0xFFFF, 0) + payload)))
        else:
            hbh = bytes([17, 0, 0xC2, 4]) + struct.pack("!I", 48 + len(payload))
            out.append(_eth(0x86DD, _ipv6(0, hbh + struct.pack("!HHHH", 53, 53, 0, 0) + payload, plen=0)))
    for n in range(0, 24):  # runts
        out.append(rng.bytes(n))
    return out


def _relink(eth: bytes, linktype: int, rng: np.random.Generator) -> bytes:
    """The same packet under another link type (its Ethernet header replaced)."""
    et, payload = eth[12:14], eth[14:]
    if linktype == DLT_EN10MB:
        return eth
    if linktype == DLT_LINUX_SLL:  # packet type, ARPHRD, address length, 8-byte address, protocol
        return struct.pack("!HHH", 0, 1, 6) + eth[6:12] + b"\x00\x00" + eth[12:]
    if linktype == DLT_LINUX_SLL2:  # protocol, reserved, ifindex, ARPHRD, packet type, length, address
        return et + b"\x00\x00" + struct.pack("!IHBB", 2, 1, 0, 6) + eth[6:12] + b"\x00\x00" + payload
    if linktype in (DLT_NULL, DLT_LOOP):
        family = 2 if et == b"\x08\x00" else int(rng.choice([10, 24, 28, 30])) if et == b"\x86\xdd" else 99
        return struct.pack("<I" if linktype == DLT_NULL and rng.random() < 0.7 else ">I", family) + payload
    return payload  # the raw IP link types


@dataclass
class SeedPool:
    buf: np.ndarray
    off: np.ndarray
    caplen: np.ndarray
    wirelen: np.ndarray


def build_pools(rng: np.random.Generator) -> tuple[dict[int, SeedPool], int]:
    """Seed pools per link type, and how many packets the traces gave."""
    eth: list[bytes] = []
    wire: list[int] = []
    for path in sorted(glob.glob(os.path.join(DATA, "*.pcap"))):
        batch, _ = read_pcap(path)
        raw = batch.buf.tobytes()
        for o, c, w in zip(batch.off.tolist(), batch.caplen.tolist(), batch.wirelen.tolist()):
            eth.append(raw[o:o + c])
            wire.append(w)
    n_trace = len(eth)
    extra = _variants(eth, rng)
    eth += extra
    wire += [len(p) for p in extra]
    pools = {}
    for lt in LINKTYPES:
        pkts = [_relink(p, lt, rng) for p in eth]
        wl = np.array([max(w + len(q) - len(p), len(q)) for p, q, w in zip(eth, pkts, wire)], dtype=np.int64)
        pkts = [p[:SEED_CAP] for p in pkts]
        caplen = np.array([len(p) for p in pkts], dtype=np.int64)
        off = np.zeros(len(pkts), dtype=np.int64)
        np.cumsum(caplen[:-1], out=off[1:])
        pools[lt] = SeedPool(np.frombuffer(b"".join(pkts), dtype=np.uint8), off, caplen, wl)
    return pools, n_trace


def mutated_batch(pool: SeedPool, linktype: int, n: int, rng: np.random.Generator, t0: float,
                  *, sane_lengths: bool = False, wild_times: float = 0.0) -> Batch:
    """n mutated packets from the pool, all numpy. sane_lengths keeps caplen <= wirelen (what a
    savefile reader insists on); otherwise wire lengths lie in every direction. wild_times: the
    share of packets stamped anywhere in 0 .. 2**32-1 s (damaged records, clock steps)."""
    idx = rng.integers(0, len(pool.off), n)
    caplen = pool.caplen[idx].copy()
    wirelen = pool.wirelen[idx].copy()
    cut = rng.random(n) < 0.2  # truncations: the caplen cut anywhere, down to nothing
    caplen[cut] = (rng.random(int(cut.sum())) * (caplen[cut] + 1)).astype(np.int64)
    off = np.zeros(n, dtype=np.int64)
    np.cumsum(caplen[:-1], out=off[1:])
    total = int(caplen.sum())
    src = np.repeat(pool.off[idx] - off, caplen) + np.arange(total, dtype=np.int64)
    buf = pool.buf[src]

    have = caplen > 0
    # bit flips anywhere (about one per packet)
    who = rng.integers(0, n, n)
    who = who[have[who]]
    pos = off[who] + (rng.random(len(who)) * caplen[who]).astype(np.int64)
    buf[pos] ^= (np.uint8(1) << rng.integers(0, 8, len(who)).astype(np.uint8))
    # byte replacements in the headers (first 80 bytes), interesting values or random
    who = rng.integers(0, n, 2 * n)
    at = (rng.random(len(who)) ** 2 * 80).astype(np.int64)  # biased to the first bytes
    ok = at < caplen[who]
    who, at = who[ok], at[ok]
    vals = np.where(rng.random(len(who)) < 0.6, INTERESTING[rng.integers(0, len(INTERESTING), len(who))],
                    rng.integers(0, 256, len(who))).astype(np.uint8)
    buf[off[who] + at] = vals
    # wire lengths that lie
    wrong = rng.random(n) < 0.1
    k = int(wrong.sum())
    choices = np.stack([np.zeros(k, np.int64), np.maximum(caplen[wrong] - 1, 0), rng.integers(0, 65536, k),
                        caplen[wrong] + rng.integers(1, 100000, k), np.full(k, 2**32 - 1, np.int64)])
    wirelen[wrong] = choices[rng.integers(0, 5, k), np.arange(k)]
    if sane_lengths:
        wirelen = np.maximum(wirelen, caplen)
    # timestamps: mostly forward, now and then backwards
    step = rng.exponential(20e-6, n)
    step[rng.random(n) < 0.002] *= -5000
    t = np.maximum(t0 + np.cumsum(step), 0.0)
    sec = np.floor(t).astype(np.int64)
    usec = np.minimum(((t - sec) * 1e6).astype(np.int64), 999_999)
    wild = rng.random(n) < wild_times
    k = int(wild.sum())
    sec[wild] = np.stack([np.zeros(k, np.int64), np.full(k, 2**31 - 1), np.full(k, 2**32 - 1),
                          rng.integers(0, 2**32, k)])[rng.integers(0, 4, k), np.arange(k)]
    return Batch(buf, off, caplen, wirelen, sec, usec, linktype)
