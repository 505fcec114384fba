"""A CPU quota for a running capturer: a cgroup of its own with a CFS bandwidth limit.

Path 6's sender (tcpreplay on one core) tops out near 350 k packets/s, below what either
capturer can take on a whole core, so the live ladder finds no loss and no ratio. Giving each
capturer the same small share of a core (say 5 %: 0.5 ms of CPU in every 10 ms period)
brings its limit into the sender's range; the highest rate it takes with no drop is then set
by its CPU cost per packet, with the kernel ring (the same size for both) absorbing the
throttled part of each period. A short period keeps that part short (a 100 ms period would
leave the capturer stopped for 95 ms at a time, which a ring may not hold at high rates).

The capturer is moved into the cgroup once it is capturing (start-up and imports are not
throttled), with every process of its tree (the --workers supervisor and its workers).
cgroup v2 (`cpu.max`, when the cpu controller is enabled in the unified hierarchy) or v1
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`), whichever this machine offers; root only.
"""
from __future__ import annotations

import os

V2_ROOT = "/sys/fs/cgroup"
V1_ROOTS = ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct")


def _v2_root() -> str | None:
    for root in (V2_ROOT, os.path.join(V2_ROOT, "unified")):
        try:
            with open(os.path.join(root, "cgroup.subtree_control")) as f:
                if "cpu" in f.read().split():
                    return root
        except OSError:
            pass
    return None


def _v1_root() -> str | None:
    for root in V1_ROOTS:
        if os.path.exists(os.path.join(root, "cpu.cfs_quota_us")):
            return root
    return None


def available() -> str | None:
    """None when a quota can be set here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if _v2_root() is None and _v1_root() is None:
        return "no cgroup cpu controller (v2 cpu.max or v1 cpu.cfs_quota_us) found"
    return None


class CpuLimit:
    """`with CpuLimit(5.0) as lim: lim.add(pid)` caps pid's tree at 5 % of one CPU."""

    MIN_QUOTA_US = 1000  # the kernel refuses a smaller quota

    def __init__(self, percent: float, period_us: int = 10_000):
        if not 0 < percent <= 100:
            raise ValueError("CPU quota: a percentage of one core, 0 < p <= 100")
        self.percent = percent
        # the shortest period (at least period_us) whose share is a valid quota
        self.period_us = max(period_us, int(-(-self.MIN_QUOTA_US * 100 // percent)))
        self.quota_us = int(self.period_us * percent / 100)
        self.path = None

    def describe(self) -> str:
        return (f"{self.quota_us} µs of CPU per {self.period_us} µs period "
                f"({100 * self.quota_us / self.period_us:g} % of one core)")

    def __enter__(self):
        v2 = _v2_root()
        root = v2 or _v1_root()
        if root is None:
            raise RuntimeError(available())
        self.path = os.path.join(root, f"gims-bench-cpu-{os.getpid()}")
        os.makedirs(self.path, exist_ok=True)
        if v2:
            self._write("cpu.max", f"{self.quota_us} {self.period_us}")
        else:
            self._write("cpu.cfs_period_us", str(self.period_us))
            self._write("cpu.cfs_quota_us", str(self.quota_us))
        return self

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def add(self, pid: int) -> None:
        """Move pid and every process under it into the cgroup."""
        for p in [pid] + _descendants(pid):
            try:
                self._write("cgroup.procs", str(p))
            except (ProcessLookupError, FileNotFoundError):
                pass

    def __exit__(self, *exc):
        # Processes still inside (none once the capturers are reaped) would keep it alive.
        parent = os.path.dirname(self.path)
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                left = [line.strip() for line in f if line.strip()]
            for p in left:
                with open(os.path.join(parent, "cgroup.procs"), "w") as f:
                    f.write(p)
            os.rmdir(self.path)
        except OSError:
            pass


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out
