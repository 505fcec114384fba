"""The sandbox node for integration tests: a real systemd in PID + mount + cgroup namespaces
with gims's units, users and polkit rule, a veth pair with live traffic, gimsd on :8001
(sandbox/up.sh). One per test session; sandbox/down.sh runs at the end whatever happened.

GIMS_SANDBOX_REUSE=1 uses a sandbox that is already up (from this repository) and leaves it
running afterwards; without it, a sandbox that is already up is reused only if it runs this
repository's code, and is then left up too (it is not ours to stop).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("GIMS_SANDBOX_DIR", "/run/gims-sandbox"))
STATE = STATE_DIR / "state"


def read_state() -> dict[str, str]:
    out = {}
    try:
        for line in STATE.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                out[k] = v.strip('"')
    except OSError:
        pass
    return out


def _alive(pid: str | None) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, OSError):
        return False


class Sandbox:
    """Handle on a running sandbox node: run commands inside it, read its files."""

    host_before: dict[str, object] | None = None  # host_snapshot() before up.sh, if we started it
    tmp_marker: Path | None = None

    def __init__(self, state: dict[str, str]):
        self.state = state
        self.node_pid = int(state["NODE_PID"])
        # paths as the node sees them (the repository is bind-mounted there)
        self.python = state.get("NODE_PYTHON", sys.executable)
        self.repo = Path(state.get("NODE_REPO", str(REPO)))
        self.state_repo = Path(state.get("REPO", str(REPO)))  # the repository, on the host
        self.root = Path(f"/proc/{self.node_pid}/root")  # the node's file system, from the host

    def run(self, *cmd: str, user: str | None = None, input: str | None = None,
            check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a command inside the node (its PID, mount and cgroup namespaces)."""
        argv = ["nsenter", "-t", str(self.node_pid), "-m", "-p", "-C", "--"]
        if user:
            uid, gid = self.ids(user)
            argv += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--reset-env"]
        argv += list(cmd)
        res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} (user {user or 'root'}) exited {res.returncode}:\n"
                                 f"{res.stdout}\n{res.stderr}")
        return res

    def ids(self, user: str) -> tuple[int, int]:
        """uid, primary gid of a user of the node (its own /etc/passwd, made by sysusers)."""
        for line in self.path("/etc/passwd").read_text().splitlines():
            f = line.split(":")
            if f[0] == user:
                return int(f[2]), int(f[3])
        raise KeyError(f"no user {user} in the sandbox node")

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("bash", "-euo", "pipefail", "-c", script, **kw)

    def py(self, code: str, user: str | None = None, **kw) -> subprocess.CompletedProcess:
        """Run Python code inside the node with the repository on sys.path."""
        prelude = f"import sys; sys.path.insert(0, {str(self.repo)!r})\n"
        return self.run(self.python, "-c", prelude + code, user=user, **kw)

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        res = self.systemctl("show", unit, "-p", ",".join(props))
        return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)

    def journal(self, *match: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", *match, check=False).stdout

    def write_capture_config(self, exp: str, cfg: dict) -> None:
        """What gimsd does: /var/lib/gims/experiments/<exp>/capture.json, 0600, owner gims."""
        d = f"/var/lib/gims/experiments/{exp}"
        self.sh(f"install -d -o gims -g gims -m 0750 {d} && cat > {d}/capture.json && "
                f"chown gims:gims {d}/capture.json && chmod 0600 {d}/capture.json",
                input=json.dumps(cfg))

    def install_probe(self, exp: str, cfg: dict | None = None) -> None:
        """capture@<exp>.service with only ExecStart= replaced by tests/integration/unit_probe.py
        (everything else — user, credential, sandboxing — is the real unit's)."""
        cfg = {"experiment": exp, "interface": "gims-sb0", "output_dir": f"/var/spool/gims/{exp}",
               **(cfg or {})}
        self.write_capture_config(exp, cfg)
        dropin = (f"[Service]\nExecStart=\nExecStart={self.python} "
                  f"{self.repo}/tests/integration/unit_probe.py\nRestart=no\n")
        self.sh(f"mkdir -p /etc/systemd/system/capture@{exp}.service.d && "
                f"cat > /etc/systemd/system/capture@{exp}.service.d/50-test-probe.conf && "
                "systemctl daemon-reload", input=dropin)


def host_snapshot() -> dict[str, object]:
    """What the sandbox could leak onto the host, if its namespaces leaked: gims users and
    groups, units, polkit rules, sysusers/tmpfiles entries, gims directories, PrivateTmp
    directories, journal files. (Targeted, so other people's apt installs do not count.)"""
    snap: dict[str, object] = {}

    def names(d: str, pred=lambda n: True) -> list[str]:
        try:
            return sorted(n for n in os.listdir(d) if pred(n))
        except OSError:
            return []

    for f in ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"):
        try:
            snap[f] = sorted(line for line in Path(f).read_text().splitlines() if line.startswith("gims"))
        except OSError as exc:
            snap[f] = str(exc)
    gimsy = lambda n: "gims" in n or n.startswith("capture@")  # noqa: E731
    for d in ("/etc/systemd/system", "/etc/polkit-1/rules.d", "/etc/sysusers.d", "/etc/tmpfiles.d"):
        snap[d] = names(d, gimsy)
    for d in ("/var/lib/gims", "/var/spool/gims", "/srv/gims", "/etc/gims", "/var/lib/gims-sandbox"):
        snap[d] = os.path.exists(d)
    for f in ("/dev/log", "/dev/initctl"):  # systemd makes these links in the /dev it sees
        snap[f] = os.path.lexists(f)
    snap["/var/tmp/systemd-private-*"] = names("/var/tmp", lambda n: n.startswith("systemd-private-"))
    snap["/var/log/journal"] = names("/var/log/journal")
    for d in names("/var/log/journal"):
        snap[f"/var/log/journal/{d}"] = names(f"/var/log/journal/{d}")
    return snap


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root (namespaces, veth, a systemd of its own)")
    for tool in ("unshare", "nsenter", "ip"):
        if not shutil.which(tool):
            pytest.skip(f"the sandbox needs {tool}")


@pytest.fixture(scope="session")
def sandbox():
    _need_root()
    st = read_state()
    reuse = os.environ.get("GIMS_SANDBOX_REUSE") == "1"
    ours = False
    if st.get("READY") == "1" and _alive(st.get("NODE_PID")):
        if Path(st.get("REPO", "")).resolve() != REPO:
            pytest.fail(f"a sandbox of {st.get('REPO')} is up (state {STATE}); stop it with its "
                        "sandbox/down.sh, or these tests would test that code")
    elif reuse:
        pytest.fail("GIMS_SANDBOX_REUSE=1 but no sandbox is up: run make sandbox")
    else:
        env = dict(os.environ, GIMS_SANDBOX_PYTHON=sys.executable)
        # A file in the host's /tmp that a booted systemd's tmpfiles run must not delete.
        tmp_marker = Path(f"/tmp/gims-sandbox-marker.{os.getpid()}")
        tmp_marker.write_text("must survive the sandbox")
        before = host_snapshot()
        t0 = time.monotonic()
        res = subprocess.run([str(REPO / "sandbox/up.sh")], env=env, capture_output=True, text=True,
                             timeout=300)
        ours = True
        if res.returncode != 0:
            subprocess.run([str(REPO / "sandbox/down.sh")], capture_output=True, timeout=120)
            pytest.fail(f"sandbox/up.sh failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        print(f"\nsandbox up in {time.monotonic() - t0:.1f} s:\n{res.stdout}", file=sys.stderr)
        st = read_state()
    box = Sandbox(st)
    if ours:
        box.host_before, box.tmp_marker = before, tmp_marker
    try:
        yield box
    finally:
        if ours:
            subprocess.run([str(REPO / "sandbox/down.sh")], capture_output=True, timeout=120)
            tmp_marker.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def gimsd_url(sandbox):
    if not (REPO / "gimsd" / "server.py").exists():
        pytest.skip("gimsd/server.py is not on this branch yet (issue #3's server half)")
    url = sandbox.state.get("GIMSD", "")
    if not url.startswith("http"):
        pytest.fail(f"the sandbox did not start gimsd: {url}")
    return url


@pytest.fixture(scope="session")
def upload_units(gimsd_url):
    """gimsd starts gims-upload@<id>.path with every experiment: needs the storage half."""
    missing = [p for p in ("units/gims-upload@.path", "units/gims-upload@.service", "gimsd/upload.py")
               if not (REPO / p).exists()]
    if missing:
        pytest.skip(f"the upload units are not on this branch yet (issue #4): no {', '.join(missing)}")


_counter = iter(range(10**6))


@pytest.fixture
def exp_id(sandbox, request):
    """A fresh experiment id per test; its units are stopped and reset afterwards."""
    name = "t{}-{}".format(next(_counter), "".join(c for c in request.node.name if c.isalnum())[:24])
    yield name
    for unit in (f"capture@{name}.service", f"gims-upload@{name}.path", f"gims-upload@{name}.service"):
        sandbox.systemctl("stop", unit, check=False)
        sandbox.systemctl("reset-failed", unit, check=False)


@pytest.fixture
def am(gimsd_url):
    """An XML-RPC client to the sandbox's gimsd, as an AM would hold one."""
    return xmlrpc.client.ServerProxy(gimsd_url.rstrip("/") + "/RPC2", allow_none=True)


def stats(am, exp):
    return am.getExperimentStats({"ExperimentId": exp})
