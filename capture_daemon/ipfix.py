"""IPFIX encoding (RFC 7011), IPFIX files (RFC 5655) and an exporter to a collector.

Records are encoded per batch: the flow records (flows.RECORD_DTYPE) are copied into a
big-endian numpy structured array whose layout *is* the template, then .tobytes().

Templates (one per IP version, RFC 7011 §3.4.1):
  256 IPv4 unidirectional, 257 IPv6 unidirectional,
  258 IPv4 biflow, 259 IPv6 biflow (RFC 5103 reverse elements, PEN 29305),
  260 options template: packet sampling parameters (RFC 5477 / RFC 7270 style).
ICMP: the type and code go into icmpTypeCodeIPv4/IPv6 (the IANA element) and also, as
NetFlow, softflowd and nfdump customarily expect, into destinationTransportPort
(type*256+code, as parse.py gives it).  sourceTransportPort is 0 for ICMP.
"""
from __future__ import annotations

import collections
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from capture_daemon.flows import key_fields

IPFIX_VERSION = 10
REVERSE_PEN = 29305           # RFC 5103
TID_V4, TID_V6, TID_V4_BI, TID_V6_BI, TID_SAMPLING = 256, 257, 258, 259, 260
MAX_MESSAGE = 65535           # RFC 7011 message length field
UDP_MESSAGE = 1400            # keeps an IPv4/IPv6 UDP datagram under a 1500-byte MTU

# (name, element id, length, numpy big-endian type, enterprise number or 0)
_COMMON = [
    ("flowStartMilliseconds", 152, 8, ">u8", 0),
    ("flowEndMilliseconds", 153, 8, ">u8", 0),
    ("packetDeltaCount", 2, 8, ">u8", 0),
    ("octetDeltaCount", 1, 8, ">u8", 0),
]
_V4_ADDR = [("sourceIPv4Address", 8, 4, ">u4", 0), ("destinationIPv4Address", 12, 4, ">u4", 0)]
_V6_ADDR = [("sourceIPv6Address", 27, 16, "V16", 0), ("destinationIPv6Address", 28, 16, "V16", 0)]
_TAIL4 = [
    ("sourceTransportPort", 7, 2, ">u2", 0),
    ("destinationTransportPort", 11, 2, ">u2", 0),
    ("icmpTypeCodeIPv4", 32, 2, ">u2", 0),
    ("protocolIdentifier", 4, 1, "u1", 0),
    ("tcpControlBits", 6, 2, ">u2", 0),
    ("ipClassOfService", 5, 1, "u1", 0),
    ("vlanId", 58, 2, ">u2", 0),
    ("flowEndReason", 136, 1, "u1", 0),
]
_TAIL6 = [f if f[0] != "icmpTypeCodeIPv4" else ("icmpTypeCodeIPv6", 139, 2, ">u2", 0)
          for f in _TAIL4]
_REVERSE = [
    ("reversePacketDeltaCount", 2, 8, ">u8", REVERSE_PEN),
    ("reverseOctetDeltaCount", 1, 8, ">u8", REVERSE_PEN),
    ("reverseTcpControlBits", 6, 2, ">u2", REVERSE_PEN),
]
TEMPLATES = {
    TID_V4: _COMMON + _V4_ADDR + _TAIL4,
    TID_V6: _COMMON + _V6_ADDR + _TAIL6,
    TID_V4_BI: _COMMON + _V4_ADDR + _TAIL4 + _REVERSE,
    TID_V6_BI: _COMMON + _V6_ADDR + _TAIL6 + _REVERSE,
}
# Options template: scope observationDomainId; deprecated-but-universal samplingInterval /
# samplingAlgorithm (what nfdump and NetFlow v9 readers use) plus the PSAMP selector elements.
SAMPLING_SCOPE = [("observationDomainId", 149, 4, ">u4", 0)]
SAMPLING_FIELDS = [
    ("samplingInterval", 34, 4, ">u4", 0),
    ("samplingAlgorithm", 35, 1, "u1", 0),
    ("selectorAlgorithm", 304, 2, ">u2", 0),
    ("samplingPacketInterval", 305, 4, ">u4", 0),
    ("samplingPacketSpace", 306, 4, ">u4", 0),
    ("samplingProbability", 311, 8, ">f8", 0),
]


def _dtype(fields):
    return np.dtype([(name, typ) for name, _i, _l, typ, _e in fields])


DTYPES = {tid: _dtype(f) for tid, f in TEMPLATES.items()}
SAMPLING_DTYPE = _dtype(SAMPLING_SCOPE + SAMPLING_FIELDS)


def _field_specs(fields) -> bytes:
    out = []
    for _name, ie, length, _t, pen in fields:
        if pen:
            out.append(struct.pack("!HHI", ie | 0x8000, length, pen))
        else:
            out.append(struct.pack("!HH", ie, length))
    return b"".join(out)


def template_set(biflow: bool, sampling: bool) -> bytes:
    """Template Set (id 2) and, with sampling, an Options Template Set (id 3)."""
    tids = (TID_V4_BI, TID_V6_BI) if biflow else (TID_V4, TID_V6)
    body = b"".join(struct.pack("!HH", t, len(TEMPLATES[t])) + _field_specs(TEMPLATES[t])
                    for t in tids)
    out = struct.pack("!HH", 2, 4 + len(body)) + body
    if sampling:
        rec = (struct.pack("!HHH", TID_SAMPLING, len(SAMPLING_SCOPE) + len(SAMPLING_FIELDS),
                           len(SAMPLING_SCOPE))
               + _field_specs(SAMPLING_SCOPE) + _field_specs(SAMPLING_FIELDS))
        out += struct.pack("!HH", 3, 4 + len(rec)) + rec
    return out


def sampling_record(domain: int, sampling: dict) -> "EncodedRecords":
    """One options data record describing the packet selection (RFC 5477 style)."""
    r = np.zeros(1, dtype=SAMPLING_DTYPE)
    r["observationDomainId"] = domain
    kind = sampling.get("type")
    if kind == "everyN":
        n = int(sampling["n"])
        r["samplingInterval"] = n
        r["samplingAlgorithm"] = 1           # deterministic
        r["selectorAlgorithm"] = 1           # systematic count-based sampling
        r["samplingPacketInterval"] = 1
        r["samplingPacketSpace"] = n - 1
        r["samplingProbability"] = 1.0 / n
    else:
        p = float(sampling["p"])
        r["samplingInterval"] = max(1, int(round(1.0 / p))) if p > 0 else 0
        r["samplingAlgorithm"] = 2           # random
        r["selectorAlgorithm"] = 4           # uniform probabilistic sampling
        r["samplingProbability"] = p
    return EncodedRecords(TID_SAMPLING, SAMPLING_DTYPE.itemsize, r.tobytes(), 1)


@dataclass
class EncodedRecords:
    """Data records of one template, back to back."""
    tid: int
    size: int
    data: bytes
    count: int


def encode_records(rec: np.ndarray, biflow: bool) -> list[EncodedRecords]:
    """Flow records (RECORD_DTYPE) → data records of the IPv4 and IPv6 templates."""
    if len(rec) == 0:
        return []
    kf = key_fields(rec)
    out = []
    for ver, tid in ((4, TID_V4_BI if biflow else TID_V4), (6, TID_V6_BI if biflow else TID_V6)):
        m = kf["ipver"] == ver
        if not m.any():
            continue
        r = rec[m]
        dt = DTYPES[tid]
        a = np.zeros(len(r), dtype=dt)
        a["flowStartMilliseconds"] = r["start_us"] // 1000
        a["flowEndMilliseconds"] = r["end_us"] // 1000
        a["packetDeltaCount"] = r["packets"]
        a["octetDeltaCount"] = r["octets"]
        # biflow keys are direction-free: put the initiator first
        swap = r["init_rev"]
        k0, k1, k2, k3 = r["k0"], r["k1"], r["k2"], r["k3"]
        sport, dport = kf["sport"][m], kf["dport"][m]
        if swap.any():
            k0, k2 = np.where(swap, k2, k0), np.where(swap, k0, k2)
            k1, k3 = np.where(swap, k3, k1), np.where(swap, k1, k3)
            sport, dport = np.where(swap, dport, sport), np.where(swap, sport, dport)
        if ver == 4:
            a["sourceIPv4Address"] = k1
            a["destinationIPv4Address"] = k3
            icmp_ie = "icmpTypeCodeIPv4"
        else:
            a["sourceIPv6Address"] = np.stack([k0, k1], axis=1).view("V16").ravel()
            a["destinationIPv6Address"] = np.stack([k2, k3], axis=1).view("V16").ravel()
            icmp_ie = "icmpTypeCodeIPv6"
        proto = kf["proto"][m]
        is_icmp = (proto == 1) | (proto == 58)
        a["sourceTransportPort"] = sport
        a["destinationTransportPort"] = dport
        a[icmp_ie] = np.where(is_icmp, dport, 0)
        a["protocolIdentifier"] = proto
        a["tcpControlBits"] = r["flags"]
        a["ipClassOfService"] = r["tos"]
        a["vlanId"] = np.maximum(kf["vlan"][m], 0)
        a["flowEndReason"] = r["reason"]
        if biflow:
            a["reversePacketDeltaCount"] = r["rpackets"]
            a["reverseOctetDeltaCount"] = r["roctets"]
            a["reverseTcpControlBits"] = r["rflags"]
        out.append(EncodedRecords(tid, dt.itemsize, a.tobytes(), len(r)))
    return out


class Session:
    """One IPFIX transport session (a file, a UDP stream, a TCP connection): RFC 7011 §3.1
    sequence numbers count the data records sent before each message."""

    def __init__(self, domain: int):
        self.domain = int(domain) & 0xFFFFFFFF
        self.seq = 0

    def messages(self, sets: list[EncodedRecords], export_time: int, max_size: int,
                 prefix: bytes = b""):
        """Pack data records into messages of at most max_size bytes; prefix (template sets)
        goes at the start of the first message.  Yields (message bytes, data records in it)."""
        budget = max_size - 16
        cur = [prefix] if prefix else []
        used = len(prefix)
        nrec = 0

        def finish():
            nonlocal cur, used, nrec
            body = b"".join(cur)
            hdr = struct.pack("!HHIII", IPFIX_VERSION, 16 + len(body), int(export_time) & 0xFFFFFFFF,
                              self.seq, self.domain)
            self.seq = (self.seq + nrec) & 0xFFFFFFFF
            msg, n = hdr + body, nrec
            cur, used, nrec = [], 0, 0
            return msg, n

        for s in sets:
            pos = 0
            while pos < s.count:
                room = (budget - used - 4) // s.size
                if room <= 0:
                    yield finish()
                    continue
                k = min(room, s.count - pos)
                chunk = s.data[pos * s.size:(pos + k) * s.size]
                cur.append(struct.pack("!HH", s.tid, 4 + len(chunk)) + chunk)
                used += 4 + len(chunk)
                nrec += k
                pos += k
        if cur:
            yield finish()


# ---------------------------------------------------------------------------------------------
# Export to a collector

def parse_export_url(url: str) -> tuple[str, str, int]:
    """'udp://host:port' or 'tcp://host:port' → (scheme, host, port); ValueError otherwise."""
    u = urlsplit(url)
    if u.scheme not in ("udp", "tcp"):
        raise ValueError(f"IPFIX export URL must be udp://HOST:PORT or tcp://HOST:PORT, not {url!r}")
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or not port or u.path not in ("", "/"):
        raise ValueError(f"IPFIX export URL must be udp://HOST:PORT or tcp://HOST:PORT, not {url!r}")
    return u.scheme, u.hostname, port


@dataclass
class ExportStats:
    messages_sent: int = 0
    records_sent: int = 0
    records_dropped: int = 0      # could not be sent (collector down, queue full, send error)
    send_errors: int = 0
    connects: int = 0
    template_sends: int = 0
    connected: bool = False
    last_error: str = ""


class Exporter:
    """Sends IPFIX to a collector from its own thread, so a slow or absent collector never
    stalls the capture loop.  UDP: messages under the MTU, templates resent every
    template_refresh seconds and every refresh_messages messages (RFC 7011 §8.4).
    TCP: templates once per connection; a collector that is down is retried with exponential
    backoff (1 s doubling to 60 s); records meanwhile wait in a bounded backlog, and what
    overflows it is counted as dropped."""

    def __init__(self, url: str, *, domain: int, biflow: bool, sampling: dict | None,
                 template_refresh: float = 60.0, refresh_messages: int = 100,
                 backlog_records: int = 200_000, queue_items: int = 4096,
                 connect_timeout: float = 2.0, max_backoff: float = 60.0):
        self.scheme, self.host, self.port = parse_export_url(url)
        self.url = url
        self.domain = domain
        self.templates = template_set(biflow, sampling is not None)
        self.sampling = sampling
        self.template_refresh = template_refresh
        self.refresh_messages = refresh_messages
        self.backlog_records = backlog_records
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.stats = ExportStats()
        self._q: queue.Queue = queue.Queue(maxsize=queue_items)
        self._lock = threading.Lock()
        self._backlog: collections.deque = collections.deque()
        self._backlog_n = 0
        self._busy = False
        self._sock = None
        self._session = None
        self._next_try = 0.0
        self._backoff = 1.0
        self._last_tmpl = -1e18
        self._since_tmpl = 0
        self._thread = threading.Thread(target=self._run, name="ipfix-export", daemon=True)
        self._thread.start()

    # called from the capture thread
    def submit(self, sets: list[EncodedRecords], export_time: int) -> None:
        n = sum(s.count for s in sets)
        if n == 0:
            return
        try:
            self._q.put_nowait((sets, export_time))
        except queue.Full:
            with self._lock:
                self.stats.records_dropped += n

    def snapshot(self) -> dict:
        with self._lock:
            d = dict(self.stats.__dict__)
        d["url"] = self.url
        return d

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait (at most timeout seconds) until everything submitted was sent or given up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0 and not self._busy:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to timeout seconds), then stop."""
        if not self._thread.is_alive():
            return
        self._q.put((None, timeout))
        self._thread.join(timeout + self.connect_timeout + 1.0)
        self._disconnect()

    # the export thread
    def _run(self):
        deadline = None
        while True:
            try:
                item = self._q.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is not None and item[0] is None:
                deadline = time.monotonic() + item[1]
                self._drain_backlog(deadline)
                self._q.task_done()
                break
            if item is not None:
                sets, et = item
                self._backlog.append((sets, et))
                self._backlog_n += sum(s.count for s in sets)
                self._trim_backlog()
            self._busy = bool(self._backlog)
            self._drain_backlog(None)
            self._busy = bool(self._backlog) and self._sock is not None
            if item is not None:
                self._q.task_done()
        # anything left could not be sent
        with self._lock:
            self.stats.records_dropped += self._backlog_n
        self._backlog.clear()
        self._backlog_n = 0

    def _trim_backlog(self):
        while self._backlog_n > self.backlog_records and len(self._backlog) > 1:
            sets, _ = self._backlog.popleft()
            n = sum(s.count for s in sets)
            self._backlog_n -= n
            with self._lock:
                self.stats.records_dropped += n

    def _drain_backlog(self, deadline):
        while self._backlog:
            if deadline is not None and time.monotonic() > deadline:
                return
            if not self._ensure_connected(deadline is not None):
                if deadline is None:
                    return
                time.sleep(0.05)
                continue
            sets, et = self._backlog[0]
            if self._send(sets, et):
                self._backlog.popleft()
                self._backlog_n -= sum(s.count for s in sets)

    def _ensure_connected(self, closing: bool) -> bool:
        if self._sock is not None:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        try:
            if self.scheme == "udp":
                fam = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_DGRAM)[0]
                s = socket.socket(fam[0], socket.SOCK_DGRAM)
                s.connect(fam[4])
            else:
                s = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
                s.settimeout(5.0)
        except OSError as e:
            self._note_error(e)
            self._next_try = now + self._backoff
            self._backoff = min(self._backoff * 2, self.max_backoff)
            return False
        self._sock = s
        self._session = Session(self.domain)
        self._last_tmpl = -1e18
        self._backoff = 1.0
        with self._lock:
            self.stats.connects += 1
            self.stats.connected = True
        return True

    def _disconnect(self):
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        with self._lock:
            self.stats.connected = False

    def _note_error(self, e):
        with self._lock:
            self.stats.send_errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"

    def _send(self, sets, export_time) -> bool:
        """Send one submission, a message at a time; False when the rest must wait (TCP down)."""
        udp = self.scheme == "udp"
        size = UDP_MESSAGE if udp else MAX_MESSAGE
        remaining = list(sets)
        while remaining:
            now = time.monotonic()
            prefix = b""
            extra = []
            if (now - self._last_tmpl >= self.template_refresh
                    or (udp and self._since_tmpl >= self.refresh_messages)):
                prefix = self.templates
                if self.sampling is not None:
                    extra = [sampling_record(self.domain, self.sampling)]
                self._last_tmpl = now
                self._since_tmpl = 0
                with self._lock:
                    self.stats.template_sends += 1
            gen = self._session.messages(extra + remaining, export_time, size, prefix)
            msg, n = next(gen)
            gen.close()
            n_flows = n - len(extra)          # the options record always fits the first message
            try:
                if udp:
                    self._sock.send(msg)
                else:
                    self._sock.sendall(msg)
            except OSError as e:
                self._note_error(e)
                self._last_tmpl = -1e18       # templates again with the next message
                if udp:
                    # a refused datagram (collector down) is lost; later ones are tried
                    with self._lock:
                        self.stats.records_dropped += n_flows
                    remaining = self._skip(remaining, n_flows)
                    continue
                # TCP: this message is sent again, whole, on the next connection
                self._disconnect()
                self._next_try = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, self.max_backoff)
                self._backlog[0] = (remaining, export_time)
                return False
            self._since_tmpl += 1
            with self._lock:
                self.stats.messages_sent += 1
                self.stats.records_sent += n_flows
            remaining = self._skip(remaining, n_flows)
        return True

    @staticmethod
    def _skip(sets, n):
        """sets without their first n records."""
        out = []
        for s in sets:
            if n >= s.count:
                n -= s.count
                continue
            out.append(EncodedRecords(s.tid, s.size, s.data[n * s.size:], s.count - n) if n else s)
            n = 0
        return out


# ---------------------------------------------------------------------------------------------
# A minimal reader, for our own tests next to the independent readers (ipfixDump, tshark, nfdump)

def read_messages(data: bytes):
    """Yield (header dict, [(set id, set body bytes)]) for each IPFIX message in data."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 16:
            raise ValueError(f"truncated IPFIX message header at byte {pos}")
        ver, length, et, seq, dom = struct.unpack_from("!HHIII", data, pos)
        if ver != IPFIX_VERSION or length < 16 or pos + length > len(data):
            raise ValueError(f"bad IPFIX message at byte {pos}")
        sets = []
        p = pos + 16
        while p < pos + length:
            sid, slen = struct.unpack_from("!HH", data, p)
            if slen < 4 or p + slen > pos + length:
                raise ValueError(f"bad IPFIX set at byte {p}")
            sets.append((sid, data[p + 4:p + slen]))
            p += slen
        yield {"export_time": et, "seq": seq, "domain": dom, "length": length}, sets
        pos += length


def decode_data(data: bytes) -> dict[int, np.ndarray]:
    """Data records of our templates in data, by template id (for tests)."""
    parts: dict[int, list] = {}
    dts = dict(DTYPES)
    dts[TID_SAMPLING] = SAMPLING_DTYPE
    for _hdr, sets in read_messages(data):
        for sid, body in sets:
            if sid in dts:
                parts.setdefault(sid, []).append(np.frombuffer(body, dtype=dts[sid]))
    return {k: np.concatenate(v) for k, v in parts.items()}
