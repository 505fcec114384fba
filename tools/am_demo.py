#!/usr/bin/env python3
"""Play a GENI Aggregate Manager against a gims node, the way the original AMs drove it.

Configures an experiment in several partial calls (capture, transforms, storage, metadata),
starts it, watches its stats, stops it and waits until every file has reached storage.
Usage: am_demo.py [--url http://127.0.0.1:8001/] [--experiment demo] [--seconds 20]
"""

import argparse
import secrets
import sys
import time
import xmlrpc.client


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8001/")
    ap.add_argument("--experiment", default="demo")
    ap.add_argument("--device", default="gims-sb0")
    ap.add_argument("--storage-dir", default="/srv/gims/demo")
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    am = xmlrpc.client.ServerProxy(args.url, allow_none=True)
    exp = {"ExperimentId": args.experiment}

    def call(method, *extra, **params):
        print(f"AM → {method}({', '.join(sorted(params)) or ''})")
        result = getattr(am, method)(dict(exp, **params), *extra)
        if isinstance(result, str):
            print(f"   ← {result}")
        return result

    # The original AM sent the spec in pieces; each call merges into the experiment.
    call("configureExperiment", SiteLocation="sandbox", DeviceName="gims-sandbox-node",
         MetaDataSpec={"UserText": "gims demo: an AM request end to end"})
    call("configureExperiment", CaptureSpec={"device": args.device, "filterexpr": "ip or ip6"})
    call("ConfigureExperiment", TransformSpec={
        "SampleSpec": {"sampletype": "none"},
        "AnonSpec": {"anontype": "anonymize", "anonkey": secrets.token_hex(32)},
        "AggregationSpec": {}})
    call("configureExperiment", StorageSpec={"storagetype": "local", "storageparams": {
        "local_storage_dir": args.storage_dir, "rollover_interval": 0.1}})
    print("   storage check:", am.testExperimentStorage(exp))
    call("startExperiment")
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        time.sleep(5)
        st = am.getExperimentStats(exp)
        print(f"   stats: state={st.get('state')} packets_observed={st.get('packets_observed')} "
              f"files_written={st.get('files_written')} files_uploaded={st.get('files_uploaded')}")
    call("pauseExperiment")
    call("resumeExperiment")
    time.sleep(3)
    call("stopExperiment")
    for _ in range(60):
        st = am.getExperimentStats(exp)
        if st.get("delivered_all") or (st.get("files_pending") == 0 and st.get("files_uploaded")):
            break
        time.sleep(1)
    print(f"   final: files_written={st.get('files_written')} files_uploaded={st.get('files_uploaded')} "
          f"files_pending={st.get('files_pending')} last_upload_error={st.get('last_upload_error')!r}")
    print("   storage log (last 5 lines):")
    log = am.getStorageLog(exp, 5) or ""
    for line in (log.splitlines() if isinstance(log, str) else log):
        print("     ", line)
    ok = bool(st.get("files_uploaded")) and not st.get("files_pending")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
