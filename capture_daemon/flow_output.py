"""`--aggregate flows`: the output format that meters flows and writes IPFIX files
(RFC 5655: a file is a sequence of IPFIX messages, templates first) and, optionally,
exports the same records to a collector.

Counting definitions (also in the metadata extras): packetDeltaCount counts the IP packets
(IPv4 or IPv6 header present) of the experiment after filter and sampling; octetDeltaCount is
IP-level bytes, the IP total length from the header (headers.iplen: IPv4 total length,
IPv6 payload length + 40), as RFC 7012 defines it, not the captured or wire length.
So the sum of octetDeltaCount over all records equals the sum of iplen over the sampled
IP packets, and the sum of packetDeltaCount their number; kept packets without an IP header
are counted in `non_ip_packets`.
"""
from __future__ import annotations

from typing import BinaryIO

import numpy as np

from capture_daemon import ipfix
from capture_daemon.flows import (END_ACTIVE, END_DETECTED, END_FORCED, END_IDLE,
                                  END_RESOURCES, FlowMeter)

_REASONS = {END_IDLE: "idle_timeout", END_ACTIVE: "active_timeout",
            END_DETECTED: "end_detected", END_FORCED: "forced_end",
            END_RESOURCES: "lack_of_resources"}
_FLUSH_RECORDS = 2048          # write a file message once this many records wait
_FLUSH_US = 1_000_000          # ... or once a second of packet time has passed
FLOW_BATCH_PACKETS = 8192      # packets per batch read for --aggregate flows (memory) ...
FLOW_CHUNK_BYTES = 1 << 20     # ... and savefile bytes per batch of the direct reader
_ENCODE_RECORDS = 8192         # records encoded at a time (IPv4 then IPv6 within each)


def _check_sampling(sampling):
    if sampling is None or sampling.get("type") in (None, "none"):
        return None
    kind = sampling.get("type")
    if kind == "everyN":
        n = int(sampling.get("n", 0))
        if n < 1:
            raise ValueError("everyN sampling needs n >= 1")
        return {"type": "everyN", "n": n}
    if kind in ("uniform", "uniformrandom"):
        p = float(sampling.get("p", -1))
        if not 0.0 < p <= 1.0:
            raise ValueError("uniform sampling needs 0 < p <= 1")
        return {"type": "uniform", "p": p}
    raise ValueError(f"unknown sampling type {kind!r}")


class FlowOutput:
    ext = "ipfix"
    data_type = "ipfix"

    def __init__(self, *, idle_timeout: float = 300.0, active_timeout: float = 1800.0,
                 max_flows: int = 1_000_000, sampling: dict | None = None,
                 export_url: str | None = None, observation_domain: int = 1,
                 biflow: bool = False, tcp_end_timeout: float = 30.0,
                 read_back_addresses: bool = True):
        self.sampling = _check_sampling(sampling)
        self.domain = int(observation_domain) & 0xFFFFFFFF
        self.biflow = bool(biflow)
        # an anonymizer rewrites the addresses in the packets after parse: read them back.
        # Without one (the CLI says so) the parsed header arrays are exact as they are.
        self.read_back = bool(read_back_addresses)
        self.meter = FlowMeter(idle_timeout=idle_timeout, active_timeout=active_timeout,
                               tcp_end_timeout=tcp_end_timeout, max_flows=max_flows,
                               biflow=biflow)
        self._settings = {"idle_timeout": float(idle_timeout),
                          "active_timeout": float(active_timeout),
                          "tcp_end_timeout": float(tcp_end_timeout),
                          "max_flows": int(max_flows)}
        # validate the URL now (a bad one is a configuration error), connect in the background
        if export_url is not None:
            ipfix.parse_export_url(export_url)
        self.exporter = (ipfix.Exporter(export_url, domain=self.domain, biflow=self.biflow,
                                        sampling=self.sampling)
                         if export_url else None)
        self._templates = ipfix.template_set(self.biflow, self.sampling is not None)
        self._f: BinaryIO | None = None
        self._session: ipfix.Session | None = None
        self._pending: list = []
        self._pending_n = 0
        self._now_us = None
        self._last_flush_us = None
        self._file = self._zero_file_counts()

    # ---- the output-format interface --------------------------------------------------------
    def start_file(self, f: BinaryIO, start_time: float) -> None:
        self._f = f
        self._session = ipfix.Session(self.domain)
        self._file = self._zero_file_counts()
        extra = ([ipfix.sampling_record(self.domain, self.sampling)]
                 if self.sampling is not None else [])
        for msg, _n in self._session.messages(extra, int(start_time), ipfix.MAX_MESSAGE,
                                              self._templates):
            f.write(msg)
            self._file["messages"] += 1

    def observe(self, batch) -> None:
        """Every observed packet, before sampling: flows only meter what was kept."""

    def add(self, batch, headers, keep: np.ndarray) -> None:
        ts = np.asarray(batch.ts_sec, dtype=np.int64) * 1_000_000 + np.asarray(batch.ts_usec,
                                                                                 dtype=np.int64)
        if len(ts) == 0:
            return
        self.meter.add(ts, headers, keep,
                       buf=getattr(batch, "buf", None) if self.read_back else None)
        latest = int(ts.max())
        if self._now_us is None or latest > self._now_us:
            self._now_us = latest
        # packet time moved on with this batch: expire what timed out (the pipeline calls
        # advance() only when no packets come)
        self.meter.advance(self._now_us)
        self._collect(force=False)

    def advance(self, now: float) -> None:
        now_us = int(round(float(now) * 1e6))
        if self._now_us is None or now_us > self._now_us:
            self._now_us = now_us
        self.meter.advance(self._now_us)
        self._collect(force=False)

    def end_file(self, end_time: float, final: bool) -> dict:
        if final:
            # a full table's records are encoded while the table empties, not all at once
            while not self.meter.flush_part(_ENCODE_RECORDS):
                self._collect(force=True, partial=True)
        self._collect(force=True)
        st = self.meter.stats
        fc = self._file
        extras = {
            "records": fc["records"],
            "packets": fc["packets"],
            "octets": fc["octets"],
            "messages": fc["messages"],
            "end_reasons": dict(fc["reasons"]),
            "active": self.meter.active_flows,
            "forced_expiries": st.forced_expiries,
            "flushed": bool(final),
            **self._settings,
            "direction": "biflow (RFC 5103)" if self.biflow else "unidirectional",
            "observation_domain": self.domain,
            "octets_definition": "IP total length (IPv4 total length, IPv6 payload length + 40)",
            "packets_definition": "IP packets after filter and sampling",
            "totals": {"packets_metered": st.packets, "octets_metered": st.octets,
                       "non_ip_packets": st.non_ip, "records": st.records},
            "sampling": self._sampling_meta(),
        }
        self._f = None          # closed by the spool; records wait for the next file
        if self.exporter is not None:
            if final:
                # give the collector a moment so the metadata tells what it got
                self.exporter.drain(timeout=5.0)
            extras["export"] = self.exporter.snapshot()
        return {"flows": extras}

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()

    # ---- internals ----------------------------------------------------------------------------
    @staticmethod
    def _zero_file_counts():
        return {"records": 0, "packets": 0, "octets": 0, "messages": 0,
                "reasons": {v: 0 for v in _REASONS.values()}}

    def _sampling_meta(self):
        if self.sampling is None:
            return {"type": "none", "renormalize_factor": 1.0}
        if self.sampling["type"] == "everyN":
            return {"type": "everyN", "n": self.sampling["n"],
                    "renormalize_factor": float(self.sampling["n"]),
                    "ipfix": "options template 260: samplingInterval, selectorAlgorithm 1"}
        return {"type": "uniform", "p": self.sampling["p"],
                "renormalize_factor": 1.0 / self.sampling["p"],
                "ipfix": "options template 260: samplingProbability, selectorAlgorithm 4"}

    def _collect(self, force: bool, partial: bool = False):
        """Write what waits.  partial: only whole chunks of _ENCODE_RECORDS, the rest waits
        (so the file is the same however the records arrived)."""
        rec = self.meter.take_records()
        if len(rec):
            self._pending.append(rec)
            self._pending_n += len(rec)
        if not self._pending:
            return
        now = self._now_us or 0
        if (not force and self._pending_n < _FLUSH_RECORDS and self._last_flush_us is not None
                and now - self._last_flush_us < _FLUSH_US):
            return
        if self._f is None and not force:
            return                       # no file open yet: keep the records for the next one
        self._last_flush_us = now
        pending = self._pending
        self._pending, self._pending_n = [], 0
        export_time = now // 1_000_000
        # encode at most _ENCODE_RECORDS records at a time: the end-of-input flush of a full
        # table would otherwise build the IPFIX copies of every flow at once
        parts, n = [], 0
        for rec in pending:
            i = 0
            while i < len(rec):
                k = min(len(rec) - i, _ENCODE_RECORDS - n)
                parts.append(rec[i:i + k])
                n += k
                i += k
                if n == _ENCODE_RECORDS:
                    self._write_records(parts[0] if len(parts) == 1 else np.concatenate(parts),
                                        export_time)
                    parts, n = [], 0
        if parts:
            rest = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if partial:
                self._pending, self._pending_n = [rest], len(rest)
            else:
                self._write_records(rest, export_time)

    def _write_records(self, rec, export_time):
        sets = ipfix.encode_records(rec, self.biflow)
        if self._f is not None:
            for msg, _n in self._session.messages(sets, export_time, ipfix.MAX_MESSAGE):
                self._f.write(msg)
                self._file["messages"] += 1
            fc = self._file
            fc["records"] += len(rec)
            fc["packets"] += int(rec["packets"].sum() + rec["rpackets"].sum())
            fc["octets"] += int(rec["octets"].sum() + rec["roctets"].sum())
            reasons, counts = np.unique(rec["reason"], return_counts=True)
            for r, c in zip(reasons.tolist(), counts.tolist()):
                fc["reasons"][_REASONS.get(r, str(r))] += c
        if self.exporter is not None:
            self.exporter.submit(sets, export_time)
