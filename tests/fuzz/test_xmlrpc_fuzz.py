"""Thousands of malformed and hostile XML-RPC requests against the real gimsd server, over HTTP.

The server is gimsd.server.build_server on a free loopback port with a temporary state and spool
dir (tests/gimsd/conftest.py's node fixture; FakeUnits is the test double for the systemd side
only). Requests come from hypothesis strategies built from the contract's method signatures
(docs/gims-xmlrpc-contract.md): every method in both spellings, plus introspection and unknown
names, with random structs of right and misspelt keys, wrong types, huge strings, hostile
experiment ids, unit-name and BPF-filter injection; raw XML bodies (entity expansion, DOCTYPEs,
deep nesting, bad values, mutated bytes); and transport abuse (oversized or missing lengths,
chunked, gzip, wrong verbs and paths, garbage request lines).

For each request: a Fault with a readable faultString (or an HTTP 4xx for transport abuse), never
a traceback or "internal error"; getState still answers; no unit starts for a refused request and
every started unit belongs to a stored, valid experiment; no secret sent is echoed back; and at
the end no file exists outside the state and spool dirs.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import xmlrpc.client
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gimsd.server import METHOD_NAMES

MIN_REQUESTS = 3000
MARK = "fuzzmark"  # in hostile file-ish names, so a stray file anywhere is recognisable
KEYS = ["ab" * 32, "0123456789abcdef" * 4, "DEADBEEF" * 8]  # anonymization keys: never echoed
SECRET = "s3cr3t-" + MARK + "-Zq8"  # storage secrets: never echoed

VALID_IDS = ["fz1", "fz2", "FZ.3", "fz-4", "fz_5", "a" * 64]
HOSTILE_IDS = [
    "../" + MARK, "../../" + MARK, "/tmp/" + MARK, MARK + "/x", "x@y", "capture@x", MARK + "\x00",
    "\x00", "", " ", ".hidden", "-dash", "a" * 65, MARK + "\n", "x\ny.service", "x.service\n",
    "x;rm -rf", "x y", "é" + MARK, "\u202e" + MARK, "\ud7ff", "😀", "x\\y", "..", ".", "*", "x?",
    "capture@x.service", "gims-upload@x.path", "$(id)", "`id`", "%2e%2e%2f", MARK + "\r\n\r\nX: y",
]
ID_KEYS = ["ExperimentId", "ExperimentID", "experimentid", "EXPERIMENTID", "Experiment_Id",
           "ExperimentIds", "experiment", "Id", " ExperimentId", "ExperimentId\x00"]
TOP_KEYS = ["VLAN", "vlan", "SiteLocation", "sitelocation", "DeviceName", "ConfigName", "MetaDataSpec",
            "CaptureSpec", "capturespec", "CAPTURESPEC", "TransformSpec", "StorageSpec", "storagespec",
            "AnonSpec", "AggregationSpec", "MethodName", "CaptureSpecs", "Storage_Spec", "SampleSpec",
            "Tranformspec", "UserText", "", "\x00", "x" * 300]
INNER_KEYS = ["filterexpr", "device", "FilterExpr", "filter", "sampletype", "sampleparams", "N", "n", "p",
              "seed", "anontype", "anonkey", "AnonKey", "aggtype", "storagetype", "storageparams",
              "local_storage_dir", "rollover_interval", "s3key", "s3secret", "s3bucket", "s3accesskey",
              "s3secretkey", "sshuser", "sshhost", "sshport", "sshpath", "sshkey", "UserText", "usertext",
              "SampleSpec", "AnonSpec", "AggregationSpec", "", "x"]
FILTERS = ["ip", "tcp port 80", "ip) or (1", "ip) or (1 ", "(", ")", "ip and", "ether proto \\ip",
           "tcp[0:4] = 0x" + "f" * 400, "port " + "1" * 5000, "ip or " * 800 + "ip", "vlan 1 and vlan 2",
           "host 10.0.0.1\nport 22", "ip; touch /tmp/" + MARK, "$(touch " + MARK + ")", "\x00ip",
           "not not not " * 300, "(" * 2000 + "ip" + ")" * 2000, "port 99999", "net 10.0.0.0/33"]
DEVICES = ["gims-t0", "lo", "eth0", "x.service", "x@y", "lo\n", "../lo", "lo\x00", "any", "*", "", "a" * 100]
STORAGE_DIRS = ["srv", "../srv", "/etc", "/tmp/" + MARK, "srv/../../" + MARK, "srv\x00", "", "~root"]
NAMES = ["local", "s3", "ssh", "everyN", "uniformrandom", "none", "anonymize", "cryptopan", "count_pkts",
         "combine_pkt_flows", "combine_pkts", "pcap", "flows", "LOCAL", "ftp", "EveryN"]

# values of every XML-RPC type, hostile strings first
huge = st.sampled_from([1, 5000, 70000]).map(lambda n: "A" * n)
# Secrets (KEYS, SECRET) go only where secrets belong (anonkey, s3key, sshkey, ... below): drawn
# as an experiment id or a site name they are no longer secrets, and gimsd rightly names the id
# it cannot find ("no experiment '...'"), which the echo check then took for a leak.
hostile_text = st.one_of(st.sampled_from(HOSTILE_IDS + FILTERS + DEVICES + STORAGE_DIRS + NAMES),
                         st.text(max_size=40), huge)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**31, 2**31 - 1),
                    st.sampled_from([0, -1, 1, 7, 2**31 - 1, -2**31, 4095, 4096, 65535]),
                    st.floats(allow_nan=True, allow_infinity=True), hostile_text,
                    st.binary(max_size=20).map(xmlrpc.client.Binary))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(INNER_KEYS + TOP_KEYS), inner, max_size=5)), max_leaves=16)


def _spec_like():
    """A configure-ish struct: plausible sections with random and hostile contents."""
    capture = st.fixed_dictionaries({}, optional={"filterexpr": st.one_of(st.sampled_from(FILTERS), values),
                                                  "device": st.one_of(st.sampled_from(DEVICES), values)})
    sample = st.fixed_dictionaries({}, optional={
        "sampletype": st.one_of(st.sampled_from(NAMES), values),
        "sampleparams": st.one_of(st.fixed_dictionaries({}, optional={"N": scalars, "p": scalars, "seed": scalars}),
                                  values)})
    anon = st.fixed_dictionaries({}, optional={"anontype": st.one_of(st.sampled_from(NAMES), values),
                                               "anonkey": st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(
                                                   lambda k: k[:-1]), st.sampled_from(KEYS).map(lambda k: k + "0"),
                                                   values)})
    agg = st.fixed_dictionaries({}, optional={"aggtype": st.one_of(st.sampled_from(NAMES), values)})
    storage_params = st.fixed_dictionaries({}, optional={
        "local_storage_dir": st.sampled_from(STORAGE_DIRS), "s3key": st.just(SECRET), "s3secret": st.just(SECRET),
        "s3accesskey": st.just(SECRET), "s3bucket": hostile_text, "sshuser": hostile_text,
        "sshhost": hostile_text, "sshport": scalars, "sshpath": hostile_text, "sshkey": st.just(SECRET),
        "rollover_interval": scalars, "bogus": values})
    storage = st.fixed_dictionaries({}, optional={"storagetype": st.one_of(st.sampled_from(NAMES), values),
                                                  "storageparams": st.one_of(storage_params, values)})
    transform = st.fixed_dictionaries({}, optional={"SampleSpec": st.one_of(sample, values),
                                                    "AnonSpec": st.one_of(anon, values),
                                                    "AggregationSpec": st.one_of(agg, values)})
    return st.fixed_dictionaries({}, optional={
        "VLAN": scalars, "SiteLocation": hostile_text, "DeviceName": hostile_text, "ConfigName": hostile_text,
        "MetaDataSpec": st.one_of(st.fixed_dictionaries({"UserText": hostile_text}), values),
        "CaptureSpec": st.one_of(capture, values), "TransformSpec": st.one_of(transform, values),
        "StorageSpec": st.one_of(storage, values), "AnonSpec": st.one_of(anon, values),
        "AggregationSpec": st.one_of(agg, values), "MethodName": hostile_text})


ids = st.one_of(st.sampled_from(VALID_IDS), st.sampled_from(HOSTILE_IDS), st.text(max_size=12), scalars)


@st.composite
def params_structs(draw):
    struct = draw(_spec_like())
    if draw(st.integers(0, 9)):  # mostly carries an id, in one of its spellings (some wrong)
        struct[draw(st.sampled_from(ID_KEYS[:2]) if draw(st.booleans()) else st.sampled_from(ID_KEYS))] = draw(ids)
    for _ in range(draw(st.integers(0, 2))):  # misspelt / unknown top-level keys
        struct[draw(st.sampled_from(TOP_KEYS))] = draw(values)
    return struct


ALL_METHODS = [m for name in METHOD_NAMES for m in (name, name[0].upper() + name[1:])]
method_names = st.one_of(
    st.sampled_from(ALL_METHODS),
    st.sampled_from(["system.listMethods", "system.methodHelp", "system.methodSignature", "system.multicall",
                     "__init__", "api.configure", "_dispatch", "register_function", "configureexperiment",
                     "getstate", "GETSTATE", "getState\x00", "a" * 5000, "", "é"]))


@st.composite
def typed_calls(draw):
    method = draw(method_names)
    shape = draw(st.integers(0, 9))
    if shape <= 5:
        args = (draw(params_structs()),)
    elif shape == 6:
        args = (draw(params_structs()), draw(scalars))  # getStorageLog's n (and extra args elsewhere)
    elif shape == 7:
        args = ()
    elif shape == 8:
        args = tuple(draw(st.lists(values, max_size=3)))
    else:
        args = (draw(params_structs()), draw(values), draw(values))
    return method, args


def _valid_body(method="getState", args=()):
    return xmlrpc.client.dumps(args, method, allow_none=True, encoding="utf-8").encode("utf-8", "surrogatepass")


LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i else b"&lol;") * 10) for i in range(10))
          + b']><methodCall><methodName>getState</methodName><params><param><value><string>&lol9;'
          b'</string></value></param></params></methodCall>')
XXE = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
       b'<methodCall><methodName>configureExperiment</methodName><params><param><value><struct><member>'
       b'<name>ExperimentId</name><value>&e;</value></member></struct></value></param></params></methodCall>')
PARAM_ENTITY = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x"> %p;]>'
                b'<methodCall><methodName>getState</methodName></methodCall>')


def _nest(depth, tag):
    open_, close = {"array": (b"<value><array><data>", b"</data></array></value>"),
                    "struct": (b"<value><struct><member><name>k</name>", b"</member></struct></value>")}[tag]
    return (b"<?xml version='1.0'?><methodCall><methodName>configureExperiment</methodName><params><param>"
            + open_ * depth + b"<value><int>1</int></value>" + close * depth + b"</param></params></methodCall>")


RAW_BODIES = [
    LAUGHS, XXE, PARAM_ENTITY, _nest(17, "array"), _nest(200, "array"), _nest(2000, "struct"),
    b"", b"<", b"not xml at all", b"\xff\xfe\x00<\x00m", b"<methodCall/>",
    b"<methodCall><methodName></methodName></methodCall>",
    b"<methodCall><methodName>getState</methodName><params><param><value><int>abc</int></value></param>"
    b"</params></methodCall>",
    b"<methodCall><methodName>getStorageLog</methodName><params><param><value><struct><member><name>"
    b"ExperimentId</name><value>fz1</value></member></struct></value></param><param><value><i8>"
    + b"9" * 400 + b"</i8></value></param></params></methodCall>",
    b"<methodCall><methodName>getState</methodName><params><param><value><double>1e99999</double></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>getState</methodName><params><param><value><base64>!!!</base64></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>getState</methodName><params><param><value><dateTime.iso8601>nope"
    b"</dateTime.iso8601></value></param></params></methodCall>",
    b"<methodCall><methodName>getState</methodName><params><param><value><boolean>7</boolean></value>"
    b"</param></params></methodCall>",
    b"<methodCall><methodName>getState</methodName><params><param><value><struct><member><value>1</value>"
    b"</member></struct></value></param></params></methodCall>",
    b"<methodCall><methodName>getState</methodName><params><param><value><nil/></value></param></params>"
    b"</methodCall>",
    b"<methodCall><methodName>getState</methodName><params></param></methodCall>",
    b"<methodCall><methodName>system.listMethods</methodName></methodCall><methodCall/>",
    b"<methodCall><methodName>get\x00State</methodName></methodCall>",
    b'<?xml version="1.0" encoding="utf-7"?><methodCall><methodName>getState</methodName></methodCall>',
    b'<?xml version="1.0" encoding="x-bogus"?><methodCall><methodName>getState</methodName></methodCall>',
    b"<?xml-stylesheet href='file:///etc/passwd'?><methodCall><methodName>getState</methodName></methodCall>",
    b"<methodCall xmlns:x='http://x'><x:methodName>getState</x:methodName></methodCall>",
    b"<methodCall><methodName>getState</methodName><![CDATA[" + b"A" * 1000 + b"]]></methodCall>",
    b"<methodCall><methodName>" + b"A" * 60000 + b"</methodName></methodCall>",
]


@st.composite
def raw_bodies(draw):
    """A fixed hostile body, or a valid call's bytes mutated (flips, cuts, inserted markup)."""
    if draw(st.booleans()):
        return draw(st.sampled_from(RAW_BODIES))
    method, args = draw(typed_calls())
    try:
        body = bytearray(_valid_body(method, args))
    except (OverflowError, TypeError, ValueError):
        body = bytearray(_valid_body())
    for _ in range(draw(st.integers(1, 4))):
        if not body:
            break
        pos = draw(st.integers(0, len(body) - 1))
        op = draw(st.integers(0, 3))
        if op == 0:
            body[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            del body[pos:]
        elif op == 2:
            body[pos:pos] = draw(st.sampled_from([b"<", b">", b"&", b"&amp", b"]]>", b"<value>", b"</struct>",
                                                  b"<!DOCTYPE x>", b"<!ENTITY e 'x'>", b"\x00", b"\xc3"]))
        else:
            body[pos] = draw(st.integers(0, 255))
    return bytes(body)


def _http_request(method="POST", path="/RPC2", headers=None, body=b"", lines=None):
    """A raw HTTP/1.0 exchange; returns the answer's bytes (b"" when the server closed at once)."""
    headers = {"Content-Length": str(len(body)), "Content-Type": "text/xml"} if headers is None else headers
    head = lines if lines is not None else (f"{method} {path} HTTP/1.0\r\n"
                                            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    return head.encode("latin-1", "replace"), body


TRANSPORT_ABUSE = [
    _http_request("GET", "/RPC2"), _http_request("PUT"), _http_request("DELETE"), _http_request("OPTIONS"),
    _http_request(path="/etc/passwd", body=_valid_body()), _http_request(path="/RPC2/../x", body=_valid_body()),
    _http_request(path="/RPC3", body=_valid_body()),
    _http_request(headers={"Content-Type": "text/xml"}, body=_valid_body()),  # no Content-Length
    _http_request(headers={"Content-Length": "abc"}, body=_valid_body()),
    _http_request(headers={"Content-Length": "-5"}, body=_valid_body()),
    _http_request(headers={"Content-Length": "9" * 30}, body=_valid_body()),
    _http_request(headers={"Content-Length": str(10 ** 9)}, body=b"<"),
    _http_request(headers={"Transfer-Encoding": "chunked"}, body=b"5\r\nhello\r\n0\r\n\r\n"),
    _http_request(headers={"Content-Length": str(len(_valid_body())), "Content-Encoding": "gzip"},
                  body=_valid_body()),
    _http_request(headers={"Content-Length": str(70000)}, body=b"<" * 70000),  # over max_request_bytes
    _http_request(lines="GARBAGE\r\n\r\n"),
    _http_request(lines="POST /RPC2 HTTP/9.9\r\n\r\n"),
    _http_request(lines="POST /RPC2 HTTP/1.0\r\nX: " + "a" * 70000 + "\r\n\r\n"),
    _http_request(lines="POST /RPC2 HTTP/1.0\r\n" + "".join(f"X{i}: y\r\n" for i in range(200)) + "\r\n"),
    _http_request(lines="\x00\x01\x02 / HTTP/1.0\r\n\r\n"),
    _http_request(lines="POST " + "/" * 70000 + " HTTP/1.0\r\n\r\n"),
]


# http.server's own answers to an unknown verb and an unknown protocol version: the RFC's codes for
# them, refusals of transport abuse all the same.
TRANSPORT_REFUSALS_5XX = {501, 505}


class Fuzzer:
    """Sends requests to one node and checks every answer and the invariants after it."""

    def __init__(self, node):
        self.node = node
        self.host, self.port = node.server.server_address[:2]
        self.figures = {"requests": 0, "faults": 0, "http_refusals": 0, "answers": 0, "crashes": 0,
                        "state_checks": 0, "units_started": 0,
                        "started_specs_checked": 0, "concurrent_requests": 0}
        self.seen_calls = 0
        self.problems: list[str] = []
        self.lock = threading.RLock()

    # -- transport
    def exchange(self, head: bytes, body: bytes) -> bytes:
        with socket.create_connection((self.host, self.port), timeout=10) as s:
            try:
                s.sendall(head + body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the body was read: the answer may still be there
            chunks = []
            while True:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks)

    def post(self, body: bytes) -> bytes:
        return self.exchange(*_http_request(body=body))

    # -- checks
    def fail(self, what: str) -> None:
        self.figures["crashes"] += 1
        self.problems.append(what[:500])

    def classify(self, answer: bytes, label: str, expect_http_refusal: bool = False) -> object:
        with self.lock:  # the concurrent phase classifies from several threads
            return self._classify(answer, label, expect_http_refusal)

    def _classify(self, answer: bytes, label: str, expect_http_refusal: bool = False) -> object:
        self.figures["requests"] += 1
        if not answer:
            if expect_http_refusal:  # http.server may close on a garbage request line: not a crash if alive
                self.figures["http_refusals"] += 1
                return None
            return self.fail(f"{label}: connection closed without an answer")
        if expect_http_refusal and not answer.startswith(b"HTTP/"):
            # A request line without a version is HTTP/0.9 to http.server: its error page comes
            # without a status line, the code is in the page.
            head, body = b"", answer
            m = re.search(rb"Error code: (\d{3})", answer)
        else:
            head, _, body = answer.partition(b"\r\n\r\n")
            m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        if not m:
            return self.fail(f"{label}: no HTTP status: {answer[:200]!r}")
        status = int(m.group(1))
        text = body.decode("utf-8", "replace")
        if "Traceback" in text or "internal error" in text.lower() or 'File "' in text:
            return self.fail(f"{label}: internal detail in the answer: {text[:300]!r}")
        if 400 <= status < 500 or (expect_http_refusal and status in TRANSPORT_REFUSALS_5XX):
            self.figures["http_refusals"] += 1
            if not text.strip():
                self.fail(f"{label}: HTTP {status} without a reason")
            return None
        if status != 200:
            return self.fail(f"{label}: HTTP {status}: {text[:200]!r}")
        if expect_http_refusal:
            return self.fail(f"{label}: transport abuse answered 200: {text[:200]!r}")
        try:
            (result,), _ = xmlrpc.client.loads(body, use_builtin_types=True)
        except xmlrpc.client.Fault as f:
            self.figures["faults"] += 1
            if not isinstance(f.faultString, str) or len(f.faultString.strip()) < 5:
                self.fail(f"{label}: empty or unreadable faultString {f.faultString!r}")
            elif not isinstance(f.faultCode, int):
                self.fail(f"{label}: faultCode {f.faultCode!r} is not an int")
            self.check_no_secret(f.faultString, label)
            return f
        except Exception as e:  # an answer that is not XML-RPC at all
            return self.fail(f"{label}: unparseable answer ({type(e).__name__}): {text[:200]!r}")
        self.figures["answers"] += 1
        self.check_no_secret(json.dumps(result, default=str), label)
        if isinstance(result, str) and not result and "etStorageLog" not in label:  # an empty log is ""
            self.fail(f"{label}: empty string answer")
        return result

    def check_no_secret(self, text: str, label: str) -> None:
        for secret in KEYS + [SECRET]:
            if secret in text or secret.lower() in text.lower():
                self.fail(f"{label}: a secret was echoed: {text[:200]!r}")

    def check_after(self, label: str, refused: bool, active_before: set[str]) -> None:
        units = self.node.units
        with units.lock:
            calls = units.calls[self.seen_calls:]
            self.seen_calls = len(units.calls)
            active = {n for n, u in units.units.items() if u["active_state"] == "active"}
        starts = [name for action, name in calls if action == "start"]
        self.figures["units_started"] += len(starts)
        if refused and active != active_before:
            self.fail(f"{label}: refused, yet units changed: {sorted(active ^ active_before)}")
        for name in starts:
            m = re.fullmatch(r"(capture|gims-upload)@([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.(service|path)", name)
            if not m:
                self.fail(f"{label}: started a unit with a bad name {name!r}")
            elif not (self.node.exp_dir(m.group(2)) / "spec.json").is_file():
                self.fail(f"{label}: started {name} without a stored spec")
            elif m.group(1) == "capture" and not (self.node.exp_dir(m.group(2)) / "capture.json").is_file():
                self.fail(f"{label}: started {name} without capture settings")
        # the server still answers getState
        state = self.classify(self.post(_valid_body("getState")), f"getState after {label}")
        self.figures["state_checks"] += 1
        if not isinstance(state, dict):
            self.fail(f"getState after {label} answered {state!r}")

    def active(self) -> set[str]:
        with self.node.units.lock:
            return {n for n, u in self.node.units.units.items() if u["active_state"] == "active"}

    def stored(self) -> dict[str, bytes]:
        """Every experiment's stored files (spec, state, settings), to compare around a refusal."""
        root = Path(self.node.cfg.state_dir) / "experiments"
        return {str(p.relative_to(root)): p.read_bytes() for p in root.glob("*/*.json")} if root.is_dir() else {}

    def run(self, head: bytes, body: bytes, label: str, expect_http_refusal: bool = False) -> object:
        before = self.active()
        stored_before = self.stored()
        answer = self.classify(self.exchange(head, body), label, expect_http_refusal)
        refused = isinstance(answer, xmlrpc.client.Fault) or answer is None
        if refused:  # a refused request changes nothing on disk (start may record its last_error)
            changed = {k for k in set(stored_before) | set(self.stored())
                       if stored_before.get(k) != self.stored().get(k) and not k.endswith("/state.json")}
            if changed:
                self.fail(f"{label}: refused, yet stored files changed: {sorted(changed)}")
        self.check_after(label, refused, before)
        return answer

    def check_capture_settings(self, exp_id: str, label: str) -> None:
        """A started experiment's capture.json must be one the capture side accepts as it is."""
        from capture_daemon.settings import SettingsError, build_settings  # noqa: PLC0415
        path = self.node.exp_dir(exp_id) / "capture.json"
        try:
            build_settings(str(path), {})
        except (SettingsError, TypeError) as e:
            self.fail(f"{label}: started with capture settings the capture side refuses: {e}")
        self.figures["started_specs_checked"] += 1


def _tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, dirs, fs in os.walk(root) for f in fs + dirs}


def _marked_names(*dirs: Path) -> set[str]:
    out = set()
    for d in dirs:
        try:
            out |= {str(d / n) for n in os.listdir(d) if MARK in n}
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_thousands_of_hostile_requests(node, tmp_path):
    fz = Fuzzer(node)
    watched = [Path("/"), Path("/tmp"), Path.cwd(), tmp_path.parent, node.root.parent, node.root,
               Path(node.cfg.state_dir).parent, Path(node.cfg.spool_dir).parent]
    marked_before = _marked_names(*watched)
    tree_before = _tree(tmp_path)
    t0 = time.monotonic()

    # A valid experiment that starts, so that refused calls on a running one are exercised too.
    ok = fz.classify(fz.post(_valid_body("configureExperiment", ({
        "ExperimentId": "fz1", "CaptureSpec": {"filterexpr": "ip", "device": "lo"},
        "StorageSpec": {"storagetype": "local", "storageparams": {"local_storage_dir": str(node.root / "srv" / "fz1")}}},))),
        "setup configure")
    assert isinstance(ok, str) and ok.startswith("OK"), ok
    fz.check_after("setup configure", False, set())
    fz.run(*_http_request(body=_valid_body("startExperiment", ({"ExperimentId": "fz1"},))), "setup start")
    assert fz.active(), "the valid experiment did not start"

    for i, (head, body) in enumerate(TRANSPORT_ABUSE):
        fz.run(head, body, f"transport abuse #{i}", expect_http_refusal=True)
    for i, body in enumerate(RAW_BODIES):
        fz.run(*_http_request(body=body), f"raw body #{i}")

    common = dict(deadline=None, database=None, derandomize=False, suppress_health_check=list(HealthCheck))

    @settings(max_examples=2000, **common)
    @given(call=typed_calls())
    def typed(call):
        method, args = call
        try:
            body = _valid_body(method, args)
        except (OverflowError, TypeError, ValueError):  # not marshallable here: the call without arguments
            body = _valid_body(method, ())
        fz.run(*_http_request(body=body), f"{method}{args!r}"[:300])

    @settings(max_examples=500, **common)
    @given(body=raw_bodies())
    def raw(body):
        fz.run(*_http_request(body=body), f"raw {body[:200]!r}")

    @settings(max_examples=250, **common)
    @given(struct=params_structs(), exp_id=st.sampled_from(["fz2", "fz3"]), storage=st.booleans())
    def configure_then_start(struct, exp_id, storage):
        """Hostile specs on a real id, then start: only a spec the capture side accepts may start."""
        struct = {k: v for k, v in struct.items() if k not in ID_KEYS}
        struct["ExperimentId"] = exp_id
        if storage and "StorageSpec" not in struct:
            struct["StorageSpec"] = {"storagetype": "local",
                                     "storageparams": {"local_storage_dir": str(node.root / "srv" / exp_id)}}
        try:
            body = _valid_body("configureExperiment", (struct,))
        except (OverflowError, TypeError, ValueError):
            return
        fz.run(*_http_request(body=body), f"configure {struct!r}"[:300])
        started = fz.run(*_http_request(body=_valid_body("startExperiment", ({"ExperimentId": exp_id},))),
                         f"start {exp_id} after configure {struct!r}"[:300])
        if isinstance(started, str) and started.startswith("OK"):
            fz.check_capture_settings(exp_id, f"start {exp_id} after configure {struct!r}"[:300])
            fz.run(*_http_request(body=_valid_body("stopExperiment", ({"ExperimentId": exp_id},))), f"stop {exp_id}")
            node.units.set_status(f"capture@{exp_id}.service", active_state="inactive", sub_state="dead")

    racing = [("configureExperiment", ({"ExperimentId": "fz6", "CaptureSpec": {"filterexpr": "ip", "device": "lo"},
                                        "StorageSpec": {"storagetype": "local", "storageparams": {
                                            "local_storage_dir": str(node.root / "srv" / "fz6")}}},)),
              ("startExperiment", ({"ExperimentId": "fz6"},)), ("stopExperiment", ({"ExperimentId": "fz6"},)),
              ("pauseExperiment", ({"ExperimentId": "fz6"},)), ("resumeExperiment", ({"ExperimentId": "fz6"},)),
              ("configureExperiment", ({"ExperimentId": "fz6", "CaptureSpec": {"filterexpr": "ip) or (1"}},))]

    @settings(max_examples=25, **common)
    @given(calls=st.lists(typed_calls(), min_size=12, max_size=12))
    def concurrent(calls):
        """12 hostile calls and the 6 racing ones on one experiment, 8 connections at a time:
        every answer is still a fault or a proper result, and the server keeps answering."""
        bodies = []
        for method, args in calls + racing:
            try:
                bodies.append((method, _valid_body(method, args)))
            except (OverflowError, TypeError, ValueError):
                bodies.append((method, _valid_body(method, ())))
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda mb: (mb[0], fz.post(mb[1])), bodies))
        for method, answer in answers:
            fz.classify(answer, f"concurrent {method}")
        fz.figures["concurrent_requests"] += len(answers)
        fz.check_after("a concurrent round", False, set())

    typed()
    raw()
    configure_then_start()
    concurrent()

    # Every method of the contract in both spellings, with a plausible but broken struct each.
    for method in ALL_METHODS:
        for arg in ({"ExperimentId": "../" + MARK}, {"ExperimentID": "x\ny"}, {"experimentid": 7}, "fz1", [], {}):
            fz.run(*_http_request(body=_valid_body(method, (arg,))), f"{method}({arg!r})")

    elapsed = time.monotonic() - t0
    marked_after = _marked_names(*watched)
    new_files = _tree(tmp_path) - tree_before
    srv = os.path.relpath(node.root / "srv", tmp_path) + os.sep
    outside = sorted(f for f in new_files
                     if not (f.startswith(os.path.relpath(node.cfg.state_dir, tmp_path) + os.sep)
                             or f.startswith(os.path.relpath(node.cfg.spool_dir, tmp_path) + os.sep)
                             or f in (os.path.relpath(node.cfg.state_dir, tmp_path),
                                      os.path.relpath(node.cfg.spool_dir, tmp_path))
                             # testExperimentStorage's probe of the local storage root an experiment
                             # was configured with: a directory may stay, the probe file may not
                             or (f.startswith(srv) and (tmp_path / f).is_dir())))
    log_text = node.logs.text()
    figures = dict(fz.figures, hostile_requests=fz.figures["requests"] - fz.figures["state_checks"],
                   seconds=round(elapsed, 1), files_outside=len(outside),
                   stray_marked_files=len(marked_after - marked_before),
                   internal_errors_logged=log_text.lower().count("internal error"),
                   secrets_logged=sum(log_text.count(s) for s in KEYS + [SECRET]))
    (tmp_path / "xmlrpc_fuzz_figures.json").write_text(json.dumps(figures, indent=1))
    print(f"\nXML-RPC fuzz: {figures['hostile_requests']} hostile requests (+ {figures['state_checks']} "
          f"getState checks) in {elapsed:.1f} s: {figures['faults']} faults, "
          f"{figures['http_refusals']} HTTP refusals, {figures['answers']} answers, "
          f"{figures['units_started']} units started, crashes = {figures['crashes']}; "
          f"figures in {tmp_path / 'xmlrpc_fuzz_figures.json'}")

    saved = json.loads((tmp_path / "xmlrpc_fuzz_figures.json").read_text())
    assert fz.problems == [], "\n".join(fz.problems[:20])
    assert saved["crashes"] == 0
    assert saved["hostile_requests"] >= MIN_REQUESTS, saved
    assert saved["faults"] >= MIN_REQUESTS // 4 and saved["http_refusals"] >= len(TRANSPORT_ABUSE), saved
    assert saved["started_specs_checked"] >= 5, saved  # the start path was really exercised
    assert saved["files_outside"] == 0, outside
    assert saved["stray_marked_files"] == 0, marked_after - marked_before
    assert saved["internal_errors_logged"] == 0
    assert saved["secrets_logged"] == 0


def test_introspection_with_a_non_string_method_name_is_a_fault(node):
    """Found by the fuzzer: system.methodHelp({}) / system.methodSignature([]) looked the struct up
    in a dict inside the standard library (TypeError, an "internal error")."""
    proxy = xmlrpc.client.ServerProxy(node.url, allow_none=True)
    for call, arg in ((proxy.system.methodHelp, {}), (proxy.system.methodSignature, [1]),
                      (proxy.system.methodHelp, None)):
        try:
            call(arg)
        except xmlrpc.client.Fault as f:
            assert "method name must be a string" in f.faultString, f.faultString
        else:
            raise AssertionError(f"{call} accepted {arg!r}")
    assert "getState()" in proxy.system.methodHelp("getState")
    assert "internal error" not in node.logs.text()
