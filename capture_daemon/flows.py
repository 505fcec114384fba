"""Flow meter: turns batches of parsed packet headers into expired flow records.

Vectorized per batch (the capture path must not loop per packet in Python):

1. the packets of the experiment that carry an IP header get a flow key made of five
   uint64 columns (source address hi/lo, destination address hi/lo, and one column packing
   IP version, protocol, VLAN id, source and destination port);
2. the batch is grouped by key with one sort (a 44-bit hash of the key in the high bits, the
   packet index in the low bits, so packets of a flow stay in arrival order); every group is
   checked against its first packet's full key, and a hash collision falls back to an exact
   lexsort, so a collision can never merge two flows;
3. inside each group the packets are cut into flow segments where an expiry rule fires
   (idle gap, active timeout, quiet after FIN/RST);
4. per-segment aggregates come from np.add/maximum/bitwise_or.reduceat;
5. the segments are merged into the flow table: a structured numpy array plus a dict from
   packed key bytes to slot, looked up once per *unique flow of the batch* (not per packet).

Direction: unidirectional flows by default (one record per direction, as NetFlow, softflowd and
nfdump count them).  Why: every packet lands in exactly one record with plain IANA counters,
which collectors that ignore RFC 5103 reverse elements (nfcapd 1.7) still sum correctly; and
under packet sampling the two directions of a connection are sampled independently, so pairing
them into one biflow record says less than it seems to.  Biflows (RFC 5103, reverse elements
under PEN 29305) are available with biflow=True: the key is made direction-free and the
initiator is the direction of the first packet seen.

Two implementations with one interface: NumpyFlowMeter (this module's vectorized reference)
and CFlowMeter (capture_daemon/_accel_flows.c: the same algorithm per packet in C, with the
same group order, slot allocator and expiry order, so its records are byte-identical,
order included).  FlowMeter is CFlowMeter when the extension is built (ACCEL), else the
reference; tests/flows/test_meter_accel.py compares the two.

Time is packet time only (microseconds since the epoch, int64), so offline runs give the same
records whatever the wall clock.

Expiry (RFC 5102 flowEndReason):
  1 idle timeout    no packet for more than idle_timeout seconds;
  2 active timeout  the flow has lasted active_timeout seconds: it is exported and the next
                    packet starts a new flow;
  3 end detected    a TCP FIN or RST was seen and then no packet for tcp_end_timeout seconds
                    (the grace keeps the last ACK of a close in the flow it belongs to);
  4 forced end      flush at end of input or SIGTERM (flows that saw FIN/RST say 3);
  5 lack of resources  the table is full (max_flows): least recently active flows first.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import numpy as np

END_IDLE = 1
END_ACTIVE = 2
END_DETECTED = 3
END_FORCED = 4
END_RESOURCES = 5

TCP_FIN = 0x01
TCP_RST = 0x04
PROTO_TCP = 6

# One expired flow record, what the IPFIX encoder consumes.
RECORD_DTYPE = np.dtype([
    ("start_us", "i8"), ("end_us", "i8"),
    ("packets", "u8"), ("octets", "u8"),
    ("rpackets", "u8"), ("roctets", "u8"),     # reverse direction (biflow only, else 0)
    ("k0", "u8"), ("k1", "u8"), ("k2", "u8"), ("k3", "u8"), ("misc", "u8"),
    ("flags", "u1"), ("rflags", "u1"), ("tos", "u1"),
    ("fin", "?"), ("init_rev", "?"), ("reason", "u1"),
])

_HASH_C = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                    0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD], dtype=np.uint64)
_IDX_BITS = 20          # packet index bits under the hash in the sort key
_U64 = np.uint64


class _Columns:
    """Flow records as one contiguous array per field (fancy-indexed updates of a few fields
    touch only those fields' memory, not whole 80-byte records).  col["name"] is a field;
    col[index] gathers RECORD_DTYPE records; col[index] = records scatters them."""

    def __init__(self, n):
        self.c = {f: np.zeros(n, dtype=RECORD_DTYPE[f]) for f in RECORD_DTYPE.names}
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.c[key]
        first = self.c["start_us"][key]
        rec = np.zeros(len(first), dtype=RECORD_DTYPE)
        for f, col in self.c.items():
            rec[f] = col[key]
        return rec

    def __setitem__(self, key, value):
        if isinstance(key, str):
            self.c[key][...] = value
            return
        for f, col in self.c.items():
            col[key] = value[f]

    def grown(self, n):
        out = _Columns(n)
        for f, col in self.c.items():
            out.c[f][:self.n] = col
        return out


def key_fields(rec: np.ndarray) -> dict:
    """Decode the packed key columns of records into export fields (vectorized)."""
    misc = rec["misc"]
    return {
        "ipver": (misc >> _U64(56)).astype(np.uint8),
        "proto": ((misc >> _U64(48)) & _U64(0xFF)).astype(np.uint8),
        "vlan": (((misc >> _U64(32)) & _U64(0xFFFF)).astype(np.int32) - 1),
        "sport": ((misc >> _U64(16)) & _U64(0xFFFF)).astype(np.uint16),
        "dport": (misc & _U64(0xFFFF)).astype(np.uint16),
    }


@dataclass
class MeterStats:
    packets: int = 0          # packets metered (IP packets of the experiment)
    octets: int = 0           # their IP-level bytes (IP total length)
    non_ip: int = 0           # kept packets without an IP header: not metered
    records: int = 0          # records expired so far
    forced_expiries: int = 0  # expired because the table was full (reason 5)
    hash_fallbacks: int = 0   # batches regrouped exactly after a 44-bit hash collision


class _MeterSettings:
    """The settings both meters take, checked and stored alike (times in microseconds)."""

    def __init__(self, *, idle_timeout: float = 300.0, active_timeout: float = 1800.0,
                 tcp_end_timeout: float = 30.0, max_flows: int = 1_000_000,
                 biflow: bool = False, scan_interval: float = 1.0):
        if idle_timeout <= 0 or active_timeout <= 0 or tcp_end_timeout < 0:
            raise ValueError("flow timeouts must be positive")
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.idle_us = int(round(idle_timeout * 1e6))
        self.active_us = int(round(active_timeout * 1e6))
        self.end_us = int(round(min(tcp_end_timeout, idle_timeout) * 1e6))
        self.max_flows = int(max_flows)
        self.biflow = bool(biflow)
        self.scan_us = int(round(scan_interval * 1e6))


def with_packet_addresses(buf, h):
    """headers whose addresses are read back from the packet bytes.

    buf: the batch buffer (h.l3 are offsets into it). The anonymizer rewrites the addresses
    in the batch buffer (what the pcap output writes)
    but not the parsed header arrays; reading them back makes flow records carry exactly the
    addresses an anonymized pcap of the same packets would show.  One gather per batch."""
    if buf is None:                      # header-only batches (tests): nothing to read back
        return h
    out = copy.copy(h)
    i4 = np.flatnonzero(h.ipver == 4)
    if len(i4):
        b = buf[h.l3[i4][:, None] + (12 + np.arange(8))].astype(np.uint32)
        w = (b[:, 0::4] << 24) | (b[:, 1::4] << 16) | (b[:, 2::4] << 8) | b[:, 3::4]
        out.src4 = h.src4.copy()
        out.dst4 = h.dst4.copy()
        out.src4[i4] = w[:, 0]
        out.dst4[i4] = w[:, 1]
    i6 = np.flatnonzero(h.ipver == 6)
    if len(i6):
        b = buf[h.l3[i6][:, None] + (8 + np.arange(32))]
        out.src6 = h.src6.copy()
        out.dst6 = h.dst6.copy()
        out.src6[i6] = b[:, :16]
        out.dst6[i6] = b[:, 16:]
    return out


class NumpyFlowMeter(_MeterSettings):
    """The numpy reference meter (what CFlowMeter must match record for record)."""
    accelerated = False

    def __init__(self, **settings):
        super().__init__(**settings)
        self.stats = MeterStats()
        self._table = _Columns(1024)
        self._used = np.zeros(1024, dtype=bool)
        self._free: list[int] = list(range(1023, -1, -1))
        self._index: dict[bytes, int] = {}
        self._slot_key: list[bytes | None] = [None] * 1024
        self._next_scan = None
        self._now = None                  # latest packet time seen (us)
        self._out: list[np.ndarray] = []

    # ---- public --------------------------------------------------------------------
    @property
    def active_flows(self) -> int:
        return len(self._index)

    def take_records(self) -> np.ndarray:
        """Records expired since the last call (RECORD_DTYPE array)."""
        if not self._out:
            return np.zeros(0, dtype=RECORD_DTYPE)
        out = self._out[0] if len(self._out) == 1 else np.concatenate(self._out)
        self._out = []
        return out

    def add(self, ts_us: np.ndarray, h, sel: np.ndarray, buf=None) -> None:
        """Meter the packets where sel is True. h: parse.Headers-like arrays, ts_us int64.
        buf: the batch buffer; given, addresses are read back from the packet bytes at h.l3
        (with_packet_addresses)."""
        h = with_packet_addresses(buf, h)
        sel = np.asarray(sel, dtype=bool)
        ver = h.ipver
        ip = sel & ((ver == 4) | (ver == 6))
        idx = np.flatnonzero(ip)
        self.stats.non_ip += int(np.count_nonzero(sel)) - len(idx)
        if len(idx) == 0:
            return
        keys, rev = self._keys(h, idx)
        t = np.asarray(ts_us, dtype=np.int64)[idx]
        ln = np.asarray(h.iplen, dtype=np.int64)[idx]
        ln = np.maximum(ln, 0)
        proto = np.asarray(h.proto)[idx]
        fl = np.asarray(h.tcpflags, dtype=np.uint8)[idx]
        fl = np.where(proto == PROTO_TCP, fl, 0).astype(np.uint8)
        tos = np.asarray(h.tos, dtype=np.uint8)[idx]
        self.stats.packets += len(idx)
        tmax = int(t.max())
        if self._now is None or tmax > self._now:
            self._now = tmax
        self.stats.octets += int(ln.sum())
        order, gstart, gkeys = self._group(keys)
        self._merge(gkeys, t[order], ln[order], fl[order], tos[order],
                    rev[order] if rev is not None else None, gstart)
        self._enforce_bound()

    def advance(self, now_us: int) -> None:
        """Packet time moved on: expire idle, ended and too-long flows."""
        now_us = int(now_us)
        if self._now is None or now_us > self._now:
            self._now = now_us
        if self._next_scan is not None and now_us < self._next_scan:
            return
        self._next_scan = now_us + self.scan_us
        if not self._index:
            return
        slots = np.flatnonzero(self._used)
        tb = self._table
        r = self._reasons(tb["fin"][slots], tb["end_us"][slots], tb["start_us"][slots], now_us)
        for reason in (END_DETECTED, END_IDLE, END_ACTIVE):
            m = r == reason
            if m.any():
                self._expire_slots(slots[m], reason)

    def flush(self) -> None:
        """End of input / SIGTERM: every flow out (FIN/RST seen: 3, others: 4 forced end).
        First the flows whose timeout has passed by the latest packet time leave with that
        reason, whatever the scan throttle skipped."""
        if self._now is not None:
            self._next_scan = None
            self.advance(self._now)
        slots = np.flatnonzero(self._used)
        if len(slots) == 0:
            return
        fin = self._table["fin"][slots]
        if fin.any():
            self._expire_slots(slots[fin], END_DETECTED)
        if (~fin).any():
            self._expire_slots(slots[~fin], END_FORCED)

    def flush_part(self, max_records: int) -> bool:
        """CFlowMeter.flush_part's interface: the reference expires every flow at once (its
        records come out whole, in flush()'s order); always done."""
        self.flush()
        return True

    def _reasons(self, fin, last, start, now):
        """Why a flow ends by time `now` (0: it does not).  Of the deadlines passed, the earliest
        one gives the reason, so the answer does not depend on when the check happens to run
        (per batch, per scan, or at the next packet of the flow)."""
        big = np.int64(2**62)
        d_end = np.where(fin, last + (self.end_us + 1), big)
        d_idle = last + (self.idle_us + 1)
        d_act = start + self.active_us
        first = np.minimum(np.minimum(d_end, d_idle), d_act)
        r = np.where(d_act == first, END_ACTIVE, 0)
        r = np.where(d_idle == first, END_IDLE, r)
        r = np.where(d_end == first, END_DETECTED, r)
        return np.where(now >= first, r, 0).astype(np.uint8)

    # ---- keys and grouping ---------------------------------------------------------------
    def _keys(self, h, idx):
        n = len(idx)
        ver = np.asarray(h.ipver)[idx]
        k = np.zeros((n, 5), dtype=np.uint64)
        is6 = ver == 6
        if is6.all():
            i6 = idx
        else:
            i4 = idx if not is6.any() else idx[~is6]
            m4 = ~is6
            k[m4, 1] = np.asarray(h.src4)[i4]
            k[m4, 3] = np.asarray(h.dst4)[i4]
            i6 = idx[is6] if is6.any() else None
        if i6 is not None and len(i6):
            s6 = np.ascontiguousarray(np.asarray(h.src6)[i6]).view(np.uint64)
            d6 = np.ascontiguousarray(np.asarray(h.dst6)[i6]).view(np.uint64)
            k[is6, 0:2] = s6
            k[is6, 2:4] = d6
        vlan = np.asarray(h.vlan, dtype=np.int64)[idx]
        vlan = (np.where(vlan < 0, -1, vlan & 0xFFF) + 1).astype(np.uint64)
        sport = np.asarray(h.sport).astype(np.uint64)[idx]
        dport = np.asarray(h.dport).astype(np.uint64)[idx]
        rev = None
        if self.biflow:
            # direction-free key: the (address, port) end that sorts lower goes first
            a = (k[:, 0], k[:, 1], sport)
            b = (k[:, 2], k[:, 3], dport)
            rev = (a[0] > b[0]) | ((a[0] == b[0]) & ((a[1] > b[1]) |
                                                      ((a[1] == b[1]) & (a[2] > b[2]))))
            if rev.any():
                k[rev, 0], k[rev, 2] = k[rev, 2], k[rev, 0].copy()
                k[rev, 1], k[rev, 3] = k[rev, 3], k[rev, 1].copy()
                sport, dport = np.where(rev, dport, sport), np.where(rev, sport, dport)
        k[:, 4] = ((ver.astype(np.uint64) << _U64(56))
                   | (np.asarray(h.proto).astype(np.uint64)[idx] << _U64(48))
                   | (vlan << _U64(32)) | (sport << _U64(16)) | dport)
        return k, rev

    def _group(self, k):
        """Order packets grouped by key, arrival order inside a group.
        Returns (order, start of each group in that order, each group's key)."""
        n = len(k)
        if n >= (1 << _IDX_BITS):
            return self._exact_group(k)
        h = (k[:, 0] * _HASH_C[0] ^ k[:, 1] * _HASH_C[1] ^ k[:, 2] * _HASH_C[2]
             ^ k[:, 3] * _HASH_C[3] ^ k[:, 4] * _HASH_C[4])
        h ^= h >> _U64(31)
        h *= _HASH_C[4]
        h ^= h >> _U64(29)
        comp = (h & ~_U64((1 << _IDX_BITS) - 1)) | np.arange(n, dtype=np.uint64)
        comp.sort()
        order = (comp & _U64((1 << _IDX_BITS) - 1)).astype(np.int64)
        hs = comp >> _U64(_IDX_BITS)
        brk = np.empty(n, dtype=bool)
        brk[0] = True
        np.not_equal(hs[1:], hs[:-1], out=brk[1:])
        gstart = np.flatnonzero(brk)
        ks = k[order]
        # inside a group every key must equal its predecessor's, or two keys share a hash
        differs = (ks[1:] != ks[:-1]).any(axis=1)
        if (differs & ~brk[1:]).any():
            # two keys share a 44-bit hash in this batch: group exactly instead
            self.stats.hash_fallbacks += 1
            return self._exact_group(k)
        return order, gstart, np.ascontiguousarray(ks[gstart])

    @staticmethod
    def _exact_group(k):
        n = len(k)
        order = np.lexsort((np.arange(n), k[:, 4], k[:, 3], k[:, 2], k[:, 1], k[:, 0]))
        ks = k[order]
        brk = np.empty(n, dtype=bool)
        brk[0] = True
        np.any(ks[1:] != ks[:-1], axis=1, out=brk[1:])
        gstart = np.flatnonzero(brk)
        return order, gstart, np.ascontiguousarray(ks[gstart])

    # ---- merging a batch ---------------------------------------------------------------
    def _merge(self, gkeys, t, ln, fl, tos, rev, gstart):
        n = len(t)
        G = len(gstart)
        kb = gkeys.view("V40").ravel().tolist()
        get = self._index.get
        slots = np.array(list(map(get, kb, itertools.repeat(-1, G))), dtype=np.int64)
        has = slots >= 0
        tb = self._table
        t_first = t[gstart]
        prior_rev = np.zeros(G, dtype=bool)
        if has.any():
            hs = slots[has]
            r = self._reasons(tb["fin"][hs], tb["end_us"][hs], tb["start_us"][hs], t_first[has])
            gone = r > 0
            if gone.any():
                for reason in (END_ACTIVE, END_IDLE, END_DETECTED):
                    m = r == reason
                    if m.any():
                        self._expire_slots(hs[m], reason)
                hidx = np.flatnonzero(has)
                slots[hidx[gone]] = -1
                has = slots >= 0
            prior_rev[has] = tb["init_rev"][slots[has]]

        # --- cut each group into flow segments
        gsize = np.diff(np.append(gstart, n))
        gid = np.repeat(np.arange(G), gsize)
        gap = np.empty(n, dtype=np.int64)
        gap[0] = 0
        np.subtract(t[1:], t[:-1], out=gap[1:])
        gfirst = np.zeros(n, dtype=bool)
        gfirst[gstart] = True
        bounds = gfirst | (gap > self.idle_us)
        isfin = (fl & (TCP_FIN | TCP_RST)) != 0
        safe = np.maximum(slots, 0)
        prior_start = np.where(has, tb["start_us"][safe], 0)
        prior_fin = has & tb["fin"][safe]
        possible_fin = bool(isfin.any() or prior_fin.any())
        if possible_fin:
            # FIN/RST packets strictly before each packet (in the sorted order)
            before = np.zeros(n, dtype=np.int64)
            np.cumsum(isfin[:-1], out=before[1:])
        else:
            before = None
        # Packets where an active-timeout or end-after-FIN split could happen.  Usually none:
        # a batch rarely spans active_timeout, and most batches carry few FIN/RST.
        t_min = int(t.min())
        if has.any():
            t_min = min(t_min, int(prior_start[has].min()))
        cand_mask = t >= t_min + self.active_us
        if possible_fin:
            cand_mask |= gap > self.end_us
        cand_mask &= ~bounds
        cand = np.flatnonzero(cand_mask)

        def seg_state(seg_first):
            """start time and FIN count carried in, for segments starting at seg_first."""
            t0 = t[seg_first].copy()
            fin0 = np.zeros(len(seg_first), dtype=np.int64)
            pr = gfirst[seg_first] & has[gid[seg_first]]
            if pr.any():
                g = gid[seg_first[pr]]
                t0[pr] = prior_start[g]
                fin0[pr] = prior_fin[g]
            return t0, fin0, pr

        while len(cand):
            sstart = np.flatnonzero(bounds)
            seg_first = sstart[np.searchsorted(sstart, cand, side="right") - 1]
            t0, fin0, _ = seg_state(seg_first)
            cond = t[cand] - t0 >= self.active_us
            if possible_fin:
                fin_before = before[cand] - before[seg_first] + fin0
                cond |= (fin_before > 0) & (gap[cand] > self.end_us)
            c = np.flatnonzero(cond)
            if len(c) == 0:
                break
            # only the first split of each segment: later ones depend on where it falls
            cs = seg_first[c]
            keep = np.ones(len(c), dtype=bool)
            keep[1:] = cs[1:] != cs[:-1]
            picked = cand[c[keep]]
            bounds[picked] = True
            cand = cand[~np.isin(cand, picked)]
        sstart = np.flatnonzero(bounds)
        sid = np.cumsum(bounds) - 1
        s_t0, s_fin0, first_seg_of_prior = seg_state(sstart)
        S = len(sstart)
        # reason a segment ended, if another segment of its group follows it
        nxt = np.append(sstart[1:], n)
        last_seg = np.append(gfirst[sstart[1:]], True)
        seg_reason = np.zeros(S, dtype=np.uint8)
        inner = np.flatnonzero(~last_seg)
        if len(inner):
            b = nxt[inner]
            if possible_fin:
                # FIN/RST packets in the segment that ends just before b
                fin_prev = before[b] - before[sstart[inner]] + s_fin0[inner]
            else:
                fin_prev = np.zeros(len(inner), dtype=np.int64)
            r = self._reasons(fin_prev > 0, t[b - 1], s_t0[inner], t[b])
            seg_reason[inner] = np.where(r == 0, END_ACTIVE, r)

        # --- per-segment aggregates
        cnt = np.diff(np.append(sstart, n)).astype(np.uint64)
        seg = _Columns(S)
        seg["start_us"] = np.minimum.reduceat(t, sstart)
        seg["end_us"] = np.maximum.reduceat(t, sstart)
        sg = gid[sstart]
        seg["k0"], seg["k1"], seg["k2"], seg["k3"], seg["misc"] = gkeys[sg].T
        seg["tos"] = tos[sstart]
        if rev is None:
            seg["packets"] = cnt
            seg["octets"] = np.add.reduceat(ln, sstart)
            seg["flags"] = np.bitwise_or.reduceat(fl, sstart)
        else:
            init = rev[sstart].copy()
            init[first_seg_of_prior] = prior_rev[gid[sstart[first_seg_of_prior]]]
            fwd = rev == init[sid]
            seg["init_rev"] = init
            pf = np.add.reduceat(fwd.astype(np.int64), sstart).astype(np.uint64)
            seg["packets"] = pf
            seg["rpackets"] = cnt - pf
            seg["octets"] = np.add.reduceat(np.where(fwd, ln, 0), sstart)
            seg["roctets"] = np.add.reduceat(np.where(fwd, 0, ln), sstart)
            seg["flags"] = np.bitwise_or.reduceat(np.where(fwd, fl, 0).astype(np.uint8), sstart)
            seg["rflags"] = np.bitwise_or.reduceat(np.where(fwd, 0, fl).astype(np.uint8), sstart)
            # the reverse direction's ToS is not kept; the initiator's first packet gives it
            fi = np.flatnonzero(fwd)
            if len(fi):
                pos = np.searchsorted(fi, sstart)
                okp = pos < len(fi)
                okp[okp] &= sid[fi[pos[okp]]] == np.arange(S)[okp]
                seg["tos"][okp] = tos[fi[pos[okp]]]
        # flags are zero for non-TCP packets, so FIN/RST seen is in the OR of the flags
        seg["fin"] = ((seg["flags"] | seg["rflags"]) & (TCP_FIN | TCP_RST)) != 0

        # --- merge the first segment of groups that continue a flow in the table
        if first_seg_of_prior.any():
            fs = np.flatnonzero(first_seg_of_prior)
            sl = slots[sg[fs]]
            src = {f: seg[f][fs] for f in ("end_us", "start_us", "packets", "octets", "flags",
                                            "fin", "rpackets", "roctets", "rflags")}
            tb["end_us"][sl] = np.maximum(tb["end_us"][sl], src["end_us"])
            tb["start_us"][sl] = np.minimum(tb["start_us"][sl], src["start_us"])
            for f in (("packets", "octets", "rpackets", "roctets") if rev is not None
                      else ("packets", "octets")):
                tb[f][sl] += src[f]
            tb["flags"][sl] |= src["flags"]
            if rev is not None:
                tb["rflags"][sl] |= src["rflags"]
            tb["fin"][sl] |= src["fin"]
            # a continued segment that ends inside the batch: the table flow ends now
            done = ~last_seg[fs]
            if done.any():
                for reason in (END_ACTIVE, END_IDLE, END_DETECTED):
                    m = done & (seg_reason[fs] == reason)
                    if m.any():
                        self._expire_slots(sl[m], reason)
        else:
            fs = np.zeros(0, dtype=np.int64)
        # --- segments closed inside the batch that are not in the table
        fresh = ~first_seg_of_prior
        out = fresh & ~last_seg
        if out.any():
            rec = seg[out]
            rec["reason"] = seg_reason[out]
            self._emit(rec)
        # --- open segments that start new flows
        new = np.flatnonzero(fresh & last_seg)
        if len(new):
            self._insert(seg[new], [kb[g] for g in sg[new].tolist()])

    # ---- table management ----------------------------------------------------------------
    def _insert(self, rec, keys):
        m = len(rec)
        if len(self._free) < m:
            self._grow(m - len(self._free))
        free = self._free
        slots = free[len(free) - m:]
        del free[len(free) - m:]
        sl = np.array(slots, dtype=np.int64)
        self._table[sl] = rec
        self._used[sl] = True
        idx = self._index
        sk = self._slot_key
        for s, k in zip(slots, keys):
            idx[k] = s
            sk[s] = k

    def _grow(self, need):
        old = len(self._table)
        new = max(old * 2, old + need)
        self._table = self._table.grown(new)
        used = np.zeros(new, dtype=bool)
        used[:old] = self._used
        self._used = used
        self._slot_key.extend([None] * (new - old))
        # keep low slots at the top of the free stack
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def _expire_slots(self, slots, reason):
        slots = np.asarray(slots, dtype=np.int64)
        rec = self._table[slots]
        rec["reason"] = reason
        self._emit(rec)
        self._used[slots] = False
        idx = self._index
        sk = self._slot_key
        sl = slots.tolist()
        for s in sl:
            del idx[sk[s]]
            sk[s] = None
        self._free.extend(sl)

    def _emit(self, rec):
        self.stats.records += len(rec)
        self._out.append(rec)

    def _enforce_bound(self):
        over = len(self._index) - self.max_flows
        if over <= 0:
            return
        used = np.flatnonzero(self._used)
        last = self._table["end_us"][used]
        # least recently active first; ties broken by slot for a deterministic result
        pick = np.lexsort((used, last))[:over]
        self.stats.forced_expiries += over
        self._expire_slots(used[pick], END_RESOURCES)


# ---- the C meter ---------------------------------------------------------------------------
try:
    from capture_daemon import _accel_flows
except ImportError:          # not built (python setup.py build_ext --inplace): numpy only
    _accel_flows = None

# The C module writes records in RECORD_DTYPE's packed layout: check it is the one it knows.
_LAYOUT = [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 89, 90, 91, 92, 93]
ACCEL = (_accel_flows is not None and RECORD_DTYPE.itemsize == 94
         and [RECORD_DTYPE.fields[f][1] for f in RECORD_DTYPE.names] == _LAYOUT)

# parse.Headers' dtypes: the C meter reads these arrays as raw buffers
_HDR_DTYPES = (("ipver", np.uint8), ("src4", np.uint32), ("dst4", np.uint32),
               ("src6", np.uint8), ("dst6", np.uint8), ("vlan", np.int32),
               ("sport", np.uint16), ("dport", np.uint16), ("proto", np.uint8),
               ("tcpflags", np.uint8), ("tos", np.uint8), ("iplen", np.int64))


class CFlowMeter(_MeterSettings):
    """FlowMeter with the per-packet work (keys, grouping, segments, merge, expiry) in C
    (capture_daemon/_accel_flows.c).  Same records, fields, end reasons and order as
    NumpyFlowMeter: it reproduces the reference's group order (the same 44-bit hash of
    _HASH_C), its slot allocator and free stack, and its expiry order.  Header arrays must
    have parse.Headers' dtypes or values that fit them (converted; else TypeError, where
    the reference would have read the out-of-range values as they are)."""
    accelerated = True

    def __init__(self, **settings):
        super().__init__(**settings)
        self._m = _accel_flows.Meter(self.idle_us, self.active_us, self.end_us, self.scan_us,
                                     self.max_flows, self.biflow,
                                     [int(x) for x in _HASH_C])
        self._octets = 0

    @property
    def stats(self) -> MeterStats:
        st = MeterStats(*self._m.stats())
        st.octets = self._octets
        return st

    @property
    def active_flows(self) -> int:
        return self._m.active()

    def take_records(self) -> np.ndarray:
        return np.frombuffer(self._m.take(), dtype=RECORD_DTYPE)

    @staticmethod
    def _arr(h, name, dt):
        a = np.asarray(getattr(h, name))
        if a.dtype != dt:
            if not np.can_cast(a.dtype, dt, casting="safe") and not (
                    a.size == 0 or (np.issubdtype(a.dtype, np.integer)
                                    and np.iinfo(dt).min <= a.min() and a.max() <= np.iinfo(dt).max)):
                raise TypeError(f"headers.{name}: {a.dtype} values do not fit {np.dtype(dt)}")
            a = a.astype(dt)
        return np.ascontiguousarray(a)

    def add(self, ts_us: np.ndarray, h, sel: np.ndarray, buf=None) -> None:
        """As NumpyFlowMeter.add.  buf: read the addresses back from the packet bytes."""
        ts = np.ascontiguousarray(ts_us, dtype=np.int64)
        n = len(ts)
        a = [self._arr(h, name, dt) for name, dt in _HDR_DTYPES]
        sel = np.ascontiguousarray(np.broadcast_to(np.asarray(sel, dtype=bool), (n,)))
        for x in a:
            if len(x) != n:
                raise ValueError("header arrays and timestamps differ in length")
        if buf is not None:
            buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
            l3 = self._arr(h, "l3", np.int64)
        else:
            l3 = None
        self._octets += self._m.add(ts, *a, sel, buf, l3)

    def advance(self, now_us: int) -> None:
        self._m.advance(int(now_us))

    def flush(self) -> None:
        self._m.flush()

    def flush_part(self, max_records: int) -> bool:
        """flush() in parts: expires at most about max_records flows (take_records() them
        between calls); True once the table is empty.  Same records, same order as flush()."""
        return self._m.flush_part(int(max_records))


FlowMeter = CFlowMeter if ACCEL else NumpyFlowMeter
