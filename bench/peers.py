#!/usr/bin/env python3
"""The tools the benchmark compares: gims-capture and its peers, one `Tool` per (path, program).

A Tool knows how to build its exact command line for an input trace and an empty output
directory, whether it can run here (and why not), and how to check afterwards that it really
processed the whole trace (so a tool that exits early never shows up as fast).

Run as a script, `peers.py pcapy-read FILE` is the pcapy-ng `next_batch` read baseline.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The checkout whose gims-capture is measured (run.py --gims-repo: another branch's worktree).
GIMS_REPO = os.environ.get("GIMS_BENCH_REPO") or REPO
HERE = os.path.dirname(os.path.abspath(__file__))

# Where a yaf built from a fetched source lives (outside the repository, never committed).
YAF_CANDIDATES = [os.environ.get("GIMS_BENCH_YAF", ""), "/work/peers/yaf-install/bin/yaf",
                  "/usr/local/bin/yaf", shutil.which("yaf") or ""]

# pktanon profile: HMAC-SHA1 of IPv4/IPv6 addresses, everything else kept. Payload is cut to
# zero bytes because pktanon 2~git20160407 segfaults on snaplen-truncated packets otherwise
# (seen here: AnonIdentity on the payload of the first truncated packet) -- so it does less
# work than a pcap-preserving anonymizer; the table says so.
PKTANON_PROFILE = """<?xml version="1.0" encoding="UTF-8"?>
<pktanon-config>
  <anonymizations>
    <packet protocol="ethernet">
      <field name="mac-source" anon="AnonIdentity"/>
      <field name="mac-dest" anon="AnonIdentity"/>
      <field name="ethertype" anon="AnonIdentity"/>
    </packet>
    <packet protocol="ip">
      <field name="tos" anon="AnonIdentity"/>
      <field name="identification" anon="AnonIdentity"/>
      <field name="flags" anon="AnonIdentity"/>
      <field name="fragment" anon="AnonIdentity"/>
      <field name="ttl" anon="AnonIdentity"/>
      <field name="protocol" anon="AnonIdentity"/>
      <field name="src-ip" anon="AnonHashHmacSha1" key="gims-bench"/>
      <field name="dest-ip" anon="AnonHashHmacSha1" key="gims-bench"/>
      <field name="options" anon="AnonIdentity"/>
    </packet>
    <packet protocol="ipv6">
      <field name="traffic-class" anon="AnonIdentity"/>
      <field name="flow-label" anon="AnonIdentity"/>
      <field name="hop-limit" anon="AnonIdentity"/>
      <field name="src-ip" anon="AnonHashHmacSha1" key="gims-bench"/>
      <field name="dest-ip" anon="AnonHashHmacSha1" key="gims-bench"/>
      <field name="next-header" anon="AnonIdentity"/>
    </packet>
    <packet protocol="tcp">
      <field name="source-port" anon="AnonIdentity"/>
      <field name="dest-port" anon="AnonIdentity"/>
      <field name="seq" anon="AnonIdentity"/>
      <field name="ack" anon="AnonIdentity"/>
      <field name="flags" anon="AnonIdentity"/>
      <field name="window-size" anon="AnonIdentity"/>
      <field name="urgent-pointer" anon="AnonIdentity"/>
      <field name="options" anon="AnonIdentity"/>
    </packet>
    <packet protocol="udp">
      <field name="source-port" anon="AnonIdentity"/>
      <field name="dest-port" anon="AnonIdentity"/>
    </packet>
    <packet protocol="icmp">
      <field name="type" anon="AnonIdentity"/>
      <field name="code" anon="AnonIdentity"/>
      <field name="rest" anon="AnonIdentity"/>
    </packet>
    <packet protocol="icmpv6">
      <field name="type" anon="AnonIdentity"/>
      <field name="code" anon="AnonIdentity"/>
      <field name="rest" anon="AnonIdentity"/>
      <field name="target-address" anon="AnonIdentity"/>
    </packet>
    <packet protocol="payload">
      <field name="payload" anon="AnonShorten" newlen="0"/>
    </packet>
  </anonymizations>
</pktanon-config>
"""


@dataclass
class Context:
    """What every command needs: the input, its packet count, the key, a UDP sink port."""
    trace: str
    packets: int
    workdir: str
    key_file: str
    sink_port: int = 0
    python: str = sys.executable


@dataclass
class Tool:
    path: int
    name: str
    build: Callable[[Context, str], list]          # (ctx, outdir) -> argv
    is_gims: bool = False
    requires: list = field(default_factory=list)   # executables that must exist
    verify: Optional[Callable[[Context, str, str], Optional[str]]] = None  # -> error or None
    note: str = ""
    env: dict = field(default_factory=dict)
    cwd: Optional[str] = None
    unavailable: Optional[str] = None              # set when it cannot run here (the reason)

    def check(self) -> Optional[str]:
        if self.unavailable:
            return self.unavailable
        for exe in self.requires:
            if not (os.path.isabs(exe) and os.access(exe, os.X_OK)) and not shutil.which(exe):
                return f"{exe} not installed"
        return None


# ---------------------------------------------------------------------------------------------
# gims-capture


def gims_available() -> Optional[str]:
    """None when gims-capture's entry point exists in this checkout, else why not."""
    if not os.path.exists(os.path.join(GIMS_REPO, "capture_daemon", "cli.py")):
        return "gims-capture not built yet (capture_daemon/cli.py missing)"
    return None


def gims_argv(ctx: Context, outdir: str, *extra: str) -> list:
    return [ctx.python, "-m", "capture_daemon.cli", "--read", ctx.trace, "--output-dir", outdir,
            "--experiment", "bench", "--site", "BENCH", "--rollover", "100000", *extra]


def gims_verify(ctx: Context, outdir: str, stderr: str) -> Optional[str]:
    """The run is real when its metadata says every packet of the trace was observed."""
    metas = glob.glob(os.path.join(outdir, "*.meta.json"))
    if not metas:
        return "no metadata record written"
    seen = 0
    for m in metas:
        with open(m) as f:
            seen += int(json.load(f).get("packets_observed", 0))
    if seen != ctx.packets:
        return f"metadata says {seen} packets observed, trace has {ctx.packets}"
    return None


def _gims(path: int, name: str, *extra: str, extra_fn=None) -> Tool:
    def build(ctx, outdir):
        more = list(extra) + (extra_fn(ctx) if extra_fn else [])
        return gims_argv(ctx, outdir, *more)
    return Tool(path, name, build, is_gims=True, verify=gims_verify, cwd=GIMS_REPO,
                env={"PYTHONPATH": GIMS_REPO}, unavailable=gims_available())


# ---------------------------------------------------------------------------------------------
# peers


def _file_nonempty(name: str):
    def verify(ctx, outdir, stderr):
        p = os.path.join(outdir, name)
        if not os.path.exists(p) or os.path.getsize(p) <= 24:
            return f"{name} missing or empty"
        return None
    return verify


def _tcpdump_read_all(ctx, outdir, stderr):
    # tcpdump -w prints nothing per packet; its savefile must hold every record.
    p = os.path.join(outdir, "out.pcap")
    if not os.path.exists(p):
        return "no output"
    return None


def _sha256_written(ctx, outdir, stderr):
    """The chained copy's digest line is there: the hash read the whole output."""
    missing = _tcpdump_read_all(ctx, outdir, stderr)
    if missing:
        return missing
    p = os.path.join(outdir, "out.pcap.sha256")
    line = open(p).read() if os.path.exists(p) else ""
    return None if re.match(r"[0-9a-f]{64} ", line) else "no sha256 line written"


def find_yaf() -> Optional[str]:
    for c in YAF_CANDIDATES:
        if c and os.access(c, os.X_OK):
            return c
    return None


def _yaf_tool() -> Tool:
    yaf = find_yaf()
    reason = None if yaf else ("not built (no yaf found: build yaf 2.x from a fetched source "
                              "against Debian's libfixbuf 2.4 and set GIMS_BENCH_YAF)")
    return Tool(3, "yaf", lambda ctx, o: [yaf, "--in", ctx.trace, "--out", os.path.join(o, "out.ipfix")],
                verify=_file_nonempty("out.ipfix"), unavailable=reason,
                note="yaf 2.x, uniflow, default timeouts (idle 300 s, active 1800 s)")


def _softflowd_verify(ctx, outdir, stderr):
    for line in stderr.splitlines():
        if line.strip().startswith("Packets processed:"):
            n = int(line.split(":")[1])
            return None if n == ctx.packets else f"softflowd processed {n} of {ctx.packets}"
    return "softflowd printed no statistics"


def _pcapy_verify(ctx, outdir, stderr):
    p = os.path.join(outdir, "count")
    n = int(open(p).read()) if os.path.exists(p) else -1
    return None if n == ctx.packets else f"read {n} of {ctx.packets} packets"


def tools() -> list:
    """Every (path, tool) the harness knows, in table order."""
    return [
        # 0: what reading alone costs in Python (the floor under every gims path).
        Tool(0, "pcapy-ng next_batch", lambda ctx, o: [ctx.python, os.path.join(HERE, "peers.py"),
                                                       "pcapy-read", ctx.trace, os.path.join(o, "count")],
             verify=_pcapy_verify, note="read only, 65536 packets per batch, no processing"),
        Tool(0, "gims OfflineSource", lambda ctx, o: [ctx.python, os.path.join(HERE, "peers.py"),
                                                      "gims-read", ctx.trace, os.path.join(o, "count")],
             verify=_pcapy_verify, cwd=GIMS_REPO, env={"PYTHONPATH": GIMS_REPO},
             unavailable=gims_available(),
             note="gims's batch source: the savefile read in 2 MiB chunks, records walked in C (_accel_read)"),
        Tool(0, "tcpdump -w /dev/null", lambda ctx, o: ["tcpdump", "-r", ctx.trace, "-w", "/dev/null"],
             requires=["tcpdump"]),
        # 1: pcap -> Crypto-PAn anonymized pcap.
        _gims(1, "gims-capture", extra_fn=lambda ctx: ["--anon-key-file", ctx.key_file]),
        Tool(1, "tcpdump copy", lambda ctx, o: ["tcpdump", "-r", ctx.trace, "-w", os.path.join(o, "out.pcap")],
             requires=["tcpdump"], verify=_tcpdump_read_all, note="plain copy, no anonymization"),
        Tool(1, "tcpdump copy + fsync",
             lambda ctx, o: ["sh", "-c", 'tcpdump -r "$1" -w "$2" && sync "$2"', "sh", ctx.trace,
                             os.path.join(o, "out.pcap")],
             requires=["tcpdump", "sync"], verify=_tcpdump_read_all,
             note="the copy made durable (coreutils sync FILE: fsync), as gims-capture makes "
                  "every file before it publishes it; informational, not the issue's peer"),
        Tool(1, "tcpdump copy + fsync + sha256",
             lambda ctx, o: ["sh", "-c",
                             'tcpdump -r "$1" -w "$2" && sync "$2" && openssl dgst -sha256 -r "$2" > "$2.sha256"',
                             "sh", ctx.trace, os.path.join(o, "out.pcap")],
             requires=["tcpdump", "sync", "openssl"], verify=_sha256_written,
             note="the copy with the integrity work gims-capture's metadata carries (a durable file "
                  "and the sha256 of its bytes) done by C tools in a chain; OpenSSL's sha256, as "
                  "gims's hashlib (SHA-NI here; coreutils' sha256sum has no SHA-NI and takes 4x "
                  "longer); informational, not the issue's peer, and still without anonymization"),
        Tool(1, "tcprewrite", lambda ctx, o: ["tcprewrite", "--seed=7", "--fixcsum", "-i", ctx.trace,
                                              "-o", os.path.join(o, "out.pcap")],
             requires=["tcprewrite"], verify=_file_nonempty("out.pcap"),
             note="random address remap (--seed) + checksum fix"),
        Tool(1, "pktanon", lambda ctx, o: ["pktanon", "-c", os.path.join(ctx.workdir, "pktanon-profile.xml"),
                                           ctx.trace, os.path.join(o, "out.pcap")],
             requires=["pktanon"], verify=_file_nonempty("out.pcap"),
             note="HMAC-SHA1 addresses; payload cut (segfaults on truncated packets otherwise)"),
        # 2: pcap -> 1-in-100 sampled pcap.
        _gims(2, "gims-capture", "--sample", "everyN:100"),
        Tool(2, "tcpdump copy", lambda ctx, o: ["tcpdump", "-r", ctx.trace, "-w", os.path.join(o, "out.pcap")],
             requires=["tcpdump"], verify=_tcpdump_read_all, note="plain copy (the issue's peer)"),
        # 3: pcap -> IPFIX flow file.
        _gims(3, "gims-capture", "--aggregate", "flows"),
        _yaf_tool(),
        Tool(3, "softflowd", lambda ctx, o: ["softflowd", "-d", "-r", ctx.trace, "-n",
                                             f"127.0.0.1:{ctx.sink_port}", "-v", "10", "-6",
                                             "-m", "1000000", "-c", "none",
                                             "-p", os.path.join(o, "softflowd.pid")],
             requires=["softflowd"], verify=_softflowd_verify,
             note="IPFIX over UDP to a local sink; -c none (Debian's 1.1.0 blocks in accept() "
                  "on its control socket once per batch when reading a file)"),
        # 4: pcap -> counts per second.
        _gims(4, "gims-capture", "--aggregate", "counts"),
        Tool(4, "tcpdump -w /dev/null", lambda ctx, o: ["tcpdump", "-r", ctx.trace, "-w", "/dev/null"],
             requires=["tcpdump"]),
    ]


def write_pktanon_profile(workdir: str) -> str:
    p = os.path.join(workdir, "pktanon-profile.xml")
    with open(p, "w") as f:
        f.write(PKTANON_PROFILE)
    return p


# ---------------------------------------------------------------------------------------------
# pcapy-ng read baseline


def pcapy_read(path: str) -> int:
    import pcapy
    r = pcapy.open_offline(path)
    n = 0
    while True:
        data, meta = r.next_batch(65536)
        if not meta:
            break
        n += len(meta) // 16        # pcapy-ng 2.1.0: 4 x uint32 per packet (sec, usec, offset, caplen)
    return n


def gims_read(path: str) -> int:
    """gims's own offline source (the next_batch wire-length workaround included), no processing."""
    sys.path.insert(0, GIMS_REPO)
    from capture_daemon.source import open_source
    src = open_source(read=path, interface=None)
    n = wire = 0
    try:
        for b in src.batches():
            if b is None:
                continue
            n += len(b)
            wire += int(b.wirelen.sum())
    finally:
        src.close()
    if wire <= 0:
        raise SystemExit("gims-read: no wire lengths")
    return n


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    readers = {"pcapy-read": pcapy_read, "gims-read": gims_read}
    if len(argv) >= 2 and argv[0] in readers:
        n = readers[argv[0]](argv[1])
        if len(argv) >= 3:
            with open(argv[2], "w") as f:
                f.write(str(n))
        print(n)
        return 0
    print("usage: peers.py pcapy-read|gims-read FILE [COUNT_FILE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
