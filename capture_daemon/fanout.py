"""Multi-core live capture: a supervisor and N workers sharing one interface (PACKET_FANOUT).

``gims-capture --interface IF --workers N`` runs this module: the process systemd started
becomes a small supervisor that owns nothing on the capture path. It

- recovers the spool once (workers share it, so none of them may take a sibling's open temp
  file for a torn one), then starts N workers;
- each worker opens its own live handle on the interface (same filter, snaplen, buffer),
  joins the PACKET_FANOUT group (PACKET_FANOUT_HASH: the kernel hashes each packet's flow
  symmetrically, so both directions of a flow land on the same worker and per-worker flow
  tables stay correct) and runs its own Pipeline into the shared spool, where link()-based
  naming keeps files of the same second apart;
- workers report to the supervisor over a pipe (hello, ready, their counters about once a
  second, their final counters); the supervisor sends READY=1 once every handle is active,
  STATUS= with the counters summed, WATCHDOG=1 only while every worker is alive and has
  reported recently, and writes the one ``.gims-status.json`` of the spool;
- SIGTERM/SIGINT/SIGHUP are forwarded to the workers; exit 0 when all of them exited 0,
  2 when a worker could not open its capture (the one-line reason is printed), 1 otherwise.
  A worker that dies while the others run stops the whole capture (exit 1): systemd's
  Restart= then starts a complete group again instead of running short-handed unnoticed.

Workers are started with the "spawn" method: a fresh interpreter per worker inherits no
pcap handle, no writer thread, no sd_notify socket and no signal handlers from the
supervisor (fork after threads or open capture sockets is how captures get duplicated or
deadlock). Start-up costs a few hundred milliseconds per worker, once.

Sampling across workers: ``everyN`` is every N-th packet of each worker's share (1 in N on
average, not exactly every N-th packet on the wire: the metadata says so); ``uniform`` draws
from a different seeded stream per worker ([seed, worker index]).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import wait

from . import libc
from .memory import keep_freed_batches
from .pipeline import COUNTER_NAMES, status_line

log = logging.getLogger("gims-capture")

REPORT_STALE_SECONDS = 5.0  # a worker silent this long is not "progressing": no WATCHDOG=1


def stale_after() -> float:
    """Seconds of silence after which a worker counts as stuck (it reports about every second).

    Under a watchdog, half its period (at least 2 s), so a stuck worker starves the watchdog
    well before systemd's deadline would be met by the supervisor's own pings.
    """
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    return max(2.0, usec / 2e6) if usec else REPORT_STALE_SECONDS
SUMMED = COUNTER_NAMES + ("packets_unwritten", "files_written", "ps_recv", "ps_drop", "ps_ifdrop")
PR_SET_PDEATHSIG = 1


def fanout_group_id(pid: int) -> int:
    """The 16-bit PACKET_FANOUT group id of the supervisor with this pid.

    Group ids are per network namespace; deriving it from the supervisor's pid keeps two
    experiments on one host apart (two live supervisors whose pids differ by a multiple
    of 65536 would collide: pid_max is 4 M on 64-bit, so this is possible, if unlikely).
    """
    return pid & 0xFFFF


def fanout_description(group: int, index: int, workers: int) -> dict:
    return {"group": group, "worker": index, "workers": workers, "mode": "hash",
            # Linux hashes PACKET_FANOUT_HASH with __skb_get_hash_symmetric (since 4.10):
            # both directions of a flow go to one worker. Fragments other than the first
            # carry no ports and may land on another worker than their flow.
            "symmetric": True}


def sum_counters(reports: list[dict]) -> dict:
    total = dict.fromkeys(SUMMED, 0)
    suspended = None
    for c in reports:
        for k in SUMMED:
            total[k] += int(c.get(k) or 0)
        suspended = suspended or c.get("writing_suspended")
    total["writing_suspended"] = suspended
    return total


# ---------------------------------------------------------------------- supervisor
class _Worker:
    def __init__(self, index, process, conn):
        self.index = index
        self.process = process
        self.conn = conn
        self.hello = False
        self.ready = False
        self.counters: dict = {}
        self.last_report = time.monotonic()
        self.error: str | None = None
        self.state = "starting"


def supervise(settings, verbose: bool = False) -> int:
    from .recovery import recover_spool
    from .service import Notifier, setup_logging
    from .spool import Spool

    log_ = setup_logging(settings.experiment, verbose)
    n = settings.workers
    group = fanout_group_id(os.getpid())
    # The spool is shared: recover what an earlier run left, once, before any worker writes.
    os.makedirs(settings.output_dir, exist_ok=True)
    prefix = f"{settings.experiment}_{settings.site}"
    recovered = recover_spool(settings.output_dir, prefix, _recovery_metadata(settings, group, n))
    status_spool = Spool(settings.output_dir, settings.experiment, settings.site, "status")

    pending: list[int] = []

    def on_signal(signum, _frame):
        pending.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    ctx = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    for i in range(n):
        recv_end, send_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=worker_main, name=f"gims-capture-worker-{i}",
                        args=(settings, i, n, group, send_end, verbose, os.getpid()))
        p.start()
        send_end.close()
        workers.append(_Worker(i, p, recv_end))

    notifier = Notifier()
    stale = stale_after()
    announced_ready = False
    stopping = False
    failed_early = False
    last_status = 0.0

    def totals():
        t = sum_counters([w.counters for w in workers])
        t["files_written"] += len(recovered)
        return t

    def write_status(state):
        status_spool.write_status(dict(totals(), state=state, experiment=settings.experiment,
                                       workers=n, fanout_group=group))

    def stop_all(sig=signal.SIGTERM):
        for w in workers:
            if w.process.exitcode is None and w.hello:
                _kill(w.process.pid, sig)

    while any(w.process.exitcode is None for w in workers) or any(w.conn for w in workers):
        # Signals: forwarded to workers that have their handlers installed ("hello");
        # one still starting gets it as soon as it says hello.
        while pending:
            sig = pending.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                stopping = True
            for w in workers:
                if w.hello and w.process.exitcode is None:
                    _kill(w.process.pid, sig)
        live_conns = [w.conn for w in workers if w.conn is not None]
        sentinels = [w.process.sentinel for w in workers if w.process.exitcode is None]
        for obj in wait(live_conns + sentinels, timeout=0.5):
            w = next((w for w in workers if w.conn is obj), None)
            if w is None:
                continue  # a process exited: its pipe's EOF is read below
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                w.conn.close()
                w.conn = None
                continue
            _handle(w, msg)
            if msg[0] == "hello" and stopping:
                _kill(w.process.pid, signal.SIGTERM)
        for w in workers:
            if w.process.exitcode is not None and w.process.exitcode != 0 and not stopping:
                # One worker gone: stop the others and fail, rather than capture short-handed.
                stopping = failed_early = True
                if not (w.error and w.process.exitcode == 2):  # a usage error: said once, below
                    reason = w.error or f"exit status {w.process.exitcode}"
                    log_.error("worker %d stopped (%s): stopping the capture", w.index, reason)
                stop_all()
        if not announced_ready and all(w.ready for w in workers):
            announced_ready = True
            notifier.ready(status_line(totals()))
            write_status("running")
            log_.info("capturing on %s with %d workers in PACKET_FANOUT group %d (hash)",
                      settings.interface, n, group)
        now = time.monotonic()
        if announced_ready and now - last_status >= 1.0:
            last_status = now
            notifier.status(status_line(totals()))
            write_status("running")
        if announced_ready and not stopping and all(
                w.process.exitcode is None and now - w.last_report < stale
                for w in workers):
            notifier.watchdog()
    for w in workers:
        w.process.join()
    notifier.stopping()
    write_status("stopped")
    t = totals()
    codes = [w.process.exitcode for w in workers]
    errors = [w.error for w in workers if w.error]
    if errors and any(c == 2 for c in codes):
        sys.stderr.write(f"gims-capture: {errors[0]}\n")
        return 2
    log_.info("done: %d packets observed, %d sampled, %d written, %d files (%d workers, exit %s)",
              t["packets_observed"], t["packets_sampled"], t["packets_written"],
              t["files_written"], n, codes)
    if failed_early or any(c != 0 for c in codes):
        return 1
    return 0


def _handle(w: _Worker, msg) -> None:
    kind = msg[0]
    w.last_report = time.monotonic()
    if kind == "hello":
        w.hello = True
    elif kind == "ready":
        w.ready = True
    elif kind == "status":
        w.state, w.counters = msg[1], msg[2]
    elif kind == "error":
        w.error = msg[1]


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _recovery_metadata(settings, group: int, workers: int) -> dict:
    from . import __version__
    from .source import libpcap_version
    return {"format": "gims-meta/1", "experiment": settings.experiment, "site": settings.site,
            "device": settings.interface, "filter": settings.effective_filter,
            "snaplen": settings.snaplen, "aggregation": settings.aggregate,
            "software": {"gims": __version__, "libpcap": libpcap_version(live=True)},
            "user_text": settings.user_text,
            # which worker wrote a recovered file is not known; the group it ran in is not either
            "fanout": {"group": None, "worker": None, "workers": workers, "mode": "hash"}}


# ---------------------------------------------------------------------- worker
def worker_main(settings, index: int, workers: int, group: int, conn, verbose: bool,
                supervisor_pid: int) -> None:
    """One capture process of the group: its own handle, Pipeline and files."""
    keep_freed_batches()  # a spawned interpreter: the supervisor's setting is not inherited
    stop = {"requested": False, "rotate": False, "pipeline": None}

    def on_stop(*_):
        stop["requested"] = True
        if stop["pipeline"] is not None:
            stop["pipeline"].request_stop()

    def on_hup(*_):
        if stop["pipeline"] is not None:
            stop["pipeline"].request_rotate()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    _die_with_parent(supervisor_pid)
    # Only the supervisor talks to systemd.
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(var, None)
    conn.send(("hello", os.getpid()))
    sys.exit(_run_worker(settings, index, workers, group, conn, verbose, stop))


def _run_worker(settings, index, workers, group, conn, verbose, stop) -> int:
    from .cli import _make_anonymizer, _make_output
    from .pipeline import Pipeline
    from .sampling import parse_sample_spec
    from .service import setup_logging
    from .source import SourceError, open_source

    log_ = setup_logging(settings.experiment, verbose)
    try:
        source = open_source(read=None, interface=settings.interface,
                             filter_expr=settings.effective_filter, snaplen=settings.snaplen,
                             promiscuous=settings.promiscuous, timeout_ms=settings.timeout_ms,
                             buffer_bytes=settings.buffer_bytes, fanout_group=group)
    except SourceError as exc:
        _send(conn, ("error", str(exc)))
        return 2
    try:
        sampler = parse_sample_spec(settings.sample).for_worker(index, workers)
        anonymizer = _make_anonymizer(settings)
        output = _make_output(settings, source, sampler)
    except (ValueError, OSError) as exc:
        source.close()
        _send(conn, ("error", str(exc)))
        return 2
    _send(conn, ("ready", source.description))

    def sink(state, counters):
        if not _send(conn, ("status", state, counters)):
            pipeline.request_stop()  # the supervisor is gone: finish the file and stop

    pipeline = Pipeline(settings, source, output, sampler, anonymizer, None, status_sink=sink,
                        fanout=fanout_description(group, index, workers))
    stop["pipeline"] = pipeline
    if stop["requested"]:
        pipeline.request_stop()
    try:
        totals = pipeline.run()
    except Exception as exc:
        log_.exception("worker %d failed: %s", index, exc)
        _send(conn, ("error", f"worker {index}: {exc}"))
        return 1
    finally:
        source.close()
    log_.info("worker %d done: %d packets observed, %d written, %d files", index,
              totals["packets_observed"], totals["packets_written"], pipeline.spool.files_written)
    return 0


def _send(conn, msg) -> bool:
    try:
        conn.send(msg)
        return True
    except (BrokenPipeError, OSError):
        return False


def _die_with_parent(supervisor_pid: int) -> None:
    """SIGTERM this worker when the supervisor dies (e.g. SIGKILL): no orphaned captures."""
    prctl = libc.function("prctl", (ctypes.c_int,) + (ctypes.c_ulong,) * 4)
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
