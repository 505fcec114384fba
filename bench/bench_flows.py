#!/usr/bin/env python3
"""pcap → IPFIX flow file: gims-capture vs softflowd (and yaf when built), same input, same run.

    python bench/bench_flows.py [--packets N] [--flows F] [--rounds R] [--pcap FILE] [--yaf PATH]

Generates a deterministic trace (tests/flows/gen_trace.py: Ethernet, ~15 % IPv6, heavy-tailed
flows, snaplen 128) unless --pcap is given, then runs the tools in alternation, R rounds, and
prints packets/s per tool, the median of the pairwise ratios (gims / peer, same round) and
peak RSS, with the exact commands.  Timings are wall-clock of the whole process (start-up
included), one process at a time.

softflowd (Debian 1.1.0) exports to a local UDP port where nothing listens (its cost of
sending is paid, the datagrams are refused); it only reads a file while its control socket is
being poked, see tests/flows/peers.py.  yaf is not in Debian: pass --yaf /path/to/yaf if you
built it from a fetched source outside the repository; the table says when it was not run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.flows.helpers import free_port  # noqa: E402
from tests.flows.peers import softflowd_cmd  # noqa: E402


def timed(cmd, **kw):
    """Run cmd; (seconds, peak RSS in MiB of the child)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    _, status, ru = os.wait4(p.pid, 0)
    el = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr.read().decode()[-500:]}")
    return el, ru.ru_maxrss / 1024


def run_gims(pcap, work):
    out = tempfile.mkdtemp(dir=work, prefix="gims-out-")
    cmd = [sys.executable, "-m", "capture_daemon.cli", "--read", pcap, "--output-dir", out,
           "--aggregate", "flows", "--rollover", "0"]
    el, rss = timed(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    shutil.rmtree(out)
    return el, rss, " ".join(cmd[1:])


def run_softflowd(pcap, work):
    ctl = os.path.join(work, "sf.ctl")
    pidf = os.path.join(work, "sf.pid")
    cmd = softflowd_cmd(pcap, free_port(), ctl, pidf)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(ctl):
        time.sleep(0.001)
    rus = None
    while True:
        subprocess.run(["softflowctl", "-c", ctl, "statistics"], capture_output=True)
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            rus = ru
            break
        time.sleep(0.01)
    el = time.perf_counter() - t0
    for f in (ctl, pidf):
        if os.path.exists(f):
            os.unlink(f)
    return el, rus.ru_maxrss / 1024, " ".join(cmd)


def run_yaf(yaf, pcap, work):
    out = os.path.join(work, "yaf.ipfix")
    cmd = [yaf, "--in", pcap, "--out", out, "--idle-timeout", "300", "--active-timeout", "1800"]
    el, rss = timed(cmd)
    os.unlink(out)
    return el, rss, " ".join(cmd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=5_000_000)
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pcap")
    ap.add_argument("--yaf", default=shutil.which("yaf"))
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix=f"gims-bench-flows-{os.getpid()}-", dir="/var/tmp")
    try:
        pcap = a.pcap
        if not pcap:
            pcap = os.path.join(work, "trace.pcap")
            # in a child process: a forked child's peak RSS starts at its parent's size
            subprocess.run([sys.executable, "-m", "tests.flows.gen_trace", pcap, str(a.packets),
                            str(a.flows), "1"], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, PYTHONPATH=REPO))
        n = a.packets
        if a.pcap:
            out = subprocess.run(["capinfos", "-c", "-M", pcap], capture_output=True, text=True).stdout
            n = int(out.split("Number of packets:")[1].split()[0])
        tools = {"gims": lambda: run_gims(pcap, work)}
        if shutil.which("softflowd"):
            tools["softflowd"] = lambda: run_softflowd(pcap, work)
        if a.yaf:
            tools["yaf"] = lambda: run_yaf(a.yaf, pcap, work)
        res = {k: [] for k in tools}
        cmds = {}
        for r in range(a.rounds):
            order = list(tools) if r % 2 == 0 else list(tools)[::-1]
            for k in order:
                el, rss, cmd = tools[k]()
                res[k].append((el, rss))
                cmds[k] = cmd
        print(f"input: {pcap} ({n} packets), {a.rounds} rounds, alternating; {os.cpu_count()} cores")
        print(f"{'tool':10s} {'packets/s (median)':>20s} {'peak RSS MiB':>13s} {'gims/peer (median of rounds)':>30s}")
        for k in tools:
            pps = statistics.median(n / el for el, _ in res[k])
            rss = max(r for _, r in res[k])
            ratio = ("" if k == "gims" else
                     f"{statistics.median(g[0] and p[0] / g[0] for g, p in zip(res['gims'], res[k])):.2f}x")
            print(f"{k:10s} {pps:20,.0f} {rss:13.0f} {ratio:>30s}")
        if "yaf" not in tools:
            print("yaf: not run (not built here; pass --yaf PATH)")
        for k, c in cmds.items():
            print(f"  {k}: {c}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
