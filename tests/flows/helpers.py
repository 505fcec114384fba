"""Shared helpers for the flow tests: run FlowOutput over a pcap, read IPFIX with real tools."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess

import numpy as np

from capture_daemon import parse
from capture_daemon.flow_output import FlowOutput
from capture_daemon.source import OfflineSource

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRACES = sorted(glob.glob(os.path.join(REPO, "tests", "data", "*.pcap")))


def have(tool):
    return shutil.which(tool) is not None


def free_port(kind=socket.SOCK_DGRAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def meter_pcap(path, out_path, *, every_n=None, **kw):
    """pcap → IPFIX file through OfflineSource + parse + FlowOutput (the pipeline's order:
    sample, then meter).  Returns (extras, expected) where expected holds what went in after
    sampling, counted from parse's headers: IP packets and the sum of their iplen."""
    src = OfflineSource(path)
    sampling = {"type": "everyN", "n": every_n} if every_n else None
    fo = FlowOutput(sampling=sampling, **kw)
    exp = {"packets": 0, "octets": 0, "seen": 0}
    seen = 0
    with open(out_path, "wb") as f:
        first = True
        last = 0.0
        for batch in src.batches():
            if batch is None or len(batch) == 0:
                continue
            if first:
                fo.start_file(f, float(batch.ts_sec[0]))
                first = False
            h = parse.parse(batch)
            keep = np.ones(len(batch), dtype=bool)
            if every_n:
                idx = seen + np.arange(len(batch))
                keep = (idx % every_n) == every_n - 1
            seen += len(batch)
            ip = keep & (h.ipver > 0)
            exp["packets"] += int(ip.sum())
            exp["octets"] += int(h.iplen[ip].sum())
            fo.add(batch, h, keep)
            last = float(batch.ts_sec[-1]) + batch.ts_usec[-1] * 1e-6
            fo.advance(last)
        if first:
            fo.start_file(f, 0.0)
        extras = fo.end_file(last, final=True)
    fo.close()
    src.close()
    exp["seen"] = seen
    return extras["flows"], exp


def ipfixdump(path):
    """Run ipfixDump over a file: (returncode, stdout, stderr)."""
    p = subprocess.run(["ipfixDump", "--in", path, "--out", "-"], capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def tshark_sums(path):
    """(records, packets, octets) summed by tshark's IPFIX decoder over an IPFIX file."""
    p = subprocess.run(["tshark", "-r", path, "-T", "fields", "-E", "separator=;",
                        "-e", "cflow.packets", "-e", "cflow.octets", "-e", "_ws.malformed"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    recs = pk = oc = 0
    malformed = 0
    for line in p.stdout.splitlines():
        parts = line.split(";")
        if parts[0]:
            vals = [int(v) for v in parts[0].split(",")]
            recs += len(vals)
            pk += sum(vals)
        if len(parts) > 1 and parts[1]:
            oc += sum(int(v) for v in parts[1].split(","))
        if len(parts) > 2 and parts[2]:
            malformed += 1
    return recs, pk, oc, malformed
