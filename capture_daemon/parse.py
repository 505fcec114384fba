"""Vectorized header parsing of a whole batch: link layer, VLAN tags, IPv4/IPv6, L4 ports.

Every field is a numpy array with one entry per packet. A field is read only where its bytes
were captured (``pos + width <= end of packet``); elsewhere it holds 0 / -1. Loops here run
over header *levels* (VLAN tags, IPv6 extension headers), never over packets.

``parse_numpy`` is the reference. ``parse`` uses the C accelerator (``_accel_parse.c``, one loop
over the packets, same Headers field for field; tests/capture/test_parse_accel.py) when it is
built (``ACCELERATED``), else the reference.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from .batch import Batch

# Link types as libpcap reports them (DLT_*) and as savefiles store them (LINKTYPE_*).
DLT_NULL, DLT_EN10MB, DLT_RAW_BSD, DLT_RAW_OBSD = 0, 1, 12, 14
LINKTYPE_RAW, DLT_LOOP, DLT_LINUX_SLL, DLT_IPV4, DLT_IPV6, DLT_LINUX_SLL2 = 101, 108, 113, 228, 229, 276
RAW_IP_LINKTYPES = {DLT_RAW_BSD, DLT_RAW_OBSD, LINKTYPE_RAW, DLT_IPV4, DLT_IPV6}
SUPPORTED_LINKTYPES = {DLT_NULL, DLT_EN10MB, DLT_LOOP, DLT_LINUX_SLL, DLT_LINUX_SLL2} | RAW_IP_LINKTYPES

ETH_IPV4, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
MAX_VLAN_TAGS = 4
IPV6_EXT_HEADERS = (0, 43, 60, 44, 51, 135)  # hop-by-hop, routing, dst opts, fragment, AH, mobility
MAX_IPV6_EXT_HEADERS = 8
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, PROTO_SCTP = 1, 6, 17, 58, 132
PORT_PROTOCOLS = (PROTO_TCP, PROTO_UDP, PROTO_SCTP, 136)  # 136 = UDP-Lite
ICMP_PROTOCOLS = (PROTO_ICMP, PROTO_ICMPV6)


@dataclass
class Headers:
    ethertype: np.ndarray  # uint16 after VLAN tags (raw-IP link types: synthesized from the version)
    l3: np.ndarray         # int64 absolute offset of the network header in buf, -1 none
    ipver: np.ndarray      # uint8: 4 or 6 where the IP header up to the addresses was captured, else 0
    vlan: np.ndarray       # int32 outermost VLAN id, -1 untagged
    proto: np.ndarray      # uint8 final L4 protocol (after IPv6 extension headers)
    l4: np.ndarray         # int64 absolute offset of the L4 header when it starts inside the capture
                           # and the packet is not a later fragment, else -1
    frag_later: np.ndarray  # bool: non-first fragment (no L4 header in it)
    sport: np.ndarray      # uint16
    dport: np.ndarray      # uint16 (ICMP/ICMPv6: type * 256 + code)
    tcpflags: np.ndarray   # uint8
    tos: np.ndarray        # uint8 IPv4 TOS / IPv6 traffic class
    iplen: np.ndarray      # int64 IP datagram length from the header (IPv6: payload length + 40)
    src4: np.ndarray       # uint32
    dst4: np.ndarray       # uint32
    src6: np.ndarray       # (n, 16) uint8
    dst6: np.ndarray       # (n, 16) uint8
    malformed: np.ndarray  # bool: headers that contradict themselves (not mere snaplen truncation)

    def __len__(self) -> int:
        return len(self.l3)


READ_PAD = 64  # zero bytes after the buffer, so reads near its end need no clipping


class _Reader:
    """Big-endian field reads at per-packet positions, one gather per field.

    The buffer is copied once with zero padding and viewed as unaligned big-endian 16- and
    32-bit integers starting at every byte, so ``u16(pos)`` is a single gather. Reads are
    not bounds-checked one by one: callers compute validity masks per header (``ok``) and
    discard what lies past the capture — bytes there belong to the next packet.
    """

    def __init__(self, batch: Batch):
        n = len(batch.buf)
        padded = np.zeros(n + READ_PAD, dtype=np.uint8)
        padded[:n] = batch.buf
        self.b8 = padded
        self.b16 = np.ndarray((n + READ_PAD - 1,), dtype=">u2", buffer=padded, strides=(1,))
        self.b32 = np.ndarray((n + READ_PAD - 3,), dtype=">u4", buffer=padded, strides=(1,))
        self.limit = n  # positions are clamped here (inside the padding: reads zeros)
        self.off = batch.off
        self.end = batch.off + batch.caplen

    def ok(self, pos: np.ndarray, width: int) -> np.ndarray:
        return (pos >= self.off) & (pos + width <= self.end)

    def _clamp(self, pos):
        return np.minimum(np.maximum(pos, 0), self.limit)

    def u8(self, pos, ok=None):
        v = self.b8[self._clamp(pos)]
        return v if ok is None else np.where(ok, v, 0).astype(np.uint8)

    def u16(self, pos, ok=None):
        v = self.b16[self._clamp(pos)].astype(np.uint16)
        return v if ok is None else np.where(ok, v, 0).astype(np.uint16)

    def u32(self, pos, ok=None):
        v = self.b32[self._clamp(pos)].astype(np.uint32)
        return v if ok is None else np.where(ok, v, 0).astype(np.uint32)

    def bytes16(self, pos, ok):
        """(n, 16) copy of the 16 bytes at pos where ok, zeros elsewhere."""
        out = np.zeros((len(pos), 16), dtype=np.uint8)
        idx = np.nonzero(ok)[0]
        if len(idx):
            out[idx] = self.b8[pos[idx, None] + np.arange(16)]
        return out


def _any_of(values: np.ndarray, choices) -> np.ndarray:
    """values == c1 | values == c2 | ...: faster than np.isin for a handful of choices."""
    out = values == choices[0]
    for c in choices[1:]:
        out |= values == c
    return out


def _link_layer(batch: Batch, rd: _Reader):
    """Offset of the network header and its ethertype, after any VLAN tags."""
    n = len(batch)
    off = batch.off
    lt = batch.linktype
    vlan = np.full(n, -1, dtype=np.int32)
    if lt == DLT_EN10MB:
        et_pos = off + 12
    elif lt == DLT_LINUX_SLL:
        et_pos = off + 14
    elif lt == DLT_LINUX_SLL2:
        et = rd.u16(off, rd.ok(off, 2))
        return off + 20, et, vlan, ~rd.ok(off, 20)
    elif lt in (DLT_NULL, DLT_LOOP):
        raw = rd.u32(off, rd.ok(off, 4))
        if lt == DLT_NULL:  # host byte order of the capturing machine: accept both
            swapped = raw.byteswap()
            raw = np.where(raw > 0xFFFF, swapped, raw)
        et = np.select([raw == 2, np.isin(raw, (10, 24, 28, 30))], [ETH_IPV4, ETH_IPV6], 0)
        return off + 4, et.astype(np.uint16), vlan, ~rd.ok(off, 4)
    elif lt in RAW_IP_LINKTYPES:
        version = rd.u8(off, rd.ok(off, 1)) >> 4
        et = np.select([version == 4, version == 6], [ETH_IPV4, ETH_IPV6], 0).astype(np.uint16)
        return off.copy(), et, vlan, np.zeros(n, dtype=bool)
    else:
        raise ValueError(f"unsupported link type {lt}")
    short = ~rd.ok(et_pos, 2)
    et = rd.u16(et_pos, ~short)
    pos = et_pos + 2
    for _ in range(MAX_VLAN_TAGS):
        tagged = _any_of(et, VLAN_TPIDS) & rd.ok(pos, 4)
        if not tagged.any():
            break
        tci = rd.u16(pos, tagged)
        vlan = np.where(tagged & (vlan < 0), (tci & 0x0FFF).astype(np.int32), vlan)
        et = np.where(tagged, rd.u16(pos + 2, tagged), et)
        pos = np.where(tagged, pos + 4, pos)
    return pos, et, vlan, short


def parse_numpy(batch: Batch) -> Headers:
    """The reference implementation (numpy, one gather per field); parse() uses the C one when built."""
    rd = _Reader(batch)
    l3, ethertype, vlan, malformed = _link_layer(batch, rd)
    malformed = malformed & (batch.wirelen > 0)

    first = rd.u8(l3)
    version = first >> 4
    is4 = (ethertype == ETH_IPV4) & rd.ok(l3, 20)
    is6 = (ethertype == ETH_IPV6) & rd.ok(l3, 40)
    # An IP ethertype whose header version disagrees is malformed; so is a header the wire
    # length says cannot be there.
    ip_claimed = (ethertype == ETH_IPV4) | (ethertype == ETH_IPV6)
    wire_end = batch.off + batch.wirelen
    malformed |= ip_claimed & rd.ok(l3, 1) & (
        ((ethertype == ETH_IPV4) & (version != 4)) | ((ethertype == ETH_IPV6) & (version != 6)))
    malformed |= ((ethertype == ETH_IPV4) & (l3 + 20 > wire_end)) | (
        (ethertype == ETH_IPV6) & (l3 + 40 > wire_end))
    is4 &= version == 4
    is6 &= version == 6

    ihl = (first & 0x0F).astype(np.int64) * 4
    total4 = rd.u16(l3 + 2, is4).astype(np.int64)
    bad4 = is4 & ((ihl < 20) | (total4 < ihl))
    malformed |= bad4
    is4 &= ~bad4
    frag4 = rd.u16(l3 + 6, is4)
    frag_later = is4 & ((frag4 & 0x1FFF) != 0)

    proto = np.where(is4, rd.u8(l3 + 9, is4), 0).astype(np.uint8)
    tos = np.where(is4, rd.u8(l3 + 1, is4), 0).astype(np.uint8)
    src4 = rd.u32(l3 + 12, is4)
    dst4 = rd.u32(l3 + 16, is4)
    l4 = np.where(is4 & ~frag_later, l3 + ihl, -1)
    iplen = np.where(is4, total4, 0)

    # IPv6: walk the extension header chain, all packets at once.
    any6 = bool(is6.any())
    src6 = rd.bytes16(l3 + 8, is6)
    dst6 = rd.bytes16(l3 + 24, is6)
    tc = ((rd.u16(l3, is6) >> 4) & 0xFF).astype(np.uint8)
    tos = np.where(is6, tc, tos)
    plen6 = rd.u16(l3 + 4, is6).astype(np.int64)
    iplen = np.where(is6, np.where(plen6 == 0, batch.wirelen - (l3 - batch.off), plen6 + 40), iplen)
    nh = rd.u8(l3 + 6, is6)
    pos = l3 + 40
    walking = is6.copy()
    for _ in range(MAX_IPV6_EXT_HEADERS if any6 else 0):
        walking &= _any_of(nh, IPV6_EXT_HEADERS)
        if not walking.any():
            break
        readable = walking & rd.ok(pos, 8)
        nxt = rd.u8(pos, readable)
        hlen_byte = rd.u8(pos + 1, readable).astype(np.int64)
        is_frag = readable & (nh == 44)
        frag_off = rd.u16(pos + 2, is_frag) >> 3
        hlen = np.select([nh == 44, nh == 51], [8, (hlen_byte + 2) * 4], (hlen_byte + 1) * 8)
        later = is_frag & (frag_off != 0)
        frag_later |= later
        # Headers past the capture: the final protocol is unknown (stays at the ext header).
        nh = np.where(readable, nxt, nh)
        pos = np.where(readable, pos + hlen, pos)
        walking &= readable & ~later
    proto = np.where(is6, nh, proto).astype(np.uint8)
    l4 = np.where(is6 & ~frag_later, pos, l4)
    # Where the L4 header does not start inside the capture, there is none to look at.
    l4 = np.where(rd.ok(l4, 1), l4, -1)

    has_ports = (l4 >= 0) & _any_of(proto, PORT_PROTOCOLS) & rd.ok(l4, 4)
    sport = rd.u16(l4, has_ports)
    dport = rd.u16(l4 + 2, has_ports)
    is_icmp = (l4 >= 0) & (((proto == PROTO_ICMP) & is4) | ((proto == PROTO_ICMPV6) & is6)) & rd.ok(l4, 2)
    dport = np.where(is_icmp, rd.u16(l4, is_icmp), dport).astype(np.uint16)
    is_tcp = (l4 >= 0) & (proto == PROTO_TCP) & rd.ok(l4, 14)
    tcpflags = rd.u8(l4 + 13, is_tcp)

    ipver = np.select([is4, is6], [4, 6], 0).astype(np.uint8)
    return Headers(ethertype=ethertype.astype(np.uint16), l3=np.where(ip_claimed | (ethertype == ETH_ARP), l3, -1),
                   ipver=ipver, vlan=vlan, proto=proto, l4=l4.astype(np.int64),
                   frag_later=frag_later, sport=sport.astype(np.uint16), dport=dport,
                   tcpflags=tcpflags, tos=tos, iplen=iplen.astype(np.int64),
                   src4=src4, dst4=dst4, src6=src6, dst6=dst6, malformed=malformed)


# The C accelerator (capture_daemon/_accel_parse.c, built by setup.py): same Headers, one pass
# over the packets. parse() uses it when it is built; ACCELERATED says whether it is.
try:
    from . import _accel_parse
except ImportError:  # not built: the numpy reference does the work
    _accel_parse = None
ACCELERATED = _accel_parse is not None

_HEADER_DTYPES = (  # Headers' fields in order, with the dtype and per-packet shape of each
    ("ethertype", np.uint16, ()), ("l3", np.int64, ()), ("ipver", np.uint8, ()), ("vlan", np.int32, ()),
    ("proto", np.uint8, ()), ("l4", np.int64, ()), ("frag_later", np.bool_, ()), ("sport", np.uint16, ()),
    ("dport", np.uint16, ()), ("tcpflags", np.uint8, ()), ("tos", np.uint8, ()), ("iplen", np.int64, ()),
    ("src4", np.uint32, ()), ("dst4", np.uint32, ()), ("src6", np.uint8, (16,)), ("dst6", np.uint8, (16,)),
    ("malformed", np.bool_, ()),
)


def _int64_column(a):
    if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 1:
        return None
    return np.ascontiguousarray(a)


def c_columns(batch: Batch):
    """(buf, off, caplen, wirelen, linktype) of the batch as the C parser takes them (uint8 and
    contiguous int64 arrays, a supported link type), or None for a batch it does not take
    (unusual dtypes or shapes, an unsupported link type). Shared by parse_c and the
    anonymizer's one-pass parse and rewrite (Anonymizer.apply_parsing)."""
    buf = batch.buf
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        return None
    off, caplen, wirelen = _int64_column(batch.off), _int64_column(batch.caplen), _int64_column(batch.wirelen)
    if off is None or caplen is None or wirelen is None or not len(off) == len(caplen) == len(wirelen):
        return None
    try:
        linktype = operator.index(batch.linktype)
    except TypeError:
        return None
    if linktype not in SUPPORTED_LINKTYPES:
        return None
    return np.ascontiguousarray(buf), off, caplen, wirelen, linktype


def parse_c(batch: Batch) -> Headers | None:
    """parse_numpy's Headers from the C accelerator; None when it is not built or the batch is
    one it does not take (see c_columns; or packets outside the buffer), which parse() then
    hands to the numpy reference."""
    if _accel_parse is None:
        return None
    cols = c_columns(batch)
    if cols is None:
        return None
    n = len(cols[1])
    outs = tuple(np.empty((n,) + shape, dtype=dtype) for _, dtype, shape in _HEADER_DTYPES)
    if not _accel_parse.parse(*cols, outs):
        return None
    return Headers(*outs)


def parse(batch: Batch) -> Headers:
    """Headers of every packet of the batch: the C accelerator when built, else parse_numpy."""
    h = parse_c(batch)
    return h if h is not None else parse_numpy(batch)
