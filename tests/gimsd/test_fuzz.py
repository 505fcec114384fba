"""Generated configure/start/stats calls over the wire: every answer is an "OK" string, a struct
or a Fault with a reason; the server stays up; nothing appears outside the state directory."""
from __future__ import annotations

import xmlrpc.client

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**31, 2**31 - 1),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                    st.sampled_from(["everyN", "uniformrandom", "anonymize", "local", "s3", "ssh", "count_pkts",
                                     "combine_pkt_flows", "gims-t0", "lo", "ip", "tcp port 80", "ab" * 32,
                                     "../x", "/srv", "0.5", "7"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["N", "p", "seed", "sampletype", "sampleparams", "anontype", "anonkey",
                                     "aggtype", "storagetype", "storageparams", "local_storage_dir",
                                     "rollover_interval", "filterexpr", "device", "UserText", "x"]),
                    inner, max_size=4)), max_leaves=12)
top_keys = st.sampled_from(["VLAN", "SiteLocation", "DeviceName", "ConfigName", "MetaDataSpec", "CaptureSpec",
                            "TransformSpec", "StorageSpec", "AnonSpec", "AggregationSpec", "vlan", "capturespec",
                            "Other"])
ids = st.one_of(st.sampled_from(["f1", "f2", "F.3", "f-4"]), st.text(max_size=10))
calls = st.tuples(ids, st.dictionaries(top_keys, values, max_size=5),
                  st.sampled_from(["configureExperiment", "startExperiment", "getExperimentStats",
                                   "pauseExperiment", "resumeExperiment", "stopExperiment"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=calls)
def test_generated_calls_get_an_answer_or_a_fault(node, call):
    exp_id, extra, method = call
    params = dict(extra, ExperimentId=exp_id)
    try:
        result = getattr(xmlrpc.client.ServerProxy(node.url, allow_none=True), method)(params)  # <nil/> too
    except xmlrpc.client.Fault as f:
        assert f.faultString and "Traceback" not in f.faultString and "internal error" not in f.faultString
    else:
        assert (isinstance(result, str) and result.startswith("OK: ")) or isinstance(result, dict)
    assert all(f.startswith("state/experiments/") for f in node.all_files())
    assert "internal error" not in node.logs.text()
