"""A deterministic synthetic pcap for flow tests and the flow benchmark (vectorized, no loop
per packet): Ethernet, ~15 % IPv6, 10 % of flows VLAN-tagged, TCP/UDP/ICMP, heavy-tailed flow
sizes, snaplen 128 (headers only; wire lengths say the full size).

    python -m tests.flows.gen_trace OUT.pcap PACKETS FLOWS [SEED]
"""
from __future__ import annotations

import struct
import sys

import numpy as np


def _be16(a):
    a = np.asarray(a, dtype=np.uint32)
    return np.stack([(a >> 8) & 0xFF, a & 0xFF], axis=1).astype(np.uint8)


def _be32(a):
    a = np.asarray(a, dtype=np.uint64)
    return np.stack([(a >> s) & 0xFF for s in (24, 16, 8, 0)], axis=1).astype(np.uint8)


def generate(path, n_packets, n_flows, seed=1, t0=1_700_000_000, rate=100_000.0,
             snaplen=128, fin_share=0.3):
    rng = np.random.default_rng(seed)
    # flows: heavy-tailed sizes (Pareto), every flow has at least one packet
    fid = np.minimum((rng.pareto(1.1, n_packets) * n_flows / 8).astype(np.int64), n_flows - 1)
    fid[:n_flows] = np.arange(min(n_flows, n_packets))
    rng.shuffle(fid)
    v6 = rng.random(n_flows) < 0.15
    vlan = np.where(rng.random(n_flows) < 0.10, rng.integers(1, 4095, n_flows), -1)
    proto = rng.choice(np.array([6, 17, 1]), n_flows, p=[0.75, 0.22, 0.03])
    sport = rng.integers(1024, 65536, n_flows)
    dport = rng.choice(np.array([80, 443, 53, 22, 8080, 123]), n_flows)
    src4 = rng.integers(0x0A000000, 0x0AFFFFFF, n_flows)
    dst4 = rng.integers(0xC0000000, 0xDF000000, n_flows)
    src6 = rng.integers(0, 256, (n_flows, 16)).astype(np.uint8)
    dst6 = rng.integers(0, 256, (n_flows, 16)).astype(np.uint8)
    src6[:, :2] = (0x20, 0x01)
    dst6[:, :2] = (0x20, 0x01)

    ts = t0 * 1_000_000 + np.cumsum(rng.exponential(1e6 / rate, n_packets)).astype(np.int64)
    pv6, pvlan, pproto = v6[fid], vlan[fid] >= 0, proto[fid]
    iplen = rng.integers(40, 1500, n_packets)
    iplen = np.where(pv6, np.maximum(iplen, 60), iplen)
    # the last packet of some TCP flows carries FIN
    last = np.zeros(n_packets, dtype=bool)
    _, last_idx = np.unique(fid[::-1], return_index=True)
    last[n_packets - 1 - last_idx] = True
    flags = np.where(pproto == 6, np.where(last & (rng.random(n_packets) < fin_share), 0x11, 0x18), 0)

    eth_len = 14 + 4 * pvlan
    ip_hl = np.where(pv6, 40, 20)
    l4_len = np.where(pproto == 6, 20, 8)
    caplen = np.minimum(eth_len + ip_hl + l4_len, snaplen)
    wirelen = eth_len + iplen
    rec = 16 + caplen
    off = np.zeros(n_packets, dtype=np.int64)
    np.cumsum(rec[:-1], out=off[1:])
    out = np.zeros(int(rec.sum()), dtype=np.uint8)

    def put(pos, cols):
        """write the (n, w) byte columns at per-packet positions pos."""
        w = cols.shape[1]
        out[pos[:, None] + np.arange(w)] = cols

    allp = np.arange(n_packets)
    hdr = np.stack([ts // 1_000_000, ts % 1_000_000, caplen, wirelen], axis=1).astype("<u4")
    put(off, hdr.view(np.uint8).reshape(n_packets, 16))
    d = off + 16
    put(d, np.tile(np.array([2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2], np.uint8), (n_packets, 1)))
    vl = allp[pvlan]
    put(d[vl] + 12, np.concatenate([_be16(np.full(len(vl), 0x8100)), _be16(vlan[fid[vl]])], axis=1))
    et = d + eth_len - 2
    put(et, _be16(np.where(pv6, 0x86DD, 0x0800)))
    ip = d + eth_len
    i4 = allp[~pv6]
    f4 = fid[i4]
    put(ip[i4], np.concatenate([
        np.full((len(i4), 1), 0x45, np.uint8), np.zeros((len(i4), 1), np.uint8), _be16(iplen[i4]),
        np.zeros((len(i4), 4), np.uint8), np.full((len(i4), 1), 64, np.uint8),
        pproto[i4].astype(np.uint8)[:, None], np.zeros((len(i4), 2), np.uint8),
        _be32(src4[f4]), _be32(dst4[f4])], axis=1))
    i6 = allp[pv6]
    f6 = fid[i6]
    nh = np.where(pproto[i6] == 1, 58, pproto[i6]).astype(np.uint8)
    put(ip[i6], np.concatenate([
        np.tile(np.array([0x60, 0, 0, 0], np.uint8), (len(i6), 1)), _be16(iplen[i6] - 40),
        nh[:, None], np.full((len(i6), 1), 64, np.uint8), src6[f6], dst6[f6]], axis=1))
    l4 = ip + ip_hl
    ports = allp[pproto != 1]
    put(l4[ports], np.concatenate([_be16(sport[fid[ports]]), _be16(dport[fid[ports]])], axis=1))
    udp = allp[pproto == 17]
    put(l4[udp] + 4, _be16(iplen[udp] - ip_hl[udp]))
    icmp = allp[pproto == 1]
    put(l4[icmp], np.tile(np.array([8, 0], np.uint8), (len(icmp), 1)))
    tcp = allp[pproto == 6]
    put(l4[tcp] + 12, np.stack([np.full(len(tcp), 0x50), flags[tcp]], axis=1).astype(np.uint8))
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
        f.write(out.tobytes())
    return {"packets": n_packets, "octets": int(iplen.sum())}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(generate(a[0], int(a[1]), int(a[2]), int(a[3]) if len(a) > 3 else 1))
