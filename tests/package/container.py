"""A clean Debian 12 root booted with systemd-nspawn, for the package install test.

- The pristine root (debootstrap minbase + systemd + dbus) is made once and kept under
  /var/cache/gims-test/; each test run copies it, so the first run pays for debootstrap (~1 min)
  and later ones only for the copy.
- Downloaded .debs are kept in /var/cache/gims-test/apt-archives (bound into the container), so
  a warm run installs without downloading.
- apt reaches the Debian mirror from a non-booted nspawn (host network); the booted container
  gets a private network namespace (only lo, plus the veth the test moves in), so the traffic
  it captures and the XML-RPC port it opens never touch the host's network.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CACHE = Path("/var/cache/gims-test")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
INCLUDE = "systemd,systemd-sysv,dbus"
PRISTINE = CACHE / f"root-{SUITE}-minbase-{INCLUDE.replace(',', '+')}"
ARCHIVES = CACHE / "apt-archives"
SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(cmd, *, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; failures show the command's stderr."""
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}"
                             f"\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def pristine_root() -> Path:
    """The cached clean root, made with debootstrap the first time (under a lock)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (PRISTINE / ".complete").exists():
            partial = PRISTINE.with_name(PRISTINE.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE,
                 str(partial), MIRROR], timeout=1200, env={"PATH": SYSTEM_PATH})
            # apt in the copies should keep what it downloads (bound to ARCHIVES).
            (partial / "etc/apt/apt.conf.d/10gims-test-keep-debs").write_text(
                'Binary::apt::APT::Keep-Downloaded-Packages "true";\n'
                'APT::Keep-Downloaded-Packages "true";\n')
            shutil.rmtree(PRISTINE, ignore_errors=True)
            partial.rename(PRISTINE)
            (PRISTINE / ".complete").touch()
    return PRISTINE


class Container:
    """A copy of the pristine root; `prepare` runs commands in it unbooted, `boot` boots it."""

    def __init__(self, workdir: Path, name: str, debs_dir: Path):
        self.workdir = workdir
        self.root = workdir / "root"
        self.name = name
        self.debs_dir = debs_dir
        self.proc: subprocess.Popen | None = None
        self.leader: int | None = None
        self.log = workdir / "nspawn.log"

    def create(self) -> None:
        src = pristine_root()
        ARCHIVES.mkdir(parents=True, exist_ok=True)
        run(["cp", "-a", "--reflink=auto", str(src), str(self.root)])
        (self.root / ".complete").unlink()
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")

    def _nspawn_base(self) -> list[str]:
        return ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit",
                f"--machine={self.name}", "-D", str(self.root),
                f"--bind={ARCHIVES}:/var/cache/apt/archives",
                f"--bind-ro={self.debs_dir}:/debs"]

    def prepare(self, *cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """Run a command in the unbooted root with the host's network (for apt downloads)."""
        assert self.proc is None, "prepare() is for the unbooted root"
        return run(self._nspawn_base() + ["--pipe", "--setenv=DEBIAN_FRONTEND=noninteractive",
                                          "--", *cmd], timeout=timeout,
                   stdin=subprocess.DEVNULL, env={"PATH": SYSTEM_PATH})

    def boot(self, timeout: float = 120) -> None:
        """Boot systemd in the root, in a private network namespace; wait until it runs."""
        logf = open(self.log, "w")
        self.proc = subprocess.Popen(
            self._nspawn_base() + ["--private-network", "-b"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            env={"PATH": SYSTEM_PATH, "SYSTEMD_NSPAWN_TMPFS_TMP": "1"},
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"container did not start:\n{self.log.read_text()[-3000:]}")
            self.leader = self._find_leader()
            time.sleep(0.2)
        while True:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                failed = self.sh("systemctl --failed --no-legend", check=False).stdout
                raise AssertionError(f"container systemd is {state!r}; failed units:\n{failed}")
            time.sleep(0.5)

    def _find_leader(self) -> int | None:
        """PID (in our namespace) of the container's PID 1: nspawn's child running systemd."""
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("PPid", "").strip() == str(self.proc.pid) and \
                    fields.get("NSpid", "").split()[-1:] == ["1"]:
                return int(entry.name)
        return None

    def exec(self, *cmd: str, check: bool = True, timeout: int = 600,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the booted container (all its namespaces and its root)."""
        assert self.leader is not None
        return run(["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={SYSTEM_PATH}",
                    "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8", *cmd],
                   check=check, timeout=timeout, input=input,
                   **({} if input is not None else {"stdin": subprocess.DEVNULL}))

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.exec("/bin/sh", "-c", script, **kw)

    def host_in_netns(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A host binary (ip, ping) run in the container's network namespace only."""
        assert self.leader is not None
        return run(["nsenter", "-t", str(self.leader), "-n", *cmd], check=check)

    def stop(self) -> None:
        """Power the container off (SIGKILL to its PID 1 if it does not stop in time)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.leader is not None:
                try:
                    os.kill(self.leader, signal.SIGRTMIN + 4)  # systemd: poweroff
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if self.leader is not None:
                    try:
                        os.kill(self.leader, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None
        self.leader = None
