"""S3 storage unreachable for a while mid-experiment, then back: every file delivered, none
twice, last_upload_error visible while it lasts. The storage is moto's S3 server over real
HTTP; the outage is a TCP relay in front of it that is stopped (connections refused and cut)
and started again, so moto keeps the objects delivered before the outage."""
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import (SpoolWatcher, check_delivered_pcaps, delivered_pcaps, lost, record, stats,
                       stop_and_drain, unit_failures, wait_for)

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 30


def test_s3_unreachable_then_back_delivers_everything_once(sandbox, am, exp_id, upload_units, moto_s3):
    exp = exp_id
    t_start = time.time()
    bucket = moto_s3.bucket(exp.lower().replace("_", "-")[:40] + "-b")
    ident = {"ExperimentId": exp}
    am.configureExperiment({**ident, "CaptureSpec": {"filterexpr": "", "device": "gims-sb0"},
                            "StorageSpec": {"storagetype": "s3", "storageparams": {
                                **moto_s3.params(bucket), "rollover_interval": 0.05}}})
    assert am.testExperimentStorage(ident).startswith("OK: s3 storage")
    with SpoolWatcher(sandbox, exp) as watch:
        am.startExperiment(ident)
        assert wait_for(lambda: stats(am, exp)["files_uploaded"] >= 1, 30), stats(am, exp)
        moto_s3.proxy.stop()
        t0 = time.monotonic()
        try:
            err = wait_for(lambda: stats(am, exp)["last_upload_error"], OUTAGE_SECONDS)
            assert err, stats(am, exp)
            seen_error = stats(am, exp)
            assert seen_error["files_pending"] >= 1, seen_error
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - t0)))
        finally:
            moto_s3.proxy.start()
        # the error clears once files go through again
        assert wait_for(lambda: not stats(am, exp)["last_upload_error"], 90), stats(am, exp)
        time.sleep(2)
        final = stop_and_drain(am, exp, timeout=120)
    with tempfile.TemporaryDirectory(prefix=f"gims-reliab-{exp}-") as tmp:
        keys = moto_s3.download(bucket, Path(tmp))
        assert len(keys) == len(set(keys))
        files = delivered_pcaps(Path(tmp))
        figures = check_delivered_pcaps(files)
        missing = lost(watch.produced(), files)
        assert not missing, missing
        # none twice: exactly one object per data file the capture wrote (plus its metadata
        # record). The count comes from the capture itself: the spool watcher polls, and a last
        # file written and delivered between two of its looks would be missed by it.
        pcaps = [k for k in keys if k.endswith(".pcap")]
        assert set(n for n in watch.produced() if n.endswith(".pcap")) <= set(pcaps), (pcaps, watch.produced())
        assert len(pcaps) == final["files_written"], (pcaps, final["files_written"])
        assert len(keys) == 2 * len(pcaps), keys
    crashes = unit_failures(sandbox, [exp], t_start)
    assert crashes == 0, crashes
    record("test_storage_outage::s3_unreachable", faults_injected=1, outage_seconds=OUTAGE_SECONDS,
           files_seen_in_spool=len(watch.produced()), files_lost=len(missing), duplicates=0,
           upload_error_seen=str(err)[:120], files_uploaded_stat=final["files_uploaded"], crashes=crashes, **figures)
