"""Every refused spec value comes back as a Fault naming the field, over the wire."""
from __future__ import annotations

import json
import os
import xmlrpc.client

import pytest

KEY = "ab" * 32


def srv(node, sub="x"):
    return {"storagetype": "local", "storageparams": {"local_storage_dir": str(node.root / "srv" / sub)}}


BAD = [
    # (extra struct merged into {"ExperimentId": "v"}, field named in the fault, reason words)
    ({"VLAN": 0.5}, "VLAN", "integer"),
    ({"VLAN": 4095}, "VLAN", "1..4094"),
    ({"VLAN": "ten"}, "VLAN", "integer"),
    ({"VLAN": True}, "VLAN", "integer"),
    ({"SiteLocation": "a/b"}, "SiteLocation", "file names"),
    ({"SiteLocation": 7}, "SiteLocation", "string"),
    ({"DeviceName": "x\ny"}, "DeviceName", "control"),
    ({"MetaDataSpec": "text"}, "MetaDataSpec", "struct"),
    ({"MetaDataSpec": {"UserText": 5}}, "MetaDataSpec.UserText", "string"),
    ({"MetaDataSpec": {"bogus": 1}}, "MetaDataSpec.bogus", "unknown key"),
    ({"CaptureSpec": {"filterexpr": "tcp port 99999999"}}, "CaptureSpec.filterexpr", "does not compile"),
    ({"CaptureSpec": {"filterexpr": "ip and ("}}, "CaptureSpec.filterexpr", "does not compile"),
    ({"CaptureSpec": {"filterexpr": ["ip"]}}, "CaptureSpec.filterexpr", "string"),
    ({"CaptureSpec": {"device": "eth9"}}, "CaptureSpec.device", "not one this node allows"),
    ({"CaptureSpec": {"device": "gims-t0; rm -rf /"}}, "CaptureSpec.device", "not one this node allows"),
    ({"TransformSpec": {"SampleSpec": {"sampletype": "every", "sampleparams": {}}}},
     "TransformSpec.SampleSpec.sampletype", "everyN"),
    ({"TransformSpec": {"SampleSpec": {"sampletype": "everyN", "sampleparams": {"N": 0}}}},
     "TransformSpec.SampleSpec.sampleparams.N", "1..2147483647, got 0"),
    ({"TransformSpec": {"SampleSpec": {"sampletype": "everyN", "sampleparams": {"N": 2.5}}}},
     "TransformSpec.SampleSpec.sampleparams.N", "integer"),
    ({"TransformSpec": {"SampleSpec": {"sampletype": "everyN", "sampleparams": {}}}},
     "TransformSpec.SampleSpec.sampleparams.N", "missing"),
    ({"TransformSpec": {"SampleSpec": {"sampletype": "uniformrandom", "sampleparams": {"p": 0}}}},
     "TransformSpec.SampleSpec.sampleparams.p", "(0, 1]"),
    ({"TransformSpec": {"SampleSpec": {"sampletype": "uniformrandom", "sampleparams": {"p": 1.5}}}},
     "TransformSpec.SampleSpec.sampleparams.p", "(0, 1]"),
    ({"TransformSpec": {"SampleSpec": {"sampletype": "uniformrandom", "sampleparams": {"p": "nan"}}}},
     "TransformSpec.SampleSpec.sampleparams.p", "finite"),
    ({"TransformSpec": {"AnonSpec": {"anontype": "anonymize", "anonkey": "short"}}},
     "TransformSpec.AnonSpec.anonkey", "64 hexadecimal"),
    ({"TransformSpec": {"AnonSpec": {"anontype": "anonymize"}}}, "TransformSpec.AnonSpec.anonkey", "missing"),
    ({"AnonSpec": {"anontype": "md5", "anonkey": KEY}}, "TransformSpec.AnonSpec.anontype", "anonymize"),
    ({"TransformSpec": {"AggregationSpec": {"aggtype": "sum"}}}, "TransformSpec.AggregationSpec.aggtype",
     "count_pkts"),
    ({"TransformSpec": {"Unknown": {}}}, "TransformSpec.Unknown", "unknown key"),
    ({"StorageSpec": {"storagetype": "ftp", "storageparams": {}}}, "StorageSpec.storagetype", "local, s3, ssh"),
    ({"StorageSpec": {"storagetype": "local", "storageparams": {"local_storage_dir": "/etc"}}},
     "StorageSpec.storageparams.local_storage_dir", "not under"),
    ({"StorageSpec": {"storagetype": "local", "storageparams": {"local_storage_dir": "relative/dir"}}},
     "StorageSpec.storageparams.local_storage_dir", "absolute"),
    ({"StorageSpec": {"storagetype": "local", "storageparams": {"rollover_interval": 0}}},
     "StorageSpec.storageparams.rollover_interval", "minutes > 0"),
    ({"StorageSpec": {"storagetype": "local", "storageparams": {"rollover_interval": "soon"}}},
     "StorageSpec.storageparams.rollover_interval", "number"),
    ({"StorageSpec": {"storagetype": "s3", "storageparams": {"s3key": "AK"}}}, "StorageSpec.storageparams", ""),
    ({"StorageSpec": "local"}, "StorageSpec", "struct"),
    ({"ExperimentId": "v", "experimentid": "w"}, "ExperimentId", "different values"),
]


@pytest.mark.parametrize("extra,field,words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_value_fault_names_the_field(node, extra, field, words):
    params = {"ExperimentId": "v"}
    params.update(extra)
    with pytest.raises(xmlrpc.client.Fault) as e:
        node.proxy().configureExperiment(params)
    assert f"{field}" in e.value.faultString, e.value.faultString
    assert words in e.value.faultString, e.value.faultString
    assert not (node.exp_dir("v") / "spec.json").exists(), "a refused call must store nothing"


def test_refused_call_leaves_the_earlier_spec_untouched(node):
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "keep", "CaptureSpec": {"filterexpr": "udp"}})
    before = (node.exp_dir("keep") / "spec.json").read_bytes()
    with pytest.raises(xmlrpc.client.Fault):
        p.configureExperiment({"ExperimentId": "keep", "CaptureSpec": {"filterexpr": "udp and ("}})
    assert (node.exp_dir("keep") / "spec.json").read_bytes() == before


def test_local_dir_symlink_escaping_the_root_is_refused(node):
    link = node.root / "srv" / "escape"
    os.symlink("/etc", link)
    with pytest.raises(xmlrpc.client.Fault, match="not under the local storage roots"):
        node.proxy().configureExperiment({"ExperimentId": "v", "StorageSpec": {
            "storagetype": "local", "storageparams": {"local_storage_dir": str(link / "sub")}}})


def test_local_dir_rechecked_at_start(node):
    """A directory that was fine at configure time but became a symlink out is refused at start."""
    p = node.proxy()
    target = node.root / "srv" / "later"
    target.mkdir()
    p.configureExperiment({"ExperimentId": "v", "StorageSpec": {
        "storagetype": "local", "storageparams": {"local_storage_dir": str(target)}}})
    target.rmdir()
    os.symlink("/tmp", target)
    with pytest.raises(xmlrpc.client.Fault, match="local_storage_dir.*not under"):
        p.startExperiment({"ExperimentId": "v"})
    assert ("start", "capture@v.service") not in node.units.calls


def test_accepted_spelling_variants(node):
    p = node.proxy()
    r = p.configureExperiment({
        "experimentid": "spell", "EXTRAKEY": 1,
        "capturespec": {"FilterExpr": "", "DEVICE": "lo"},
        "TRANSFORMSPEC": {"samplespec": {"SampleType": "uniformrandom", "SampleParams": {"P": "0.25", "seed": 9}},
                          "AggregationSpec": {"aggtype": "combine_pkts_flows"}},
        "aggregationspec": {"aggtype": "combine_pkts_flows"},
        "anonspec": {"anontype": "anonymize", "anonkey": KEY.upper()},
        "StorageSpec": {"storagetype": "S3", "storageparams": {"s3accesskey": "AKIDEXAMPLE",
                                                                "s3secretkey": "s3cr3t-value-xyz",
                                                                "s3bucket": "bucket1"}}})
    assert r.startswith("OK") and "ignored unknown keys: EXTRAKEY" in r
    p.startExperiment({"ExperimentID": "spell"})
    cap = json.loads((node.exp_dir("spell") / "capture.json").read_text())
    assert cap["interface"] == "lo" and cap["filter"] == ""
    assert cap["sample"] == "uniform:0.25:9" and cap["aggregate"] == "flows" and cap["anon_key_hex"] == KEY
    sto = json.loads((node.exp_dir("spell") / "storage.json").read_text())
    assert sto["storagetype"] == "s3"
    assert sto["storageparams"] == {"s3key": "AKIDEXAMPLE", "s3secret": "s3cr3t-value-xyz", "s3bucket": "bucket1"}
    for agg, want in (("count_pkts", "counts"), ("combine_pkt_flows", "flows"), ("combine_pkts", "flows"),
                      ("none", "pcap")):
        p.pauseExperiment({"ExperimentId": "spell"})
        p.configureExperiment({"ExperimentId": "spell", "AggregationSpec": {"aggtype": agg}})
        p.resumeExperiment({"ExperimentId": "spell"})
        assert json.loads((node.exp_dir("spell") / "capture.json").read_text())["aggregate"] == want


def test_empty_dicts_mean_none(node):
    p = node.proxy()
    p.configureExperiment({"ExperimentId": "e", "StorageSpec": srv(node),
                           "TransformSpec": {"SampleSpec": {"sampletype": "everyN", "sampleparams": {"N": 5}},
                                             "AnonSpec": {"anontype": "anonymize", "anonkey": KEY}}})
    p.configureExperiment({"ExperimentId": "e", "TransformSpec": {"SampleSpec": {}, "AnonSpec": {},
                                                                  "AggregationSpec": {}}})
    p.startExperiment({"ExperimentId": "e"})
    cap = json.loads((node.exp_dir("e") / "capture.json").read_text())
    assert (cap["sample"], cap["anon_key_hex"], cap["aggregate"]) == ("none", None, "pcap")
