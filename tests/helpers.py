"""Shared test helpers: paths, running our programs as subprocesses, reading tool output."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
TRACES = sorted(glob.glob(os.path.join(DATA, "*.pcap")))


def module_cmd(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run_module(module: str, *args, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    env.update(kw.pop("env", {}))
    proc = subprocess.run(module_cmd(module, *args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def run_capture(*args, **kw) -> subprocess.CompletedProcess:
    return run_module("capture_daemon.cli", *args, **kw)


def data_files(directory: str) -> list[str]:
    """Complete data files in a spool: visible, not metadata, with a metadata record."""
    names = sorted(os.listdir(directory))
    return [os.path.join(directory, n) for n in names
            if not n.startswith(".") and not n.endswith(".meta.json") and f"{n}.meta.json" in names]


def metadata(path: str) -> dict:
    with open(path + ".meta.json", encoding="utf-8") as fh:
        return json.load(fh)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: run `make deps` (it is in .ci/apt-packages.txt)")
    return path


def tshark_fields(path: str, *fields, extra=()) -> list[list[str]]:
    need_tool("tshark")
    cmd = ["tshark", "-n", "-r", path, "-T", "fields", *extra]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    return [line.split("\t") for line in out.splitlines()]


def pcap_count(path: str) -> int:
    need_tool("tcpdump")
    out = subprocess.run(["tcpdump", "-n", "-r", path], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"tcpdump cannot read {path}: {out.stderr}")
    return len(out.stdout.splitlines())


def sh(*cmd, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@contextlib.contextmanager
def veth_pair(prefix: str, net4: str, net6: str | None = None):
    """(host end, namespace) of a fresh veth pair: <net4>.1 on the host end (in the host's
    network namespace, where a capture runs), <net4>.2 on the peer inside a namespace of its own
    (where test traffic is sent from). Names carry the prefix and the pid, so concurrent runs
    do not collide; everything is deleted afterwards."""
    if os.geteuid() != 0:
        raise AssertionError("live capture tests need root (network namespaces); CI runs as root")
    tag = f"{os.getpid() % 100000}"
    ns, host, peer = f"{prefix}{tag}", f"{prefix}{tag}h", f"{prefix}{tag}p"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "addr", "add", f"{net4}.1/24", "dev", host)
        if net6:
            sh("ip", "addr", "add", f"{net6}1/64", "dev", host, "nodad")
        sh("ip", "link", "set", host, "up")
        inside = ("ip", "netns", "exec", ns)
        sh(*inside, "ip", "addr", "add", f"{net4}.2/24", "dev", peer)
        if net6:
            sh(*inside, "ip", "addr", "add", f"{net6}2/64", "dev", peer, "nodad")
        sh(*inside, "ip", "link", "set", peer, "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        yield host, ns
    finally:
        sh("ip", "link", "del", host, check=False)
        sh("ip", "netns", "del", ns, check=False)


def wait_for(pred, timeout: float = 30.0, step: float = 0.5, what: str | None = None):
    """Poll pred until it returns something true (returned) or the timeout passes: then its
    last value is returned, so an assert shows what it was; or, with `what`, an AssertionError
    says what was waited for."""
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    value = pred()
    if not value and what is not None:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
    return value


def env_without(directory, *modules: str) -> dict:
    """Environment for a subprocess (and every process it spawns: fan-out workers) in which
    these modules fail to import, as on a machine where a C accelerator was never built: a
    sitecustomize.py in `directory`, put first on PYTHONPATH, refuses them."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "sitecustomize.py"), "w") as fh:
        fh.write("import importlib.abc, sys\n"
                 "class NotBuilt(importlib.abc.MetaPathFinder):\n"
                 "    def find_spec(self, name, path, target=None):\n"
                 f"        if name in {list(modules)!r}:\n"
                 "            raise ImportError(f'{name} not built')\n"
                 "sys.meta_path.insert(0, NotBuilt())\n")
    return {"PYTHONPATH": f"{directory}{os.pathsep}{REPO}"}
