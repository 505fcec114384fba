"""The capture pipeline: source → sample → parse → anonymize → output format → spool.

Everything here works on whole batches. Time for rotation comes from packet timestamps (so
an offline run gives the same files whatever the wall clock); a live capture that sees no
packets advances on the wall clock, so empty intervals still close a valid file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time

import numpy as np

from . import __version__
from .batch import Batch
from .parse import parse
from .source import PcapSource, libpcap_version
from .recovery import recover_one, recover_spool
from .spool import (LIVE_BACKLOG_BYTES, OFFLINE_BACKLOG_BYTES, OpenFile, Spool, SpoolGuard, is_space_error,
                    utc_iso)

log = logging.getLogger("gims-capture")

COUNTER_NAMES = ("packets_observed", "bytes_observed", "packets_sampled", "bytes_sampled",
                 "packets_written", "malformed_packets")


class Pipeline:
    def __init__(self, settings, source: PcapSource, output, sampler, anonymizer=None,
                 notifier=None, *, status_sink=None, fanout: dict | None = None):
        """status_sink(state, counters): where the counters go instead of .gims-status.json.

        A fan-out worker (capture_daemon.fanout) passes one that reports to its supervisor,
        which writes the single status file with the sum over workers; such a worker also
        shares the spool with its siblings, so it recovers only the files it tore itself
        (the supervisor recovers the spool once, before any worker starts).
        fanout: the group this pipeline captures in, copied into every metadata record.
        """
        self.s = settings
        self.source = source
        self.output = output
        self.sampler = sampler
        self.anonymizer = anonymizer
        self.notifier = notifier
        self.status_sink = status_sink
        self.fanout = fanout
        self.torn: list[tuple[str, str]] = []  # (temp path, final name) this process detached
        self.spool = Spool(settings.output_dir, settings.experiment, settings.site, output.ext,
                           LIVE_BACKLOG_BYTES if source.live else OFFLINE_BACKLOG_BYTES)
        self.current: OpenFile | None = None
        self.boundary = math.inf
        self.totals = dict.fromkeys(COUNTER_NAMES, 0)
        self.totals["packets_unwritten"] = 0
        self.pcap_base = (0, 0, 0)  # libpcap counters of earlier processes of this experiment
        self.stop_requested = False
        self.rotate_requested = False
        self.suspended: str | None = None  # "disk full" / "quota": counting, not writing
        self.last_resume_check = 0.0
        self.guard = SpoolGuard(settings.output_dir, settings.spool_quota_bytes)
        # Headers are parsed only where something reads them (anonymization, flows); a plain
        # pcap copy or counts never look inside packets, and report malformed_packets: null.
        self.output_reads_headers = getattr(output, "needs_headers", True)
        self.inspect_headers = anonymizer is not None or self.output_reads_headers
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
        if self.fanout is None:  # a fan-out worker's spool was recovered by its supervisor
            self._continue_counters()
            recovered = recover_spool(self.s.output_dir, self.spool.prefix, self.static_meta)
            self.spool.files_written += len(recovered)
        self.guard.ensure_reserve()
        # The status file is made now, while there is room: later it is rewritten in place,
        # which works on a full disk (Spool._write_status_now).
        self._write_status("running", wait=True)
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
            try:
                self._close_current(end, final=True)
            finally:
                self.spool.discard_prepared(wait=True)
            self.output.close()
            self._write_status("stopped")
        return self.totals

    def _process(self, batch: Batch) -> None:
        start = 0
        n = len(batch)
        while start < n:
            t0 = batch.time_at(start)
            if self.suspended:
                self._try_resume(t0)
            if self.current is None and not self.suspended:
                self._open(t0)
            if self.current is None:
                stop = n  # writing is suspended: the rest is counted, not written
            else:
                stop = batch.first_at_or_after(self.boundary, start)
                if stop == start:  # a packet at or past the boundary: rotate first
                    self._rotate(self.boundary, t0)
                    continue
            self._process_segment(batch, start, stop)
            start = stop
        last = batch.time_at(n - 1)
        self.now = last if self.now is None else max(self.now, last)

    def _process_segment(self, batch: Batch, start: int, stop: int) -> None:
        seg = batch.slice(start, stop)
        of = self.current
        n_obs = len(seg)
        bytes_obs = int(seg.wirelen.sum())
        self._count(of, "packets_observed", n_obs)
        self._count(of, "bytes_observed", bytes_obs)
        self.output.observe(seg)
        if of is not None:
            of.first_packet = seg.time_at(0) if of.first_packet is None else of.first_packet
            of.last_packet = seg.time_at(n_obs - 1)

        keep = self.sampler.select(n_obs)
        sub = seg if keep is None else seg.take(keep)
        if not len(sub):
            return
        self._count(of, "packets_sampled", len(sub))
        self._count(of, "bytes_sampled", int(sub.wirelen.sum()))
        if of is None or self.guard.over_quota(self._bytes_out()):
            if of is not None:
                self._suspend("quota")
            self.totals["packets_unwritten"] += len(sub)
            return
        headers = malformed = None
        if self.anonymizer is not None:
            sub.make_writable()
            if not self.output_reads_headers:  # parsed and anonymized in one pass
                malformed = self.anonymizer.apply_parsing(sub)
        if malformed is None and self.inspect_headers:
            headers = parse(sub)
            malformed = int(np.count_nonzero(headers.malformed))
            if self.anonymizer is not None:
                self.anonymizer.apply(sub, headers, np.ones(len(sub), dtype=bool))
        if malformed is not None:
            self._count(of, "malformed_packets", malformed)
        self._write(sub, headers)

    def _write(self, sub: Batch, headers) -> None:
        """Hand packets to the output format, cutting files at --max-file-bytes and stopping
        at the experiment's spool quota.

        Formats whose record sizes are known up front (pcap) are cut exactly; the others
        rotate as soon as a file has reached the limit (and meet the quota a batch late).
        """
        limit = self.s.max_file_bytes
        quota = self.s.spool_quota_bytes
        sizes = getattr(self.output, "record_sizes", None)
        while (limit or quota) and sizes is not None and len(sub) and self.current is not None:
            room_file = limit - self.current.file.size if limit else math.inf
            room_quota = quota - self.guard.usage(self._bytes_out()) if quota else math.inf
            cum = np.cumsum(sizes(sub))
            fit = int(np.searchsorted(cum, min(room_file, room_quota), side="right"))
            if fit >= len(sub):
                break
            if room_quota <= room_file:  # the quota binds: write what fits, count the rest
                if fit:
                    self._emit(sub.slice(0, fit), None)
                self.totals["packets_unwritten"] += len(sub) - fit
                self._suspend("quota")
                return
            if fit == 0 and self.current.counters["packets_written"] == 0:
                fit = 1  # a record larger than the limit still goes into a file of its own
            if fit:
                self._emit(sub.slice(0, fit), None)
                sub = sub.slice(fit, len(sub))
                headers = None  # formats with record_sizes do not read headers
            t = float(sub.times[0])
            self._rotate(t, t)
        if len(sub):
            self._emit(sub, headers)
        if limit and sizes is None and self.current is not None and self.current.file.size >= limit:
            t = float(sub.times[-1])
            self._rotate(t, t)

    def _bytes_out(self) -> int:
        """Bytes this process put into the spool so far (committed files, those being
        committed, the open one)."""
        return (self.spool.bytes_written + self.spool.committing_bytes
                + (self.current.file.size if self.current else 0))

    def _emit(self, part: Batch, headers) -> None:
        if self.current is None:
            self.totals["packets_unwritten"] += len(part)
            return
        try:
            self.output.add(part, headers, np.ones(len(part), dtype=bool))
        except OSError as exc:
            if not is_space_error(exc):
                raise
            self.totals["packets_unwritten"] += len(part)
            self._disk_full()
            return
        self._count(self.current, "packets_written", len(part))

    def _disk_full(self) -> None:
        """The spool's file system is full: stop writing, keep the partial file for recovery.

        The temp file stays where it is; once space returns, recovery cuts it at its last
        whole record and gives it a metadata record marked recovered (capture_daemon.recovery).
        """
        of, self.current = self.current, None
        if of is not None:
            of.file.detach()
            self._tear(of)
        self.spool.discard_prepared()
        self.suspended = "disk full"
        self.guard.release_reserve()
        log.error("spool %s is full: packets are counted but not written until space returns",
                  self.s.output_dir)

    def _tear(self, of: OpenFile) -> None:
        """of (detached) stays a temp file for recovery; what it held is now unknown past its
        last whole record: recovery tells."""
        self.torn.append((of.file.path, of.name))
        self.totals["packets_written"] -= of.counters["packets_written"]
        self.totals["packets_unwritten"] += of.counters["packets_written"]

    def _suspend(self, reason: str) -> None:
        """Close the current file cleanly and stop writing (the per-experiment quota)."""
        t = self.now if self.now is not None else time.time()
        self._close_current(t, final=False)
        self.spool.discard_prepared()
        if self.suspended is None:
            self.suspended = reason
            log.error("spool %s is over its quota of %d bytes: packets are counted but not "
                      "written until uploads make room", self.s.output_dir, self.s.spool_quota_bytes)

    def _try_resume(self, now: float) -> None:
        wall = time.monotonic()
        if wall - self.last_resume_check < 1.0:
            return
        self.last_resume_check = wall
        if self.suspended == "disk full":
            # Files still being committed in the background end first (committed or torn):
            # recovery must not take a temp file its committer is still writing, nor the empty
            # one made ahead for the next file.
            self._collect_commits(wait=True)
            self.spool.discard_prepared(wait=True)
            # Give the torn file its whole records and a metadata record first, so the
            # uploader can ship it and free its space. This needs only a page or two; if
            # even that fails, it is tried again a second later (recovery is idempotent).
            try:
                recovered = self._recover_torn()
            except OSError as exc:
                if not is_space_error(exc):
                    raise
                recovered = []
            self.spool.files_written += len(recovered)
            packets = sum(_recovered_packets(p) for p in recovered)
            self.totals["packets_written"] += packets
            self.totals["packets_unwritten"] -= packets
        if not self.guard.can_resume(self.suspended):
            return
        log.info("spool %s has room again: writing resumes", self.s.output_dir)
        self.suspended = None
        self.guard.ensure_reserve()

    def _recover_torn(self) -> list[str]:
        if self.fanout is None:
            return recover_spool(self.s.output_dir, self.spool.prefix, self.static_meta)
        # Siblings write into the same spool: their open temp files are not torn, so only
        # the files this worker detached are recovered here.
        recovered = []
        while self.torn:
            tmp, final = self.torn[0]
            if os.path.exists(tmp):
                path = recover_one(self.s.output_dir, tmp, final, self.static_meta)
                if path:
                    recovered.append(path)
            self.torn.pop(0)
        return recovered

    def _count(self, of: OpenFile | None, name: str, value: int) -> None:
        if of is not None:
            of.counters[name] += value
        self.totals[name] += value

    # ------------------------------------------------------------------ files and rotation
    def _interval_end(self, t: float) -> float:
        r = self.s.rollover_seconds
        if not r:
            return math.inf
        return (math.floor(t / r) + 1) * r

    def _open(self, t: float) -> None:
        if self.suspended:
            return
        try:
            self.current = self.spool.open(t)
            self.boundary = self._interval_end(t)
            self.output.start_file(self.current.file, t)
            if self.source.live and self.boundary != math.inf:
                # the next file made ahead, so that the rotation waits for no disk
                self.spool.prepare(self.boundary)
        except OSError as exc:
            if not is_space_error(exc):
                raise
            self._disk_full()

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
            if self.current is not None:
                self._close_current(gap_end, final=False)
            self._open(gap_end)
        else:
            self._open(end_time if next_time >= end_time else next_time)
        self.rotate_requested = False

    def _close_current(self, end_time: float, final: bool) -> None:
        """Close the file being written: at a rotation it is committed in the background
        (Spool.commit_later, outcome in _collect_commits); the last one (final) after every
        earlier one, before this returns."""
        if final:
            self._collect_commits(wait=True)
        of = self.current
        if of is None:
            if not (final and self.spool.files_written == 0 and not self.suspended):
                return
            # A capture that saw nothing still leaves one valid, empty file behind.
            self._open(end_time)
            of = self.current
            if of is None:
                return
        end_time = max(end_time, of.last_packet or end_time, of.start_time)
        try:
            extra = self.output.end_file(end_time, final)
            meta = self._metadata(of, end_time, extra)
            if not final:
                self.spool.commit_later(of, meta)
                return
            self.spool.commit(of, meta)
        except OSError as exc:
            if not is_space_error(exc):
                raise
            self._disk_full()
            return
        finally:
            self.current = None
        self._written(of)

    def _written(self, of: OpenFile) -> None:
        log.info("wrote %s: %d packets observed, %d written, %d bytes",
                 of.name, of.counters["packets_observed"], of.counters["packets_written"], of.file.size)
        self._write_status("running")

    def _collect_commits(self, wait: bool = False) -> None:
        """The outcomes of the files committed in the background: each logged, or, where the
        disk was full, the file left torn for recovery and writing suspended (_disk_full)."""
        for of, result in self.spool.committed(wait):
            if not isinstance(result, BaseException):
                self._written(of)
            elif isinstance(result, OSError) and is_space_error(result):
                self._tear(of)
                if self.suspended != "disk full":
                    self._disk_full()
            else:
                raise result

    def _advance(self, now: float) -> None:
        self.now = now if self.now is None else max(self.now, now)
        if self.suspended:
            self._try_resume(now)
        if self.current is None:
            self._open(now)
        elif now >= self.boundary:
            self._rotate(self.boundary, now)
        self.output.advance(now)

    def _housekeeping(self) -> None:
        self._collect_commits()
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
    def _continue_counters(self) -> None:
        """Carry the experiment's counters over from the previous capture process.

        A paused and resumed (or restarted) experiment is one experiment to its AM: its
        totals, libpcap's included, continue from what the last process reported in
        .gims-status.json rather than starting again from zero.
        """
        try:
            with open(os.path.join(self.s.output_dir, ".gims-status.json"), encoding="utf-8") as fh:
                previous = json.load(fh)
        except (OSError, ValueError):
            return
        if not isinstance(previous, dict) or previous.get("experiment") != self.s.experiment:
            return
        def number(key):
            v = previous.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0
        for key in self.totals:
            self.totals[key] += number(key)
        self.spool.files_written += number("files_written")
        self.pcap_base = tuple(number(k) for k in ("ps_recv", "ps_drop", "ps_ifdrop"))

    def counters(self) -> dict:
        recv, drop, ifdrop = (a + b for a, b in zip(self.source.stats(), self.pcap_base))
        return dict(self.totals, files_written=self.spool.files_written, ps_recv=recv,
                    ps_drop=drop, ps_ifdrop=ifdrop, writing_suspended=self.suspended)

    def status_line(self) -> str:
        return status_line(self.counters())

    def _write_status(self, state: str, wait: bool | None = None) -> None:
        """wait: see Spool.write_status."""
        if self.status_sink is not None:
            self.status_sink(state, self.counters())
            return
        self.spool.write_status(dict(self.counters(), state=state, experiment=self.s.experiment),
                                wait)

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
                         "numpy": numpy.__version__,
                         "libpcap": libpcap_version(live=self.source.live)},
            "platform": {"system": platform.system(), "release": platform.release(),
                         "machine": platform.machine(), "node": platform.node()},
            "user_text": s.user_text,
            "fanout": self.fanout,
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
            "malformed_packets": c["malformed_packets"] if self.inspect_headers else None,
            "headers_inspected": self.inspect_headers,
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


def status_line(c: dict) -> str:
    """The sd_notify STATUS= text: key=value pairs from a counters() dict."""
    keys = ("packets_observed", "bytes_observed", "packets_sampled", "bytes_sampled",
            "packets_written", "files_written", "ps_recv", "ps_drop", "ps_ifdrop")
    parts = [f"{k}={c[k]}" for k in keys]
    parts.append(f"malformed={c['malformed_packets']}")
    if c["packets_unwritten"]:
        parts.append(f"packets_unwritten={c['packets_unwritten']}")
    if c.get("writing_suspended"):
        parts.append(f"suspended={c['writing_suspended'].replace(' ', '_')}")
    return " ".join(parts)


def _recovered_packets(path: str) -> int:
    import json
    try:
        with open(path + ".meta.json", encoding="utf-8") as fh:
            return int(json.load(fh).get("packets_written") or 0)
    except (OSError, ValueError):
        return 0
