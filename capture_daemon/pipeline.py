"""The capture pipeline: source → sample → parse → anonymize → output format → spool.

Everything here works on whole batches. Time for rotation comes from packet timestamps (so
an offline run gives the same files whatever the wall clock); a live capture that sees no
packets advances on the wall clock, so empty intervals still close a valid file.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time

import numpy as np

from . import __version__
from .batch import Batch
from .parse import parse
from .source import PcapSource, libpcap_version
from .recovery import recover_spool
from .spool import OpenFile, Spool, SpoolFullError, utc_iso

log = logging.getLogger("gims-capture")

COUNTER_NAMES = ("packets_observed", "bytes_observed", "packets_sampled", "bytes_sampled",
                 "packets_written", "malformed_packets")


class Pipeline:
    def __init__(self, settings, source: PcapSource, output, sampler, anonymizer=None,
                 notifier=None):
        self.s = settings
        self.source = source
        self.output = output
        self.sampler = sampler
        self.anonymizer = anonymizer
        self.notifier = notifier
        self.spool = Spool(settings.output_dir, settings.experiment, settings.site, output.ext)
        self.current: OpenFile | None = None
        self.boundary = math.inf
        self.totals = dict.fromkeys(COUNTER_NAMES, 0)
        self.totals["packets_unwritten"] = 0
        self.stop_requested = False
        self.rotate_requested = False
        self.spool_full = False
        self.last_stats = 0.0
        self.last_status = 0.0
        self.now = None
        self.static_meta = self._static_metadata()

    # ------------------------------------------------------------------ control
    def request_stop(self, *_):
        self.stop_requested = True

    def request_rotate(self, *_):
        self.rotate_requested = True

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        recovered = recover_spool(self.s.output_dir, self.spool.prefix, self.static_meta)
        self.spool.files_written += len(recovered)
        if self.notifier:
            self.notifier.ready(self.status_line())
        try:
            for batch in self.source.batches():
                if batch is None:  # live read timed out: time still moves on
                    self._advance(time.time())
                elif len(batch):
                    self._process(batch)
                self._housekeeping()
                if self.stop_requested:
                    break
        finally:
            end = self.now if self.now is not None else time.time()
            if self.source.live:
                end = max(end, time.time())
            self._close_current(end, final=True)
            self.output.close()
            self._write_status("stopped")
        return self.totals

    def _process(self, batch: Batch) -> None:
        times = batch.times
        start = 0
        n = len(batch)
        while start < n:
            t0 = float(times[start])
            self._ensure_file(t0)
            later = np.nonzero(times[start:] >= self.boundary)[0]
            stop = start + int(later[0]) if len(later) else n
            if stop == start:  # a packet at or past the boundary: rotate first
                self._rotate(self.boundary, t0)
                continue
            self._process_segment(batch, start, stop)
            start = stop
        self.now = float(times[-1]) if self.now is None else max(self.now, float(times[-1]))

    def _process_segment(self, batch: Batch, start: int, stop: int) -> None:
        seg = batch.take(np.arange(start, stop)) if (start, stop) != (0, len(batch)) else batch
        of = self.current
        n_obs = len(seg)
        bytes_obs = int(seg.wirelen.sum())
        self._count(of, "packets_observed", n_obs)
        self._count(of, "bytes_observed", bytes_obs)
        self.output.observe(seg.times, seg.wirelen)
        t = seg.times
        of.first_packet = float(t[0]) if of.first_packet is None else of.first_packet
        of.last_packet = float(t[-1])

        keep = self.sampler.select(n_obs)
        sub = seg if keep is None else seg.take(keep)
        if not len(sub):
            return
        self._count(of, "packets_sampled", len(sub))
        self._count(of, "bytes_sampled", int(sub.wirelen.sum()))
        headers = parse(sub)
        self._count(of, "malformed_packets", int(np.count_nonzero(headers.malformed)))
        if self.anonymizer is not None:
            sub.make_writable()
            self.anonymizer.apply(sub, headers, np.ones(len(sub), dtype=bool))
        self._write(sub, headers)

    def _write(self, sub: Batch, headers) -> None:
        """Hand packets to the output format, cutting files at --max-file-bytes.

        Formats whose record sizes are known up front (pcap) are cut exactly; the others
        rotate as soon as a file has reached the limit.
        """
        limit = self.s.max_file_bytes
        sizes = getattr(self.output, "record_sizes", None)
        while limit and sizes is not None and len(sub):
            room = limit - self.current.file.size
            fit = int(np.searchsorted(np.cumsum(sizes(sub)), room, side="right"))
            if fit == 0 and self.current.counters["packets_written"] == 0:
                fit = 1  # a record larger than the limit still goes into a file of its own
            if fit >= len(sub):
                break
            if fit:
                self._emit(sub.take(np.arange(fit)), None)
                sub = sub.take(np.arange(fit, len(sub)))
                headers = None  # formats with record_sizes do not read headers
            t = float(sub.times[0])
            self._rotate(t, t)
        if len(sub):
            self._emit(sub, headers)
        if limit and sizes is None and self.current.file.size >= limit:
            t = float(sub.times[-1])
            self._rotate(t, t)

    def _emit(self, part: Batch, headers) -> None:
        if self.spool_full:
            self.totals["packets_unwritten"] += len(part)
            return
        try:
            self.output.add(part, headers, np.ones(len(part), dtype=bool))
        except SpoolFullError:
            self._spool_full(len(part))
            return
        except OSError as exc:
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT from a buffered write
                self._spool_full(len(part))
                return
            raise
        self._count(self.current, "packets_written", len(part))

    def _spool_full(self, lost: int) -> None:
        self.spool_full = True
        self.totals["packets_unwritten"] += lost
        log.error("spool %s is full: packets are counted but not written until space returns",
                  self.s.output_dir)

    def _count(self, of: OpenFile, name: str, value: int) -> None:
        of.counters[name] += value
        self.totals[name] += value

    # ------------------------------------------------------------------ files and rotation
    def _interval_end(self, t: float) -> float:
        r = self.s.rollover_seconds
        if not r:
            return math.inf
        return (math.floor(t / r) + 1) * r

    def _ensure_file(self, t: float) -> None:
        if self.current is None:
            self._open(t)

    def _open(self, t: float) -> None:
        try:
            self.current = self.spool.open(t)
        except SpoolFullError:
            raise
        self.boundary = self._interval_end(t)
        self.output.start_file(self.current.file, t)

    def _rotate(self, end_time: float, next_time: float) -> None:
        """Close the current file at end_time and open the next one for next_time.

        A jump over several intervals (a quiet spell in a trace) closes one empty file
        spanning the gap, so readers of the spool see time covered without a file per
        second of silence.
        """
        self._close_current(end_time, final=False)
        r = self.s.rollover_seconds
        if r and next_time >= end_time + r:
            gap_end = math.floor(next_time / r) * r
            self._open(end_time)
            self._close_current(gap_end, final=False)
            self._open(gap_end)
        else:
            self._open(end_time if next_time >= end_time else next_time)
        self.rotate_requested = False

    def _close_current(self, end_time: float, final: bool) -> None:
        of = self.current
        if of is None:
            if not (final and self.spool.files_written == 0):
                return
            # A capture that saw nothing still leaves one valid, empty file behind.
            self._open(end_time)
            of = self.current
        self.current = None
        end_time = max(end_time, of.last_packet or end_time, of.start_time)
        extra = self.output.end_file(end_time, final)
        meta = self._metadata(of, end_time, extra)
        try:
            self.spool.commit(of, meta)
        except SpoolFullError:
            self._spool_full(of.counters["packets_written"])
            return
        log.info("wrote %s: %d packets observed, %d written, %d bytes",
                 of.name, of.counters["packets_observed"], of.counters["packets_written"], meta["size"])
        if self.spool_full:
            self.spool_full = False  # space came back: the next file gets written again
        self._write_status("running")

    def _advance(self, now: float) -> None:
        self.now = now if self.now is None else max(self.now, now)
        if self.current is None:
            self._open(now)
        elif now >= self.boundary:
            self._rotate(self.boundary, now)
        self.output.advance(now)

    def _housekeeping(self) -> None:
        if self.rotate_requested and self.current is not None:
            t = max(self.now or time.time(), self.current.start_time)
            self._rotate(t, t)
        wall = time.monotonic()
        if self.notifier:
            self.notifier.watchdog()
        if wall - self.last_status >= 1.0:
            self.last_status = wall
            if self.notifier:
                self.notifier.status(self.status_line())
            self._write_status("running")
        if self.s.stats_interval and wall - self.last_stats >= self.s.stats_interval:
            self.last_stats = wall
            if self.current is not None:
                recv, drop, ifdrop = self.source.stats()
                self.current.stats_updates.append(dict(
                    time=utc_iso(time.time()), ps_recv=recv, ps_drop=drop, ps_ifdrop=ifdrop,
                    packets_observed=self.totals["packets_observed"],
                    bytes_observed=self.totals["bytes_observed"]))

    # ------------------------------------------------------------------ reporting
    def counters(self) -> dict:
        recv, drop, ifdrop = self.source.stats()
        return dict(self.totals, files_written=self.spool.files_written, ps_recv=recv,
                    ps_drop=drop, ps_ifdrop=ifdrop, spool_full=self.spool_full)

    def status_line(self) -> str:
        c = self.counters()
        keys = ("packets_observed", "bytes_observed", "packets_sampled", "bytes_sampled",
                "packets_written", "files_written", "ps_recv", "ps_drop", "ps_ifdrop")
        parts = [f"{k}={c[k]}" for k in keys]
        parts.append(f"malformed={c['malformed_packets']}")
        if c["packets_unwritten"]:
            parts.append(f"packets_unwritten={c['packets_unwritten']}")
        return " ".join(parts)

    def _write_status(self, state: str) -> None:
        self.spool.write_status(dict(self.counters(), state=state, experiment=self.s.experiment))

    def _static_metadata(self) -> dict:
        s = self.s
        import numpy
        return {
            "format": "gims-meta/1",
            "experiment": s.experiment, "site": s.site,
            "device": s.interface or None, "source_file": os.path.basename(s.read) if s.read else None,
            "device_name": s.device_name or platform.node(), "config_name": s.config_name,
            "data_type": self.output.data_type, "linktype": self.source.linktype,
            "snaplen": self.source.snaplen, "filter": s.effective_filter,
            "aggregation": s.aggregate, "rollover_seconds": s.rollover_seconds,
            "max_file_bytes": s.max_file_bytes,
            "software": {"gims": __version__, "python": platform.python_version(),
                         "numpy": numpy.__version__, "libpcap": libpcap_version()},
            "platform": {"system": platform.system(), "release": platform.release(),
                         "machine": platform.machine(), "node": platform.node()},
            "user_text": s.user_text,
        }

    def _metadata(self, of: OpenFile, end_time: float, extra: dict) -> dict:
        recv, drop, ifdrop = self.source.stats()
        c = of.counters
        meta = dict(self.static_meta)
        meta.update({
            "data_file": of.name,
            "start_time": utc_iso(of.start_time), "end_time": utc_iso(end_time),
            "first_packet_time": utc_iso(of.first_packet), "last_packet_time": utc_iso(of.last_packet),
            "sampling": dict(self.sampler.describe(), packets_before=c["packets_observed"],
                             packets_after=c["packets_sampled"]),
            "anonymization": dict(self.anonymizer.describe(), **self.anonymizer.counters())
                             if self.anonymizer else {"scheme": None, "key_fingerprint": None},
            "packets_observed": c["packets_observed"], "bytes_observed": c["bytes_observed"],
            "packets_sampled": c["packets_sampled"], "bytes_sampled": c["bytes_sampled"],
            "packets_written": c["packets_written"],
            "bytes_written": of.file.size,
            "malformed_packets": c["malformed_packets"],
            "wire_lengths_estimated": self.source.wirelen_estimated,
            "pcap_stats": {"ps_recv": recv, "ps_drop": drop, "ps_ifdrop": ifdrop},
            "stats_updates": of.stats_updates,
            "summary": {"packets_observed": c["packets_observed"], "packets_saved": c["packets_written"],
                        "bytes_observed": c["bytes_observed"]},
            "packets_unwritten_total": self.totals["packets_unwritten"],
            "recovered": False,
        })
        meta.update(extra)
        return meta
