"""Real servers for the storage tests: OpenSSH's sshd on a loopback port with throwaway keys,
moto's S3 server over real HTTP, and spool files made from the real traces in tests/data."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gimsd.storage._botocompat import ensure_botocore_importable

ensure_botocore_importable()  # moto imports boto3; see gimsd/storage/_botocompat.py

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
NAME = "storage"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# -- spool files --------------------------------------------------------------------------
def make_meta(exp: str, name: str, payload: bytes) -> dict:
    """A metadata record as the capture process writes it (the fields the upload uses)."""
    return {"format": "gims-meta/1", "experiment": exp, "site": "LOC", "data_file": name,
            "data_type": "pcap", "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(), "recovered": False,
            "anonymization": {"scheme": None, "key_fingerprint": None}}


def add_spool_file(spool: Path, exp: str, stamp: str, payload: bytes, ext: str = "pcap") -> str:
    """Write one data file + metadata the way the spool contract says (dot temp, rename,
    then the metadata record)."""
    name = f"{exp}_LOC_{stamp}.{ext}"
    tmp = spool / f".{name}.tmp"
    tmp.write_bytes(payload)
    os.replace(tmp, spool / name)
    mtmp = spool / f".{name}.meta.json.tmp"
    mtmp.write_text(json.dumps(make_meta(exp, name, payload)))
    os.replace(mtmp, spool / (name + ".meta.json"))
    return name


def trace_payloads() -> list[bytes]:
    """Real captures: the pcaps of tests/data."""
    return [p.read_bytes() for p in sorted(DATA.glob("*.pcap"))]


@pytest.fixture
def workdir():
    d = Path(tempfile.mkdtemp(prefix=f"gims-{NAME}-{os.getpid()}-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def spool(workdir):
    s = workdir / "spool"
    s.mkdir()
    return s


def run_upload(settings: dict, spool: Path, exp: str, *extra: str, timeout: float = 120,
               storage_file: Path | None = None) -> subprocess.CompletedProcess:
    storage_file = storage_file or spool.parent / "storage.json"
    storage_file.write_text(json.dumps(settings))
    os.chmod(storage_file, 0o600)
    return subprocess.run(
        [sys.executable, "-m", "gimsd.upload", "--experiment", exp, "--storage",
         str(storage_file), "--spool", str(spool), *extra],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=timeout)


def start_upload(settings: dict, spool: Path, exp: str, *extra: str) -> subprocess.Popen:
    storage_file = spool.parent / "storage.json"
    storage_file.write_text(json.dumps(settings))
    os.chmod(storage_file, 0o600)
    return subprocess.Popen(
        [sys.executable, "-m", "gimsd.upload", "--experiment", exp, "--storage",
         str(storage_file), "--spool", str(spool), *extra],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


FAST_RETRIES = {"retry_initial_seconds": 0.2, "retry_max_seconds": 1.0,
                "round_backoff_initial": 0.5, "round_backoff_max": 2.0,
                "permanent_retry_seconds": 2.0, "attempts_per_file": 3}


# -- sshd ---------------------------------------------------------------------------------
class Sshd:
    """OpenSSH sshd -D on a loopback port, its own host keys, user keys and authorized_keys."""

    def __init__(self, base: Path):
        if os.geteuid() != 0:
            pytest.skip("sshd for SFTP tests must run as root (it switches to the login user)")
        if not Path("/usr/sbin/sshd").exists():
            pytest.skip("openssh-server not installed (.ci/apt-packages.txt lists it)")
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o700)
        self.port = free_port()
        self.user = "root"
        self.remote = base / "remote"
        self.remote.mkdir()
        self.host_keys = {}
        for kt in ("ed25519", "ecdsa", "rsa"):
            p = base / f"host_{kt}"
            subprocess.run(["ssh-keygen", "-q", "-t", kt, "-N", "", "-f", str(p)], check=True)
            self.host_keys[kt] = p
        self.user_keys = {}
        pubs = []
        for kt in ("ed25519", "ecdsa", "rsa"):
            p = base / f"user_{kt}"
            subprocess.run(["ssh-keygen", "-q", "-t", kt, "-N", "", "-f", str(p)], check=True)
            self.user_keys[kt] = p.read_text()
            pubs.append((base / f"user_{kt}.pub").read_text())
        # a PEM (traditional format) RSA key as well: old AMs send those
        pem = base / "user_rsa_pem"
        subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-m", "PEM", "-N", "", "-f", str(pem)],
                       check=True)
        self.user_keys["rsa_pem"] = pem.read_text()
        pubs.append((base / "user_rsa_pem.pub").read_text())
        self.authorized = base / "authorized_keys"
        self.authorized.write_text("".join(pubs))
        os.chmod(self.authorized, 0o600)
        self.log = base / "sshd.log"
        self.config = base / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1",
            *[f"HostKey {p}" for p in self.host_keys.values()],
            f"PidFile {base / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "LogLevel VERBOSE", "Subsystem sftp internal-sftp", "MaxStartups 100",
            "MaxSessions 50", ""]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        self.proc = None
        self.start()

    def host_pub(self, kt: str = "ed25519") -> str:
        return Path(str(self.host_keys[kt]) + ".pub").read_text().strip()

    def start(self) -> None:
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # the listener only: sessions in flight are its children and die with the
            # connection when the client notices; kill them too so the "server" is gone
            children = subprocess.run(["pgrep", "-P", str(self.proc.pid)],
                                      capture_output=True, text=True).stdout.split()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            for c in children:
                try:
                    os.kill(int(c), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        self.proc = None

    def auth_failures(self) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count("Failed publickey for ")

    def params(self, kt: str = "ed25519", **kw) -> dict:
        p = {"sshuser": self.user, "sshhost": "127.0.0.1", "sshport": self.port,
             "sshpath": str(self.remote), "sshkey": self.user_keys[kt],
             "sshhostkey": self.host_pub()}
        p.update(kw)
        return p


@pytest.fixture
def sshd(workdir):
    s = Sshd(workdir / "sshd")
    yield s
    s.stop()


# -- moto S3 ------------------------------------------------------------------------------
class MotoS3:
    def __init__(self):
        from moto.server import ThreadedMotoServer
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._cls = ThreadedMotoServer
        self.server = None
        self.start()

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wait_port(self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="AKIAGIMSTEST0000", aws_secret_access_key="x" * 40)


@pytest.fixture
def moto_s3():
    m = MotoS3()
    yield m
    m.stop()


@pytest.fixture
def moto_s3_auth(moto_s3):
    """moto S3 that checks signatures: an IAM user with an s3:* policy and its access key
    (created while moto still lets everything through), then authentication switched on.
    Yields (server, key id, secret); the bucket is server.bucket. Every request is counted in
    server.requests. (moto keeps its state per process: names are unique per use.)"""
    import logging
    import uuid
    tag = uuid.uuid4().hex[:8]

    import boto3
    import moto.settings as msettings
    iam = boto3.client("iam", endpoint_url=moto_s3.endpoint, region_name="us-east-1",
                       aws_access_key_id="AKIAGIMSADMIN000", aws_secret_access_key="a" * 40)
    iam.create_user(UserName=f"gims-exp-{tag}")
    iam.put_user_policy(UserName=f"gims-exp-{tag}", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=f"gims-exp-{tag}")["AccessKey"]
    moto_s3.bucket = f"gims-auth-{tag}"
    moto_s3.client().create_bucket(Bucket=moto_s3.bucket)

    class Count(logging.Handler):
        def emit(self, record):
            moto_s3.requests.append(record.getMessage())
    moto_s3.requests = []
    handler = Count()
    wz = logging.getLogger("werkzeug")
    old_level = wz.level
    wz.setLevel(logging.INFO)
    wz.addHandler(handler)
    old = msettings.INITIAL_NO_AUTH_ACTION_COUNT
    msettings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield moto_s3, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        msettings.INITIAL_NO_AUTH_ACTION_COUNT = old
        wz.removeHandler(handler)
        wz.setLevel(old_level)
