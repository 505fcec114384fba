#!/usr/bin/env python3
"""Benchmark harness: gims-capture against its peers on the same trace, side by side.

    python bench/run.py                  # 5 M packets, 3 rounds, every path that can run here
    python bench/run.py --quick          # 50 k packets, 1 round (the CI smoke run)
    python bench/run.py --paths 1,3 --rounds 5 --json out.json

For each path the tools run one after another on the same input, in an order rotated every
round (so caches and background load hit everybody alike). Per tool: packets/s = packets in the
trace / wall time, median over rounds, and packets per CPU-second (user + system time of the
command and its children: on a shared machine wall time also counts the time others had the
CPU); per peer: the median over rounds of the per-round ratio gims / peer (> 1 means gims is
faster), for both; peak RSS of the command from GNU time.
Each run is checked (exit status, and that the whole trace was processed) before it counts.
Traces live under /var/tmp/gims-bench (never in the repository, never in /tmp).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gen_trace  # noqa: E402
import peers  # noqa: E402

DEFAULT_WORKDIR = "/var/tmp/gims-bench"

TARGETS = {  # issue #6: gims / peer, measured in the same run
    (1, "tcpdump copy"): 1.0, (2, "tcpdump copy"): 1.0, (3, "yaf"): 1.0, (3, "softflowd"): 2.7,
    (4, "tcpdump -w /dev/null"): 1.0,
}
PATH_TITLES = {
    0: "read baseline (no processing)",
    1: "pcap -> Crypto-PAn anonymized pcap",
    2: "pcap -> 1-in-100 sampled pcap",
    3: "pcap -> IPFIX flow file",
    4: "pcap -> counts per second",
    5: "Crypto-PAn on never-seen addresses",
    6: "live capture on a veth pair",
    7: "peak RSS, flows",
}


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version()}


def ensure_trace(workdir: str, packets: int, flows: int, seed: int, snaplen: int) -> tuple[str, dict]:
    """The trace for these parameters, generated once and reused (with its summary beside it)."""
    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(workdir, f"trace-v{gen_trace.GENERATOR_VERSION}-{packets}-f{flows}-s{seed}-l{snaplen}")
    pcap, info = base + ".pcap", base + ".json"
    if os.path.exists(pcap) and os.path.exists(info):
        with open(info) as f:
            return pcap, json.load(f)
    t = time.monotonic()
    tmp = pcap + f".{os.getpid()}.tmp"
    stats = gen_trace.generate(tmp, packets, flows, seed, snaplen, 60.0, 1_700_000_000.0)
    os.replace(tmp, pcap)
    stats["generate_seconds"] = round(time.monotonic() - t, 2)
    stats["command"] = (f"python bench/gen_trace.py --packets {packets} --flows {flows} "
                        f"--seed {seed} --snaplen {snaplen} -o {pcap}")
    with open(info, "w") as f:
        json.dump(stats, f, indent=1)
    return pcap, stats


def ensure_key(workdir: str) -> str:
    """A fixed benchmark-only Crypto-PAn key (64 hex chars), 0600."""
    p = os.path.join(workdir, "bench-cryptopan.key")
    if not os.path.exists(p):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
    return p


def run_once(argv: list, cwd: str | None, env_extra: dict, cpu: int | None) -> dict:
    """Run one command; wall time, peak RSS, exit status, its output (stdout + stderr).

    Peak RSS comes from /usr/bin/time (GNU time) wrapped around the command: a forked child
    inherits its parent's RSS high-water mark into ru_maxrss across exec, so measuring from this
    (large) Python process would report our own size; time is a tiny parent.
    """
    env = dict(os.environ)
    env.update(env_extra)
    out = tempfile.TemporaryFile()
    fd, rss_file = tempfile.mkstemp(prefix="rss-", suffix=".txt")
    os.close(fd)
    has_time = os.access("/usr/bin/time", os.X_OK)
    # Without GNU time (Debian package "time") RSS falls back to wait4's, an upper bound.
    wrapped = (["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file] if has_time else []) + list(argv)
    if cpu is not None and shutil.which("taskset"):
        wrapped = ["taskset", "-c", str(cpu)] + wrapped
    # Every command starts with no dirty page cache left by the one before (not timed): the
    # previous tool's output (up to 1.8 GB) would otherwise be written back during this one,
    # and a command that fsyncs its files (gims-capture publishes only durable files) waited
    # for the others' writeback too (measured: the same gims run took 1.4 to 16 s wall).
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.Popen(wrapped, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode(errors="replace")
    try:
        with open(rss_file) as f:
            rss_kb = int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        rss_kb = ru.ru_maxrss
    os.unlink(rss_file)
    return {"wall": wall, "rss_kb": rss_kb, "cpu": ru.ru_utime + ru.ru_stime,
            "rc": p.returncode, "stderr": text}


class UdpSink:
    """A bound UDP socket that receives and drops softflowd's IPFIX export (a real endpoint)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


def bench_path(path: int, tools: list, ctx: peers.Context, rounds: int, cpu: int | None,
               log) -> list:
    """Run every available tool of one path, rounds times, in rotating order."""
    rows = []
    runnable = []
    for t in tools:
        why = t.check()
        row = {"path": path, "tool": t.name, "is_gims": t.is_gims, "note": t.note, "runs": [],
               "error": why, "skipped": why is not None, "command": None}
        rows.append(row)
        if why is None:
            runnable.append((t, row))
        else:
            log(f"path {path}: {t.name}: skipped: {why}")
    for r in range(rounds):
        order = runnable[r % len(runnable):] + runnable[:r % len(runnable)] if runnable else []
        for t, row in order:
            if row["error"]:
                continue
            outdir = tempfile.mkdtemp(prefix=f"p{path}-", dir=ctx.workdir)
            argv = t.build(ctx, outdir)
            row["command"] = [a.replace(outdir, "OUT") for a in argv]
            res = run_once(argv, t.cwd, t.env, cpu)
            problem = None
            if res["rc"] != 0:
                tail = res["stderr"].strip().splitlines()[-1:] or [""]
                problem = f"exit status {res['rc']}: {tail[0][:200]}"
            elif t.verify:
                problem = t.verify(ctx, outdir, res["stderr"])
            subprocess.run(["rm", "-rf", outdir], check=False)
            if problem:
                row["error"] = problem
                log(f"path {path}: {t.name}: FAILED: {problem}")
                continue
            pps = ctx.packets / res["wall"]
            row["runs"].append({"wall": res["wall"], "pps": pps, "rss_kb": res["rss_kb"],
                                "cpu": res["cpu"], "pps_cpu": ctx.packets / max(res["cpu"], 1e-6)})
            log(f"path {path} round {r + 1}: {t.name}: {pps / 1e6:.3f} Mpps, "
                f"{res['wall']:.2f} s, RSS {res['rss_kb'] / 1024:.0f} MB")
    # Ratios: per round gims / peer, then the median.
    gims = next((row for row in rows if row["is_gims"] and row["runs"] and not row["error"]), None)
    for row in rows:
        ok = row["runs"] and not row["error"]
        row["pps_median"] = statistics.median(x["pps"] for x in row["runs"]) if ok else None
        row["rss_mb"] = max(x["rss_kb"] for x in row["runs"]) / 1024 if ok else None
        row["pps_cpu_median"] = statistics.median(x["pps_cpu"] for x in row["runs"]) if ok else None
        row["ratio"] = row["ratio_cpu"] = None
        if ok and gims is not None and not row["is_gims"]:
            pairs = [g["pps"] / p["pps"] for g, p in zip(gims["runs"], row["runs"])]
            row["ratio"] = statistics.median(pairs)
            pairs = [g["pps_cpu"] / p["pps_cpu"] for g, p in zip(gims["runs"], row["runs"])]
            row["ratio_cpu"] = statistics.median(pairs)
        row["target"] = TARGETS.get((path, row["tool"]))
    return rows


def summarize_pyspy(raw_path: str, top: int = 15) -> list:
    """Inclusive and self shares per function from py-spy's raw (collapsed) output."""
    import collections
    import re
    incl, self_ = collections.Counter(), collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack or not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
            self_[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; inclusive share, self share, function"]
    shown = [(fr, n) for fr, n in incl.most_common()
             if "<frozen" not in fr and not fr.startswith(("<module> (capture_daemon/cli.py", "main (capture_daemon/cli.py"))]
    for fr, n in shown[:top]:
        lines.append(f"{100 * n / total:5.1f} % {100 * self_[fr] / total:5.1f} %  {fr}")
    return lines


def profile_gims(path: int, tool, ctx: peers.Context, cpu: int | None, log) -> dict:
    """One extra, untimed run of gims-capture under py-spy (sampling, --idle: waits show too)."""
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(pyspy, os.X_OK):
        return {"path": path, "lines": ["py-spy not installed (pip install py-spy)"]}
    outdir = tempfile.mkdtemp(prefix=f"prof{path}-", dir=ctx.workdir)
    raw = os.path.join(ctx.workdir, f"pyspy-path{path}.txt")
    argv = [pyspy, "record", "--idle", "-r", "200", "-f", "raw", "-o", raw, "--"] + tool.build(ctx, outdir)
    res = run_once(argv, tool.cwd, tool.env, cpu)
    subprocess.run(["rm", "-rf", outdir], check=False)
    if res["rc"] != 0 or not os.path.exists(raw):
        return {"path": path, "lines": [f"py-spy run failed: {res['stderr'].strip()[-300:]}"]}
    log(f"path {path}: profile written to {raw}")
    return {"path": path, "raw": raw, "lines": summarize_pyspy(raw)}


def cryptopan_path(args, log) -> dict:
    """Path 5 belongs to bench/bench_cryptopan.py (the crypto engineer's); run it when present."""
    script = os.path.join(HERE, "bench_cryptopan.py")
    if not os.path.exists(script):
        return {"path": 5, "skipped": True, "error": "bench/bench_cryptopan.py not present yet"}
    argv = [sys.executable, script]
    try:
        helptext = subprocess.run(argv + ["--help"], capture_output=True, text=True, timeout=60,
                                  cwd=peers.REPO, env={**os.environ, "PYTHONPATH": peers.REPO}).stdout
    except subprocess.TimeoutExpired:
        helptext = ""
    if args.quick:
        # A smoke run: the smallest sizes the script takes (flags it does not know are left out).
        small = {"--quick": None, "--n4": "20000", "--n6": "5000", "--peer-n4": "300",
                 "--peer-n6": "100", "--rounds": "1", "--packets-repeat": "1"}
        for flag, val in small.items():
            if flag in helptext:
                argv += [flag] if val is None else [flag, val]
    log(f"path 5: {shlex.join(argv)}")
    p = subprocess.run(argv, capture_output=True, text=True, cwd=peers.REPO,
                       env={**os.environ, "PYTHONPATH": peers.REPO}, timeout=3600)
    return {"path": 5, "skipped": False, "command": argv, "rc": p.returncode,
            "output": p.stdout.strip(), "error": None if p.returncode == 0 else
            (p.stderr.strip().splitlines() or ["failed"])[-1]}


def _git_head(repo: str) -> str:
    try:
        return subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def fmt_pps(x):
    return "—" if x is None else f"{x / 1e6:.3f} M"


def render(result: dict) -> str:
    """The table (Markdown), the commands, and what was skipped and why."""
    out = []
    m = result["machine"]
    tr = result["trace"]
    out.append(f"Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; "
               f"pinned to CPU {result['cpu']}" if result["cpu"] is not None else
               f"Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}")
    out.append(f"gims-capture from {result['gims_repo']} at {result['gims_commit']}")
    out.append(f"Trace: {tr['packets']} packets, {tr['flows']} flows, "
               f"{tr['ipv6'] / tr['packets']:.1%} IPv6, {tr['vlan']} VLAN-tagged, "
               f"{tr['whole']} captured whole (snaplen {result['snaplen']}); {result['rounds']} round(s)")
    out.append("")
    out.append("| path | tool | packets/s (median) | gims ÷ peer (median) | packets per CPU-second "
               "| gims ÷ peer, CPU | target | peak RSS | status |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        status = "ok"
        if row["skipped"]:
            status = f"skipped: {row['error']}"
        elif row["error"]:
            status = f"failed: {row['error']}"
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        ratio_cpu = "—" if row.get("ratio_cpu") is None else f"{row['ratio_cpu']:.2f}×"
        target = "" if row["target"] is None else f"≥ {row['target']}×"
        rss = "—" if row["rss_mb"] is None else f"{row['rss_mb']:.0f} MB"
        out.append(f"| {row['path']} {PATH_TITLES[row['path']]} | {row['tool']} | {fmt_pps(row['pps_median'])} "
                   f"| {ratio} | {fmt_pps(row.get('pps_cpu_median'))} | {ratio_cpu} | {target} | {rss} "
                   f"| {status} |")
    p7 = result.get("rss_flows")
    if p7:
        for peer, ratio in p7.items():
            out.append(f"| 7 {PATH_TITLES[7]} | gims-capture ÷ {peer} | — | "
                       f"{'—' if ratio is None else f'{ratio:.2f}× RSS'} | — | — | "
                       f"{'≤ 2×' if peer == 'yaf' else ''} | — | "
                       f"{'ok' if ratio is not None else 'not measured'} |")
    out.append("")
    p5 = result.get("cryptopan")
    if p5:
        if p5.get("skipped"):
            out.append(f"Path 5 ({PATH_TITLES[5]}): skipped: {p5['error']}")
        else:
            out.append(f"Path 5 ({PATH_TITLES[5]}): `{shlex.join(p5['command'])}`"
                       + (f" — failed: {p5['error']}" if p5.get("error") else ""))
            out.append("```")
            out.append(p5.get("output", ""))
            out.append("```")
    p6 = result.get("live")
    if p6:
        out.append(f"Path 6 ({PATH_TITLES[6]}):")
        out.extend(p6.get("lines", [f"skipped: {p6.get('error')}"]))
    for prof in result.get("profiles", []):
        out.append("")
        out.append(f"Profile of gims-capture, path {prof['path']} (py-spy --idle):")
        out.append("```")
        out.extend(prof["lines"])
        out.append("```")
    out.append("")
    out.append("Commands (one round; OUT is a fresh directory per run):")
    for row in result["rows"]:
        if row["command"]:
            out.append(f"- path {row['path']}, {row['tool']}: `{shlex.join(row['command'])}`"
                       + (f" — {row['note']}" if row["note"] else ""))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="gims-capture vs peers, side by side")
    ap.add_argument("--size", type=int, default=None, help="packets in the trace (default 5000000)")
    ap.add_argument("--flows", type=int, default=None, help="flows (default size / 50)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--snaplen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="50k packets, 1 round (smoke run)")
    ap.add_argument("--paths", default="0,1,2,3,4,5,7", help="comma-separated path numbers "
                    "(6, the live veth path, runs only when asked for: it needs root and netns)")
    ap.add_argument("--cpu", type=int, default=1, help="pin every tool to this CPU (-1: no pinning)")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    ap.add_argument("--gims-repo", default=None, metavar="DIR",
                    help="measure the gims-capture of another checkout (e.g. a branch's worktree)")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed rounds, run gims-capture once more under py-spy per path "
                         "and print its hot spots (raw profiles stay in the workdir)")
    ap.add_argument("--live-buffer", type=int, default=None, metavar="BYTES",
                    help="path 6: kernel capture buffer for both capturers (default: each one's own)")
    ap.add_argument("--live-rates", default="", help="path 6: comma-separated packets/s to offer")
    ap.add_argument("--live-workers", type=int, default=1, metavar="N",
                    help="path 6: run gims-capture with --workers N (PACKET_FANOUT)")
    ap.add_argument("--live-gims-cpus", default="1", metavar="LIST",
                    help="path 6: taskset CPU list for gims-capture (tcpreplay has CPU 0)")
    ap.add_argument("--live-no-tcpdump", action="store_true",
                    help="path 6: measure gims-capture only")
    ap.add_argument("--live-cpu-quota", type=float, default=None, metavar="PERCENT",
                    help="path 6: limit each capturer to this share of one core once it captures "
                         "(a cgroup CPU quota, bench/cpulimit.py): a CPU-restricted comparison "
                         "for when the sender, not the capturers, is the limit")
    a = ap.parse_args(argv)
    size = a.size or (50_000 if a.quick else 5_000_000)
    rounds = a.rounds or (1 if a.quick else 3)
    flows = a.flows or max(1, size // 50)
    cpu = None if a.cpu < 0 or a.cpu >= (os.cpu_count() or 1) else a.cpu
    try:
        paths = sorted({int(x) for x in a.paths.split(",") if x.strip()})
    except ValueError:
        print(f"run.py: --paths {a.paths!r}: not a list of numbers", file=sys.stderr)
        return 2
    if size < 2 or rounds < 1:
        print("run.py: --size must be >= 2 and --rounds >= 1", file=sys.stderr)
        return 2

    if a.gims_repo:
        if not os.path.exists(os.path.join(a.gims_repo, "capture_daemon", "cli.py")):
            print(f"run.py: --gims-repo {a.gims_repo!r}: no capture_daemon/cli.py there", file=sys.stderr)
            return 2
        peers.GIMS_REPO = os.path.abspath(a.gims_repo)
        os.environ["GIMS_BENCH_REPO"] = peers.GIMS_REPO     # the peers.py gims-read subprocess too

    def log(msg):
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    os.makedirs(a.workdir, exist_ok=True)
    trace, tinfo = ensure_trace(a.workdir, size, flows, a.seed, a.snaplen)
    log(f"trace {trace}: {tinfo['packets']} packets")
    peers.write_pktanon_profile(a.workdir)
    sink = UdpSink()
    ctx = peers.Context(trace=trace, packets=tinfo["packets"], workdir=a.workdir,
                        key_file=ensure_key(a.workdir), sink_port=sink.port)
    result = {"machine": machine(), "trace": tinfo, "trace_file": trace, "rounds": rounds,
              "gims_repo": peers.GIMS_REPO, "gims_commit": _git_head(peers.GIMS_REPO),
              "snaplen": a.snaplen, "cpu": cpu, "rows": [], "started": time.time()}
    all_tools = peers.tools()
    try:
        for path in paths:
            if path in (0, 1, 2, 3, 4):
                result["rows"] += bench_path(path, [t for t in all_tools if t.path == path],
                                             ctx, rounds, cpu, log)
                gims = next((t for t in all_tools if t.path == path and t.is_gims), None)
                gims_ok = any(r["is_gims"] and r["path"] == path and r["runs"] and not r["error"]
                              for r in result["rows"])
                if a.profile and gims is not None and gims_ok:
                    result.setdefault("profiles", []).append(profile_gims(path, gims, ctx, cpu, log))
            elif path == 5:
                result["cryptopan"] = cryptopan_path(a, log)
            elif path == 6:
                import live
                result["live"] = live.run(ctx, a.live_rates, log, buffer_bytes=a.live_buffer,
                                          gims_workers=a.live_workers,
                                          gims_cpus=a.live_gims_cpus,
                                          with_tcpdump=not a.live_no_tcpdump,
                                          cpu_percent=a.live_cpu_quota)
    finally:
        sink.close()
    if 7 in paths:
        flows_rows = {r["tool"]: r for r in result["rows"] if r["path"] == 3}
        g = flows_rows.get("gims-capture")
        result["rss_flows"] = {}
        for peer in ("yaf", "softflowd"):
            p = flows_rows.get(peer)
            ok = g and p and g["rss_mb"] and p["rss_mb"]
            result["rss_flows"][peer] = (g["rss_mb"] / p["rss_mb"]) if ok else None
    text = render(result)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**result, "table": text}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
