"""Independent flow tools from Debian, driven for tests and the benchmark:
nfcapd/nfdump (collector and reader) and softflowd (an independent flow meter).

softflowd 1.1.0 quirk, seen here: with -r FILE it blocks in accept() on its control socket
before reading anything, and again after reading, with its flows unexported.
Each connection lets its main loop run once; the run after the end of the file exports every
flow and exits ("Shutting down after pcap EOF").  So: ask `softflowctl statistics` until it exits.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time


class Nfcapd:
    """nfcapd listening on 127.0.0.1:port, storing under dirpath."""

    def __init__(self, dirpath, port):
        self.dir = dirpath
        self.port = port
        os.makedirs(dirpath, exist_ok=True)
        self.proc = subprocess.Popen(["nfcapd", "-w", dirpath, "-p", str(port), "-b", "127.0.0.1",
                                      "-t", "3600", "-B", str(16 << 20)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RuntimeError(f"nfcapd did not start: {self.proc.stderr.read().decode()[-300:]}")

    def stop(self):
        """Stop it (SIGTERM makes nfcapd close its current file) and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def records(self):
        """Every flow record stored, as dicts from nfdump's CSV output."""
        files = [os.path.join(self.dir, f) for f in os.listdir(self.dir) if f.startswith("nfcapd.")]
        out = []
        for f in sorted(files):
            p = subprocess.run(["nfdump", "-r", f, "-q", "-o", "csv", "-N"], capture_output=True,
                               text=True, timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"nfdump -r {f}: {p.stderr.strip()}")
            for line in p.stdout.splitlines():
                c = line.split(",")
                if len(c) < 13 or not c[0][:1].isdigit():
                    continue
                out.append({"sa": c[3], "da": c[4], "sp": int(c[5]), "dp": c[6], "pr": c[7],
                            "ipkt": int(c[11]), "ibyt": int(c[12])})
        return out


def softflowd_cmd(pcap, port, ctl, pidfile, idle=300, active=1800, tcp_end=30):
    return ["softflowd", "-r", pcap, "-a", "-d", "-n", f"127.0.0.1:{port}", "-v", "10", "-6",
            "-T", "vlan", "-m", "2000000", "-c", ctl, "-p", pidfile,
            "-t", f"general={idle}", "-t", f"tcp={idle}", "-t", f"udp={idle}",
            "-t", f"icmp={idle}", "-t", f"maxlife={active}", "-t", f"tcp.fin={tcp_end}",
            "-t", f"tcp.rst={tcp_end}"]


def run_softflowd(pcap, port, workdir, timeout=600, **timeouts):
    """Run softflowd over pcap exporting IPFIX to 127.0.0.1:port; return seconds elapsed."""
    ctl = os.path.join(workdir, f"sf-{os.getpid()}.ctl")
    pidfile = os.path.join(workdir, f"sf-{os.getpid()}.pid")
    t0 = time.perf_counter()
    proc = subprocess.Popen(softflowd_cmd(pcap, port, ctl, pidfile, **timeouts),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(ctl):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"softflowd did not start: {proc.stdout.read().decode()[-400:]}")
            time.sleep(0.002)
        # each control connection lets its main loop run once; at the end of the file it
        # exports everything and exits ("Shutting down after pcap EOF")
        while proc.poll() is None and time.monotonic() < deadline:
            subprocess.run(["softflowctl", "-c", ctl, "statistics"], capture_output=True,
                           timeout=max(1.0, deadline - time.monotonic()))
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (ctl, pidfile):
            if os.path.exists(f):
                os.unlink(f)
