"""Fault tests against the whole node: the sandbox of tests/integration (one real systemd in
namespaces, gimsd on :8001, capture@/gims-upload@ units, live traffic on gims-sb0), shared
for the session. Helpers here: an XML-RPC client, waits, an experiment factory, and a count
of what was produced and delivered, so each test states what a fault lost (target: zero).

Every test appends its figures to $GIMS_RELIAB_FIGURES (default
/var/tmp/gims-reliability-figures.jsonl) and prints them, so docs/RELIABILITY.md can quote
the last run.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
import time
import xmlrpc.client
from pathlib import Path

import pytest

from tests.helpers import wait_for

# The sandbox fixtures of tests/integration (one node per session: a second import of the
# same fixture finds the node up from this repository and reuses it).
from tests.integration.conftest import am, gimsd_url, sandbox, stats, upload_units  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]
FIGURES = Path(os.environ.get("GIMS_RELIAB_FIGURES", "/var/tmp/gims-reliability-figures.jsonl"))


_counter = iter(range(10**6))


@pytest.fixture
def exp_id(sandbox, request):
    """A fresh experiment id per test and run (gimsd keeps experiments across sessions when the
    sandbox is reused); its units are stopped and reset afterwards."""
    name = "r{}-{}-{}".format(os.getpid() % 100000, next(_counter),
                              "".join(c for c in request.node.name if c.isalnum())[5:25])
    yield name
    for unit in (f"capture@{name}.service", f"gims-upload@{name}.path", f"gims-upload@{name}.service"):
        sandbox.systemctl("stop", unit, check=False)
        sandbox.systemctl("reset-failed", unit, check=False)






def gimsd_answering() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 8001), timeout=1).close()
        return True
    except OSError:
        return False


def configure_local(am, exp, filterexpr="", rollover_min=0.05, storage_dir=None, **extra):
    ident = {"ExperimentId": exp}
    am.configureExperiment({**ident, "SiteLocation": "sandbox",
                            "CaptureSpec": {"filterexpr": filterexpr, "device": extra.pop("device", "gims-sb0")},
                            "MetaDataSpec": {"UserText": "gims reliability"}, **extra})
    am.configureExperiment({**ident, "StorageSpec": {"storagetype": "local", "storageparams": {
        "local_storage_dir": storage_dir or f"/srv/gims/{exp}", "rollover_interval": rollover_min}}})
    return ident


def pcap_records(path: Path) -> int:
    """Records of a pcap file counted by walking its record headers (our own count; tcpdump's
    is the independent one)."""
    data = path.read_bytes()
    if len(data) < 24:
        return -1
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    off, n = 24, 0
    while off + 16 <= len(data):
        incl = struct.unpack_from(endian + "I", data, off + 8)[0]
        off += 16 + incl
        n += 1
    return n if off == len(data) else -1


def tcpdump_count(path: Path) -> tuple[int, str]:
    """(packets tcpdump reads, its stderr): an independent reader; a truncated file makes it
    complain ("truncated dump file")."""
    res = subprocess.run(["tcpdump", "-n", "-r", str(path)], capture_output=True, text=True, timeout=60)
    return len(res.stdout.splitlines()), (res.stderr if res.returncode == 0 else f"exit {res.returncode}: {res.stderr}")


def meta_packets(meta: dict) -> int:
    assert isinstance(meta.get("packets_written"), int), f"no packets_written in metadata: {sorted(meta)}"
    return meta["packets_written"]


def delivered_pcaps(root: Path) -> list[tuple[Path, dict]]:
    out = []
    if not root.is_dir():
        return out
    for p in sorted(root.iterdir()):
        if p.suffix == ".pcap":
            m = p.with_name(p.name + ".meta.json")
            assert m.exists(), f"{p.name} delivered without its metadata record"
            out.append((p, json.loads(m.read_text())))
    return out


def check_delivered_pcaps(files: list[tuple[Path, dict]]) -> dict:
    """Every delivered pcap reads cleanly with tcpdump and holds exactly the packets its
    metadata says: no truncated file delivered as complete. Returns counts."""
    recovered = 0
    for p, meta in files:
        n, err = tcpdump_count(p)
        assert "truncated" not in err.lower() and not err.startswith("exit"), (p.name, err)
        assert n == meta_packets(meta) == pcap_records(p), (p.name, n, meta_packets(meta), pcap_records(p))
        assert meta["size"] == p.stat().st_size, p.name
        recovered += bool(meta.get("recovered"))
    return {"files_delivered": len(files), "recovered": recovered}


def record(test: str, **figures) -> None:
    """Append this test's figures (faults injected, files produced/delivered, lost, crashes)."""
    line = {"test": test, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    with FIGURES.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print("FIGURES", json.dumps(line))


def stop_and_drain(am, exp, timeout=60):
    am.stopExperiment({"ExperimentId": exp})
    s = wait_for(lambda: (lambda s: s if s["delivered_all"] and s["files_pending"] == 0
                          and s["state"] in ("stopped", "delivered") else None)(stats(am, exp)), timeout)
    assert s, stats(am, exp)
    return s


class TcpProxy:
    """A TCP relay on a loopback port that a test can stop (storage unreachable: new
    connections are refused, open ones are cut) and start again on the same port."""

    def __init__(self, target_port: int):
        self.target = target_port
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self._lsock = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._lsock = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls):
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


class SpoolWatcher:
    """Notes every data file that appears in an experiment's spool (finished under its final
    name, or still being written as .<name>.tmp), so a test can say which were produced and
    whether each one reached storage."""

    def __init__(self, sandbox, exp: str, step: float = 0.2):
        self.dir = sandbox.path(f"/var/spool/gims/{exp}")
        self.finished: set[str] = set()
        self.partial: dict[str, int] = {}  # name -> largest size seen while being written
        self._stop = threading.Event()
        self._step = step
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self):
        while not self._stop.is_set():
            try:
                for e in os.scandir(self.dir):
                    n = e.name
                    if n.endswith(".meta.json") or n.startswith(".gims"):
                        continue
                    if n.startswith(".") and n.endswith(".tmp"):
                        base = n[1:-4]
                        if not base.endswith((".pcap", ".csv", ".ipfix")):
                            continue  # metadata and state files being written
                        try:
                            self.partial[base] = max(self.partial.get(base, 0), e.stat().st_size)
                        except OSError:
                            pass
                    elif not n.startswith("."):
                        self.finished.add(n)
            except OSError:
                pass
            self._stop.wait(self._step)

    def produced(self) -> set[str]:
        """Data files that held data: finished ones, and partial ones with more than a pcap
        header (a file with no whole record holds nothing to deliver)."""
        return self.finished | {n for n, size in self.partial.items() if size > 24}


def lost(produced: set[str], delivered: list[tuple[Path, dict]]) -> list[str]:
    names = {p.name for p, _ in delivered}
    return sorted(n for n in produced if n.endswith(".pcap") and n not in names)


class MotoS3:
    """moto's S3 server over real HTTP on a host loopback port (the node shares the host's
    network namespace, so its upload units reach it), with a TcpProxy in front that a test
    stops to make the storage unreachable without losing moto's in-memory objects."""

    def __init__(self):
        from gimsd.storage._botocompat import ensure_botocore_importable
        ensure_botocore_importable()  # moto imports boto3; see gimsd/storage/_botocompat.py
        import boto3
        from moto.server import ThreadedMotoServer
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.proxy = TcpProxy(self.port)
        self.proxy.start()
        self.key = "AKIARELIAB" + os.urandom(5).hex().upper()
        self.secret = "reliab-secret-" + os.urandom(16).hex()
        self.client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}", region_name="us-east-1",
                                   aws_access_key_id=self.key, aws_secret_access_key=self.secret)

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def params(self, bucket: str) -> dict:
        return {"s3key": self.key, "s3secret": self.secret, "s3bucket": bucket,
                "s3endpoint": f"http://127.0.0.1:{self.proxy.port}"}

    def download(self, bucket: str, dest: Path) -> list[str]:
        dest.mkdir(parents=True, exist_ok=True)
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                keys.append(obj["Key"])
                self.client.download_file(bucket, obj["Key"], str(dest / Path(obj["Key"]).name))
        return keys

    def close(self):
        self.proxy.stop()
        self.server.stop()


@pytest.fixture(scope="session")
def moto_s3():
    m = MotoS3()
    yield m
    m.close()


class NodeConfig:
    """Edits the node's /etc/gims/gimsd.toml for one test (the sandbox's overlay: the host's
    is never touched), restarts gimsd, and puts the original back afterwards."""

    def __init__(self, sandbox):
        self.sandbox = sandbox
        self.path = sandbox.path("/etc/gims/gimsd.toml")
        self.original = self.path.read_text()

    def _restart(self):
        self.sandbox.systemctl("restart", "gimsd.service")
        assert wait_for(gimsd_answering, 30), "gimsd did not come back with the changed config"

    def set(self, text: str):
        self.path.write_text(text)
        self._restart()

    def with_full_snaplen(self, text: str | None = None) -> str:
        """The config with whole packets captured (snaplen 1500 in [defaults]): the sandbox's
        64-byte default would take minutes of traffic to fill a spool or a write buffer."""
        text = self.original if text is None else text
        assert "\n[defaults]\n" in text, text
        return text.replace("\n[defaults]\n", "\n[defaults]\nsnaplen = 1500\n", 1)

    def restore(self):
        self.path.write_text(self.original)
        self._restart()


def blast_udp(dst: str, nbytes: int, size: int = 1400, port: int = 9) -> int:
    """Send nbytes of UDP towards the sandbox's peer (out through gims-sb0, where the capture
    sees it): fills a spool in seconds where the steady sandbox traffic would take minutes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    payload = os.urandom(size)
    try:
        while sent < nbytes:
            try:
                s.sendto(payload, (dst, port))
                sent += size
            except OSError:
                time.sleep(0.001)
    finally:
        s.close()
    return sent


PEER = "198.18.203.2"  # the sandbox's veth peer: traffic to it crosses gims-sb0


def paced_blast(nbytes: int, seconds: float = 4.0) -> int:
    """nbytes of UDP to the peer spread over a few seconds, so the capture keeps up."""
    chunks = 40
    sent = 0
    for _ in range(chunks):
        sent += blast_udp(PEER, nbytes // chunks)
        time.sleep(seconds / chunks)
    return sent


def unit_failures(sandbox, exps: list[str], since: float) -> int:
    """Times a unit of these experiments, or gimsd, ended in failure since `since` (epoch s),
    from systemd's own journal lines ("<unit>: Failed with result ..."): a test subtracts the
    failures it injected; whatever is left is a crash."""
    out = sandbox.run("journalctl", "--no-pager", "-o", "cat", "--since", f"@{int(since)}",
                      "SYSLOG_IDENTIFIER=systemd", check=False).stdout
    names = [f"@{e}.service" for e in exps] + ["gimsd.service"]
    return sum(1 for line in out.splitlines()
               if "Failed with result" in line and any(n + ":" in line for n in names))
