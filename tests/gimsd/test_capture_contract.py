"""The capture settings gimsd writes are what the real gims-capture accepts, and the counters the real
gims-capture leaves behind are what getExperimentStats reports.

The capture process runs here as a plain subprocess reading a bundled trace (the capture@ unit
and live capture are covered by the sandbox and capture tests); only the source differs from what
the unit runs: the settings file is gimsd's own capture.json with interface swapped for read.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO / "tests" / "data" / "zeek__wikipedia.pcap"
KEY = "0f" * 32


def test_capture_json_is_accepted_by_gims_capture_settings(node):
    settings = pytest.importorskip("capture_daemon.settings", reason="capture engine not on this branch")
    sampling = pytest.importorskip("capture_daemon.sampling")
    p = node.proxy()
    for i, (sample, agg) in enumerate([({"sampletype": "everyN", "sampleparams": {"N": 7}}, "count_pkts"),
                                       ({"sampletype": "uniformrandom", "sampleparams": {"p": 0.3, "seed": 4}},
                                        "combine_pkt_flows"),
                                       ({}, "none")]):
        exp = f"cc{i}"
        p.configureExperiment({"ExperimentId": exp, "VLAN": 12, "CaptureSpec": {"filterexpr": "udp"},
                               "TransformSpec": {"SampleSpec": sample, "AggregationSpec": {"aggtype": agg},
                                                 "AnonSpec": {"anontype": "anonymize", "anonkey": KEY}},
                               "StorageSpec": {"storagetype": "local", "storageparams": {
                                   "local_storage_dir": str(node.root / "srv" / exp)}}})
        p.startExperiment({"ExperimentId": exp})
        path = str(node.exp_dir(exp) / "capture.json")
        s = settings.build_settings(path, {})
        assert s.experiment == exp and s.interface == "gims-t0" and s.effective_filter == "vlan 12 and (udp)"
        sampling.parse_sample_spec(s.sample)  # raises on a spelling the engine does not know


@pytest.mark.skipif(not TRACE.exists(), reason="bundled trace missing")
def test_stats_report_what_the_real_capture_counted(node, tmp_path):
    pytest.importorskip("capture_daemon.cli", reason="capture engine not on this branch")
    # Crypto-PAn lands separately; without it the run is made without anonymization
    anon = importlib.util.find_spec("capture_daemon.cryptopan") is not None
    p = node.proxy()
    exp = "realcap"
    p.configureExperiment({"ExperimentId": exp,
                           "TransformSpec": {"SampleSpec": {"sampletype": "everyN", "sampleparams": {"N": 2}}},
                           "AnonSpec": {"anontype": "anonymize", "anonkey": KEY} if anon else {},
                           "CaptureSpec": {"filterexpr": ""},
                           "StorageSpec": {"storagetype": "local", "storageparams": {
                               "local_storage_dir": str(node.root / "srv" / exp)}}})
    p.startExperiment({"ExperimentId": exp})
    settings = json.loads((node.exp_dir(exp) / "capture.json").read_text())
    settings.update(interface=None, read=str(TRACE))
    cfg = tmp_path / "capture.json"
    cfg.write_text(json.dumps(settings))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    r = subprocess.run([sys.executable, "-m", "capture_daemon.cli", "--config", str(cfg)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # the capture process has exited: gimsd reads its status file
    node.units.stop_unit(f"capture@{exp}.service")
    stats = p.getExperimentStats({"ExperimentId": exp})
    metas = [json.loads(f.read_text()) for f in node.spool(exp).glob("*.meta.json")]
    assert metas, "the capture wrote no files"
    assert stats["counters_source"] == "status_file"
    assert stats["files_written"] == len(metas)
    assert stats["packets_observed"] == sum(m["packets_observed"] for m in metas) > 0
    assert stats["packets_after_sampling"] == sum(m["packets_sampled"] for m in metas)
    assert stats["packets_after_sampling"] == (stats["packets_observed"] + 1) // 2
    assert stats["bytes_observed"] == sum(m["bytes_observed"] for m in metas)
    if anon:
        assert all(m["anonymization"]["key_fingerprint"] == stats["spec"]["anonymization"]["key_fingerprint"]
                   for m in metas)
    assert KEY not in json.dumps(stats) and all(KEY not in json.dumps(m) for m in metas)
