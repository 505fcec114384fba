"""gims-upload as a process (python -m gimsd.upload) draining a spool into real storage, and the
faults the issue names: server gone mid-drain, wrong credentials, SIGKILL mid-transfer, full disk."""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gimsd.upload import log_tail, read_status
from tests import helpers

from .conftest import (FAST_RETRIES, add_spool_file, run_upload, start_upload,
                       trace_payloads)

EXP = "exp1"


def fill_spool(spool: Path, payloads: list[bytes], start: int = 0) -> dict[str, bytes]:
    files = {}
    for i, p in enumerate(payloads):
        stamp = f"202611270{(start + i) // 3600 % 10}{(start + i) // 60 % 60:02d}{(start + i) % 60:02d}"
        name = add_spool_file(spool, EXP, stamp, p)
        files[name] = p
    return files


def visible(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def assert_delivered(dest: Path, files: dict[str, bytes], spool: Path, extra_ok=()) -> None:
    """Every file and its annotated metadata at the destination, byte for byte, nothing else
    (no temp names, no second copies), and nothing left in the spool."""
    expected = sorted(list(files) + [n + ".meta.json" for n in files])
    assert sorted(n for n in os.listdir(dest) if n not in extra_ok) == expected
    for name, payload in files.items():
        assert (dest / name).read_bytes() == payload, name
        meta = json.loads((dest / (name + ".meta.json")).read_text())
        up = meta["upload"]
        assert up["verified"] is True and up["size"] == len(payload)
        assert up["sha256"] == meta["sha256"]
        assert up["destination"].endswith("/" + name)
        assert "uploaded_at" in up
    assert visible(spool) == []


def assert_no_secrets(spool: Path, secrets: list[str], *texts: str) -> None:
    blobs = list(texts)
    for n in os.listdir(spool):
        p = spool / n
        if p.is_file():
            blobs.append(p.read_text(errors="replace"))
    for s in secrets:
        parts = [s] + [ln for ln in s.splitlines() if len(ln) >= 8 and "PRIVATE KEY" not in ln]
        for part in parts:
            for b in blobs:
                assert part not in b, "a secret leaked"


# tests.helpers.wait_for, raising on timeout, with this module's patience
wait_for = functools.partial(helpers.wait_for, timeout=60.0, step=0.05, what="condition")


# -- happy paths --------------------------------------------------------------------------
@pytest.mark.integration
def test_drain_real_traces_to_local_dir(workdir, spool):
    root = workdir / "srv"
    root.mkdir()
    files = fill_spool(spool, trace_payloads())
    settings = {"experiment": EXP, "storagetype": "local",
                "storageparams": {"local_storage_dir": str(root / EXP)},
                "node": {"allowed_local_roots": [str(root)], "parallel": 4}}
    r = run_upload(settings, spool, EXP)
    assert r.returncode == 0, r.stderr
    assert_delivered(root / EXP, files, spool)
    st = read_status(str(spool))
    assert st["files_uploaded"] == len(files)
    assert st["bytes_uploaded"] == sum(map(len, files.values()))
    assert st["files_pending"] == 0 and st["delivered_all"] is True
    assert st["last_upload_error"] is None and st["last_upload_time"]
    tail = log_tail(EXP, 3, str(spool))
    assert len(tail) == 3 and tail[-1].endswith("spool drained")
    assert sum("delivered " in ln for ln in log_tail(EXP, 1000, str(spool))) == len(files)


@pytest.mark.integration
def test_oldest_first_and_keep_local(workdir, spool):
    root = workdir / "srv"
    root.mkdir()
    payloads = [os.urandom(1000 + i) for i in range(4)]
    # written newest first, so mtime order is the reverse of the names' time order
    files = {}
    for i in reversed(range(4)):
        files[add_spool_file(spool, EXP, f"2026112701000{i}", payloads[i])] = payloads[i]
    settings = {"experiment": EXP, "storagetype": "local",
                "storageparams": {"local_storage_dir": str(root)},
                "node": {"allowed_local_roots": [str(root)], "parallel": 1, "keep_local": True}}
    r = run_upload(settings, spool, EXP)
    assert r.returncode == 0, r.stderr
    assert_delivered(root, files, spool)
    order = [ln.split("delivered ")[1].split()[0] for ln in log_tail(EXP, 100, str(spool))
             if "delivered " in ln]
    assert order == sorted(files)
    kept = spool / ".delivered"
    assert sorted(os.listdir(kept)) == sorted(list(files) + [n + ".meta.json" for n in files])
    for n, p in files.items():
        assert (kept / n).read_bytes() == p
    # a second run finds nothing to do and sends nothing twice
    r = run_upload(settings, spool, EXP)
    assert r.returncode == 0
    assert read_status(str(spool))["files_uploaded"] == 4


@pytest.mark.integration
def test_drain_to_sftp(sshd, workdir, spool):
    files = fill_spool(spool, trace_payloads()[:8])
    settings = {"experiment": EXP, "storagetype": "ssh", "storageparams": sshd.params("rsa"),
                "node": {"known_hosts": "/nonexistent", "parallel": 3}}
    r = run_upload(settings, spool, EXP)
    assert r.returncode == 0, r.stderr
    assert_delivered(sshd.remote / EXP, files, spool)
    assert_no_secrets(spool, [sshd.user_keys["rsa"]], r.stderr, r.stdout)


@pytest.mark.integration
def test_drain_to_s3(moto_s3, workdir, spool):
    moto_s3.client().create_bucket(Bucket="gims-drain")
    payloads = trace_payloads()[:6] + [os.urandom(7 << 20)]  # one multipart upload
    files = fill_spool(spool, payloads)
    secret = "drain-secret-" + "z" * 27
    settings = {"experiment": EXP, "storagetype": "s3",
                "storageparams": {"s3accesskey": "AKIAGIMSDRAIN001", "s3secretkey": secret,
                                  "s3bucket": "gims-drain", "s3prefix": "p"},
                "node": {"s3_endpoint": moto_s3.endpoint, "s3_multipart_threshold": 5 << 20,
                         "s3_multipart_chunksize": 5 << 20}}
    r = run_upload(settings, spool, EXP)
    assert r.returncode == 0, r.stderr
    c = moto_s3.client()
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket="gims-drain")["Contents"])
    assert keys == sorted(f"p/{n}" for n in list(files) + [f + ".meta.json" for f in files])
    for n, p in files.items():
        assert c.get_object(Bucket="gims-drain", Key=f"p/{n}")["Body"].read() == p
        meta = json.loads(c.get_object(Bucket="gims-drain", Key=f"p/{n}.meta.json")["Body"].read())
        assert meta["upload"]["destination"] == f"s3://gims-drain/p/{n}"
        assert meta["upload"]["verified"] is True and meta["upload"]["sha256"] == meta["sha256"]
    assert visible(spool) == []
    assert_no_secrets(spool, [secret, "AKIAGIMSDRAIN001"], r.stderr)


# -- faults -------------------------------------------------------------------------------
@pytest.mark.integration
def test_sftp_server_stopped_mid_drain_then_back(sshd, workdir, spool):
    rnd = random.Random(4)
    files = fill_spool(spool, [os.urandom(rnd.randint(200_000, 900_000)) for _ in range(40)])
    settings = {"experiment": EXP, "storagetype": "ssh", "storageparams": sshd.params(),
                "node": {"known_hosts": "/nonexistent", "parallel": 2, **FAST_RETRIES}}
    proc = start_upload(settings, spool, EXP)
    try:
        wait_for(lambda: read_status(str(spool))["files_uploaded"] >= 4, what="first uploads")
        sshd.stop()
        st = wait_for(lambda: (s := read_status(str(spool)))["last_upload_error"] and s,
                      what="the error to show in the status")
        assert st["files_pending"] > 0 and st["delivered_all"] is False
        assert "cannot connect" in st["last_upload_error"] or "SSH" in st["last_upload_error"] \
            or "upload" in st["last_upload_error"], st["last_upload_error"]
        time.sleep(3)  # the outage lasts; the uploader keeps backing off, it does not exit
        assert proc.poll() is None
        assert read_status(str(spool))["last_upload_error"]
        sshd.start()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_delivered(sshd.remote / EXP, files, spool)
    st = read_status(str(spool))
    assert st["files_uploaded"] == len(files) and st["delivered_all"] is True
    assert st["last_upload_error"] is None
    log = "\n".join(log_tail(EXP, 10_000, str(spool)))
    assert "retrying" in log
    for n in files:
        assert log.count(f"delivered {n} ") == 1


@pytest.mark.integration
def test_s3_server_stopped_mid_drain_then_back(moto_s3, workdir, spool):
    moto_s3.client().create_bucket(Bucket="gims-outage")
    rnd = random.Random(5)
    files = fill_spool(spool, [os.urandom(rnd.randint(200_000, 900_000)) for _ in range(40)])
    settings = {"experiment": EXP, "storagetype": "s3",
                "storageparams": {"s3key": "AKIAGIMSOUTAGE01", "s3secret": "o" * 40,
                                  "s3bucket": "gims-outage", "s3endpoint": moto_s3.endpoint},
                "node": {"parallel": 2, **FAST_RETRIES}}
    proc = start_upload(settings, spool, EXP)
    try:
        wait_for(lambda: read_status(str(spool))["files_uploaded"] >= 4, what="first uploads")
        moto_s3.stop()
        st = wait_for(lambda: (s := read_status(str(spool)))["last_upload_error"] and s,
                      what="the error to show in the status")
        assert "cannot reach" in st["last_upload_error"], st["last_upload_error"]
        assert st["files_pending"] > 0 and not st["delivered_all"]
        time.sleep(3)
        assert proc.poll() is None
        moto_s3.start()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    c = moto_s3.client()
    objs = c.list_objects_v2(Bucket="gims-outage")["Contents"]
    assert sorted(o["Key"] for o in objs) == sorted(list(files) + [f + ".meta.json" for f in files])
    for n, p in files.items():
        assert c.get_object(Bucket="gims-outage", Key=n)["Body"].read() == p
    st = read_status(str(spool))
    assert st["files_uploaded"] == len(files) and st["delivered_all"]


@pytest.mark.integration
def test_sftp_wrong_credentials_no_retry_storm(sshd, workdir, spool):
    files = fill_spool(spool, trace_payloads()[:10])
    intruder = workdir / "intruder"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(intruder)], check=True)
    key = intruder.read_text()
    settings = {"experiment": EXP, "storagetype": "ssh",
                "storageparams": sshd.params(sshkey=key),
                "node": {"known_hosts": "/nonexistent", "parallel": 4, **FAST_RETRIES}}
    before = sshd.auth_failures()
    r = run_upload(settings, spool, EXP, "--once")
    assert r.returncode == 75, r.stderr
    connections = wait_for(lambda: sshd.auth_failures() - before, timeout=5,
                           what="sshd to log the failed logins")
    time.sleep(0.5)  # sshd's per-connection children log asynchronously
    connections = sshd.auth_failures() - before
    st = read_status(str(spool))
    # one failed login per worker at most, not one per file and retry
    assert 1 <= connections <= 4, (connections, log_tail(EXP, 50, str(spool)))
    assert st["upload_attempts"] <= 4
    assert "authentication failed" in st["last_upload_error"]
    assert st["files_pending"] == len(files) and st["files_uploaded"] == 0
    assert sorted(visible(spool)) == sorted(list(files) + [n + ".meta.json" for n in files])
    assert_no_secrets(spool, [key], r.stderr, r.stdout)
    # service mode: waits permanent_retry_seconds, then exits 75 for the unit to reload creds
    t0 = time.time()
    r = run_upload(settings, spool, EXP)
    assert r.returncode == 75 and time.time() - t0 >= 2.0
    assert sshd.auth_failures() - before <= 8


@pytest.mark.integration
def test_sigkill_mid_transfer_then_rerun_delivers_once(sshd, workdir, spool):
    payload = os.urandom(150 << 20)
    files = fill_spool(spool, [payload])
    (name,) = files
    settings = {"experiment": EXP, "storagetype": "ssh", "storageparams": sshd.params(),
                "node": {"known_hosts": "/nonexistent", "parallel": 1}}
    dest = sshd.remote / EXP
    part = dest / f".{name}.gims-part"
    proc = start_upload(settings, spool, EXP)
    try:
        wait_for(lambda: part.exists() and part.stat().st_size > (10 << 20), timeout=60,
                 step=0.01, what="a transfer in flight")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (dest / name).exists()  # nothing under the final name from the cut transfer
    assert part.stat().st_size < len(payload)
    assert sorted(visible(spool)) == [name, name + ".meta.json"]  # local copy kept
    r = run_upload(settings, spool, EXP)
    assert r.returncode == 0, r.stderr
    assert_delivered(dest, files, spool)  # also: the temp name is gone, no second copy


@pytest.mark.integration
def test_full_local_disk_keeps_files_and_recovers(workdir, spool):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    root = workdir / "srv"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "gims-storage-full", str(root)],
                   check=True)
    try:
        files = fill_spool(spool, [os.urandom(900_000) for _ in range(6)])
        settings = {"experiment": EXP, "storagetype": "local",
                    "storageparams": {"local_storage_dir": str(root / EXP)},
                    "node": {"allowed_local_roots": [str(root)], "parallel": 1, **FAST_RETRIES}}
        r = run_upload(settings, spool, EXP, "--once")
        assert r.returncode == 75, r.stderr
        st = read_status(str(spool))
        assert "disk full" in st["last_upload_error"]
        assert 1 <= st["files_uploaded"] < len(files)
        # nothing half-written at the destination, nothing lost in the spool
        dest_names = os.listdir(root / EXP)
        assert not [n for n in dest_names if n.endswith(".gims-part")]
        delivered = {n for n in dest_names if not n.endswith(".meta.json")}
        pending = {n for n in visible(spool) if not n.endswith(".meta.json")}
        assert delivered | pending == set(files) and not delivered & pending
        for n in delivered:
            assert (root / EXP / n).read_bytes() == files[n]
        subprocess.run(["mount", "-o", "remount,size=16m", str(root)], check=True)
        r = run_upload(settings, spool, EXP, "--once")
        assert r.returncode == 0, r.stderr
        assert_delivered(root / EXP, files, spool)
        assert read_status(str(spool))["files_uploaded"] == len(files)
    finally:
        subprocess.run(["umount", str(root)], check=False)


@pytest.mark.integration
def test_bad_records_are_set_aside_and_reported(workdir, spool):
    root = workdir / "srv"
    root.mkdir()
    good = fill_spool(spool, [b"good" * 100])
    (spool / "exp1_LOC_20261127020000.pcap").write_bytes(b"x" * 10)
    (spool / "exp1_LOC_20261127020000.pcap.meta.json").write_text("{not json")
    trunc = add_spool_file(spool, EXP, "20261127020001", b"y" * 100)
    with open(spool / trunc, "r+b") as f:  # the data file is cut after its record was made
        f.truncate(50)
    (spool / "exp1_LOC_20261127020002.pcap").write_bytes(b"no metadata yet")  # incomplete
    settings = {"experiment": EXP, "storagetype": "local",
                "storageparams": {"local_storage_dir": str(root)},
                "node": {"allowed_local_roots": [str(root)]}}
    r = run_upload(settings, spool, EXP, "--once")  # service mode would wait for the record
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(root)) == sorted(list(good) + [n + ".meta.json" for n in good])
    st = read_status(str(spool))
    assert st["files_failed"] == 2 and st["delivered_all"] is False
    assert st["files_incomplete"] == 1
    assert sorted(st["failed_files"]) == ["exp1_LOC_20261127020000.pcap", trunc]
    assert st["last_upload_error"]
    assert visible(spool) == ["exp1_LOC_20261127020002.pcap"]  # not complete: not touched
    log = "\n".join(log_tail(EXP, 50, str(spool)))
    assert "metadata record unreadable" in log and "its metadata says 100" in log


@pytest.mark.integration
def test_crash_between_local_deletes_is_finished_not_resent(workdir, spool):
    root = workdir / "srv"
    root.mkdir()
    files = fill_spool(spool, [os.urandom(5000)])
    (name,) = files
    settings = {"experiment": EXP, "storagetype": "local",
                "storageparams": {"local_storage_dir": str(root)},
                "node": {"allowed_local_roots": [str(root)]}}
    assert run_upload(settings, spool, EXP).returncode == 0
    # as if the process died after deleting the data file but before its record
    shutil.copy(root / (name + ".meta.json"), spool / (name + ".meta.json"))
    mtime = os.stat(root / name).st_mtime_ns
    r = run_upload(settings, spool, EXP)
    assert r.returncode == 0, r.stderr
    assert visible(spool) == []
    assert os.stat(root / name).st_mtime_ns == mtime  # the data was not sent again
    assert read_status(str(spool))["files_uploaded"] == 1


def test_settings_for_another_experiment_are_refused(workdir, spool):
    fill_spool(spool, [b"a"])
    settings = {"experiment": "other", "storagetype": "local",
                "storageparams": {"local_storage_dir": str(workdir)},
                "node": {"allowed_local_roots": [str(workdir)]}}
    r = run_upload(settings, spool, EXP, "--once")
    assert r.returncode == 2
    assert "settings file is for 'other'" in read_status(str(spool))["last_upload_error"]


def test_unusable_settings_wait_instead_of_a_restart_loop(workdir, spool):
    """Under the .path unit an immediate exit would be restarted at once; the service waits
    (until stopped) instead of exiting right away."""
    fill_spool(spool, [b"a"])
    proc = start_upload({"experiment": EXP, "storagetype": "s3", "storageparams": {}},
                        spool, EXP)
    try:
        wait_for(lambda: read_status(str(spool))["last_upload_error"], timeout=20,
                 what="the error to be recorded")
        time.sleep(1.0)
        assert proc.poll() is None
        assert "s3key: required" in read_status(str(spool))["last_upload_error"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_arguments_one_line_exit_2(workdir, spool):
    r = run_upload({"experiment": "../x"}, spool, "../x")
    assert r.returncode == 2 and "--experiment" in r.stderr


@pytest.mark.integration
def test_s3_wrong_credentials_clear_reason_no_retry_storm(moto_s3_auth, workdir, spool):
    import gimsd.storage as storage
    server, key_id, secret = moto_s3_auth
    params = {"s3key": key_id, "s3secret": secret, "s3bucket": server.bucket,
              "s3endpoint": server.endpoint}
    ok, reason = storage.test_storage({"experiment": EXP, "storagetype": "s3",
                                       "storageparams": params})
    assert ok, reason
    wrong_secret = "not-the-secret-" + "w" * 25
    bad = dict(params, s3secret=wrong_secret)
    ok, reason = storage.test_storage({"experiment": EXP, "storagetype": "s3",
                                       "storageparams": bad})
    assert not ok and "SignatureDoesNotMatch" in reason and "check s3secret" in reason, reason
    ok, reason = storage.test_storage({"experiment": EXP, "storagetype": "s3",
                                       "storageparams": dict(params, s3key="AKIAGIMSNOSUCH00")})
    assert not ok and "InvalidAccessKeyId" in reason, reason

    files = fill_spool(spool, trace_payloads()[:12])
    server.requests.clear()
    r = run_upload({"experiment": EXP, "storagetype": "s3", "storageparams": bad,
                    "node": {"parallel": 4, **FAST_RETRIES}}, spool, EXP, "--once")
    assert r.returncode == 75, r.stderr
    puts = [m for m in server.requests if f"PUT /{server.bucket}/" in m]
    # at most one refused PUT per worker (botocore's standard mode does not retry a 403),
    # not one per file and retry
    assert 1 <= len(puts) <= 4, server.requests
    st = read_status(str(spool))
    assert "SignatureDoesNotMatch" in st["last_upload_error"]
    assert st["files_pending"] == len(files) and st["files_uploaded"] == 0
    assert_no_secrets(spool, [wrong_secret, secret], r.stderr, r.stdout, reason)


@pytest.mark.integration
def test_data_file_without_record_waits_instead_of_exiting(workdir, spool):
    """A visible data file without its metadata record (a capture killed between the two
    renames) must not make the service exit at once: the .path unit would restart it in a
    tight loop. It waits, says so, and delivers once the record appears."""
    root = workdir / "srv"
    root.mkdir()
    payload = os.urandom(3000)
    name = f"{EXP}_LOC_20261127040000.pcap"
    (spool / name).write_bytes(payload)
    settings = {"experiment": EXP, "storagetype": "local",
                "storageparams": {"local_storage_dir": str(root)},
                "node": {"allowed_local_roots": [str(root)], "incomplete_poll_seconds": 0.2}}
    proc = start_upload(settings, spool, EXP)
    try:
        st = wait_for(lambda: (s := read_status(str(spool)))["upload_state"]
                      == "waiting-for-metadata" and s, timeout=20, what="waiting state")
        assert st["files_incomplete"] == 1 and st["delivered_all"] is False
        time.sleep(1.0)
        assert proc.poll() is None
        from .conftest import make_meta
        (spool / f".{name}.meta.json.tmp").write_text(json.dumps(make_meta(EXP, name, payload)))
        os.replace(spool / f".{name}.meta.json.tmp", spool / f"{name}.meta.json")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_delivered(root, {name: payload}, spool)
    assert read_status(str(spool))["delivered_all"] is True
    assert "waiting for the metadata record of " + name in "\n".join(log_tail(EXP, 20, str(spool)))


@pytest.mark.integration
def test_sigterm_while_backing_off_stops_promptly_and_loses_nothing(sshd, workdir, spool):
    files = fill_spool(spool, [os.urandom(2000) for _ in range(3)])
    settings = {"experiment": EXP, "storagetype": "ssh", "storageparams": sshd.params(),
                "node": {"known_hosts": "/nonexistent", **FAST_RETRIES,
                         "round_backoff_initial": 30.0, "round_backoff_max": 60.0}}
    sshd.stop()  # storage unreachable from the start
    proc = start_upload(settings, spool, EXP)
    try:
        wait_for(lambda: read_status(str(spool))["upload_state"] == "waiting", timeout=30,
                 what="the uploader to back off")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 75  # files remain: not "drained"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    st = read_status(str(spool))
    assert st["upload_state"] == "stopped" and st["files_pending"] == len(files)
    assert "cannot connect" in st["last_upload_error"]
    assert sorted(visible(spool)) == sorted(list(files) + [n + ".meta.json" for n in files])
