"""Synthetic packet batches for the flow meter tests (no pcap, no parse.py needed).

Builds the arrays parse.parse() returns (docs/ARCHITECTURE.md "Packet batches") for packets
described one per row, so expiry rules can be tested on exact timelines.
"""
from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import numpy as np


def headers(pkts):
    """pkts: list of dicts with t (s, float), src, dst (address strings), proto, sport, dport,
    flags, tos, iplen, vlan (-1 none).  Returns (batch-like, headers-like)."""
    n = len(pkts)
    h = SimpleNamespace(
        l3=np.full(n, 14, np.int64), ipver=np.zeros(n, np.uint8), vlan=np.full(n, -1, np.int32),
        proto=np.zeros(n, np.uint8), l4=np.full(n, 34, np.int64), frag_later=np.zeros(n, bool),
        sport=np.zeros(n, np.uint16), dport=np.zeros(n, np.uint16), tcpflags=np.zeros(n, np.uint8),
        tos=np.zeros(n, np.uint8), iplen=np.zeros(n, np.int64), src4=np.zeros(n, np.uint32),
        dst4=np.zeros(n, np.uint32), src6=np.zeros((n, 16), np.uint8),
        dst6=np.zeros((n, 16), np.uint8), malformed=np.zeros(n, bool))
    ts = np.zeros(n, np.int64)
    for i, p in enumerate(pkts):
        ts[i] = int(round(p["t"] * 1e6))
        if p.get("src") is None:          # a non-IP packet (ARP...)
            h.l3[i] = -1
            continue
        s, d = ipaddress.ip_address(p["src"]), ipaddress.ip_address(p["dst"])
        h.ipver[i] = s.version
        if s.version == 4:
            h.src4[i], h.dst4[i] = int(s), int(d)
        else:
            h.src6[i] = np.frombuffer(s.packed, np.uint8)
            h.dst6[i] = np.frombuffer(d.packed, np.uint8)
        h.proto[i] = p.get("proto", 6)
        h.sport[i], h.dport[i] = p.get("sport", 1234), p.get("dport", 80)
        h.tcpflags[i] = p.get("flags", 0x10 if h.proto[i] == 6 else 0)
        h.tos[i] = p.get("tos", 0)
        h.iplen[i] = p.get("iplen", 100)
        h.vlan[i] = p.get("vlan", -1)
    batch = SimpleNamespace(ts_sec=ts // 1_000_000, ts_usec=ts % 1_000_000, linktype=1)
    return batch, h


def random_headers(n, n_flows, seed, t0=1_700_000_000.0, span=60.0, v6_share=0.15):
    """n packets over n_flows random keys (heavy-tailed), time-ordered over span seconds."""
    rng = np.random.default_rng(seed)
    fid = np.minimum((rng.pareto(1.2, n) * n_flows / 20).astype(np.int64), n_flows - 1)
    fr = np.random.default_rng(seed + 1)
    f_v6 = fr.random(n_flows) < v6_share
    f_src4 = fr.integers(0, 2**32, n_flows, dtype=np.uint64).astype(np.uint32)
    f_dst4 = fr.integers(0, 2**32, n_flows, dtype=np.uint64).astype(np.uint32)
    f_src6 = fr.integers(0, 256, (n_flows, 16), dtype=np.uint8)
    f_dst6 = fr.integers(0, 256, (n_flows, 16), dtype=np.uint8)
    f_proto = fr.choice(np.array([6, 17, 1], np.uint8), n_flows, p=[0.7, 0.25, 0.05])
    f_sport = fr.integers(1, 65536, n_flows).astype(np.uint16)
    f_dport = fr.integers(1, 65536, n_flows).astype(np.uint16)
    f_vlan = np.where(fr.random(n_flows) < 0.1, fr.integers(0, 4095, n_flows), -1).astype(np.int32)
    h = SimpleNamespace(
        l3=np.full(n, 14, np.int64), ipver=np.where(f_v6[fid], 6, 4).astype(np.uint8),
        vlan=f_vlan[fid], proto=f_proto[fid], l4=np.full(n, 34, np.int64),
        frag_later=np.zeros(n, bool), sport=f_sport[fid], dport=f_dport[fid],
        tcpflags=np.where(f_proto[fid] == 6, 0x18, 0).astype(np.uint8),
        tos=rng.integers(0, 4, n).astype(np.uint8), iplen=rng.integers(40, 1500, n),
        src4=f_src4[fid], dst4=f_dst4[fid], src6=f_src6[fid], dst6=f_dst6[fid],
        malformed=np.zeros(n, bool))
    ts = np.sort(rng.integers(0, int(span * 1e6), n)) + int(t0 * 1e6)
    batch = SimpleNamespace(ts_sec=ts // 1_000_000, ts_usec=ts % 1_000_000, linktype=1)
    return batch, h, fid
