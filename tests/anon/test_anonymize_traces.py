"""Every trace in tests/data anonymized with a fixed key, then read by tshark (an independent
decoder): no new malformed packets, no checksum errors, every address tshark shows (outer, ARP,
ICMP-quoted, ND target) is Crypto-PAn of the input's, prefix relations kept."""
import ipaddress
import subprocess
from pathlib import Path

import numpy as np
import pytest

from capture_daemon.anonymize import Anonymizer
from capture_daemon.cryptopan import CryptoPAn
from capture_daemon.parse import parse

from .pcapio import read_pcap, write_pcap

DATA = Path(__file__).resolve().parents[1] / "data"
TRACES = sorted(DATA.glob("*.pcap"))
KEY = bytes.fromhex("1522178d33a4cf80130a5b1649907d10d8988f837979652762574c2d2a842202")

STATUS = ["ip.checksum.status", "tcp.checksum.status", "udp.checksum.status",
          "icmp.checksum.status", "icmpv6.checksum.status"]
ADDRS = ["ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "arp.src.proto_ipv4", "arp.dst.proto_ipv4",
         "icmpv6.nd.ns.target_address", "icmpv6.nd.na.target_address"]


_CACHE = {}


def tshark(path, fields):
    key = (str(path), tuple(fields))
    if key not in _CACHE:
        _CACHE[key] = _tshark(path, fields)
    return _CACHE[key]


def _tshark(path, fields):
    cmd = ["tshark", "-n", "-r", str(path), "-o", "ip.check_checksum:TRUE",
           "-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-T", "fields",
           "-E", "occurrence=a", "-E", "aggregator=,"]
    for f in ["frame.number", *fields]:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [ln.split("\t") for ln in out.stdout.splitlines()]


ALL = STATUS + ["_ws.malformed"] + ADDRS


def problems(path):
    """(frames with a bad checksum, frames tshark calls malformed)."""
    bad, mal = set(), set()
    for row in tshark(path, ALL):
        if any("0" in c.split(",") for c in row[1:6]):  # status 0 = Bad
            bad.add(int(row[0]))
        if row[6]:
            mal.add(int(row[0]))
    return bad, mal


@pytest.fixture(scope="module")
def anonymized(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("anon")
    cp = CryptoPAn(KEY)
    results = {}
    for trace in TRACES:
        batch, info = read_pcap(trace)
        anon = Anonymizer(cp)
        anon.apply(batch, parse(batch), np.ones(len(batch), dtype=bool))
        out = out_dir / trace.name
        write_pcap(out, batch, info["snaplen"])
        results[trace.name] = (trace, out, anon)
    return cp, results


@pytest.mark.parametrize("name", [t.name for t in TRACES])
def test_tshark_reads_output_without_new_errors(anonymized, name):
    _, results = anonymized
    trace, out, anon = results[name]
    bad_in, mal_in = problems(trace)
    bad_out, mal_out = problems(out)
    assert mal_out == mal_in, "malformed packets must be exactly those of the input"
    # Whole packets get recomputed checksums (see capture_daemon/anonymize.py): none is bad.
    assert bad_out == set()
    if bad_in:
        assert anon.checksums_corrected >= len(bad_in)
    assert anon.not_anonymized == 0
    assert anon.packets_anonymized > 0 or name == "zeek__nmap-vsn.pcap"


def _addr_rows(path):
    rows = {}
    for row in tshark(path, ALL):
        rows[int(row[0])] = [c.split(",") if c else [] for c in row[7:]]
    return rows


def _common_prefix(a, b):
    x = int(a) ^ int(b)
    return a.max_prefixlen - x.bit_length()


@pytest.mark.parametrize("name", [t.name for t in TRACES])
def test_addresses_are_cryptopan_of_input(anonymized, name):
    cp, results = anonymized
    trace, out, _ = results[name]
    rin, rout = _addr_rows(trace), _addr_rows(out)
    assert rin.keys() == rout.keys()
    seen = {}
    n_checked = 0
    for frame, cols in rin.items():
        for field, vin, vout in zip(ADDRS, cols, rout[frame]):
            # every occurrence, outer and ICMP-quoted ones alike
            assert len(vin) == len(vout), (frame, field)
            for a, b in zip(vin, vout):
                assert cp.anonymize_str(a) == str(ipaddress.ip_address(b)), (frame, field, a, b)
                seen[ipaddress.ip_address(a)] = ipaddress.ip_address(b)
                n_checked += 1
    assert n_checked > 0 or name == "zeek__nmap-vsn.pcap"
    # Prefix relations between all pairs of distinct addresses of each family are kept.
    for version in (4, 6):
        pairs = [(a, b) for a, b in seen.items() if a.version == version]
        for i, (a1, b1) in enumerate(pairs):
            for a2, b2 in pairs[i + 1:i + 40]:
                assert _common_prefix(a1, a2) == _common_prefix(b1, b2)


def test_icmp_quoted_headers_were_checked(anonymized):
    """The traces hold ICMP errors: tshark shows their quoted addresses (more than one ip.src
    in a frame), and they were compared above."""
    _, results = anonymized
    trace, out, _ = results["tcpdump__afs.pcap"]
    multi = [r for r in tshark(out, ALL) if "," in r[7 + ADDRS.index("ip.src")]]
    assert multi, "expected ICMP errors with quoted headers in afs.pcap"


def test_arp_addresses_present(anonymized):
    _, results = anonymized
    found = 0
    for trace, out, _ in results.values():
        found += sum(1 for r in tshark(out, ALL) if r[7 + ADDRS.index("arp.src.proto_ipv4")])
    assert found > 0, "expected ARP packets in the traces"


@pytest.mark.parametrize("name", ["tcpdump__afs.pcap", "zeek__ipv6.pcap", "zeek__timestamp.pcap"])
def test_capture_path_batches_with_record_headers(anonymized, name):
    """Batches as the capture path's OfflineSource yields them (pcap record headers between
    the packets): only packet bytes change, and exactly as in the packed batches above."""
    from capture_daemon.source import OfflineSource
    _, results = anonymized
    trace, out, _ = results[name]
    expected, _ = read_pcap(out)
    src = OfflineSource(str(trace))
    got = []
    try:
        for batch in src.batches():
            if batch is None or not len(batch):
                continue
            batch.make_writable()
            before = batch.buf.copy()
            Anonymizer(CryptoPAn(KEY)).apply(batch, parse(batch), np.ones(len(batch), dtype=bool))
            inside = np.zeros(len(batch.buf), dtype=bool)
            for o, n in zip(batch.off, batch.caplen):
                inside[o:o + n] = True
            assert (batch.buf[~inside] == before[~inside]).all()
            if batch.records:
                assert (~inside).sum() == 16 * len(batch)  # the record headers, untouched
            got += [batch.buf[o:o + n].tobytes() for o, n in zip(batch.off, batch.caplen)]
    finally:
        src.close()
    want = [expected.buf[o:o + n].tobytes() for o, n in zip(expected.off, expected.caplen)]
    assert got == want
