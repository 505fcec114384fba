"""Packet sources: a live interface or a savefile, read in batches (libpcap: pcapy-ng, or our C).

pcapy-ng's ``next_batch`` returns the packets and (sec, usec, offset, caplen) per packet, but
not the wire length, which pcap records and byte counts need. We recover it per batch:
- a classic pcap savefile read without a libpcap filter: the records lie back to back. With the
  C accelerator (_accel_read) we read the file ourselves in large chunks and walk the records
  in C: exact wire lengths, writable buffers, no per-packet Python work. Without it, the file
  offset of each record is a cumulative sum of (16 + caplen) over next_batch's caplens and the
  wire length is read from the file with pread — exact, vectorized, about half as fast;
- a live interface: with the C accelerator (_accel_live) we own the libpcap handle and read
  with pcap_dispatch, whose callback writes each packet once, as a pcap record with its real
  wire length, into the batch's buffer (no estimate, no join; coalescing is appending);
- otherwise (live capture without _accel_live, filtered savefiles, pcapng): a packet shorter
  than the snaplen was captured whole (wirelen == caplen); a truncated IP packet's wire length
  is its link header plus the IP datagram length; a truncated non-IP packet is counted at its
  captured length and reported in ``wirelen_estimated``.
"""

from __future__ import annotations

import ctypes
import logging
import select
import socket
import os
import struct
from typing import Iterator

import numpy as np

from .batch import Batch, back_to_back_offsets, gather_packed
from .coalesce import RecordReads, coalesce, coalesced_reads
from . import parse

try:
    import pcapy
except ImportError:  # reported clearly by the CLI
    pcapy = None

try:
    from . import _accel_read
except ImportError:  # not built: the pcapy-ng + pread path below (tests cover both)
    _accel_read = None

try:
    from . import _accel_live
except ImportError:  # not built: live capture through pcapy-ng's next_batch (tests cover both)
    _accel_live = None

log = logging.getLogger("gims-capture")

BATCH_PACKETS = 65536
CHUNK_BYTES = 2 << 20   # savefile bytes read per batch by the direct reader (~16k packets of
                        # the bench trace: a batch stays in cache from read to write; 8 MiB
                        # cost path 1 ~10 % more CPU)
COALESCE_BYTES = CHUNK_BYTES   # a live batch's packet bytes, at most (plus one read's)
COALESCE_SECONDS = 0.2       # the longest a live batch is held to coalesce reads (below the
                             # idle wait of 0.5 s, so signals and watchdog are no later than idle;
                             # 0.05 s cost ~20 % more CPU per packet at 100 k packets/s)
MAX_CAPLEN = 262144     # libpcap's largest snapshot length: a bigger record is corruption
PCAP_MAGICS = {0xA1B2C3D4: ("<", 1_000), 0xD4C3B2A1: (">", 1_000),
               0xA1B23C4D: ("<", 1), 0x4D3CB2A1: (">", 1)}


class SourceError(Exception):
    """A source that cannot be opened or a filter that does not compile: a one-line reason."""


def libpcap_version(live: bool = False) -> str:
    """Version string of the libpcap actually capturing: for a live interface the one
    _accel_live links (Debian's) when it is built, else the one pcapy is linked against (the
    venv's pcapy-ng wheel bundles its own; both may be loaded in one process)."""
    if live and _accel_live is not None:
        return _accel_live.lib_version()
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libpcap" in line and "/" in line}
        # pcapy's own copy first (the wheel's pcapy_ng.libs, next to the module), if it has one
        near = os.path.dirname(os.path.abspath(pcapy.__file__)) + os.sep if pcapy else "/"
        for path in sorted(paths, key=lambda p: (not p.startswith(near), p)):
            lib = ctypes.CDLL(path)
            lib.pcap_lib_version.restype = ctypes.c_char_p
            return lib.pcap_lib_version().decode()
    except OSError:
        pass
    return "unknown"


class PcapSource:
    """Common batch loop over a pcapy handle."""

    live = False
    direct = False  # read without next_batch (OfflineSource: the savefile; LiveSource: C)
    batch_packets = None   # packets per next_batch, None: BATCH_PACKETS (smaller: less memory)

    def __init__(self, handle, snaplen: int, description: str):
        self.handle = handle
        self.linktype = handle.datalink()
        self.snaplen = snaplen
        self.description = description
        self.wirelen_estimated = 0
        if self.linktype not in parse.SUPPORTED_LINKTYPES:
            raise SourceError(f"{description}: unsupported link type {self.linktype}")

    def set_filter(self, expr: str) -> None:
        if not expr:
            return
        try:
            self.handle.setfilter(expr)
        except Exception as exc:  # pcapy raises PcapError with libpcap's message
            raise SourceError(f"filter {expr!r} does not compile: {exc}") from None

    def _raw_batches(self) -> Iterator[tuple[bytes, bytes]]:
        while True:
            data, meta = self.handle.next_batch(self.batch_packets or BATCH_PACKETS)
            yield data, meta

    def batches(self) -> Iterator[Batch | None]:
        """Batches of packets; None when a live read timed out empty; stops at end of file."""
        for data, meta in self._raw_batches():
            if not len(meta):
                if self.live:
                    yield None
                    continue
                return
            m = np.frombuffer(meta, dtype=np.uint32).reshape(-1, 4).astype(np.int64)
            buf = np.frombuffer(data, dtype=np.uint8)
            caplen = m[:, 3]
            records = self._records(caplen)
            if records is not None:  # the savefile's own records: exact, and writable as they are
                # next_batch's copy of the packets is not used: drop it while the batch is
                # processed (a batch's worth of memory)
                data = meta = None
                buf, off, wirelen = records
                if self._native_records:
                    yield Batch(buf, off, caplen.copy(), wirelen, m[:, 0].copy(), m[:, 1].copy(),
                                self.linktype, records=True)
                else:  # the record headers between packets are not writable as they are
                    yield _packed(buf, off, caplen, wirelen, m[:, 0], m[:, 1], self.linktype)
                continue
            wirelen = self._estimate_wire_lengths(buf, m[:, 2], caplen)
            yield Batch(buf, m[:, 2].copy(), caplen.copy(), wirelen, m[:, 0].copy(), m[:, 1].copy(),
                        self.linktype)

    _native_records = False

    def _records(self, caplen):
        """(buffer, packet offsets, wire lengths) straight from a savefile, or None."""
        return None

    def _estimate_wire_lengths(self, buf, off, caplen) -> np.ndarray:
        wirelen = caplen.copy()
        truncated = caplen >= self.snaplen
        if not truncated.any():
            return wirelen
        idx = np.nonzero(truncated)[0]
        zeros = np.zeros(len(idx), dtype=np.int64)
        # parse only reads through offsets, so the subset can share the batch buffer
        hdr = parse.parse(Batch(buf, off[idx], caplen[idx], caplen[idx], zeros, zeros, self.linktype))
        derived = np.where(hdr.ipver > 0, (hdr.l3 - off[idx]) + hdr.iplen, caplen[idx])
        wirelen[idx] = np.maximum(caplen[idx], derived)
        self.wirelen_estimated += int(np.count_nonzero(hdr.ipver == 0))
        return wirelen

    def stats(self) -> tuple[int, int, int]:
        """libpcap's (ps_recv, ps_drop, ps_ifdrop); zeros for savefiles."""
        if not self.live:
            return (0, 0, 0)
        try:
            return tuple(int(v) for v in self.handle.stats())
        except Exception:
            return (0, 0, 0)

    def close(self) -> None:
        try:
            self.handle.close()
        except Exception:
            pass


class LiveSource(PcapSource):
    live = True

    def __init__(self, interface: str, *, snaplen: int = 64, promiscuous: bool = True,
                 timeout_ms: int = 1000, buffer_bytes: int = 1 << 20, filter_expr: str = "",
                 fanout_group: int | None = None):
        if _accel_live is None:
            _need_pcapy()
        try:  # libpcap's own words for a missing device are misleading ("unsupported link type -3")
            socket.if_nametoindex(interface)
        except OSError:
            raise SourceError(f"cannot capture on {interface!r}: no such network interface") from None
        try:
            if _accel_live is not None:
                # non-blocking already (see below); activate's warning, if any, is logged
                handle = _accel_live.Live(interface, snaplen, bool(promiscuous), timeout_ms,
                                          buffer_bytes)
            else:
                handle = pcapy.create(interface)
                handle.set_snaplen(snaplen)
                handle.set_promisc(bool(promiscuous))
                handle.set_timeout(timeout_ms)
                handle.set_buffer_size(buffer_bytes)
                handle.activate()
        except Exception as exc:
            raise SourceError(f"cannot capture on {interface!r}: {exc}") from None
        self.direct = _accel_live is not None
        if getattr(handle, "warning", None):
            log.warning("capture on %r: %s", interface, handle.warning)
        super().__init__(handle, snaplen, f"interface {interface}")
        self.interface = interface
        self.set_filter(filter_expr)
        if fanout_group is not None:
            # After the filter: this socket joins the group already filtering. HASH keeps a
            # flow on one socket (Linux hashes symmetrically, so both directions too).
            mode = (_accel_live or pcapy).PACKET_FANOUT_HASH
            try:
                self.handle.set_fanout(fanout_group, mode)
            except Exception as exc:
                self.close()
                raise SourceError(f"cannot join PACKET_FANOUT group {fanout_group} on "
                                  f"{interface!r}: {exc}") from None
        # With TPACKET_V3 libpcap may block forever when no packets come (the kernel retires
        # a block only when it holds packets), so we wait on the descriptor ourselves.
        if not self.direct:
            self.handle.setnonblock(1)
        self.fd = self.handle.getfd()
        self.buffer_bytes = buffer_bytes
        self.timeout_seconds = timeout_ms / 1000.0
        self.wait_seconds = min(self.timeout_seconds, 0.5)

    def _policy(self) -> dict:
        """How reads are coalesced (capture_daemon/coalesce.py): one kernel block per read is
        a few hundred packets, so reads are held together up to COALESCE_BYTES, no longer
        than the read timeout allows."""
        return dict(timeout=self.timeout_seconds, idle_wait=self.wait_seconds,
                    max_hold=COALESCE_SECONDS, ring_bytes=self.buffer_bytes)

    def batches(self):
        if not self.direct:
            yield from super().batches()
            return
        reads = RecordReads(self.handle.dispatch, self.linktype,
                            max_packets=self.batch_packets or BATCH_PACKETS,
                            max_bytes=COALESCE_BYTES, max_caplen=MAX_CAPLEN)
        yield from coalesce(reads, self._wait, **self._policy())

    def _raw_batches(self):
        return coalesced_reads(self.handle.next_batch, self._wait,
                               max_packets=self.batch_packets or BATCH_PACKETS,
                               max_bytes=COALESCE_BYTES, **self._policy())

    def _wait(self, seconds: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], seconds)
        return bool(ready)


class OfflineSource(PcapSource):
    def __init__(self, path: str, *, filter_expr: str = "", snaplen: int | None = None):
        _need_pcapy()
        if not os.path.isfile(path):
            raise SourceError(f"cannot read {path!r}: no such file")
        try:
            handle = pcapy.open_offline(path)
        except Exception as exc:
            raise SourceError(f"cannot read {path!r}: {exc}") from None
        self.path = path
        self._fd = None
        self._file_pos = 24
        header = _read_pcap_header(path)
        file_snaplen = header[2] if header else 262144
        super().__init__(handle, file_snaplen, f"file {path}")
        self.set_filter(filter_expr)
        # Exact wire lengths straight from the file when records are read back to back.
        if header and not filter_expr and os.path.getsize(path) > 24:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._endian, magic = header[0], header[3]
            # Records we can pass through unchanged: little-endian, microsecond timestamps.
            self._native_records = magic == 0xA1B2C3D4
            self._nanoseconds = PCAP_MAGICS[magic][1] == 1
            self.direct = _accel_read is not None

    chunk_bytes = None  # savefile bytes per batch of the direct reader, None: CHUNK_BYTES

    def batches(self):
        if not self.direct:
            yield from super().batches()
            return
        pending = np.zeros(0, dtype=np.uint8)  # a record cut by the end of the last chunk
        swap = self._endian == ">"
        while True:
            chunk = self.chunk_bytes or CHUNK_BYTES
            buf = np.empty(max(chunk, len(pending) + 16 + MAX_CAPLEN), dtype=np.uint8)
            buf[:len(pending)] = pending
            got = os.preadv(self._fd, [memoryview(buf)[len(pending):]], self._file_pos)
            self._file_pos += got
            end = len(pending) + got
            # room for the packets a chunk usually holds; a fuller chunk (records under 32
            # bytes) is walked on in the next round
            cap = max(min(BATCH_PACKETS, chunk // 32), end // 32)
            out = np.empty((5, cap), dtype=np.int64)
            n, pos, bad = _accel_read.scan(buf, 0, end, swap, self._nanoseconds, MAX_CAPLEN, *out)
            if n:
                off, caplen, wirelen, sec, usec = out[:, :n]
                if self._native_records:
                    yield Batch(buf[:pos], off, caplen, wirelen, sec, usec, self.linktype,
                                records=True)
                else:  # big-endian or nanosecond records: packets packed, headers dropped
                    yield _packed(buf, off, caplen, wirelen, sec, usec, self.linktype)
            if bad >= 0:
                raise SourceError(f"{self.description}: invalid packet capture length {bad}, "
                                  f"bigger than maximum of {MAX_CAPLEN}")
            pending = buf[pos:end].copy()
            if got == 0 and n == 0:  # end of file, and nothing more to walk in what is left
                if len(pending):
                    raise SourceError(f"{self.description}: truncated dump file; "
                                      f"{len(pending)} bytes of a last record")
                return

    def _records(self, caplen):
        """The batch's records read from the file (pread: memory stays bounded by a batch)."""
        if self._fd is None:
            return None
        rel = back_to_back_offsets(caplen + 16)  # record header offsets, relative to the first
        length = int(rel[-1] + 16 + caplen[-1])
        data = os.pread(self._fd, length, self._file_pos)
        if len(data) < length:
            return self._stop_trusting()
        raw = np.frombuffer(data, dtype=np.uint8)
        # the file's 32-bit words at every byte offset (a strided view, no copy): one gather
        # per field instead of an (n, 8) index array
        words = np.ndarray((length - 3,), dtype=self._endian + "u4", buffer=raw, strides=(1,))
        if not np.array_equal(words[rel + 8], caplen):  # not back to back after all
            return self._stop_trusting()
        self._file_pos += length
        return raw, rel + 16, words[rel + 12].astype(np.int64)

    def _stop_trusting(self):
        os.close(self._fd)
        self._fd = None
        return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().close()


def _packed(buf, off, caplen, wirelen, sec, usec, linktype) -> Batch:
    """A packed batch (packets back to back, see batch.py) of packets lying anywhere in buf."""
    new_off = back_to_back_offsets(caplen)
    return Batch(gather_packed(buf, off, caplen, new_off), new_off, caplen.copy(), wirelen.copy(),
                 sec.copy(), usec.copy(), linktype)


def _read_pcap_header(path: str):
    """(endian, linktype, snaplen, magic) of a classic pcap file, None for pcapng or others."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24:
        return None
    magic = struct.unpack("<I", head[:4])[0]
    if magic not in PCAP_MAGICS:
        return None
    endian, _ = PCAP_MAGICS[magic]
    snaplen, linktype = struct.unpack(endian + "II", head[16:24])
    return endian, linktype & 0x0FFFFFFF, snaplen, magic


def _need_pcapy() -> None:
    if pcapy is None:
        raise SourceError("pcapy-ng is not installed (python3 -m pip install pcapy-ng)")


def open_source(*, read: str | None, interface: str | None, filter_expr: str = "",
                snaplen: int = 64, promiscuous: bool = True, timeout_ms: int = 1000,
                buffer_bytes: int = 1 << 20, fanout_group: int | None = None) -> PcapSource:
    if read:
        src = OfflineSource(read, filter_expr=filter_expr)
    else:
        src = LiveSource(interface, snaplen=snaplen, promiscuous=promiscuous,
                         timeout_ms=timeout_ms, buffer_bytes=buffer_bytes, filter_expr=filter_expr,
                         fanout_group=fanout_group)
    if not src.direct and not hasattr(src.handle, "next_batch"):
        src.close()
        raise SourceError("the installed pcapy lacks next_batch: install pcapy-ng >= 2.1")
    return src
