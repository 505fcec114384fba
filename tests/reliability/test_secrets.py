"""Secrets never leave the places meant for them: one full AM run with an anonymization key and
S3 credentials, with errors provoked on purpose, then every journal entry of the node
(journalctl -o export, every field), every XML-RPC answer and fault text, every metadata
record delivered and every file left in the spool is searched for the key (hex in both cases,
and the raw 32 bytes) and the S3 secret: none may appear."""
import json
import os
import subprocess
import tempfile
import xmlrpc.client
from pathlib import Path

import pytest

from .conftest import record, stats, stop_and_drain, wait_for

pytestmark = pytest.mark.integration


def needles(key: bytes, secret: str) -> dict[str, bytes]:
    return {"anon key hex": key.hex().encode(), "anon key HEX": key.hex().upper().encode(),
            "anon key raw": key, "s3 secret": secret.encode()}


def test_no_secret_in_logs_answers_metadata_or_errors(sandbox, am, exp_id, upload_units, moto_s3):
    exp = exp_id
    key = os.urandom(32)
    bucket = moto_s3.bucket(exp.lower().replace("_", "-")[:40] + "-s")
    ident = {"ExperimentId": exp}
    answers: list = []
    faults: list[str] = []

    def call(method, *args):
        try:
            answers.append(getattr(am, method)(*args))
        except xmlrpc.client.Fault as f:
            faults.append(f.faultString)

    call("configureExperiment", {**ident, "CaptureSpec": {"filterexpr": "", "device": "gims-sb0"},
                                 "MetaDataSpec": {"UserText": "secrets run"}})
    # upper-case hex: the node must not echo it in any spelling
    call("configureExperiment", {**ident, "TransformSpec": {"SampleSpec": {}, "AggregationSpec": {},
                                 "AnonSpec": {"anontype": "anonymize", "anonkey": key.hex().upper()}}})
    call("configureExperiment", {**ident, "StorageSpec": {"storagetype": "s3", "storageparams": {
        **moto_s3.params(bucket), "rollover_interval": 0.05}}})
    call("testExperimentStorage", ident)
    assert answers[-1].startswith("OK:"), answers[-1]
    call("startExperiment", ident)
    assert wait_for(lambda: stats(am, exp)["files_uploaded"] >= 2, 40), stats(am, exp)
    # errors on purpose: reconfigure while running (with the key again), a second experiment
    # with the same credentials but a bucket that does not exist, a bad key length
    call("configureExperiment", {**ident, "TransformSpec": {"AnonSpec": {"anontype": "anonymize",
                                                                         "anonkey": key.hex()}}})
    other = {"ExperimentId": exp + "-b"}
    call("configureExperiment", {**other, "StorageSpec": {"storagetype": "s3", "storageparams": {
        **moto_s3.params("no-such-bucket-" + exp.lower()[:20])}}})
    call("testExperimentStorage", other)
    assert answers[-1].startswith("FAILED:"), answers[-1]
    call("configureExperiment", {**other, "TransformSpec": {"AnonSpec": {"anontype": "anonymize",
                                                                         "anonkey": key.hex()[:-2]}}})
    call("getExperimentStats", ident)
    call("getState")
    call("getStorageLog", ident, 200)
    stop_and_drain(am, exp)
    call("getExperimentStats", ident)
    assert len(faults) >= 2, faults

    texts = {"xml-rpc answers": json.dumps(answers, default=str).encode(),
             "fault texts": "\n".join(faults).encode()}
    journal = subprocess.run(["nsenter", "-t", str(sandbox.node_pid), "-m", "-p", "-C", "--",
                              "journalctl", "--no-pager", "-o", "export"], capture_output=True, timeout=120)
    assert journal.returncode == 0 and len(journal.stdout) > 10000, journal.stderr
    texts["journal (export, all fields)"] = journal.stdout
    spool = sandbox.path(f"/var/spool/gims/{exp}")
    for p in spool.rglob("*"):
        if p.is_file():
            texts[f"spool {p.relative_to(spool)}"] = p.read_bytes()
    with tempfile.TemporaryDirectory(prefix=f"gims-reliab-{exp}-") as tmp:
        keys = moto_s3.download(bucket, Path(tmp))
        metas = [Path(tmp, Path(k).name) for k in keys if k.endswith(".meta.json")]
        assert len(metas) >= 2, keys
        for m in metas:
            texts[f"metadata {m.name}"] = m.read_bytes()
            assert json.loads(m.read_text())["anonymization"]["scheme"] == "cryptopan"
    found = [(where, what) for where, blob in texts.items() for what, n in needles(key, moto_s3.secret).items()
             if n in blob]
    assert not found, found
    # the search can find things: the key's fingerprint is in the metadata, the bucket in the log
    assert any(bucket.encode() in b for b in texts.values())
    record("test_secrets::full_run", faults_injected=0, error_answers_provoked=len(faults), places_searched=len(texts),
           journal_bytes=len(journal.stdout), metadata_records=len(metas), secrets_found=len(found))
    for unit in (f"gims-upload@{exp}-b.path",):
        sandbox.systemctl("stop", unit, check=False)
