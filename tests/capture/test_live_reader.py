"""The live reader: _accel_live (pcap_dispatch straight into pcap records) against the pcapy-ng
fallback (next_batch), both on real traffic on the loopback interface (root).

The end-to-end checks (gims-capture on a veth pair, with and without the C reader) are in
test_live.py and test_fanout.py.
"""
import os
import socket
import threading
import time

import numpy as np
import pytest

from capture_daemon import source
from capture_daemon.source import LiveSource, SourceError

pytestmark = pytest.mark.integration

needs_c = pytest.mark.skipif(source._accel_live is None, reason="_accel_live not built (make build)")


@pytest.fixture(params=["C", "pcapy-ng"])
def reader(request, monkeypatch):
    """Which live reader LiveSource uses: _accel_live, or pcapy-ng as when it is not built."""
    if request.param == "C":
        if source._accel_live is None:
            pytest.skip("_accel_live not built (make build)")
    else:
        monkeypatch.setattr(source, "_accel_live", None)
    return request.param


@pytest.fixture
def port():
    if os.geteuid() != 0:
        raise AssertionError("live capture tests need root (CAP_NET_RAW); CI runs as root")
    return 20000 + os.getpid() % 20000


def send_udp(port, sizes, delay=0.2):
    """UDP datagrams of these payload sizes to 127.0.0.1:port, after `delay` seconds (in a
    thread, so that the capture is reading meanwhile); each payload starts with its number."""
    def run():
        time.sleep(delay)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i, size in enumerate(sizes):
            s.sendto((b"%06d" % i + b"x" * size)[:max(size, 6)], ("127.0.0.1", port))
        s.close()
    t = threading.Thread(target=run)
    t.start()
    return t


def read_all(src, expected, timeout=10.0):
    """(packet bytes, caplen, wirelen, sec, usec) of every packet read until `expected` came."""
    out, end = [], time.monotonic() + timeout
    for b in src.batches():
        if b is not None:
            buf = b.buf.tobytes()
            out += [(buf[o:o + c], c, w, s, u) for o, c, w, s, u in
                    zip(b.off.tolist(), b.caplen.tolist(), b.wirelen.tolist(), b.ts_sec.tolist(),
                        b.ts_usec.tolist())]
        if len(out) >= expected or time.monotonic() > end:
            return out


def test_both_readers_capture_the_same_traffic_alike(port):
    """Both readers open on lo at once, capturing the same datagrams (some cut by the snaplen):
    the same packets, bytes and wire lengths, and timestamps within a millisecond (each packet
    socket stamps its own copy when it queues it: tens of microseconds apart under load)."""
    if source._accel_live is None:
        pytest.skip("_accel_live not built (make build)")
    opts = dict(snaplen=96, timeout_ms=100, buffer_bytes=8 << 20, filter_expr=f"udp dst port {port}")
    c_reader = LiveSource("lo", **opts)
    saved, source._accel_live = source._accel_live, None
    try:
        fallback = LiveSource("lo", **opts)
    finally:
        source._accel_live = saved
    assert c_reader.direct and not fallback.direct
    sizes = [6 + (i * 37) % 900 for i in range(3000)]
    try:
        send_udp(port, sizes).join()
        got_c, got_py = read_all(c_reader, len(sizes)), read_all(fallback, len(sizes))
        assert len(got_c) == len(sizes)
        assert [p[:3] for p in got_c] == [p[:3] for p in got_py]
        t_c, t_py = (np.array([s + u * 1e-6 for *_, s, u in got]) for got in (got_c, got_py))
        assert np.abs(t_c - t_py).max() < 1e-3
        assert [w for _, _, w, _, _ in got_c] == [14 + 20 + 8 + s for s in sizes]
        assert c_reader.wirelen_estimated == fallback.wirelen_estimated == 0
        assert c_reader.stats()[0] >= len(sizes) and c_reader.stats()[1] == 0
        assert fallback.stats()[0] >= len(sizes) and fallback.stats()[1] == 0
    finally:
        c_reader.close()
        fallback.close()


@needs_c
def test_a_full_buffer_keeps_the_packet_that_did_not_fit(port):
    """dispatch into buffers and arrays far too small for what is ready: each call stops when
    the next packet does not fit, which then opens the next buffer; every packet arrives once,
    in order, and each buffer is exactly pcap records (walked back with _accel_read.scan)."""
    from capture_daemon import _accel_read
    live = source._accel_live.Live("lo", 200, False, 100, 1 << 20)
    live.setfilter(f"udp dst port {port}")
    sizes = [6 + (i * 53) % 400 for i in range(500)]
    send_udp(port, sizes, delay=0).join()
    time.sleep(0.3)
    seen, fulls = [], 0
    try:
        end = time.monotonic() + 10
        while len(seen) < len(sizes) and time.monotonic() < end:
            buf = np.empty(1500, dtype=np.uint8)
            fields = np.empty((5, 7), dtype=np.int64)
            n, pos, full, error = live.dispatch(buf, 0, 0, *fields)
            assert error is None and 0 <= n <= 7 and pos <= len(buf)
            if not n:
                select_wait(live, 0.1)
                continue
            fulls += full
            walked = np.empty((5, 8), dtype=np.int64)
            k, end_pos, bad = _accel_read.scan(buf, 0, pos, False, False, 262144, *walked)
            assert (k, end_pos, bad) == (n, pos, -1)
            assert np.array_equal(walked[:, :k], fields[:, :n])
            raw = buf.tobytes()
            seen += [int(raw[o + 42:o + 48]) for o in fields[0, :n].tolist()]
    finally:
        live.close()
    assert seen == list(range(len(sizes)))
    assert fulls > 0  # the small buffers did fill up


def select_wait(live, seconds):
    import select
    select.select([live.getfd()], [], [], seconds)


def test_a_filter_that_does_not_compile_gives_libpcaps_reason(reader):
    with pytest.raises(SourceError) as exc:
        LiveSource("lo", filter_expr="udp port")
    assert str(exc.value).startswith("filter 'udp port' does not compile: ")
    assert "syntax error" in str(exc.value)


def test_a_missing_interface_is_named(reader):
    with pytest.raises(SourceError, match="cannot capture on 'gims-nope0': no such network interface"):
        LiveSource("gims-nope0")


def test_stats_count_what_was_received(reader, port):
    src = LiveSource("lo", snaplen=64, timeout_ms=100, filter_expr=f"udp dst port {port}")
    try:
        assert src.stats() == (0, 0, 0)
        send_udp(port, [100] * 200).join()
        got = read_all(src, 200)
        recv, drop, ifdrop = src.stats()
        assert len(got) == 200 and recv >= 200 and drop == 0
    finally:
        src.close()
    assert src.stats() == (0, 0, 0)  # closed: zeros, as before


def test_idle_reads_yield_none_and_the_reader_reports_its_libpcap(reader):
    src = LiveSource("lo", timeout_ms=100, filter_expr="udp dst port 9")  # nothing comes
    try:
        batches = src.batches()
        t0 = time.monotonic()
        assert next(batches) is None and next(batches) is None
        assert time.monotonic() - t0 < 2.0
        version = source.libpcap_version(live=True)
        assert version.startswith("libpcap version")
        if reader == "C":
            assert version == source._accel_live.lib_version()
        else:
            assert version == source.libpcap_version()  # pcapy-ng's own
    finally:
        src.close()
