"""Crypto-PAn anonymization of a batch of packets, in place, with checksums kept consistent.

What is rewritten (in the packets selected by ``sel``):
- IPv4 / IPv6 source and destination (under any VLAN/QinQ tags, SLL, raw IP: parse finds l3);
- addresses in IPv4 options (record route, loose/strict source route, timestamp with
  addresses);
- ARP sender/target protocol addresses (protocol type IPv4, 4-byte addresses);
- the IP header quoted in ICMP errors (types 3, 4, 5, 11, 12) and ICMPv6 errors (types 1-4),
  with the quoted header checksum and the quoted TCP/UDP checksum where captured;
- the target (and redirect destination) address of ICMPv6 neighbour discovery (types 135-137).

Addresses that are only partly captured (snaplen cut through them) are still rewritten,
byte for byte as far as captured: Crypto-PAn output bit i depends only on input bits 0..i, so the
captured prefix of the anonymized address is exact and consistent with whole addresses.

Checksums (the choice made here, and why):
- Packets captured whole (the checksum's whole coverage is in the capture): every checksum we
  know (IPv4 header, TCP, UDP, ICMP, ICMPv6) is recomputed from the rewritten bytes, so output
  checksums are correct. Where the input checksum was already wrong the incremental result would
  keep the error, and an error is often a function of the ORIGINAL addresses (NIC checksum
  offload stores the pseudo-header sum only): keeping it would leak a 16-bit sum of the original
  addresses. So it is made right and counted in ``checksums_corrected``.
- Truncated packets (checksum field captured, coverage not): RFC 1624 incremental update over
  the changed words (a right checksum stays right). A TCP/UDP checksum holding exactly the
  pseudo-header sum of the original addresses (offload signature) is replaced by the same
  signature for the new addresses (``offload_checksums``), so it leaks nothing either.
- UDP checksum 0 ("none") stays 0; a computed UDP checksum of 0 is written as 0xFFFF.
- Non-first fragments: only the IP header (no L4 header there). First fragments: incremental
  (the L4 checksum covers the whole datagram, which this packet does not hold).

Malformed or truncated input never raises: bytes we cannot place are left as they are.
``not_anonymized`` counts selected packets that carry address fields left as they were: an
IPv6 routing header (its address list is not rewritten), an IP header whose version contradicts
the link layer's type, ARP for IPv4 with an address length other than 4. A header cut before its
addresses has nothing to leak and is not counted.

Not rewritten (payload, not headers): IPv6 routing-header and home-address option contents,
tunnelled inner headers (IP-in-IP, GRE, 6in4), addresses in application payloads (DNS, DHCP,
...). With a source-route option in flight, the TCP/UDP pseudo-header holds the route's final
address, not the header's destination; such checksums follow the header's destination here.

Two implementations, same bytes and counters: the numpy code below (the reference, vectorized
over the batch) and the C accelerator capture_daemon/_accel_anon.c (per packet, in the same
order), used when it is built (``Anonymizer(..., accelerated=None)``; ``ACCELERATED`` says
whether it is). The C code walks the batch once: for every address the numpy code would
rewrite it takes the image from CryptoPAn's cache (the same tables), computes it in C (OpenSSL's
AES) on a miss, writes it and fixes the checksums. tests/anon/test_anonymize_accel.py compares
both on every trace, snaplen and link type, on mutated packets and on every truncation, the C
side with a cache of its own; tests/anon/test_cryptopan.py compares the two Crypto-PAns.
"""
from __future__ import annotations

import numpy as np

from . import checksum as ck
from .cryptopan import CryptoPAn
from .parse import c_columns

try:  # the C accelerator (capture_daemon/_accel_anon.c), built by setup.py build_ext
    from . import _accel_anon
except ImportError:  # pragma: no cover - not built: the numpy reference below does the work
    _accel_anon = None

#: True when the C accelerator is importable (Anonymizer uses it unless told otherwise).
ACCELERATED = _accel_anon is not None

ETH_IPV4, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6 = 1, 6, 17, 58
ICMP4_ERRORS = (3, 4, 5, 11, 12)
ICMP6_ERRORS = (1, 2, 3, 4)
ND_ONE_ADDRESS = (135, 136)   # neighbour solicitation / advertisement: target at +8
ND_REDIRECT = 137             # target at +8, destination at +24
IPV6_EXT_HEADERS = (0, 43, 60, 44, 51, 135)
IPV6_ROUTING = 43
MAX_IPV6_EXT_HEADERS = 8

# L4 checksum offset and minimum header length, per protocol.
_CS_OFF = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}
_MIN_HDR = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_ICMP: 4, PROTO_ICMPV6: 4}


def _lut(mapping, default=0):
    t = np.full(256, default, dtype=np.int64)
    for k, v in mapping.items():
        t[k] = v
    return t


_CS_OFF_LUT = _lut(_CS_OFF, -1)
_MIN_HDR_LUT = _lut(_MIN_HDR, 0)


def _be_bytes_u32(v: np.ndarray) -> np.ndarray:
    """(n, k) uint32 → (n, 4k) uint8, network byte order."""
    v = np.ascontiguousarray(v, dtype=np.uint32)
    return v.astype(">u4").view(np.uint8).reshape(len(v), -1)


class _WholeChecks:
    """L4 checksums of packets captured whole, collected over the batch and recomputed at the
    end, after every byte of the packets has been rewritten."""

    def __init__(self):
        self.parts = []

    def add(self, l4, stop, cs_pos, pseudo, udp):
        if len(l4):
            self.parts.append((l4, stop, cs_pos, pseudo, udp))

    def arrays(self):
        if not self.parts:
            return None
        return [np.concatenate(x) for x in zip(*self.parts)]


class Anonymizer:
    """Rewrites the selected packets of a batch in place (see module doc)."""

    def __init__(self, cp: CryptoPAn, recompute_whole: bool = True, accelerated: bool | None = None):
        self.cp = cp
        self.recompute_whole = recompute_whole
        # accelerated: None = the C accelerator when it is built, else the numpy reference;
        # True = the C accelerator (ImportError if not built); False = the numpy reference.
        if accelerated is None:
            accelerated = _accel_anon is not None
        elif accelerated and _accel_anon is None:
            raise ImportError("capture_daemon._accel_anon is not built (python setup.py build_ext --inplace)")
        self.accelerated = bool(accelerated)
        self.packets_anonymized = 0
        self.not_anonymized = 0
        self.checksums_corrected = 0
        self.offload_checksums = 0
        self.addresses_truncated = 0

    def describe(self) -> dict:
        """The metadata record's anonymization object (a fingerprint, never the key)."""
        return {"scheme": "cryptopan", "key_fingerprint": self.cp.fingerprint}

    def counters(self) -> dict:
        return {
            "packets_anonymized": self.packets_anonymized,
            "not_anonymized": self.not_anonymized,
            "checksums_corrected": self.checksums_corrected,
            "offload_checksums": self.offload_checksums,
            "addresses_truncated": self.addresses_truncated,
        }

    # ------------------------------------------------------------------------------------
    def apply(self, batch, headers, sel) -> None:
        sel = np.asarray(sel, dtype=bool)
        if len(sel) == 0 or not sel.any():
            return
        if not batch.buf.flags.writeable:
            batch.make_writable()
        if self.accelerated:
            self._apply_c(batch, headers, sel)
            return
        buf = batch.buf
        end = (batch.off + batch.caplen).astype(np.int64)
        h = headers
        touched = np.zeros(len(sel), dtype=bool)
        whole = _WholeChecks()

        i4 = np.flatnonzero(sel & (h.ipver == 4))
        i6 = np.flatnonzero(sel & (h.ipver == 6))
        if len(i4):
            self._ipv4(buf, h, i4, end[i4], whole)
            touched[i4] = True
        if len(i6):
            self._ipv6(buf, h, i6, end[i6], whole)
            touched[i6] = True
        self._cut_or_bogus_ip(buf, h, sel, end, touched)
        self._arp(buf, h, sel, end, touched)
        if len(i4):
            self._icmp4_errors(buf, h, i4, end[i4])
        if len(i6):
            self._icmp6_payload(buf, h, i6, end[i6])
        if self.recompute_whole:
            self._recompute_whole(buf, whole)
        self.packets_anonymized += int(touched.sum())

    def apply_parsing(self, batch) -> int | None:
        """Parse and anonymize every packet of the batch in one C pass, without the Headers
        arrays (_accel_anon.c rewrite_records, reading each packet with _parse_packet.h, the C
        parser's own per-packet code): the same bytes and counters as parse() then apply(), for
        a pipeline whose output never reads the headers (pcap, counts). Returns the number of
        malformed packets parse() would have found; None, having written nothing, where this
        pass does not apply (the accelerator not built, a batch the C parser does not take):
        the caller then parses and applies as usual.

        Why: the Headers arrays of a batch (17 per packet, ~80 bytes) were written by the parse
        and read back by the rewrite; one pass reads each packet's header bytes once, while
        they are in the CPU's cache (docs/PERFORMANCE.md)."""
        if not self.accelerated or len(batch) == 0:
            return None
        cols = c_columns(batch)
        if cols is None:
            return None
        buf, off, caplen, wirelen, linktype = cols
        if buf is not batch.buf or not buf.flags.writeable:
            return None  # the rewrite must land in the batch's own buffer
        res = _accel_anon.rewrite_records(self.cp.core, *self.cp.cache_tables(), buf, off, caplen, wirelen,
                                          linktype, self.recompute_whole)
        if res is None:
            return None
        touched, not_anon, corrected, offload, truncated, _, _, malformed = res
        self._count(touched, not_anon, corrected, offload, truncated)
        return malformed

    def _count(self, touched, not_anon, corrected, offload, truncated) -> None:
        self.packets_anonymized += touched
        self.not_anonymized += not_anon
        self.checksums_corrected += corrected
        self.offload_checksums += offload
        self.addresses_truncated += truncated

    # --- the C accelerator: same bytes and counters, packet by packet -----------------------
    def _apply_c(self, batch, h, sel) -> None:
        """One C pass over the selected packets (capture_daemon/_accel_anon.c rewrite): it
        finds every address the numpy code would anonymize, in the same order, takes its image
        from the Crypto-PAn cache (computing and caching it on a miss), writes it and fixes
        checksums exactly as the numpy code does."""
        c = np.ascontiguousarray
        i64 = np.int64
        if len(h.src6) != len(sel) or len(h.l3) != len(sel) or len(batch.off) != len(sel):
            raise ValueError("batch, headers and sel differ in length")
        touched, not_anon, corrected, offload, truncated, _, _ = _accel_anon.rewrite(
            self.cp.core, *self.cp.cache_tables(),
            batch.buf, c(batch.off, i64), c(batch.caplen, i64), c(sel).view(np.uint8),
            c(h.l3, i64), c(h.ipver, np.uint8), c(h.ethertype, np.uint16), c(h.proto, np.uint8),
            c(h.l4, i64), c(h.iplen, i64), c(h.src4, np.uint32), c(h.dst4, np.uint32),
            c(h.src6, np.uint8), c(h.dst6, np.uint8), self.recompute_whole)
        self._count(touched, not_anon, corrected, offload, truncated)

    # --- IPv4: the common path, vectorized over the batch -------------------------------
    def _ipv4(self, buf, h, idx, e, whole):
        l3 = h.l3[idx]
        old = np.stack([h.src4[idx], h.dst4[idx]], axis=1)
        new = self.cp.anonymize_v4(old)
        buf[l3[:, None] + 12 + np.arange(8)] = _be_bytes_u32(new)
        old_sum, new_sum = ck.word_sum_u32(old), ck.word_sum_u32(new)

        # Options that carry addresses (rare: only headers longer than 20 bytes are looked at).
        ihl = (buf[l3] & 0x0F).astype(np.int64) * 4
        hdr_old, hdr_new = old_sum.copy(), new_sum.copy()
        o = np.flatnonzero(ihl > 20)
        if len(o):
            lo, eo = l3[o], np.minimum(e[o], l3[o] + ihl[o])
            before, _ = ck.gather(buf, lo + 20, eo, 40)
            self._ipv4_options(buf, lo, eo)
            after, _ = ck.gather(buf, lo + 20, eo, 40)
            hdr_old[o] += ck.word_sum(before)
            hdr_new[o] += ck.word_sum(after)

        # Header checksum: recomputed where the whole header (options included) was captured,
        # incremental where options were cut off.
        cs_pos = l3 + 10
        cs = ck.get16(buf, cs_pos)
        inc = ck.incremental(cs, hdr_old, hdr_new, 24)
        hdr_whole = l3 + ihl <= e
        if self.recompute_whole and hdr_whole.any():
            # The fixed 20 bytes are always captured here (parse: ipver 4); options are rare.
            hsum = ck.words_sum_at(buf, l3, 10)
            opt = np.flatnonzero(hdr_whole & (ihl > 20))
            if len(opt):
                ob, _ = ck.gather(buf, l3[opt] + 20, l3[opt] + ihl[opt], 40)
                hsum[opt] += ck.word_sum(ob)
            full = ck.finish(hsum - cs)
            self.checksums_corrected += int((hdr_whole & (full != inc)).sum())
            inc = np.where(hdr_whole, full, inc)
        ck.put16(buf, cs_pos, inc)

        # L4 (TCP/UDP/ICMP) where its header starts in the capture and it is a first fragment.
        proto = h.proto[idx].astype(np.int64)
        l4 = h.l4[idx]
        has_l4 = l4 >= 0
        more_frags = (buf[l3 + 6] & 0x20) != 0
        l4len = h.iplen[idx] - ihl
        self._l4(buf, l3, l4, e, proto, has_l4, more_frags, l4len, old_sum, new_sum, 4,
                 h.iplen[idx], whole)

    def _ipv4_options(self, buf, l3, e):
        """Rewrite the addresses in IPv4 options (record route 7, loose/strict source route
        131/137, timestamp 68 with flag 1 or 3) of headers at l3, captured up to e (already
        limited to the header). Walks the option list one option per step for all headers."""
        pos = l3 + 20
        live = pos < e
        apos, aend = [], []
        last = len(buf) - 1
        for _ in range(40):
            if not live.any():
                break
            t = np.where(live, buf[np.minimum(pos, last)], 0).astype(np.int64)
            live &= t != 0                       # end of option list
            single = live & (t == 1)             # no-operation: one byte
            multi = live & ~single
            ln = np.where(multi & (pos + 1 < e), buf[np.minimum(pos + 1, last)], 0).astype(np.int64)
            bad = multi & (ln < 2)               # cut or broken length: stop walking
            live &= ~bad
            multi &= ~bad
            route = multi & np.isin(t, (7, 131, 137))
            stamp = multi & (t == 68) & (pos + 3 < e)
            if stamp.any():
                flag = buf[np.minimum(pos + 3, last)] & 0x0F
                stamp &= (flag == 1) | (flag == 3)
            for sel, first, step in ((route, 3, 4), (stamp, 4, 8)):
                for i in np.flatnonzero(sel):  # a handful of addresses per option
                    p0, p1 = int(pos[i]) + first, int(pos[i] + ln[i])
                    if t[i] != 131 and t[i] != 137 and pos[i] + 2 < e[i]:
                        # record route / timestamp: only the slots before the pointer are
                        # filled; empty (zero) slots stay empty
                        p1 = min(p1, int(pos[i]) + int(buf[pos[i] + 2]) - 1)
                    slots = range(p0, p1 - 3, step)
                    apos.extend(slots)
                    aend.extend([min(int(e[i]), p1)] * len(slots))
            pos = np.where(single, pos + 1, np.where(multi, pos + ln, pos))
            live &= pos < e
        if apos:
            self._rewrite_v4_at(buf, np.array(apos, dtype=np.int64)[:, None],
                                np.array(aend, dtype=np.int64))

    # --- IPv6: the common path -----------------------------------------------------------
    def _ipv6(self, buf, h, idx, e, whole):
        l3 = h.l3[idx]
        old = np.concatenate([h.src6[idx], h.dst6[idx]], axis=1)  # (n, 32)
        new = self.cp.anonymize_v6(old.reshape(-1, 16)).reshape(-1, 32)
        buf[l3[:, None] + 8 + np.arange(32)] = new
        old_sum, new_sum = ck.word_sum(old), ck.word_sum(new)

        first_frag, rh_addrs, rh_active = self._v6_ext_flags(buf, l3, e)
        self.not_anonymized += int(rh_addrs.sum())
        proto = h.proto[idx].astype(np.int64)
        l4 = h.l4[idx]
        # With segments left in a routing header the pseudo-header holds the final
        # destination (inside it, not rewritten): leave those L4 checksums alone.
        has_l4 = (l4 >= 0) & ~rh_active
        l4len = h.iplen[idx] - (l4 - l3)
        self._l4(buf, l3, l4, e, proto, has_l4, first_frag, l4len, old_sum, new_sum, 16,
                 h.iplen[idx], whole)

    @staticmethod
    def _v6_ext_flags(buf, l3, e):
        """(first fragment, routing header with addresses, routing header with segments
        left) per IPv6 packet, walking extension headers only for the packets that have any."""
        n = len(l3)
        first_frag = np.zeros(n, dtype=bool)
        rh_addrs = np.zeros(n, dtype=bool)
        rh_active = np.zeros(n, dtype=bool)
        nh = buf[l3 + 6].astype(np.int64)
        sub = np.flatnonzero(np.isin(nh, IPV6_EXT_HEADERS))
        if len(sub) == 0:
            return first_frag, rh_addrs, rh_active
        last = len(buf) - 1
        nh = nh[sub]
        pos = l3[sub] + 40
        ee = e[sub]
        walking = np.ones(len(sub), dtype=bool)
        for _ in range(MAX_IPV6_EXT_HEADERS):
            walking &= np.isin(nh, IPV6_EXT_HEADERS) & (pos + 8 <= ee)
            if not walking.any():
                break
            p = np.where(walking, pos, 0)
            nxt = buf[np.minimum(p, last)].astype(np.int64)
            hl = buf[np.minimum(p + 1, last)].astype(np.int64)
            fo = ck.get16(buf, np.minimum(p + 2, last - 1))
            rh = walking & (nh == IPV6_ROUTING)
            # A routing header's data (beyond its first 8 bytes) holds addresses; with
            # segments left the pseudo-header's destination is the last of them.
            rh_addrs[sub[rh & (hl > 0)]] = True
            rh_active[sub[rh & ((fo & 0xFF) > 0)]] = True
            is_frag = walking & (nh == 44)
            first_frag[sub[is_frag & ((fo & 0xFFF8) == 0) & ((fo & 1) == 1)]] = True
            hlen = np.select([nh == 44, nh == 51], [8, (hl + 2) * 4], (hl + 1) * 8)
            nh = np.where(walking, nxt, nh)
            pos = np.where(walking, pos + hlen, pos)
        return first_frag, rh_addrs, rh_active

    # --- L4 checksums of the common path -------------------------------------------------
    def _l4(self, buf, l3, l4, e, proto, has_l4, first_frag, l4len, old_sum, new_sum,
            nwords, iplen, whole):
        cs_off = _CS_OFF_LUT[proto]
        v6 = nwords == 16
        pseudo_proto = PROTO_ICMPV6 if v6 else -1
        # Checksums that cover the addresses (pseudo-header): TCP, UDP, and ICMPv6 on IPv6.
        covers = (proto == PROTO_TCP) | (proto == PROTO_UDP) | (proto == pseudo_proto)
        cs_pos = l4 + cs_off
        captured = has_l4 & (cs_off >= 0) & (cs_pos + 2 <= e)
        cs = np.where(captured, ck.get16(buf, np.where(captured, cs_pos, 0)), 0)
        udp_none = (proto == PROTO_UDP) & (cs == 0)
        is_udp = proto == PROTO_UDP
        upd = captured & covers & ~udp_none
        pseudo_fixed = proto + (l4len >> 16) + (l4len & 0xFFFF)
        if upd.any():
            new_cs = ck.incremental(cs, old_sum, new_sum, nwords)
            # Offload signature: the field holds exactly the original pseudo-header sum.
            offl = upd & (proto != PROTO_ICMPV6) & (cs == ck.fold(old_sum + pseudo_fixed))
            new_cs = np.where(offl, ck.fold(new_sum + pseudo_fixed), new_cs)
            new_cs = np.where(is_udp & (new_cs == 0), 0xFFFF, new_cs)
            u = np.flatnonzero(upd)
            ck.put16(buf, cs_pos[u], new_cs[u])
            is_whole = self._is_whole(buf, l3, l4, e, proto, has_l4, first_frag, l4len, iplen)
            self.offload_checksums += int((offl & ~is_whole).sum())
        else:
            is_whole = self._is_whole(buf, l3, l4, e, proto, has_l4, first_frag, l4len, iplen)
        # Whole packets: every known L4 checksum is recomputed at the end (ICMPv4 too).
        w = np.flatnonzero(captured & is_whole & ~udp_none)
        if len(w):
            pseudo = np.where(covers[w], new_sum[w] + pseudo_fixed[w], 0)
            whole.add(l4[w], (l3 + iplen)[w], cs_pos[w], pseudo, is_udp[w])

    @staticmethod
    def _is_whole(buf, l3, l4, e, proto, has_l4, first_frag, l4len, iplen):
        """The L4 segment (the checksum's whole coverage) is in the capture."""
        ok = has_l4 & ~first_frag & (l3 + iplen <= e) & (l4len >= _MIN_HDR_LUT[proto]) & (
            _MIN_HDR_LUT[proto] > 0)
        udp = ok & (proto == PROTO_UDP)
        if udp.any():
            # A UDP length that disagrees with the IP length: no agreed coverage, leave it.
            ulen = ck.get16(buf, np.where(udp, l4 + 4, 0))
            ok &= ~udp | (ulen == l4len)
        return ok

    def _recompute_whole(self, buf, whole):
        arr = whole.arrays()
        if arr is None:
            return
        l4, stop, cs_pos, pseudo, udp = arr
        cur = ck.get16(buf, cs_pos)
        full = ck.finish(pseudo + ck.range_sums(buf, l4, stop) - cur)
        full = np.where(udp & (full == 0), 0xFFFF, full)
        self.checksums_corrected += int((full != cur).sum())
        ck.put16(buf, cs_pos, full)

    # --- addresses at arbitrary places, possibly cut by the snaplen (rare paths) ----------
    def _rewrite_v4_at(self, buf, pos, e):
        """Anonymize the 4-byte IPv4 addresses at pos (rows of an (n, k) array) as far as they
        were captured. Returns (old bytes, new bytes) as (n, 4k), zero where not captured."""
        n, k = pos.shape
        flat = pos.reshape(-1)
        ee = np.repeat(e, k)
        old, ok = ck.gather(buf, flat, ee, 4)
        new = _be_bytes_u32(self.cp.anonymize_v4(old.view(">u4").reshape(-1).astype(np.uint32)))
        ck.scatter(buf, flat, new, ok)
        new = np.where(ok, new, 0)
        part = ok.any(axis=1) & ~ok.all(axis=1)
        self.addresses_truncated += int(part.reshape(n, k).any(axis=1).sum())
        return old.reshape(n, 4 * k), new.reshape(n, 4 * k).astype(np.uint8)

    def _rewrite_v6_at(self, buf, pos, e):
        """As _rewrite_v4_at, for 16-byte IPv6 addresses."""
        n, k = pos.shape
        flat = pos.reshape(-1)
        ee = np.repeat(e, k)
        old, ok = ck.gather(buf, flat, ee, 16)
        new = self.cp.anonymize_v6(old)
        ck.scatter(buf, flat, new, ok)
        new = np.where(ok, new, 0).astype(np.uint8)
        part = ok.any(axis=1) & ~ok.all(axis=1)
        self.addresses_truncated += int(part.reshape(n, k).any(axis=1).sum())
        return old.reshape(n, 16 * k), new.reshape(n, 16 * k)

    def _cut_or_bogus_ip(self, buf, h, sel, end, touched):
        """IP headers parse did not accept: cut before the end of the addresses, or with a
        bogus header length. Their address fields are still where the layout says."""
        cand = sel & (h.l3 >= 0) & (h.ipver == 0) & np.isin(h.ethertype, (ETH_IPV4, ETH_IPV6))
        cand &= h.l3 < end
        idx = np.flatnonzero(cand)
        if len(idx) == 0:
            return
        l3, e = h.l3[idx], end[idx]
        version = buf[l3] >> 4
        et = h.ethertype[idx]
        v4 = (et == ETH_IPV4) & (version == 4)
        v6 = (et == ETH_IPV6) & (version == 6)
        self.not_anonymized += int((~v4 & ~v6).sum())
        a = np.flatnonzero(v4 & (l3 + 12 < e))
        if len(a):
            la, ea = l3[a], e[a]
            old, new = self._rewrite_v4_at(buf, np.stack([la + 12, la + 16], 1), ea)
            has_cs = la + 12 <= ea
            if has_cs.any():
                c = np.flatnonzero(has_cs)
                cs = ck.get16(buf, la[c] + 10)
                ck.put16(buf, la[c] + 10, ck.incremental(
                    cs, ck.word_sum(old[c]), ck.word_sum(new[c]), 4))
            touched[idx[a]] = True
        b = np.flatnonzero(v6 & (l3 + 8 < e))
        if len(b):
            lb = l3[b]
            self._rewrite_v6_at(buf, np.stack([lb + 8, lb + 24], 1), e[b])
            touched[idx[b]] = True

    def _arp(self, buf, h, sel, end, touched):
        idx = np.flatnonzero(sel & (h.ethertype == ETH_ARP) & (h.l3 >= 0) & (h.l3 + 6 <= end))
        if len(idx) == 0:
            return
        l3, e = h.l3[idx], end[idx]
        ptype = ck.get16(buf, l3 + 2)
        hlen = buf[l3 + 4].astype(np.int64)
        plen = buf[l3 + 5].astype(np.int64)
        ip = ptype == ETH_IPV4
        self.not_anonymized += int((ip & (plen != 4)).sum())
        a = np.flatnonzero(ip & (plen == 4) & (l3 + 8 + hlen < e))
        if len(a):
            spa = l3[a] + 8 + hlen[a]
            tpa = spa + 4 + hlen[a]
            self._rewrite_v4_at(buf, np.stack([spa, tpa], 1), e[a])
            touched[idx[a]] = True

    def _icmp4_errors(self, buf, h, i4, e):
        l4 = h.l4[i4]
        q = l4 + 8
        cand = (h.proto[i4] == PROTO_ICMP) & (l4 >= 0) & (q < e)
        if not cand.any():
            return
        cand &= np.isin(buf[np.where(cand, l4, 0)], ICMP4_ERRORS)
        cand &= (buf[np.where(cand, q, 0)] >> 4) == 4
        k = np.flatnonzero(cand & (q + 12 < e))
        if len(k):
            self._quoted(buf, l4[k], e[k], v6=False)

    def _icmp6_payload(self, buf, h, i6, e):
        l4 = h.l4[i6]
        icmp = (h.proto[i6] == PROTO_ICMPV6) & (l4 >= 0) & (l4 + 8 < e)
        if not icmp.any():
            return
        typ = np.where(icmp, buf[np.where(icmp, l4, 0)], 0)
        q = l4 + 8
        err = icmp & np.isin(typ, ICMP6_ERRORS)
        err &= (buf[np.where(err, q, 0)] >> 4) == 6
        k = np.flatnonzero(err & (q + 8 < e))
        if len(k):
            self._quoted(buf, l4[k], e[k], v6=True)
        for types, nfields in ((ND_ONE_ADDRESS, 1), ((ND_REDIRECT,), 2)):
            k = np.flatnonzero(icmp & np.isin(typ, types))
            if len(k):
                l4k, ek = l4[k], e[k]
                pos = (l4k + 8)[:, None] + 16 * np.arange(nfields)
                span = 16 * nfields
                before, _ = ck.gather(buf, l4k + 8, ek, span)
                self._rewrite_v6_at(buf, pos, ek)
                after, _ = ck.gather(buf, l4k + 8, ek, span)
                self._adjust(buf, l4k + 2, ek, before, after)

    def _quoted(self, buf, l4, e, v6):
        """Rewrite the IP header quoted in ICMP/ICMPv6 errors at l4 + 8, its checksum and the
        quoted TCP/UDP checksum, and adjust the outer ICMP checksum."""
        q = l4 + 8
        span = 80  # quoted IPv4 header (<= 60 bytes) + TCP checksum at +16; IPv6: 40 + 18
        before, _ = ck.gather(buf, q, e, span)
        if v6:
            old, new = self._rewrite_v6_at(buf, np.stack([q + 8, q + 24], 1), e)
            nwords, addr_end, qproto = 16, q + 40, buf[q + 6].astype(np.int64)
            ql4 = q + 40
            later_frag = np.zeros(len(q), dtype=bool)
        else:
            old, new = self._rewrite_v4_at(buf, np.stack([q + 12, q + 16], 1), e)
            nwords, addr_end = 4, q + 20
            qproto = np.where(q + 10 <= e, buf[np.minimum(q + 9, len(buf) - 1)], 0).astype(np.int64)
            ql4 = q + (buf[q] & 0x0F).astype(np.int64) * 4
            fo = np.where(q + 8 <= e, ck.get16(buf, np.minimum(q + 6, len(buf) - 2)), 0)
            later_frag = (fo & 0x1FFF) != 0
            c = np.flatnonzero(q + 12 <= e)  # quoted header checksum captured
            if len(c):
                cs = ck.get16(buf, q[c] + 10)
                ck.put16(buf, q[c] + 10, ck.incremental(
                    cs, ck.word_sum(old[c]), ck.word_sum(new[c]), nwords))
        old_sum, new_sum = ck.word_sum(old), ck.word_sum(new)
        # Quoted TCP/UDP checksum: only with both quoted addresses whole (the pseudo-header).
        off = np.select([qproto == PROTO_TCP, qproto == PROTO_UDP], [16, 6], -1)
        cs_pos = ql4 + off
        c = np.flatnonzero((off >= 0) & ~later_frag & (addr_end <= e) & (cs_pos + 2 <= e)
                           & (cs_pos + 2 <= q + span))
        if len(c):
            cs = ck.get16(buf, cs_pos[c])
            new_cs = ck.incremental(cs, old_sum[c], new_sum[c], nwords)
            is_udp = qproto[c] == PROTO_UDP
            new_cs = np.where(is_udp & (cs == 0), 0, np.where(is_udp & (new_cs == 0), 0xFFFF, new_cs))
            ck.put16(buf, cs_pos[c], new_cs)
        after, _ = ck.gather(buf, q, e, span)
        self._adjust(buf, l4 + 2, e, before, after)

    @staticmethod
    def _adjust(buf, cs_pos, e, before, after):
        """Incremental update of the checksum at cs_pos for a payload region that changed from
        `before` to `after` (both read with uncaptured bytes as 0, at an even offset)."""
        c = np.flatnonzero(cs_pos + 2 <= e)
        if len(c):
            cs = ck.get16(buf, cs_pos[c])
            ck.put16(buf, cs_pos[c], ck.incremental(
                cs, ck.word_sum(before[c]), ck.word_sum(after[c]), before.shape[1] // 2))
