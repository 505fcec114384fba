"""Path 6 at one steady rate: a capturer's CPU per packet while tcpreplay sends, and profiles.

bench/live.py steps the rate up to find drops and counts the capturer's CPU over its whole
life (start-up and idle included). This measures the steady state instead: the capturer's
user + system CPU time (/proc/PID/stat, all its threads) read just before and just after
tcpreplay sends, divided by the packets sent; start-up, the idle pause and shutdown are not
counted. Same veth pair, trace, pinning (tcpreplay on CPU 0, capturer on CPU 1) and gims
command as live.py.

    python bench/live_cpu.py --rate 300000 --seconds 3 [--capturer gims|tcpdump]
        [--gims-repo DIR] [--perf FILE] [--pyspy FILE] [--batch-stats]

--perf runs `perf record -g` on the capturer during the send window, --pyspy `py-spy record`
(raw collapsed stacks); a profiled run's CPU figure includes the profiler's disturbance.
--batch-stats (gims only) records how many packets each read (pcap_dispatch, or next_batch
without _accel_live) returned and how many each batch handed to the pipeline held, and prints
their distribution.

--freeze-for S [--freeze-after T] stalls the disk under the capture: the file system holding
--workdir (which must be a mount point of its own, never /) is frozen with fsfreeze T seconds
(default 1) after sending starts, for S seconds, then thawed; "dropped" then says what the
stall cost. For example, on a throwaway ext4 (as docs/PERFORMANCE.md, fifth pass):

    truncate -s 3G /var/tmp/fs.img && mkfs.ext4 -q -F /var/tmp/fs.img
    mkdir -p /mnt/gfs && mount -o loop /var/tmp/fs.img /mnt/gfs
    cp /var/tmp/gims-bench/live-v2-full-1514.pcap /var/tmp/gims-bench/bench-cryptopan.key /mnt/gfs/
    python bench/live_cpu.py --rate 300000 --seconds 5 --workdir /mnt/gfs --freeze-after 2.5 \
        --freeze-for 1.5 [--capturer tcpdump]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import cpulimit  # noqa: E402
import live  # noqa: E402
import peers  # noqa: E402
from run import DEFAULT_WORKDIR, ensure_key  # noqa: E402

# Runs gims-capture with counting wrappers around next_batch and the source's batches();
# the counts go to $GIMS_BATCH_STATS as JSON at exit. Bench-only: nothing of it is in gims.
BATCH_STATS_RUNNER = r"""
import atexit, json, os, sys
import capture_daemon.coalesce as coalesce
import capture_daemon.source as source
calls, batches = [], []
# the C reader (_accel_live): each RecordReads.read is one pcap_dispatch
read = coalesce.RecordReads.read
def counting_read(self):
    got = read(self)
    calls.append(got)
    return got
coalesce.RecordReads.read = counting_read
class Counting:
    def __init__(self, handle): self._h = handle
    def __getattr__(self, name): return getattr(self._h, name)
    def next_batch(self, n):
        data, meta = self._h.next_batch(n)
        calls.append(len(meta) // 16)
        return data, meta
init = source.PcapSource.__init__
def counting_init(self, handle, *a, **kw):
    init(self, Counting(handle), *a, **kw)
source.PcapSource.__init__ = counting_init
orig = source.LiveSource.batches
def counting_batches(self):
    for b in orig(self):
        batches.append(0 if b is None else len(b))
        yield b
source.LiveSource.batches = counting_batches
@atexit.register
def dump():
    with open(os.environ["GIMS_BATCH_STATS"], "w") as f:
        json.dump({"reads": calls, "batches": batches}, f)
from capture_daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cpu_seconds(pid: int) -> tuple[float, float, int]:
    """(user, system) CPU seconds of a process, all its threads, and its minor page faults."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def distribution(values: list[int]) -> str:
    nonzero = sorted(v for v in values if v)
    if not nonzero:
        return f"{len(values)} calls, none with packets"
    q = lambda p: nonzero[min(len(nonzero) - 1, int(p * len(nonzero)))]  # noqa: E731
    return (f"{len(values)} calls, {len(values) - len(nonzero)} empty; packets per non-empty "
            f"call: mean {sum(nonzero) / len(nonzero):.0f}, p10 {q(0.1)}, median {q(0.5)}, "
            f"p90 {q(0.9)}, max {nonzero[-1]}")


@contextlib.contextmanager
def frozen_later(mount: str, after: float, seconds: float):
    """Freeze the file system at mount (fsfreeze) `after` seconds from now, for `seconds`; it is
    thawed when the block ends at the latest."""
    done = threading.Event()

    def stall():
        if done.wait(after):
            return
        subprocess.run(["fsfreeze", "-f", mount], check=True)
        try:
            done.wait(seconds)
        finally:
            subprocess.run(["fsfreeze", "-u", mount], check=False)

    t = threading.Thread(target=stall, daemon=True)
    t.start()
    try:
        yield
    finally:
        t.join()  # the stall runs its course: the capture's result includes all of it
        done.set()
        subprocess.run(["fsfreeze", "-u", mount], capture_output=True, check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=300_000, help="packets/s, 0: tcpreplay --topspeed")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--capturer", choices=("gims", "tcpdump"), default="gims")
    ap.add_argument("--gims-repo", default=None)
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--perf", metavar="FILE", help="perf record -g output (perf.data)")
    ap.add_argument("--pyspy", metavar="FILE", help="py-spy raw output")
    ap.add_argument("--batch-stats", action="store_true")
    ap.add_argument("--cpu-quota", type=float, default=None, metavar="PERCENT",
                    help="limit the capturer to this share of one core once it captures "
                         "(bench/cpulimit.py); at a rate above what that share takes, packets "
                         "captured per second of sending measure its capacity on the budget")
    ap.add_argument("--freeze-for", type=float, default=None, metavar="S",
                    help="freeze the file system of --workdir (a mount point) for S seconds "
                         "while sending: a disk that stalls")
    ap.add_argument("--freeze-after", type=float, default=1.0, metavar="T",
                    help="seconds after sending starts (with --freeze-for)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for gims-capture (experiments, e.g. PYTHONPATH)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    if a.freeze_for is not None and (os.path.realpath(a.workdir) == "/" or not os.path.ismount(a.workdir)):
        sys.exit(f"--freeze-for needs --workdir to be a mount point of its own (not /): {a.workdir}")
    if a.gims_repo:
        peers.GIMS_REPO = os.path.abspath(a.gims_repo)
    ctx = peers.Context(trace="", packets=0, workdir=a.workdir, key_file=ensure_key(a.workdir))
    trace = os.path.join(a.workdir, f"live-v{live.gen_trace.GENERATOR_VERSION}-full-1514.pcap")
    if not os.path.exists(trace):
        sys.exit(f"{trace} missing: run bench/run.py --paths 6 once to generate it")
    count = max(10_000, int((a.rate or 350_000) * a.seconds))
    outdir = tempfile.mkdtemp(prefix="livecpu-", dir=a.workdir)
    stats_file = os.path.join(outdir, ".batch-stats.json")
    with contextlib.ExitStack() as stack:
        veth = stack.enter_context(live.VethPair())
        limit = stack.enter_context(cpulimit.CpuLimit(a.cpu_quota)) if a.cpu_quota else None
        if a.capturer == "gims":
            notify_path = os.path.join(outdir, ".notify")
            nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            nsock.bind(notify_path)
            argv = live._gims_argv(ctx, veth.a, outdir)
            if a.batch_stats:  # the same flags, through the counting runner
                argv = [ctx.python, "-c", BATCH_STATS_RUNNER] + argv[3:]
            p, argv = live._start_gims(ctx, veth.a, outdir, notify_path, argv=argv,
                                       env_extra={"GIMS_BATCH_STATS": stats_file,
                                                  **dict(e.split("=", 1) for e in a.env)})
            if not live._wait_notify(nsock, 15.0):
                p.kill()
                sys.exit(f"gims did not start: {p.communicate()[1][-500:]}")
            nsock.close()
        else:
            p, argv = live._start_tcpdump(veth.a, outdir)
            time.sleep(1.0)
        if limit is not None:
            limit.add(p.pid)
        profilers = []
        if a.perf:
            profilers.append(subprocess.Popen(["perf", "record", "-g", "-q", "-o", a.perf,
                                               "-p", str(p.pid)], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        if a.pyspy:
            pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")
            profilers.append(subprocess.Popen([pyspy, "record", "--pid", str(p.pid), "-r", "250",
                                               "-f", "raw",
                                               "-o", a.pyspy], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        if profilers:
            time.sleep(1.0)
        if a.freeze_for is not None:
            stack.enter_context(frozen_later(a.workdir, a.freeze_after, a.freeze_for))
        cpu0 = cpu_seconds(p.pid)
        t0 = time.monotonic()
        sent, achieved, rargv, rerr = live._replay(veth, trace, a.rate, count)
        cpu1 = cpu_seconds(p.pid)
        window = time.monotonic() - t0
        for prof in profilers:
            prof.send_signal(signal.SIGINT)
        for prof in profilers:
            prof.wait(timeout=60)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        err, total_cpu = live._finish(p)
    if a.capturer == "gims":
        captured, drops = live._gims_result(p, outdir)
    else:
        captured, drops = live._tcpdump_result(err)
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cpu = user + system
    result = {"capturer": a.capturer, "asked_pps": a.rate, "achieved_pps": achieved, "sent": sent,
              "captured": captured, "dropped": drops, "window_s": round(window, 3),
              "cpu_window_s": round(cpu, 3),
              "user_s": round(user, 3), "system_s": round(system, 3),
              "minor_faults": cpu1[2] - cpu0[2], "cpu_total_s": round(total_cpu, 3),
              "us_per_packet_window": round(1e6 * cpu / sent, 3) if sent else None,
              "cpu_quota": limit.describe() if limit else None,
              "disk_frozen": ({"after_s": a.freeze_after, "for_s": a.freeze_for}
                              if a.freeze_for is not None else None),
              "capturer_cmd": " ".join(argv).replace(outdir, "OUT"),
              "sender_cmd": " ".join(rargv)}
    print(json.dumps(result, indent=1))
    if rerr:
        print("tcpreplay:", rerr[-300:])
    if a.batch_stats and os.path.exists(stats_file):
        with open(stats_file) as f:
            st = json.load(f)
        print("reads (pcap_dispatch, or next_batch without _accel_live):", distribution(st["reads"]))
        print("batches to the pipeline:", distribution(st["batches"]))
    subprocess.run(["rm", "-rf", outdir])
    return 0


if __name__ == "__main__":
    sys.exit(main())
