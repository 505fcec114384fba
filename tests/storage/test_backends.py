"""The back-ends one by one, against real servers: a local directory, OpenSSH's sshd, moto's S3."""
from __future__ import annotations

import os
import subprocess

import pytest

import gimsd.storage as storage
from gimsd.storage import PermanentStorageError, TransientStorageError

from .conftest import trace_payloads


def test_registry_lists_every_backend_module_as_available():
    av = storage.available_backends()
    assert set(av) == {"local", "s3", "ssh"}
    for name, info in av.items():
        assert info["available"] is True, (name, info)
        assert info["reason"]


def test_backend_with_broken_library_is_unavailable_not_a_crash(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "paramiko" or name.startswith("paramiko."):
            raise ImportError("No module named 'paramiko'")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    av = storage.available_backends()
    assert av["ssh"]["available"] is False
    assert "paramiko" in av["ssh"]["reason"]
    assert av["local"]["available"] is True
    ok, reason = storage.test_storage({"experiment": "e", "storagetype": "ssh", "storageparams": {
        "sshuser": "u", "sshhost": "h", "sshkey": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n"}})
    assert not ok and "unavailable" in reason


@pytest.mark.parametrize("stype,params,field", [
    ("nfs", {}, "storagetype"),
    ("local", {}, "local_storage_dir"),
    ("local", {"local_storage_dir": "relative/dir"}, "local_storage_dir"),
    ("s3", {"s3secret": "x", "s3bucket": "bkt"}, "s3key"),
    ("s3", {"s3key": "x", "s3bucket": "bkt"}, "s3secret"),
    ("s3", {"s3accesskey": "x", "s3secretkey": "y"}, "s3bucket"),
    ("s3", {"s3key": "x", "s3secret": "y", "s3bucket": "b/../c"}, "s3bucket"),
    ("s3", {"s3key": "x", "s3secret": "y", "s3bucket": "bkt", "s3endpoint": "ftp://x"},
     "s3endpoint"),
    ("ssh", {"sshhost": "h", "sshkey": "-----BEGIN RSA PRIVATE KEY-----"}, "sshuser"),
    ("ssh", {"sshuser": "u", "sshkey": "-----BEGIN RSA PRIVATE KEY-----"}, "sshhost"),
    ("ssh", {"sshuser": "u", "sshhost": "h"}, "sshkey"),
    ("ssh", {"sshuser": "u", "sshhost": "h", "sshkey": "not a key"}, "sshkey"),
    ("ssh", {"sshuser": "u", "sshhost": "h", "sshport": "ssh",
             "sshkey": "-----BEGIN RSA PRIVATE KEY-----"}, "sshport"),
    ("ssh", {"sshuser": "u", "sshhost": "h", "sshport": 70000,
             "sshkey": "-----BEGIN RSA PRIVATE KEY-----"}, "sshport"),
    ("ssh", {"sshuser": "u", "sshhost": "h", "sshkey": "-----BEGIN RSA PRIVATE KEY-----",
             "sshhostkey": "garbage"}, "sshhostkey"),
])
def test_validate_params_names_the_bad_field(stype, params, field):
    with pytest.raises(ValueError) as ei:
        storage.validate_params(stype, params)
    assert str(ei.value).startswith(field), str(ei.value)


def test_validate_params_accepts_both_s3_spellings():
    storage.validate_params("s3", {"s3key": "a", "s3secret": "b", "s3bucket": "bkt"})
    storage.validate_params("s3", {"s3accesskey": "a", "s3secretkey": "b", "s3bucket": "bkt"})


# -- local --------------------------------------------------------------------------------
def local_settings(root, target, **node):
    n = {"allowed_local_roots": [str(root)]}
    n.update(node)
    return {"experiment": "exp1", "storagetype": "local",
            "storageparams": {"local_storage_dir": str(target)}, "node": n}


def test_local_refuses_dirs_outside_the_allowed_roots(workdir):
    root = workdir / "srv"
    root.mkdir()
    outside = workdir / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    for target in (outside, root / "link" / "x", root / ".." / "elsewhere"):
        ok, reason = storage.test_storage(local_settings(root, target))
        assert not ok
        assert "not under an allowed root" in reason, reason
    assert list(outside.iterdir()) == []  # nothing was written there


def test_local_put_verify_probe(workdir):
    root = workdir / "srv"
    root.mkdir()
    ok, reason = storage.test_storage(local_settings(root, root / "exp1"))
    assert ok, reason
    assert list((root / "exp1").iterdir()) == []  # probe deleted
    b = storage.make_backend(local_settings(root, root / "exp1"))
    payload = trace_payloads()[0]
    src = workdir / "f.pcap"
    src.write_bytes(payload)
    r = b.put(str(src), "f.pcap")
    assert r.size == len(payload) and r.uri == f"file://{root}/exp1/f.pcap"
    assert (root / "exp1" / "f.pcap").read_bytes() == payload
    assert b.verify("f.pcap", len(payload), r.sha256)
    assert not b.verify("f.pcap", len(payload), "0" * 64)
    assert not b.verify("f.pcap", len(payload) + 1, None)
    assert not b.verify("missing.pcap", 1, None)


def test_local_permission_denied_is_permanent(workdir):
    root = workdir / "srv"
    (root / "ro").mkdir(parents=True)
    os.chmod(root / "ro", 0o555)
    src = workdir / "f"
    src.write_bytes(b"x")
    # root ignores mode bits; drop to nobody in a child so the kernel really refuses
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import os; os.setgid(65534); os.setuid(65534)\n"
            "import gimsd.storage as s\n"
            "b = s.make_backend(%r)\n"
            "try:\n    b.put(%r, 'f')\nexcept s.PermanentStorageError as e:\n    print('PERM', e)\n"
            "except s.TransientStorageError as e:\n    print('TRANS', e)\n") % (
        str(os.getcwd()), local_settings(root, root / "ro"), str(src))
    os.chmod(src, 0o644)
    os.chmod(workdir, 0o755)
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.getcwd())
    assert out.stdout.startswith("PERM"), (out.stdout, out.stderr)
    assert "Permission denied" in out.stdout


# -- SFTP ---------------------------------------------------------------------------------
def ssh_settings(sshd, kt="ed25519", node=None, **kw):
    return {"experiment": "exp1", "storagetype": "ssh", "storageparams": sshd.params(kt, **kw),
            "node": node or {"known_hosts": "/nonexistent"}}


@pytest.mark.integration
@pytest.mark.parametrize("kt", ["ed25519", "ecdsa", "rsa", "rsa_pem"])
def test_sftp_each_key_type_probe_and_put(sshd, workdir, kt):
    s = ssh_settings(sshd, kt)
    ok, reason = storage.test_storage(s)
    assert ok, reason
    b = storage.make_backend(s)
    try:
        payload = trace_payloads()[1]
        src = workdir / "t.pcap"
        src.write_bytes(payload)
        r = b.put(str(src), "t.pcap")
        dest = sshd.remote / "exp1" / "t.pcap"
        assert dest.read_bytes() == payload
        assert r.uri == f"sftp://root@127.0.0.1:{sshd.port}{sshd.remote}/exp1/t.pcap"
        assert b.verify("t.pcap", len(payload), None)
        assert not b.verify("t.pcap", len(payload) - 1, None)
        assert sorted(os.listdir(sshd.remote / "exp1")) == ["t.pcap"]  # no temp, no probe
    finally:
        b.close()


@pytest.mark.integration
def test_sftp_host_key_mismatch_is_refused(sshd, workdir):
    other = workdir / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = (workdir / "other.pub").read_text()
    ok, reason = storage.test_storage(ssh_settings(sshd, sshhostkey=wrong))
    assert not ok
    assert "host key mismatch" in reason and "probe write failed" in reason, reason
    assert not (sshd.remote / "exp1").exists()
    b = storage.make_backend(ssh_settings(sshd, sshhostkey=wrong))
    (workdir / "x").write_bytes(b"x")
    with pytest.raises(PermanentStorageError):
        b.put(str(workdir / "x"), "x")


@pytest.mark.integration
def test_sftp_known_hosts_and_first_use_pinning(sshd, workdir):
    kh = workdir / "known_hosts"
    # unknown host, no TOFU: refused
    ok, reason = storage.test_storage(ssh_settings(sshd, sshhostkey=None,
                                                   node={"known_hosts": str(kh)}))
    assert not ok and "unknown" in reason, reason
    # operator's known_hosts line for [127.0.0.1]:port (the ECDSA key, to vary)
    kh.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_pub('ed25519')}\n")
    ok, reason = storage.test_storage(ssh_settings(sshd, sshhostkey=None,
                                                   node={"known_hosts": str(kh)}))
    assert ok, reason
    # a known_hosts line as sshhostkey works too
    ok, reason = storage.test_storage(ssh_settings(
        sshd, sshhostkey=f"[127.0.0.1]:{sshd.port} {sshd.host_pub()}", node={}))
    assert ok, reason
    # TOFU: pins on first use into the given file, then enforces it
    pins = workdir / "pins"
    node = {"known_hosts": str(workdir / "none"), "trust_on_first_use": True,
            "tofu_known_hosts": str(pins)}
    ok, reason = storage.test_storage(ssh_settings(sshd, sshhostkey=None, node=node))
    assert ok, reason
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519 " in pins.read_text()
    # a pin that differs from what the server offers: refused
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "o")],
                   check=True)
    pins.write_text(f"[127.0.0.1]:{sshd.port} {(workdir / 'o.pub').read_text()}")
    ok, reason = storage.test_storage(ssh_settings(sshd, sshhostkey=None, node=node))
    assert not ok and "host key mismatch" in reason, reason


@pytest.mark.integration
def test_sftp_wrong_key_clear_reason_without_secret(sshd, workdir):
    other = workdir / "intruder"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    key = other.read_text()
    ok, reason = storage.test_storage(ssh_settings(sshd, sshkey=key))
    assert not ok
    assert "authentication failed for root@127.0.0.1" in reason, reason
    for line in key.splitlines()[1:-1]:
        assert line not in reason


@pytest.mark.integration
def test_sftp_server_down_is_transient(sshd, workdir):
    b = storage.make_backend(ssh_settings(sshd))
    sshd.stop()
    (workdir / "x").write_bytes(b"x")
    with pytest.raises(TransientStorageError) as ei:
        b.put(str(workdir / "x"), "x")
    assert "cannot connect" in str(ei.value)


# -- S3 -----------------------------------------------------------------------------------
def s3_settings(moto_s3, bucket, **node):
    return {"experiment": "exp1", "storagetype": "s3",
            "storageparams": {"s3key": "AKIAGIMSTEST0001", "s3secret": "gims-secret-" + "s" * 28,
                              "s3bucket": bucket, "s3endpoint": moto_s3.endpoint,
                              "s3prefix": "captures/exp1"},
            "node": node}


@pytest.mark.integration
def test_s3_probe_put_verify_byte_for_byte(moto_s3, workdir):
    moto_s3.client().create_bucket(Bucket="gims-b1")
    s = s3_settings(moto_s3, "gims-b1", s3_multipart_threshold=5 << 20,
                    s3_multipart_chunksize=5 << 20)
    ok, reason = storage.test_storage(s)
    assert ok, reason
    b = storage.make_backend(s)
    small = trace_payloads()[0]
    big = os.urandom(11 << 20)  # above the threshold: multipart with per-part SHA-256
    for name, payload in (("small.pcap", small), ("big.pcap", big)):
        (workdir / name).write_bytes(payload)
        r = b.put(str(workdir / name), name)
        assert r.uri == f"s3://gims-b1/captures/exp1/{name}"
        got = moto_s3.client().get_object(Bucket="gims-b1", Key=f"captures/exp1/{name}")
        assert got["Body"].read() == payload
        assert b.verify(name, len(payload), r.sha256)
        assert not b.verify(name, len(payload), "0" * 64)
    head = moto_s3.client().head_object(Bucket="gims-b1", Key="captures/exp1/big.pcap")
    assert head["ETag"].endswith('-3"')  # really multipart
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket="gims-b1")["Contents"]]
    assert sorted(keys) == ["captures/exp1/big.pcap", "captures/exp1/small.pcap"]


@pytest.mark.integration
def test_s3_missing_bucket_is_not_created_unless_configured(moto_s3):
    ok, reason = storage.test_storage(s3_settings(moto_s3, "gims-nobucket"))
    assert not ok and "bucket gims-nobucket does not exist" in reason, reason
    names = [b["Name"] for b in moto_s3.client().list_buckets()["Buckets"]]
    assert "gims-nobucket" not in names
    ok, reason = storage.test_storage(s3_settings(moto_s3, "gims-made", create_bucket=True))
    assert ok, reason
    names = [b["Name"] for b in moto_s3.client().list_buckets()["Buckets"]]
    assert "gims-made" in names


@pytest.mark.integration
def test_s3_endpoint_down_is_transient_and_secret_free(moto_s3, workdir):
    moto_s3.client().create_bucket(Bucket="gims-b2")
    s = s3_settings(moto_s3, "gims-b2")
    b = storage.make_backend(s)
    moto_s3.stop()
    (workdir / "x").write_bytes(b"x")
    with pytest.raises(TransientStorageError) as ei:
        b.put(str(workdir / "x"), "x")
    assert "cannot reach" in str(ei.value)
    ok, reason = storage.test_storage(s)
    assert not ok and "cannot reach" in reason
    for secret in (s["storageparams"]["s3secret"], s["storageparams"]["s3key"]):
        assert secret not in reason and secret not in str(ei.value)


def test_paramiko_speedup_keeps_asbytes_semantics():
    import paramiko
    from paramiko.common import asbytes

    from gimsd.storage._paramikocompat import speed_up_paramiko
    speed_up_paramiko()
    m = paramiko.Message()
    m.add_string(b"x" * 100)
    assert asbytes(m) == m.asbytes()
    assert asbytes("é") == "é".encode()
    assert asbytes(b"\x00") == b"\x00"
    o = object()
    assert asbytes(o) is o  # paramiko's documented fallback: returned unchanged


@pytest.mark.integration
def test_s3_write_only_credentials_still_verified_by_the_checksummed_put(moto_s3_auth, workdir):
    """A policy with s3:PutObject only (no ListBucket/GetObject): HEAD is refused, but the
    single PUT carried Content-MD5 and a SHA-256 the server checked, which is the proof."""
    import json as _json

    import boto3
    server, _, _ = moto_s3_auth
    import moto.settings as msettings
    msettings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")  # admin calls while setting up
    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                       aws_access_key_id="AKIAGIMSADMIN000", aws_secret_access_key="a" * 40)
    wo = "gims-wo-" + server.bucket[-8:]
    iam.create_user(UserName=wo)
    iam.put_user_policy(UserName=wo, PolicyName="put", PolicyDocument=_json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=wo)["AccessKey"]
    msettings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    b = storage.make_backend({"experiment": "exp1", "storagetype": "s3", "storageparams": {
        "s3key": key["AccessKeyId"], "s3secret": key["SecretAccessKey"],
        "s3bucket": server.bucket, "s3endpoint": server.endpoint}})
    payload = trace_payloads()[2]
    (workdir / "w.pcap").write_bytes(payload)
    r = b.put(str(workdir / "w.pcap"), "w.pcap")
    with pytest.raises(PermanentStorageError):
        b._head("w.pcap")  # really not allowed to read
    assert b.verify("w.pcap", len(payload), r.sha256)
    with pytest.raises(PermanentStorageError):
        b.verify("w.pcap", len(payload), "0" * 64)  # not what was accepted: no proof
    with pytest.raises(PermanentStorageError):
        b.verify("never-put.pcap", 1, None)  # no proof: the error stands
    msettings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    got = server.client().get_object(Bucket=server.bucket, Key="w.pcap")["Body"].read()
    assert got == payload
