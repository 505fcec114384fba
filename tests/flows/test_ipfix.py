"""IPFIX files and export, checked with independent readers: ipfixDump (libfixbuf), tshark,
nfcapd/nfdump; plus our own decoder for exact field checks."""
from __future__ import annotations

import io
import socket
import struct
import threading
import time

import numpy as np
import pytest

from capture_daemon import ipfix
from capture_daemon.flow_output import FlowOutput
from tests.flows.helpers import free_port, have, ipfixdump, tshark_sums
from tests.flows.peers import Nfcapd
from tests.flows.synth import headers, random_headers

T0 = 1_700_000_000


def write_file(path, n=20000, flows=3000, seed=1, **kw):
    b, h, fid = random_headers(n, flows, seed=seed, t0=T0)
    fo = FlowOutput(**kw)
    with open(path, "wb") as f:
        fo.start_file(f, T0)
        step = 4096
        for i in range(0, n, step):
            sl = slice(i, i + step)
            sub_b = type(b)(ts_sec=b.ts_sec[sl], ts_usec=b.ts_usec[sl], linktype=1)
            sub_h = type(h)(**{k: v[sl] for k, v in vars(h).items()})
            fo.add(sub_b, sub_h, np.ones(len(sub_b.ts_sec), bool))
            fo.advance(float(sub_b.ts_sec[-1]))
        extras = fo.end_file(T0 + 100, final=True)["flows"]
    fo.close()
    return extras, h


@pytest.mark.skipif(not have("ipfixDump"), reason="ipfixDump (libfixbuf-tools) not installed")
@pytest.mark.parametrize("biflow", [False, True])
def test_file_read_by_ipfixdump(tmp_path, biflow):
    path = str(tmp_path / "f.ipfix")
    extras, h = write_file(path, biflow=biflow)
    rc, out, err = ipfixdump(path)
    assert rc == 0, err
    assert "error" not in err.lower() and "warn" not in err.lower(), err
    n_data = out.count("--- data record")
    assert n_data == extras["records"]
    assert out.count("tid:   256") + out.count("tid:   258") > 0
    if biflow:
        assert "reversePacketDeltaCount" in out
    # packetDeltaCount values as ipfixDump prints them add up to what went in
    pk = [int(line.split(":")[1]) for line in out.splitlines()
          if line.strip().startswith("(2)") and "packetDeltaCount" in line]
    rpk = [int(line.split(":")[1]) for line in out.splitlines() if "reversePacketDeltaCount" in line
           and ":" in line and line.strip().startswith("(")]
    assert sum(pk) + sum(rpk) == 20000


@pytest.mark.skipif(not have("tshark"), reason="tshark not installed")
def test_file_decoded_by_tshark(tmp_path):
    path = str(tmp_path / "f.ipfix")
    extras, h = write_file(path)
    recs, pk, oc, malformed = tshark_sums(path)
    assert malformed == 0
    assert (recs, pk, oc) == (extras["records"], 20000, int(h.iplen.sum()))


def test_messages_sequence_numbers_and_own_decoder(tmp_path):
    path = str(tmp_path / "f.ipfix")
    extras, h = write_file(path, sampling={"type": "everyN", "n": 10})
    data = open(path, "rb").read()
    seen = 0
    first = True
    for hdr, sets in ipfix.read_messages(data):
        assert hdr["domain"] == 1 and hdr["length"] <= 65535
        assert hdr["seq"] == seen                 # data records sent before this message
        if first:
            assert [s for s, _ in sets][:2] == [2, 3]   # templates, options template first
            first = False
        for sid, body in sets:
            if sid >= 256:
                size = (ipfix.SAMPLING_DTYPE if sid == ipfix.TID_SAMPLING else ipfix.DTYPES[sid]).itemsize
                assert len(body) % size == 0
                seen += len(body) // size
    recs = ipfix.decode_data(data)
    samp = recs[ipfix.TID_SAMPLING]
    assert samp["samplingInterval"].tolist() == [10] and samp["selectorAlgorithm"].tolist() == [1]
    assert samp["samplingPacketSpace"].tolist() == [9]
    v4, v6 = recs[ipfix.TID_V4], recs[ipfix.TID_V6]
    assert len(v4) + len(v6) == extras["records"]
    assert v4["packetDeltaCount"].sum() + v6["packetDeltaCount"].sum() == 20000
    assert extras["sampling"]["renormalize_factor"] == 10.0


def test_fields_of_one_icmp_and_one_tcp_flow():
    pk = [dict(t=T0 + 1.5, src="192.0.2.1", dst="198.51.100.7", proto=1, sport=0, dport=8 * 256,
               iplen=84, tos=0x20, vlan=12),
          dict(t=T0 + 2.0, src="2001:db8::5", dst="2001:db8::6", proto=6, sport=443, dport=5555,
               flags=0x12, iplen=60),
          dict(t=T0 + 2.25, src="2001:db8::5", dst="2001:db8::6", proto=6, sport=443, dport=5555,
               flags=0x11, iplen=52)]
    b, h = headers(pk)
    fo = FlowOutput()
    buf = io.BytesIO()
    fo.start_file(buf, T0)
    fo.add(b, h, np.ones(3, bool))
    fo.end_file(T0 + 3, final=True)
    recs = ipfix.decode_data(buf.getvalue())
    v4 = recs[ipfix.TID_V4][0]
    assert socket.inet_ntoa(struct.pack("!I", v4["sourceIPv4Address"])) == "192.0.2.1"
    assert v4["icmpTypeCodeIPv4"] == 8 * 256 and v4["destinationTransportPort"] == 8 * 256
    assert (v4["vlanId"], v4["ipClassOfService"], v4["octetDeltaCount"]) == (12, 0x20, 84)
    assert v4["flowStartMilliseconds"] == (T0 + 1) * 1000 + 500
    assert v4["flowEndReason"] == 4
    v6 = recs[ipfix.TID_V6][0]
    assert socket.inet_ntop(socket.AF_INET6, bytes(v6["sourceIPv6Address"])) == "2001:db8::5"
    assert (v6["packetDeltaCount"], v6["octetDeltaCount"], v6["tcpControlBits"]) == (2, 112, 0x13)
    assert v6["flowEndReason"] == 3 and v6["icmpTypeCodeIPv6"] == 0


def test_bad_export_url_is_an_error():
    for url in ("http://x:1", "udp://:4739", "udp://host", "tcp://h:99999", "udp://h:1/x"):
        with pytest.raises(ValueError):
            FlowOutput(export_url=url)


class UdpSink:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # a big receive buffer: loopback drops datagrams a busy test process reads too slowly
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)   # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.got = []
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop:
            try:
                self.got.append(self.sock.recv(65536))
            except socket.timeout:
                pass

    def close(self):
        self._stop = True
        self.t.join()
        self.sock.close()


def test_udp_export_mtu_and_template_refresh(tmp_path):
    sink = UdpSink()
    try:
        extras, _ = write_file(str(tmp_path / "f.ipfix"), n=60000, flows=20000,
                               export_url=f"udp://127.0.0.1:{sink.port}",
                               sampling={"type": "uniform", "p": 0.5})
        time.sleep(0.3)
    finally:
        sink.close()
    exp = extras["export"]
    assert exp["records_dropped"] == 0 and exp["records_sent"] > 0
    assert len(sink.got) == exp["messages_sent"]
    assert max(len(d) for d in sink.got) <= ipfix.UDP_MESSAGE
    with_tmpl = [d for d in sink.got if any(s == 2 for s, _ in next(ipfix.read_messages(d))[1])]
    assert len(with_tmpl) >= 2 and len(sink.got) > 100   # sent again after 100 messages
    flows = sum(len(v) for k, v in ipfix.decode_data(b"".join(sink.got)).items()
                if k != ipfix.TID_SAMPLING)
    assert flows == extras["records"]
    # each message's sequence number counts the data records before it (options included)
    n = 0
    for d in sink.got:
        hdr, sets = next(ipfix.read_messages(d))
        assert hdr["seq"] == n
        for k, v in ipfix.decode_data(d).items():
            n += len(v)


def test_udp_collector_down_never_crashes(tmp_path):
    port = free_port()                     # nobody listens: the kernel refuses the datagrams
    path = str(tmp_path / "f.ipfix")
    extras, _ = write_file(path, export_url=f"udp://127.0.0.1:{port}")
    exp = extras["export"]
    assert exp["records_dropped"] > 0 and exp["send_errors"] > 0
    assert "ConnectionRefused" in exp["last_error"]
    # the file is complete all the same
    recs = ipfix.decode_data(open(path, "rb").read())
    assert sum(len(v) for v in recs.values()) == extras["records"]


@pytest.mark.integration
@pytest.mark.skipif(not have("ipfixDump"), reason="ipfixDump (libfixbuf-tools) not installed")
def test_tcp_export_waits_for_collector_then_delivers(tmp_path):
    port = free_port(socket.SOCK_STREAM)
    fo = FlowOutput(export_url=f"tcp://127.0.0.1:{port}")
    b, h, _ = random_headers(5000, 500, seed=7, t0=T0)
    f = open(tmp_path / "f.ipfix", "wb")
    fo.start_file(f, T0)
    fo.add(b, h, np.ones(5000, bool))
    fo.advance(T0 + 400)                   # every flow idles out: records go to the exporter
    time.sleep(0.5)
    assert not fo.exporter.snapshot()["connected"]   # collector down: retried, no crash
    # now the collector comes up
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1)
    srv.settimeout(10)
    conn, _ = srv.accept()                 # the exporter's backoff (1 s, 2 s ...) reconnects
    extras = fo.end_file(T0 + 400, final=True)["flows"]
    fo.close()
    f.close()
    conn.settimeout(5)
    stream = b""
    while True:
        d = conn.recv(65536)
        if not d:
            break
        stream += d
    conn.close()
    srv.close()
    out = tmp_path / "tcp-stream.ipfix"
    out.write_bytes(stream)
    rc, text, err = ipfixdump(str(out))
    assert rc == 0, err
    assert text.count("--- data record") == extras["records"]
    snap = fo.exporter.snapshot()
    assert snap["records_sent"] == extras["records"] and snap["records_dropped"] == 0
    assert snap["send_errors"] >= 1        # the refused connection attempts were counted


@pytest.mark.integration
@pytest.mark.skipif(not (have("nfcapd") and have("nfdump")), reason="nfdump not installed")
def test_nfcapd_stores_exported_flows(tmp_path):
    port = free_port()
    nf = Nfcapd(str(tmp_path / "nf"), port)
    try:
        extras, h = write_file(str(tmp_path / "f.ipfix"), n=5000, flows=400,
                               export_url=f"udp://127.0.0.1:{port}")
        time.sleep(0.5)
    finally:
        nf.stop()
    recs = nf.records()
    assert len(recs) == extras["records"]
    assert sum(r["ipkt"] for r in recs) == 5000
    assert sum(r["ibyt"] for r in recs) == int(h.iplen.sum())
