#!/usr/bin/env python3
"""Upload throughput of gims's back-ends against the standard tools, same file, same servers,
same run:

- S3: gims's S3 back-end (boto3) vs ``aws s3 cp`` (awscli), both against one moto server
  (a separate process, real HTTP on loopback);
- SFTP: gims's SFTP back-end (paramiko) vs OpenSSH ``sftp -b``, both against one sshd on a
  loopback port with throwaway keys.

Rounds alternate the tools; the table shows the median MB/s (1 MB = 10^6 bytes) and the median
of the per-round ratios gims/peer. Peer times include their process start-up (that is what an
operator pays); gims times are the back-end's put + verify in this process.

    python bench/bench_upload.py [--size-mb 128] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gimsd.storage._botocompat import ensure_botocore_importable  # noqa: E402

ensure_botocore_importable()

import gimsd.storage as storage  # noqa: E402
from tests.storage.conftest import Sshd, free_port, wait_port  # noqa: E402

MOTO_LAUNCH = ("import sys; sys.path.insert(0, %r);"
               "from gimsd.storage._botocompat import ensure_botocore_importable as e; e();"
               "from moto.server import main; main(['-H', '127.0.0.1', '-p', sys.argv[1]])")


#: awscli lives in its own venv: Debian's awscli package brings python3-awscrt 0.16, which
#: moto 5 (in the test venv, which sees system site-packages) then uses and fails on
#: (no crc64nvme) at CompleteMultipartUpload; pip's awscli v1 next to the test venv would
#: replace Debian's botocore. A separate venv disturbs neither.
AWSCLI_VENV = Path("/var/tmp/gims-bench-awscli")


def find_awscli(install: bool) -> str | None:
    aws = shutil.which("aws")
    if aws:
        return aws
    venv_aws = AWSCLI_VENV / "bin" / "aws"
    if not venv_aws.exists() and install:
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(AWSCLI_VENV)], check=True)
        subprocess.run([str(AWSCLI_VENV / "bin" / "pip"), "install", "-q", "awscli"],
                       check=True)
    return str(venv_aws) if venv_aws.exists() else None


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> None:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")


class UploadProcess:
    """One real ``gims-upload --once`` run per round on a spool holding the file and its
    metadata record: process start, hashing, transfer, verification, metadata upload, delete."""

    def __init__(self, work: Path, data: Path, settings: dict):
        import hashlib
        import json
        self.work, self.data = work, data
        self.storage_file = work / f"storage-{settings['storagetype']}.json"
        self.storage_file.write_text(json.dumps(settings))
        h = hashlib.sha256()
        with open(data, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        self.meta = json.dumps({"format": "gims-meta/1", "experiment": "bench",
                                "size": data.stat().st_size, "sha256": h.hexdigest()})

    def __call__(self) -> None:
        spool = self.work / "spool"
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir()
        name = "bench_LOC_20261127000000.pcap"
        os.link(self.data, spool / name)  # no copy: the upload deletes only the link
        (spool / (name + ".meta.json")).write_text(self.meta)
        run([sys.executable, "-m", "gimsd.upload", "--once", "--experiment", "bench",
             "--storage", str(self.storage_file), "--spool", str(spool)],
            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-sftp", action="store_true")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--install-awscli", action="store_true",
                    help="if no aws is on PATH, pip-install awscli into its own venv "
                         f"({AWSCLI_VENV})")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix=f"gims-storage-bench-{os.getpid()}-"))
    data = work / "payload.bin"
    size = args.size_mb * 1_000_000
    with open(data, "wb") as f:
        for _ in range(args.size_mb):
            f.write(os.urandom(1_000_000))
    rows = []
    procs = []
    try:
        if not args.skip_s3:
            aws = find_awscli(args.install_awscli)
            port = free_port()
            moto = subprocess.Popen([sys.executable, "-c", MOTO_LAUNCH % str(REPO), str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(moto)
            wait_port(port, 30)
            endpoint = f"http://127.0.0.1:{port}"
            settings = {"experiment": "bench", "storagetype": "s3",
                        "storageparams": {"s3key": "AKIABENCH0000000", "s3secret": "b" * 40,
                                          "s3bucket": "gims-bench", "s3endpoint": endpoint},
                        "node": {"create_bucket": True}}
            backend = storage.make_backend(settings)
            env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIABENCH0000000",
                       AWS_SECRET_ACCESS_KEY="b" * 40, AWS_DEFAULT_REGION="us-east-1",
                       AWS_PAGER="")
            aws_cmd = [aws, "s3", "cp", "--only-show-errors", "--endpoint-url", endpoint,
                       str(data), "s3://gims-bench/aws-copy.bin"] if aws else None
            proc_run = UploadProcess(work, data, settings)
            g, gp, a = [], [], []
            for _ in range(args.rounds):
                g.append(timed(lambda: (backend.put(str(data), "gims-copy.bin"),
                                        backend.verify("gims-copy.bin", size, None))))
                gp.append(timed(proc_run))
                if aws_cmd:
                    a.append(timed(lambda: run(aws_cmd, env)))
            backend.close()
            peer = " ".join(aws_cmd[:-2] + ["FILE", "s3://gims-bench/KEY"]) if aws_cmd \
                else "aws: not installed"
            rows.append(("S3 (moto)", "gims s3 back-end (boto3 put + head)", g, peer, a))
            rows.append(("S3 (moto)", "gims-upload --once (whole process, metadata too)", gp,
                         "(same)", a))
        if not args.skip_sftp:
            sshd = Sshd(work / "sshd")
            procs.append(sshd)
            keyfile = work / "sshd" / "user_ed25519"
            kh = work / "known_hosts"
            kh.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_pub()}\n")
            settings = {"experiment": "bench", "storagetype": "ssh",
                        "storageparams": sshd.params(), "node": {}}
            backend = storage.make_backend(settings)
            batch = work / "batch"
            (sshd.remote / "bench").mkdir(exist_ok=True)
            batch.write_text(f"put {data} {sshd.remote}/bench/sftp-copy.bin\n")
            sftp_cmd = ["sftp", "-q", "-b", str(batch), "-i", str(keyfile), "-P", str(sshd.port),
                        "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
                        "-o", "BatchMode=yes", f"{sshd.user}@127.0.0.1"]
            proc_run = UploadProcess(work, data, dict(settings, node={"known_hosts": str(kh)}))
            g, gp, o = [], [], []
            for _ in range(args.rounds):
                g.append(timed(lambda: (backend.put(str(data), "gims-copy.bin"),
                                        backend.verify("gims-copy.bin", size, None))))
                gp.append(timed(proc_run))
                o.append(timed(lambda: run(sftp_cmd)))
            backend.close()
            rows.append(("SFTP (OpenSSH sshd)", "gims ssh back-end (paramiko put + stat)", g,
                         " ".join(sftp_cmd), o))
            rows.append(("SFTP (OpenSSH sshd)", "gims-upload --once (whole process, metadata too)",
                         gp, "(same)", o))
    finally:
        for p in procs:
            if isinstance(p, subprocess.Popen):
                p.kill()
                p.wait()
            else:
                p.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"file: {args.size_mb} MB of random data, {args.rounds} rounds, alternating; "
          f"median MB/s (1 MB = 10^6 B)")
    print(f"{'server':22} {'gims MB/s':>10} {'peer MB/s':>10} {'gims/peer':>10}")
    for server, gdesc, g, pcmd, p in rows:
        gm = statistics.median(mbps(size, t) for t in g)
        if p:
            pm = statistics.median(mbps(size, t) for t in p)
            ratio = statistics.median(pt / gt for gt, pt in zip(g, p))
            print(f"{server:22} {gm:10.1f} {pm:10.1f} {ratio:10.2f}")
        else:
            print(f"{server:22} {gm:10.1f} {'n/a':>10} {'n/a':>10}")
        print(f"    gims: {gdesc}")
        print(f"    peer: {pcmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
