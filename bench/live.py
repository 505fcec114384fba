"""Path 6: live capture on a veth pair — the highest offered rate each capturer takes with no drop.

A network namespace holds one end of a veth pair; tcpreplay, pinned to CPU 0, replays a
full-size generated trace (snaplen 1514) from there at a stepped packet rate, and the capturer,
pinned to CPU 1, captures on the host end: gims-capture with its full pipeline on (Crypto-PAn
anonymization, pcap output, snaplen 128) or `tcpdump -w` (snaplen 128). Drops are read from
the capturer itself (gims metadata pcap_stats.ps_drop; tcpdump's "dropped by kernel" line), and
a step only counts as clean when every sent packet was also captured. The rate tcpreplay really
achieved is the one reported (it can fall short of the one asked for). IPv6 is disabled on both
veth ends so the kernel adds no packets of its own.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cpulimit  # noqa: E402
import gen_trace  # noqa: E402
import peers  # noqa: E402

DEFAULT_RATES = [25_000, 50_000, 100_000, 200_000, 400_000, 0]   # 0: tcpreplay --topspeed
LIVE_TRACE_PACKETS = 300_000   # replayed in a loop as often as a step needs
SEND_SECONDS = 3.0          # each step offers rate * SEND_SECONDS packets (bounded below)


def _sh(*argv, check=True, **kw):
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kw)


class VethPair:
    """veth: host end `a` (captured on), peer end `b` inside netns `ns`; removed on close."""

    def __init__(self):
        tag = os.getpid() % 100000
        self.ns = f"gims-bench-{tag}"
        self.a, self.b = f"gbnA{tag}", f"gbnB{tag}"

    def __enter__(self):
        _sh("ip", "netns", "add", self.ns)
        try:
            _sh("ip", "link", "add", self.a, "type", "veth", "peer", "name", self.b)
            _sh("ip", "link", "set", self.b, "netns", self.ns)
            _sh("sysctl", "-q", "-w", f"net.ipv6.conf.{self.a}.disable_ipv6=1")
            _sh("ip", "netns", "exec", self.ns, "sysctl", "-q", "-w",
                f"net.ipv6.conf.{self.b}.disable_ipv6=1")
            _sh("ip", "link", "set", self.a, "up")
            _sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.b, "up")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        _sh("ip", "link", "del", self.a, check=False)
        _sh("ip", "netns", "del", self.ns, check=False)


def _wait_notify(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(0.2)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if b"READY=1" in sock.recv(4096):
                return True
        except socket.timeout:
            pass
    return False


def _gims_argv(ctx, iface, outdir, buffer_bytes=None, workers=1):
    argv = [ctx.python, "-m", "capture_daemon.cli", "--interface", iface, "--output-dir", outdir,
            "--experiment", "benchlive", "--site", "BENCH", "--snaplen", "128",
            "--anon-key-file", ctx.key_file, "--rollover", "100000"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    if buffer_bytes:
        # The kernel buffer is a capture setting without a flag: hand it over as a config file.
        conf = os.path.join(ctx.workdir, f"live-gims-{buffer_bytes}.json")
        with open(conf, "w") as f:
            json.dump({"buffer_bytes": int(buffer_bytes)}, f)
        argv += ["--config", conf]
    return argv


def _start_gims(ctx, iface, outdir, notify_path, buffer_bytes=None, workers=1, cpus="1",
                argv=None, env_extra=None):
    """argv: a command to run instead of _gims_argv's (bench/live_cpu.py wraps it)."""
    argv = argv or _gims_argv(ctx, iface, outdir, buffer_bytes, workers)
    env = {**os.environ, "PYTHONPATH": peers.GIMS_REPO, "NOTIFY_SOCKET": notify_path,
           **(env_extra or {})}
    p = subprocess.Popen(["taskset", "-c", cpus] + argv, cwd=peers.GIMS_REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return p, argv


def _finish(p, timeout=60.0):
    """Wait for a signalled capturer: (stderr text, CPU seconds of it and its reaped children).

    wait4() reports the child's user+system time including the workers it waited for (a
    --workers supervisor joins all of them), which Popen.communicate() would throw away.
    """
    import threading
    err = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    killer = threading.Timer(timeout, lambda: p.poll() is None and p.kill())
    killer.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        killer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5.0)
    return (err[0] if err else ""), ru.ru_utime + ru.ru_stime


def _gims_result(p, outdir):
    metas = glob.glob(os.path.join(outdir, "*.meta.json"))
    captured = drops = 0
    for m in metas:
        with open(m) as f:
            md = json.load(f)
        captured += int(md.get("packets_observed", 0))
        st = md.get("pcap_stats") or {}
        drops = max(drops, int(st.get("ps_drop") or 0) + int(st.get("ps_ifdrop") or 0))
    return (captured, drops) if metas else (None, None)


def _start_tcpdump(iface, outdir, buffer_bytes=None):
    argv = ["tcpdump", "-i", iface, "-s", "128", "-w", os.path.join(outdir, "out.pcap")]
    if buffer_bytes:
        argv[1:1] = ["-B", str(max(1, buffer_bytes // 1024))]      # tcpdump counts KiB
    p = subprocess.Popen(["taskset", "-c", "1"] + argv, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    return p, argv


def _tcpdump_result(stderr):
    cap = re.search(r"(\d+) packets? captured", stderr)
    drop = re.search(r"(\d+) packets? dropped by kernel", stderr)
    if not cap or not drop:
        return None, None
    return int(cap.group(1)), int(drop.group(1))


def _replay(veth, pcap, pps, count):
    rate = ["--topspeed"] if pps == 0 else ["--pps", str(pps)]
    argv = ["ip", "netns", "exec", veth.ns, "taskset", "-c", "0", "tcpreplay", "-i", veth.b,
            *rate, "--loop", "0", "-L", str(count), pcap]
    p = _sh(*argv, check=False)
    out = p.stdout + p.stderr
    sent = re.search(r"Actual: (\d+) packets", out)
    rate = re.search(r"Rated: [\d.]+ Bps, [\d.]+ Mbps, ([\d.]+) pps", out)
    return (int(sent.group(1)) if sent else None, float(rate.group(1)) if rate else None,
            argv, out if p.returncode else "")


def run(ctx, rates_arg: str, log, refine: int = 2, buffer_bytes: int | None = None,
        gims_workers: int = 1, gims_cpus: str = "1", with_tcpdump: bool = True,
        cpu_percent: float | None = None) -> dict:
    """Step the offered rate up for each capturer; report the best clean step.

    buffer_bytes: the kernel capture buffer for both capturers (None: each one's default).
    gims_workers > 1 runs gims-capture --workers N (PACKET_FANOUT), pinned to gims_cpus (a
    taskset list; tcpreplay stays on CPU 0, so "0,1" shares the sender's core).
    cpu_percent: once capturing, each capturer gets only this share of one core (a cgroup CPU
    quota, bench/cpulimit.py), so that the sender is no longer the limit."""
    if os.geteuid() != 0:
        return {"error": "needs root (network namespaces)", "lines": ["skipped: needs root"]}
    if cpu_percent is not None:
        why = cpulimit.available()
        if why:
            return {"error": f"CPU quota: {why}", "lines": [f"skipped: CPU quota: {why}"]}
    for exe in ("ip", "tcpreplay", "tcpdump", "taskset"):
        if not shutil.which(exe):
            return {"error": f"{exe} not installed", "lines": [f"skipped: {exe} not installed"]}
    rates = [int(x) for x in rates_arg.split(",") if x.strip()] if rates_arg else DEFAULT_RATES
    full = os.path.join(ctx.workdir, f"live-v{gen_trace.GENERATOR_VERSION}-full-1514.pcap")
    if not os.path.exists(full):
        tmp = full + f".{os.getpid()}.tmp"
        gen_trace.generate(tmp, LIVE_TRACE_PACKETS, LIVE_TRACE_PACKETS // 50, seed=3, snaplen=1514,
                           duration=60.0, start=1_700_000_000.0)
        os.replace(tmp, full)
    capturers = {"tcpdump -w": None}
    why_no_gims = peers.gims_available()
    if why_no_gims is None:
        capturers = {"gims-capture": None, "tcpdump -w": None}
    if not with_tcpdump and why_no_gims is None:
        capturers.pop("tcpdump -w")
    best = {name: None for name in capturers}
    steps = []
    commands = {}
    first_loss = {name: None for name in capturers}
    cpu_steps: dict[str, list] = {}

    def step(veth, name, pps):
        """One capture at one offered rate: (clean, achieved pps) or None if it did not start."""
        count = max(10_000, int((pps or 1_000_000) * SEND_SECONDS))
        outdir = tempfile.mkdtemp(prefix="live-", dir=ctx.workdir)
        notify_path = os.path.join(outdir, ".notify")
        nsock = None
        if name == "gims-capture":
            nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            nsock.bind(notify_path)
            p, argv = _start_gims(ctx, veth.a, outdir, notify_path, buffer_bytes,
                                  gims_workers, gims_cpus)
            ready = _wait_notify(nsock, 15.0)
        else:
            p, argv = _start_tcpdump(veth.a, outdir, buffer_bytes)
            time.sleep(1.0)            # tcpdump says "listening on" once the socket is bound
            ready = p.poll() is None
        commands[name] = [a.replace(outdir, "OUT") for a in argv]
        if ready and limit is not None:
            limit.add(p.pid)
        if not ready or p.poll() is not None:
            p.kill()
            err = p.communicate()[1][-300:]
            steps.append(f"{name}: did not start: {err.strip()}")
            shutil.rmtree(outdir, ignore_errors=True)
            if nsock:
                nsock.close()
            return None
        sent, achieved, rargv, rerr = _replay(veth, full, pps, count)
        commands["tcpreplay"] = rargv
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        err, cpu = _finish(p)
        if nsock:
            nsock.close()
        if name == "gims-capture":
            captured, drops = _gims_result(p, outdir)
        else:
            captured, drops = _tcpdump_result(err)
        shutil.rmtree(outdir, ignore_errors=True)
        clean = (sent is not None and captured is not None and drops == 0 and captured >= sent)
        steps.append(f"{name}: asked {pps or 'top speed'} pps, tcpreplay achieved "
                     f"{achieved if achieved is not None else '?'} pps, sent {sent}, "
                     f"captured {captured}, dropped {drops}, CPU {cpu:.2f} s "
                     f"({1e6 * cpu / captured if captured else float('nan'):.2f} µs/packet "
                     f"captured, start-up and idle included) -> {'clean' if clean else 'LOSS'}")
        cpu_steps.setdefault(name, []).append((captured or 0, cpu))
        log(f"path 6: {steps[-1]}")
        if rerr:
            steps.append(f"tcpreplay: {rerr.strip()[-200:]}")
        return clean, achieved

    with contextlib.ExitStack() as stack:
        veth = stack.enter_context(VethPair())
        limit = stack.enter_context(cpulimit.CpuLimit(cpu_percent)) if cpu_percent else None
        # The ladder: every capturer at each rate in turn, until its first lossy step.
        for pps in rates:
            for name in capturers:
                if capturers[name] == "stopped":
                    continue
                r = step(veth, name, pps)
                if r is None:
                    capturers[name] = "stopped"
                    continue
                clean, achieved = r
                if clean and achieved:
                    best[name] = max(best[name] or 0, achieved)
                elif not clean:
                    capturers[name] = "stopped"   # the steps above this one only lose more
                    first_loss[name] = achieved or pps
        # Then narrow the bracket [highest clean, first lossy] by bisection.
        for name in capturers:
            for _ in range(refine):
                lo, hi = best[name], first_loss[name]
                if not lo or not hi or hi <= lo * 1.1:
                    break
                r = step(veth, name, int((lo + hi) / 2))
                if r is None:
                    break
                clean, achieved = r
                if clean and achieved:
                    best[name] = max(best[name], achieved)
                else:
                    first_loss[name] = achieved or int((lo + hi) / 2)
    lines = [f"kernel capture buffer: {'each capturer default (gims 32 MiB, tcpdump 2 MiB)' if not buffer_bytes else f'{buffer_bytes} bytes for both'}"]
    if cpu_percent:
        lines.append(f"**CPU-restricted comparison**: once capturing, each capturer (every thread "
                     f"and process of it; one capturer at a time) ran in a cgroup limited to "
                     f"{cpulimit.CpuLimit(cpu_percent).describe()}; the rates below are what each "
                     f"takes on that budget, not on a whole core")
    lines += ["", "| capturer | highest clean rate (achieved pps) | lowest lossy rate |", "|---|---|---|"]
    for name, b in best.items():
        fl = first_loss.get(name)
        lines.append(f"| {name} | {'none clean' if b is None else f'{b:,.0f}'} | "
                     f"{'none lossy up to the top step' if fl is None else f'{fl:,.0f}'} |")
    if why_no_gims:
        lines.append(f"| gims-capture | skipped: {why_no_gims} |")
    g, t = best.get("gims-capture"), best.get("tcpdump -w")
    if why_no_gims is None and t:
        g = g or 0.0
        if first_loss.get("gims-capture") is None and first_loss.get("tcpdump -w") is None and g:
            lines.append(f"\nboth capturers clean up to tcpreplay's top speed ({g:,.0f} and {t:,.0f} "
                         "pps achieved): the sender is the limit here, not the capturers; no ratio")
        else:
            lines.append(f"\nratio gims / tcpdump: {g / t:.2f}× (target ≥ 1.0×); a capturer with no "
                         "lossy step may go higher than measured"
                         + (f"; CPU-restricted ({cpu_percent:g} % of a core each)" if cpu_percent else ""))
    if gims_workers > 1:
        lines.append(f"\ngims-capture ran with --workers {gims_workers} (PACKET_FANOUT), "
                     f"pinned to CPUs {gims_cpus}")
    for name, cs in cpu_steps.items():
        pk, sec = sum(c for c, _ in cs), sum(t for _, t in cs)
        if pk:
            lines.append(f"CPU per captured packet, {name}, all steps: {1e6 * sec / pk:.2f} µs "
                         f"({sec:.1f} s for {pk:,} packets)")
    lines.append("")
    lines += [f"- {s}" for s in steps]
    lines += [f"- command ({k}): `{' '.join(v)}`" for k, v in commands.items()]
    lines.append("- every step: capturer started (gims: waits for READY=1 on NOTIFY_SOCKET), "
                 f"tcpreplay sends max(10000, {SEND_SECONDS:g} s x rate) packets, 1 s pause, SIGINT")
    return {"best": best, "first_loss": first_loss, "steps": steps, "lines": lines,
            "cpu_steps": cpu_steps}
