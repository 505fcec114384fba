"""The real units under a real systemd: gims-upload@.path sees files in the spool and starts
gims-upload@.service, which runs as gims-upload with its full sandbox and the storage settings as
a systemd credential, drains the spool to local storage and to S3 (moto on host loopback), logs
to the journal with EXPERIMENT=, and log_tail() reads it back from the journal.

systemd is booted as PID 1 of a new PID + mount namespace (docs/design-notes.md). Everything it
touches is private to that namespace: fresh tmpfs on /run, /tmp (so its tmpfiles cannot empty the
host's /tmp), /var/spool and /srv; overlays on /etc (the gims users), /usr/bin (a gims-upload
wrapper running this worktree's code) and /var/lib (gimsd's state dir), upper layers in the
namespace's /run. The unit files are used exactly as shipped.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, MotoS3, make_meta

pytestmark = pytest.mark.integration

MASK = [
    "systemd-sysctl.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount", "systemd-modules-load.service",
    "systemd-remount-fs.service", "systemd-random-seed.service", "systemd-update-utmp.service",
    "systemd-journal-flush.service", "systemd-timesyncd.service", "systemd-udevd.service",
    "systemd-udevd-control.socket", "systemd-udevd-kernel.socket", "systemd-udev-trigger.service",
    "kmod-static-nodes.service", "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "dev-hugepages.mount", "dev-mqueue.mount", "sys-fs-fuse-connections.mount",
    "systemd-pstore.service", "systemd-firstboot.service", "systemd-machine-id-commit.service",
    "ldconfig.service", "systemd-hwdb-update.service", "systemd-sysusers.service",
    "systemd-boot-system-token.service", "systemd-journal-catalog-update.service",
    "systemd-update-done.service", "systemd-ask-password-console.path",
    "systemd-ask-password-wall.path", "systemd-repart.service", "systemd-networkd.service",
]

BOOT = r"""
set -e
mount -t tmpfs -o mode=755 gims-storage-run /run
mount -t tmpfs -o mode=1777 gims-storage-tmp /tmp
mount -t proc proc /proc
for d in etc usrbin varlib; do mkdir -p /run/gims-ovl/$d/u /run/gims-ovl/$d/w; done
mount -t overlay gims-storage-etc -o lowerdir=/etc,upperdir=/run/gims-ovl/etc/u,workdir=/run/gims-ovl/etc/w /etc
mount -t overlay gims-storage-bin -o lowerdir=/usr/bin,upperdir=/run/gims-ovl/usrbin/u,workdir=/run/gims-ovl/usrbin/w /usr/bin
mount -t overlay gims-storage-lib -o lowerdir=/var/lib,upperdir=/run/gims-ovl/varlib/u,workdir=/run/gims-ovl/varlib/w /var/lib
mount -t tmpfs -o mode=755 gims-storage-spool /var/spool
mount -t tmpfs -o mode=755 gims-storage-srv /srv
echo 'gims-spool:x:64990:gims-upload' >> /etc/group
echo 'gims-upload:x:64991:' >> /etc/group
echo 'gims-upload:x:64991:64991:gims upload:/nonexistent:/usr/sbin/nologin' >> /etc/passwd
# The units have PrivateTmp=: a checkout under /tmp or /var/tmp (CI's clone may be there) would
# vanish for them, so the repository is bind-mounted read-only under /run, which they see.
mkdir -p /run/gims-repo
mount --bind %(repo)s /run/gims-repo
mount -o remount,bind,ro /run/gims-repo
printf '#!/bin/sh\nPYTHONPATH=/run/gims-repo exec %(unit_python)s -m gimsd.upload "$@"\n' > /usr/bin/gims-upload
chmod 755 /usr/bin/gims-upload
mkdir -p /run/systemd/system
for u in %(mask)s; do ln -sf /dev/null /run/systemd/system/$u; done
cp %(units)s/gims-upload@.service %(units)s/gims-upload@.path /run/systemd/system/
# systemd moves each unit's credentials mount into /run/credentials from a child mount
# namespace: that needs shared propagation (within this namespace only; the host's mounts
# are not peers of these, the namespace was created private)
mount --make-rshared /
exec /lib/systemd/systemd --system --unit=basic.target
"""


class NamespacedSystemd:
    def __init__(self):
        # the venv usually lives in the repository: the units then run it through the bind mount
        python = Path(sys.executable)
        unit_python = (Path("/run/gims-repo") / python.relative_to(REPO)
                       if python.is_relative_to(REPO) else python)
        boot = BOOT % {"repo": REPO, "unit_python": unit_python, "mask": " ".join(MASK),
                       "units": REPO / "units"}
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--propagation", "private",
             "sh", "-c", boot], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.pid = None
        end = time.time() + 30
        while time.time() < end and self.pid is None:
            kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
            for k in kids:
                try:
                    if Path(f"/proc/{k}/comm").read_text().strip() == "systemd":
                        self.pid = int(k)
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError("namespace boot failed: " + self.proc.stderr.read().decode())
            time.sleep(0.1)
        if self.pid is None:
            self.kill()
            raise RuntimeError("systemd did not start in the namespace")
        self.root = Path(f"/proc/{self.pid}/root")
        end = time.time() + 60
        while time.time() < end:
            r = self.run("systemctl", "is-active", "basic.target", check=False)
            if r.stdout.strip() == "active":
                return
            time.sleep(0.2)
        raise RuntimeError("basic.target never became active: " +
                           self.run("systemctl", "--failed", check=False).stdout)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", *cmd],
                              capture_output=True, text=True, check=check, timeout=60)

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def nsd():
    if os.geteuid() != 0:
        pytest.skip("booting systemd in a namespace needs root")
    for tool in ("unshare", "nsenter", "/lib/systemd/systemd"):
        if not shutil.which(tool) and not Path(tool).exists():
            pytest.skip(f"{tool} not available")
    s = NamespacedSystemd()
    yield s
    s.kill()


def setup_experiment(nsd: NamespacedSystemd, exp: str, settings: dict) -> Path:
    sp = nsd.root / "var/spool/gims" / exp
    sp.mkdir(parents=True)
    os.chown(sp, 0, 64990)
    os.chmod(sp, 0o2770)
    st = nsd.root / "var/lib/gims/experiments" / exp
    st.mkdir(parents=True)
    (st / "storage.json").write_text(json.dumps(settings))
    os.chmod(st / "storage.json", 0o600)  # only root (PID 1) reads it, for LoadCredential
    return sp


def drop_files(spool: Path, exp: str, n: int, start: int = 0) -> dict[str, bytes]:
    files = {}
    for i in range(start, start + n):
        payload = os.urandom(50_000 + i)
        name = f"{exp}_LOC_2026112703000{i}.pcap"
        (spool / f".{name}.tmp").write_bytes(payload)
        os.chmod(spool / f".{name}.tmp", 0o640)
        os.replace(spool / f".{name}.tmp", spool / name)
        (spool / f".{name}.m.tmp").write_text(json.dumps(make_meta(exp, name, payload)))
        os.chmod(spool / f".{name}.m.tmp", 0o640)
        os.replace(spool / f".{name}.m.tmp", spool / (name + ".meta.json"))
        files[name] = payload
    return files


def wait_drained(nsd, spool: Path, unit: str, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        if not [n for n in os.listdir(spool) if not n.startswith(".")]:
            # and the service has finished
            r = nsd.run("systemctl", "is-active", unit, check=False).stdout.strip()
            if r in ("inactive", "failed"):
                return
        time.sleep(0.2)
    raise AssertionError(
        f"spool not drained: {os.listdir(spool)}\n" +
        nsd.run("journalctl", "--no-pager", "-n", "60", "-u", unit, check=False).stdout)


def test_path_unit_starts_sandboxed_upload_to_local_and_s3(nsd):
    moto = MotoS3()
    try:
        moto.client().create_bucket(Bucket="gims-unit")
        (nsd.root / "srv/gims").mkdir()
        os.chown(nsd.root / "srv/gims", 64991, 64991)
        node = {"allowed_local_roots": ["/srv/gims"], "parallel": 2}
        sp_local = setup_experiment(nsd, "exp-local", {
            "experiment": "exp-local", "storagetype": "local",
            "storageparams": {"local_storage_dir": "/srv/gims/exp-local"}, "node": node})
        secret = "unit-secret-" + "q" * 28
        sp_s3 = setup_experiment(nsd, "exp-s3", {
            "experiment": "exp-s3", "storagetype": "s3",
            "storageparams": {"s3key": "AKIAGIMSUNIT0001", "s3secret": secret,
                              "s3bucket": "gims-unit"},
            "node": dict(node, s3_endpoint=moto.endpoint)})
        for exp in ("exp-local", "exp-s3"):
            nsd.run("systemctl", "start", f"gims-upload@{exp}.path")
        files_local = drop_files(sp_local, "exp-local", 3)
        files_s3 = drop_files(sp_s3, "exp-s3", 3)
        wait_drained(nsd, sp_local, "gims-upload@exp-local.service")
        wait_drained(nsd, sp_s3, "gims-upload@exp-s3.service")

        dest = nsd.root / "srv/gims/exp-local"
        for name, payload in files_local.items():
            assert (dest / name).read_bytes() == payload
            st = (dest / name).stat()
            assert st.st_uid == 64991  # written by gims-upload, not root
            meta = json.loads((dest / (name + ".meta.json")).read_text())
            assert meta["upload"]["verified"] is True
        c = moto.client()
        for name, payload in files_s3.items():
            assert c.get_object(Bucket="gims-unit", Key=name)["Body"].read() == payload
        for exp in ("exp-local", "exp-s3"):
            show = nsd.run("systemctl", "show", f"gims-upload@{exp}.service",
                           "-p", "Result", "-p", "ExecMainStatus", "-p", "NRestarts").stdout
            assert "Result=success" in show and "ExecMainStatus=0" in show, show
            assert nsd.run("systemctl", "is-active", f"gims-upload@{exp}.path").stdout.strip() \
                == "active"

        # the journal carries EXPERIMENT= (journalctl EXPERIMENT=x works) ...
        j = nsd.run("journalctl", "--no-pager", "-o", "cat", "EXPERIMENT=exp-s3").stdout
        assert all(f"delivered {n} " in j for n in files_s3), j
        assert "exp-local" not in j
        # ... and log_tail reads it from there (the spool's log file removed to be sure)
        os.unlink(sp_s3 / ".gims-upload.log")
        code = ("import json,sys; sys.path.insert(0, %r)\n"
                "from gimsd.upload import log_tail\n"
                "print(json.dumps(log_tail('exp-s3', 50, '/var/spool/gims/exp-s3')))") % str(REPO)
        tail = json.loads(nsd.run(sys.executable, "-c", code).stdout)
        assert sum("delivered " in ln for ln in tail) == 3 and tail[-1].endswith("spool drained")
        assert secret not in j and "AKIAGIMSUNIT0001" not in j
        full = nsd.run("journalctl", "--no-pager", "-o", "verbose").stdout
        assert secret not in full

        # files arriving later trigger a new run through the .path unit
        more = drop_files(sp_local, "exp-local", 1, start=5)
        time.sleep(0.5)
        wait_drained(nsd, sp_local, "gims-upload@exp-local.service")
        for name, payload in more.items():
            assert (dest / name).read_bytes() == payload
    finally:
        moto.stop()


def test_sandbox_isolation_and_no_restart_loop(nsd):
    """While the service waits (a data file without its record), look at the world from inside
    its mount namespace: only its own spool, no gimsd state, a read-only system. Then a
    permanent error under the .path unit: a few slow restarts, never systemd's start limit."""
    (nsd.root / "srv/gims").mkdir()
    os.chown(nsd.root / "srv/gims", 64991, 64991)
    node = {"allowed_local_roots": ["/srv/gims"], "incomplete_poll_seconds": 0.5}
    sp_a = setup_experiment(nsd, "exp-a", {
        "experiment": "exp-a", "storagetype": "local",
        "storageparams": {"local_storage_dir": "/srv/gims/exp-a"}, "node": node})
    setup_experiment(nsd, "exp-b", {"experiment": "exp-b", "storagetype": "local",
                                    "storageparams": {"local_storage_dir": "/srv/gims/b"}})
    (sp_a / "exp-a_LOC_20261127050000.pcap").write_bytes(b"waiting for its record")
    nsd.run("systemctl", "start", "gims-upload@exp-a.path")
    unit = "gims-upload@exp-a.service"
    end = time.time() + 30
    pid = 0
    while time.time() < end and not pid:
        pid = int(nsd.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
                  or 0)
        time.sleep(0.2)
    assert pid, nsd.run("journalctl", "--no-pager", "-n", "30", check=False).stdout

    def inside(*cmd):
        # the unit's mount namespace, as its user (in the host's user namespace: the uids
        # are the same, PrivateUsers= only hides the others)
        return nsd.run("nsenter", "-t", str(pid), "-m", "setpriv", "--reuid=64991",
                       "--regid=64990", "--clear-groups", *cmd, check=False)
    r = inside("ls", "/var/spool/gims")
    assert r.stdout.split() == ["exp-a"], (r.stdout, r.stderr)
    r = inside("ls", "/var/lib/gims")
    assert r.returncode != 0  # gimsd's state, all experiments' credentials: not there
    r = inside("touch", "/etc/gims-upload-was-here")
    assert r.returncode != 0 and "Read-only" in r.stderr, r.stderr
    assert inside("touch", "/srv/gims/probe-from-unit").returncode == 0
    assert inside("touch", "/var/spool/gims/exp-a/.probe").returncode == 0
    # the unit's process as the kernel sees it (MainPID is a PID of the namespace)
    status = (nsd.root / f"proc/{pid}/status").read_text()
    caps = {ln.split(":")[0]: ln.split()[1] for ln in status.splitlines() if ln.startswith("Cap")}
    assert caps["CapEff"] == "0000000000000000" and caps["CapBnd"] == "0000000000000000", caps
    assert "NoNewPrivs:\t1" in status
    # the .path unit first, or it starts the service again (old settings) at once
    nsd.run("systemctl", "stop", "gims-upload@exp-a.path", unit)

    # a permanent error under the path unit: the service waits, exits 75, is started again
    (sp_a / "exp-a_LOC_20261127050000.pcap").unlink()
    st = nsd.root / "var/lib/gims/experiments/exp-a/storage.json"
    st.write_text(json.dumps({"experiment": "exp-a", "storagetype": "local",
                              "storageparams": {"local_storage_dir": "/etc/not-allowed"},
                              "node": dict(node, permanent_retry_seconds=1.5)}))
    nsd.run("journalctl", "--rotate", check=False)
    since = nsd.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    time.sleep(1.1)  # journalctl --since has second resolution
    drop_files(sp_a, "exp-a", 1)
    nsd.run("systemctl", "start", "gims-upload@exp-a.path")
    time.sleep(8)
    journal = nsd.run("journalctl", "--no-pager", "-u", unit, "-o", "cat",
                      "--since", since).stdout
    starts = journal.count("Started gims-upload@exp-a.service")
    assert 2 <= starts <= 7, journal  # one run per ~1.5 s wait, not a burst
    assert "Start request repeated too quickly" not in journal
    assert nsd.run("systemctl", "is-failed", "gims-upload@exp-a.path", check=False) \
        .stdout.strip() != "failed"
    spool_status = json.loads((sp_a / ".gims-upload-status.json").read_text())
    assert "not under an allowed root" in spool_status["last_upload_error"], spool_status
    assert not (nsd.root / "srv/gims/exp-a").exists()  # nothing went anywhere
