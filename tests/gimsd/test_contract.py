"""The wire contract (docs/gims-xmlrpc-contract.md) driven over real HTTP with xmlrpc.client."""
from __future__ import annotations

import json
import os
import stat
import xmlrpc.client

import pytest

METHODS = ["configureExperiment", "startExperiment", "stopExperiment", "pauseExperiment",
           "resumeExperiment", "getExperimentStats", "getStorageLog", "testExperimentStorage", "getState"]

ORIGINAL_STATS_FIELDS = ["exp_id", "storage_type", "storage_params", "local_staging_folder",
                         "memory_consumed", "cpu_time_user", "cpu_time_system", "capture_enabled",
                         "capture_started", "capture_pid", "bytes_observed", "packets_observed",
                         "bytes_after_sampling", "packets_after_sampling", "files_written", "files_uploaded"]

ANON_KEY = "00112233445566778899aabbccddeeff" "0123456789abcdef0123456789abcdef"


def local_storage(node, sub="exp"):
    return {"storagetype": "local",
            "storageparams": {"local_storage_dir": str(node.root / "srv" / sub), "rollover_interval": 2}}


def test_introspection_lists_every_method_in_both_spellings(node):
    names = set(node.proxy().system.listMethods())
    for m in METHODS:
        assert m in names and m[0].upper() + m[1:] in names
    assert {"system.listMethods", "system.methodHelp", "system.methodSignature"} <= names
    assert "configure" in node.proxy().system.methodHelp("ConfigureExperiment").lower()


def test_original_am_call_sequence(node):
    """configure in several partial calls, start, stats, storage log, pause, resume, stop, getState."""
    p = node.proxy()
    exp = "am-seq.1"
    # 1: top-level fields only (the id spelt ExperimentID, keys in odd cases)
    r = p.configureExperiment({"ExperimentID": exp, "MethodName": "configureExperiment",
                               "sitelocation": "gpo", "DEVICENAME": "node7", "ConfigName": "cfg-a",
                               "MetaDataSpec": {"usertext": "hello from the AM"}})
    assert r.startswith("OK: ") and "StorageSpec" in r  # tells what is still needed
    # 2: capture only
    assert p.configureExperiment({"ExperimentId": exp, "CaptureSpec": {"filterexpr": "tcp or udp",
                                                                      "device": "gims-t0"}}).startswith("OK")
    # 3: transforms (AnonSpec at top level, as the contract allows)
    assert p.ConfigureExperiment({"ExperimentId": exp, "VLAN": 42,
                                  "TransformSpec": {"SampleSpec": {"sampletype": "everyN", "sampleparams": {"N": 10}},
                                                    "AggregationSpec": {}},
                                  "AnonSpec": {"anontype": "anonymize", "anonkey": ANON_KEY}}).startswith("OK")
    # 4: storage, in a later call; the earlier settings must survive the merge
    r = p.configureExperiment({"ExperimentId": exp, "StorageSpec": local_storage(node)})
    assert r == f"OK: experiment {exp} configured"

    assert p.startExperiment({"ExperimentId": exp}).startswith("OK: ")
    assert ("start", f"gims-upload@{exp}.path") in node.units.calls
    assert ("start", f"capture@{exp}.service") in node.units.calls

    # the files handed to the units: exact keys of docs/ARCHITECTURE.md, 0600
    d = node.exp_dir(exp)
    for name in ("spec.json", "capture.json", "storage.json", "state.json"):
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
    capture = json.loads((d / "capture.json").read_text())
    assert capture == {
        "experiment": exp, "site": "GPO", "interface": "gims-t0", "read": None,
        "output_dir": os.path.join(node.cfg.spool_dir, exp), "filter": "vlan 42 and (tcp or udp)",
        "vlan": None, "snaplen": 64, "promiscuous": True, "timeout_ms": 1000, "buffer_bytes": 32 << 20,
        "sample": "everyN:10", "anon_key_hex": ANON_KEY, "aggregate": "pcap", "counts_interval": 1,
        "rollover_seconds": 120, "max_file_bytes": None, "stats_interval": 30, "ipfix_export": None,
        "flow_idle_timeout": 300, "flow_active_timeout": 1800, "user_text": "hello from the AM",
        "device_name": "node7", "config_name": "cfg-a", "spool_quota_bytes": node.cfg.spool_quota_bytes}
    storage = json.loads((d / "storage.json").read_text())
    assert storage["experiment"] == exp and storage["storagetype"] == "local"
    assert storage["storageparams"] == {"local_storage_dir": str(node.root / "srv" / "exp")}
    assert set(storage["node"]) >= {"s3_endpoint", "allowed_local_roots", "known_hosts", "keep_local", "site"}
    assert storage["node"]["allowed_local_roots"] == [str(node.root / "srv")]

    # the capture process reports through its unit's StatusText
    node.units.set_status(f"capture@{exp}.service", status_text=(
        "packets_observed=1000 bytes_observed=3000000000 packets_sampled=100 bytes_sampled=64000 "
        "packets_written=100 files_written=3 ps_recv=1000 ps_drop=2 ps_ifdrop=1 malformed=4"))
    s = p.getExperimentStats({"ExperimentId": exp})
    for f in ORIGINAL_STATS_FIELDS:
        assert f in s, f
    assert s["exp_id"] == exp and s["state"] == "running" and s["capture_enabled"] is True
    assert s["capture_started"] is True and s["capture_pid"] > 0
    assert s["packets_observed"] == 1000 and s["packets_after_sampling"] == 100
    assert s["bytes_observed"] == 3000000000  # beyond 32 bits: sent as a double, exact
    assert s["bytes_after_sampling"] == 64000 and s["files_written"] == 3
    assert s["packets_dropped"] == 3 and s["malformed_packets"] == 4
    assert s["cpu_time_user"] == pytest.approx(0.15) and s["cpu_time_system"] == pytest.approx(0.05)
    assert s["memory_consumed"] == 12 << 20
    assert s["storage_type"] == "local" and s["local_staging_folder"] == os.path.join(node.cfg.spool_dir, exp)
    assert s["storage_params"]["rollover_interval"] == 2
    assert s["spec"]["anonymization"]["type"] == "cryptopan" and len(s["spec"]["anonymization"]["key_fingerprint"]) == 16

    try:
        log = p.getStorageLog({"ExperimentId": exp}, 5)
        assert isinstance(log, str)
    except xmlrpc.client.Fault as f:  # only acceptable while gimsd.upload has not landed
        assert "gimsd.upload is not installed" in f.faultString

    assert p.pauseExperiment({"ExperimentId": exp}).startswith("OK: ")
    assert node.units.unit_status(f"capture@{exp}.service")["active_state"] == "inactive"
    assert node.units.unit_status(f"gims-upload@{exp}.path")["active_state"] == "active"  # uploads go on
    assert p.getExperimentStats({"ExperimentId": exp})["state"] == "paused"
    assert p.ResumeExperiment({"ExperimentId": exp}).startswith("OK: ")
    assert node.units.unit_status(f"capture@{exp}.service")["active_state"] == "active"
    assert p.getExperimentStats({"ExperimentId": exp})["state"] == "running"

    r = p.stopExperiment({"ExperimentId": exp})
    assert r.startswith("OK: ") and "delivered" in r
    st = p.getState()
    assert exp in st["experiments"]
    assert st["experiments"][exp]["state"] in ("stopped", "stopping")
    assert set(st["storage_backends"]) >= {"local", "s3", "ssh"}
    for b in st["storage_backends"].values():
        assert isinstance(b["available"], bool) and isinstance(b["reason"], str)


def test_every_method_answers_in_upper_camel(node):
    p = node.proxy()
    exp = "upper"
    assert p.ConfigureExperiment({"ExperimentId": exp, "StorageSpec": local_storage(node)}).startswith("OK")
    assert p.StartExperiment({"ExperimentId": exp}).startswith("OK")
    assert p.GetExperimentStats({"ExperimentId": exp})["state"] == "running"
    assert p.PauseExperiment({"ExperimentId": exp}).startswith("OK")
    assert p.ResumeExperiment({"ExperimentId": exp}).startswith("OK")
    assert p.StopExperiment({"ExperimentId": exp}).startswith("OK")
    assert exp in p.GetState()["experiments"]
    for call in (lambda: p.GetStorageLog({"ExperimentId": exp}, 3),
                 lambda: p.TestExperimentStorage({"ExperimentId": exp})):
        try:
            call()
        except xmlrpc.client.Fault as f:  # storage parts may not be installed; then say so
            assert "not installed" in f.faultString or "storage" in f.faultString


def test_counters_come_from_status_file_when_capture_is_not_running(node):
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "e2", "StorageSpec": local_storage(node)})
    p.startExperiment({"ExperimentId": "e2"})
    p.pauseExperiment({"ExperimentId": "e2"})
    node.write_status_file("e2", packets_observed=77, bytes_observed=7700, packets_sampled=7,
                           bytes_sampled=700, packets_written=7, files_written=2, ps_recv=77,
                           ps_drop=0, ps_ifdrop=0, malformed=0)
    s = p.getExperimentStats({"ExperimentId": "e2"})
    assert (s["packets_observed"], s["files_written"], s["counters_source"]) == (77, 2, "status_file")


def test_crashed_capture_unit_is_reported_with_its_reason(node):
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "crash", "StorageSpec": local_storage(node)})
    p.startExperiment({"ExperimentId": "crash"})
    node.units.crash("capture@crash.service", status=2, text="error: interface gims-t0 went away")
    s = p.getExperimentStats({"ExperimentId": "crash"})
    assert s["state"] == "failed"
    assert "exit-code" in s["failure_reason"] and "exit status 2" in s["failure_reason"]
    assert "went away" in s["failure_reason"] and s["last_error"] == s["failure_reason"]
    assert p.getState()["experiments"]["crash"]["state"] == "failed"
    node.api.reconcile()
    assert "crash" in node.logs.text() and "failed" in node.logs.text()
    # a failed experiment can be started again
    assert p.startExperiment({"ExperimentId": "crash"}).startswith("OK")
    assert p.getExperimentStats({"ExperimentId": "crash"})["state"] == "running"


def test_restarted_gimsd_reports_from_the_units_not_memory(node, node_factory):
    from gimsd.server import build_server
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "persist", "StorageSpec": local_storage(node)})
    p.startExperiment({"ExperimentId": "persist"})
    # a second gimsd on the same state dir and the same "systemd": a restart
    server2, api2 = build_server(node.cfg, node.units)
    try:
        assert api2.stats({"ExperimentId": "persist"})["state"] == "running"
        node.units.crash("capture@persist.service")
        assert api2.stats({"ExperimentId": "persist"})["state"] == "failed"
    finally:
        server2.server_close()


def test_stop_keeps_uploads_until_the_spool_is_delivered(node):
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "drain", "StorageSpec": local_storage(node)})
    p.startExperiment({"ExperimentId": "drain"})
    spool = node.spool("drain")
    spool.mkdir(parents=True, exist_ok=True)
    (spool / "drain_TST_20260101000000.pcap").write_bytes(b"x" * 100)
    (spool / "drain_TST_20260101000000.pcap.meta.json").write_text("{}")
    r = p.stopExperiment({"ExperimentId": "drain"})
    assert "1 file(s) still being delivered" in r
    s = p.getExperimentStats({"ExperimentId": "drain"})
    assert s["state"] == "stopping" and s["files_pending"] == 1 and s["delivered_all"] is False
    assert node.units.unit_status("gims-upload@drain.path")["active_state"] == "active"
    for f in list(spool.iterdir()):
        if not f.name.startswith("."):
            f.unlink()
    node.api.reconcile()
    s = p.getExperimentStats({"ExperimentId": "drain"})
    assert s["state"] == "stopped" and s["delivered_all"] is True and s["delivered_at"]
    assert node.units.unit_status("gims-upload@drain.path")["active_state"] == "inactive"


def test_configure_is_refused_while_running_and_allowed_while_paused(node):
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "busy", "StorageSpec": local_storage(node)})
    p.startExperiment({"ExperimentId": "busy"})
    with pytest.raises(xmlrpc.client.Fault, match="running: pause or stop"):
        p.configureExperiment({"ExperimentId": "busy", "CaptureSpec": {"filterexpr": "udp"}})
    p.pauseExperiment({"ExperimentId": "busy"})
    p.configureExperiment({"ExperimentId": "busy", "CaptureSpec": {"filterexpr": "udp"}})
    p.resumeExperiment({"ExperimentId": "busy"})
    assert json.loads((node.exp_dir("busy") / "capture.json").read_text())["filter"] == "udp"


def test_state_machine_refusals_are_clear(node):
    p = node.proxy()
    with pytest.raises(xmlrpc.client.Fault, match="no experiment 'nope'"):
        p.startExperiment({"ExperimentId": "nope"})
    p.configureExperiment({"ExperimentId": "fresh"})
    with pytest.raises(xmlrpc.client.Fault, match="StorageSpec: missing"):
        p.startExperiment({"ExperimentId": "fresh"})
    with pytest.raises(xmlrpc.client.Fault, match="never started"):
        p.stopExperiment({"ExperimentId": "fresh"})
    with pytest.raises(xmlrpc.client.Fault, match="not running"):
        p.pauseExperiment({"ExperimentId": "fresh"})
    with pytest.raises(xmlrpc.client.Fault, match="not paused"):
        p.resumeExperiment({"ExperimentId": "fresh"})


def test_systemd_refusal_becomes_a_fault_with_its_reason(node):
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "denied", "StorageSpec": local_storage(node)})
    node.units.refuse_start["capture@denied.service"] = "Interactive authentication required."
    with pytest.raises(xmlrpc.client.Fault) as e:
        p.startExperiment({"ExperimentId": "denied"})
    assert "systemd refused start unit of capture@denied.service: Interactive authentication required" \
        in e.value.faultString
    s = p.getExperimentStats({"ExperimentId": "denied"})
    assert s["state"] == "configured" and "start failed" in s["last_error"]
    assert "Interactive authentication required" in s["last_error"]


def test_faultcode_is_minus_one_by_default_and_distinct_on_request(node, node_factory):
    with pytest.raises(xmlrpc.client.Fault) as e:
        node.proxy().startExperiment({"ExperimentId": "nope"})
    assert e.value.faultCode == -1
    other = node_factory(distinct_fault_codes=True)
    with pytest.raises(xmlrpc.client.Fault) as e:
        other.proxy().startExperiment({"ExperimentId": "nope"})
    assert e.value.faultCode == 2
    with pytest.raises(xmlrpc.client.Fault) as e:
        other.proxy().configureExperiment({"ExperimentId": "x", "VLAN": 5000})
    assert e.value.faultCode == 1


def test_rollover_default_is_the_configs_not_thirty_seconds(node):
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "roll", "StorageSpec": local_storage(node)})  # 2 minutes
    p.configureExperiment({"ExperimentId": "roll", "StorageSpec": {
        "storagetype": "local", "storageparams": {"local_storage_dir": str(node.root / "srv" / "r")}}})
    p.startExperiment({"ExperimentId": "roll"})
    assert json.loads((node.exp_dir("roll") / "capture.json").read_text())["rollover_seconds"] == 300


def test_max_experiments_limit(node_factory):
    node = node_factory(max_experiments=2)
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "a"})
    p.configureExperiment({"ExperimentId": "b"})
    p.configureExperiment({"ExperimentId": "a", "SiteLocation": "X"})  # updating is fine
    with pytest.raises(xmlrpc.client.Fault, match="max_experiments"):
        p.configureExperiment({"ExperimentId": "c"})


def test_experiments_running_before_a_node_restart_are_started_again(node):
    from gimsd.server import build_server
    p = node.proxy()
    for exp in ("run1", "paused1", "done1", "crashed1"):
        p.configureExperiment({"ExperimentId": exp, "StorageSpec": local_storage(node, exp)})
        p.startExperiment({"ExperimentId": exp})
    p.pauseExperiment({"ExperimentId": "paused1"})
    p.stopExperiment({"ExperimentId": "done1"})
    node.api.reconcile()  # done1: nothing waiting, so stopped
    # gimsd restarted on a running node: nothing is started behind a crashed unit's back
    node.units.crash("capture@crashed1.service")
    assert node.api.restore_after_boot() == []
    # the node rebooted: a fresh systemd that has run nothing yet
    booted = type(node.units)()
    server2, api2 = build_server(node.cfg, booted)
    try:
        assert sorted(api2.restore_after_boot()) == ["crashed1", "run1"]
        assert booted.unit_status("capture@run1.service")["active_state"] == "active"
        assert booted.unit_status("capture@paused1.service")["active_state"] == "inactive"
        assert booted.unit_status("gims-upload@paused1.path")["active_state"] == "active"
        assert booted.unit_status("capture@done1.service")["active_state"] == "inactive"
        assert ("start", "gims-upload@done1.path") not in booted.calls
        assert api2.stats({"ExperimentId": "run1"})["state"] == "running"
    finally:
        server2.server_close()
