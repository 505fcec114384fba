"""The C flow meter (capture_daemon/_accel_flows.c) against the numpy reference: identical
records (every field, end reason and order), stats and active flows, after every batch."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from capture_daemon import flows, parse
from capture_daemon.source import OfflineSource
from tests.flows.helpers import TRACES
from tests.flows.synth import headers, random_headers

needs_accel = pytest.mark.skipif(not flows.ACCEL, reason="capture_daemon._accel_flows not built")


def test_accelerator_built_under_ci():
    """CI (GIMS_CI=1) must run the C meter, not silently fall back to numpy."""
    if os.environ.get("GIMS_CI") != "1":
        pytest.skip("only enforced under CI (GIMS_CI=1)")
    assert flows.ACCEL and flows.FlowMeter is flows.CFlowMeter


def test_flag_and_choice_agree():
    assert flows.FlowMeter is (flows.CFlowMeter if flows.ACCEL else flows.NumpyFlowMeter)
    assert flows.FlowMeter.accelerated == flows.ACCEL


def _sub(h, sl):
    return SimpleNamespace(**{k: v[sl] for k, v in vars(h).items()})


class Pair:
    """A numpy and a C meter fed the same calls; every output compared byte for byte."""

    def __init__(self, **kw):
        self.ref = flows.NumpyFlowMeter(**kw)
        self.acc = flows.CFlowMeter(**kw)
        self.n_records = 0

    def check(self):
        a, b = self.ref.take_records(), self.acc.take_records()
        assert a.dtype == b.dtype
        assert len(a) == len(b), (len(a), len(b))
        if a.tobytes() != b.tobytes():
            bad = np.flatnonzero(a != b)
            raise AssertionError(f"records differ at {bad[:5]}: {a[bad[:2]]} vs {b[bad[:2]]}")
        assert vars(self.ref.stats) == vars(self.acc.stats)
        assert self.ref.active_flows == self.acc.active_flows
        self.n_records += len(a)

    def add(self, ts, h, sel, buf=None):
        errs = []
        for m in (self.ref, self.acc):
            try:
                m.add(ts, h, sel, buf=buf)
                errs.append(None)
            except IndexError as e:     # out-of-buffer l3 with buf: both must refuse
                errs.append(type(e))
        assert errs[0] == errs[1], errs
        self.check()
        return errs[0] is None

    def advance(self, now):
        self.ref.advance(now)
        self.acc.advance(now)
        self.check()

    def flush(self):
        self.ref.flush()
        self.acc.flush()
        self.check()
        assert self.acc.active_flows == 0


def run_batches(h, ts, step, sel=None, advance=True, **kw):
    p = Pair(**kw)
    n = len(ts)
    sel = np.ones(n, bool) if sel is None else sel
    for i in range(0, n, step):
        sl = slice(i, i + step)
        p.add(ts[sl], _sub(h, sl), sel[sl])
        if advance and len(ts[sl]):
            p.advance(int(ts[sl].max()))
    p.flush()
    return p


# ---- traces ------------------------------------------------------------------------------

TRACE_SETTINGS = [dict(), dict(idle_timeout=1.0, active_timeout=5.0, tcp_end_timeout=0.5),
                  dict(biflow=True), dict(biflow=True, idle_timeout=0.2, active_timeout=2.0),
                  dict(max_flows=7), dict(max_flows=50, biflow=True, idle_timeout=3.0)]


@needs_accel
@pytest.mark.parametrize("trace", TRACES, ids=os.path.basename)
def test_traces_identical(trace):
    batches = [b for b in OfflineSource(trace).batches() if b is not None and len(b)]
    parsed = [(b, parse.parse(b)) for b in batches]
    for kw in TRACE_SETTINGS:
        p = Pair(**kw)
        rng = np.random.default_rng(1)
        for b, h in parsed:
            ts = b.ts_sec.astype(np.int64) * 1_000_000 + b.ts_usec
            # flow_output's way for the reference (read-back headers); buf for both, too
            assert p.add(ts, h, np.ones(len(b), bool), buf=b.buf)
            sel = rng.random(len(b)) < 0.5                      # sampling
            p.ref.add(ts, flows.with_packet_addresses(b.buf, h), sel)
            p.acc.add(ts, h, sel, buf=b.buf)
            p.check()
            p.advance(int(ts.max()))
        p.flush()
        assert p.n_records > 0 or all(h.ipver.max(initial=0) == 0 for _, h in parsed)


@needs_accel
@pytest.mark.parametrize("trace", TRACES[::4], ids=os.path.basename)
def test_rewritten_addresses_read_back(trace):
    """As after anonymization: the addresses in the (writable) buffer differ from the parsed
    headers; flow_output's path for both meters must carry the buffer's addresses."""
    from capture_daemon.flow_output import FlowOutput
    outs = []
    for accel in (False, True):
        fo = FlowOutput(idle_timeout=2.0)
        fo.meter = (flows.CFlowMeter if accel else flows.NumpyFlowMeter)(idle_timeout=2.0)
        recs = []
        for b in OfflineSource(trace).batches():
            if b is None or not len(b):
                continue
            h = parse.parse(b)
            b.make_writable()
            for ver, lo, hi in ((4, 12, 20), (6, 8, 40)):
                i = np.flatnonzero(h.ipver == ver)
                pos = (h.l3[i][:, None] + np.arange(lo, hi)).ravel()
                b.buf[pos] ^= 0x5A
            fo.add(b, h, np.ones(len(b), bool))     # no file open: records stay pending
        fo.meter.flush()
        recs = fo._pending + [fo.meter.take_records()]
        outs.append(np.concatenate(recs))
    assert outs[0].tobytes() == outs[1].tobytes()
    assert len(outs[0]) or not parse.parse(next(OfflineSource(trace).batches())).ipver.any()


@needs_accel
def test_every_split_of_a_small_trace():
    trace = next(t for t in TRACES if "ssh" in t)
    b = next(x for x in OfflineSource(trace).batches() if x is not None and len(x))
    b = b.slice(0, min(len(b), 60))
    h = parse.parse(b)
    ts = b.ts_sec.astype(np.int64) * 1_000_000 + b.ts_usec
    n = len(b)
    for kw in (dict(idle_timeout=0.05, active_timeout=0.3, tcp_end_timeout=0.01),
               dict(biflow=True, idle_timeout=0.1), dict(max_flows=2)):
        for k in range(n + 1):
            p = Pair(**kw)
            for sl in (slice(0, k), slice(k, n)):
                p.add(ts[sl], _sub(h, sl), np.ones(sl.stop - sl.start, bool))
                if sl.stop > sl.start:
                    p.advance(int(ts[sl][-1]))
            p.flush()


# ---- synthetic traces ----------------------------------------------------------------------

def _synth(seed, n=4000, n_flows=300, span=30.0, fin_share=0.05):
    b, h, _ = random_headers(n, n_flows, seed=seed, span=span)
    rng = np.random.default_rng(seed + 7)
    fl = rng.choice([0x10, 0x18, 0x02, 0x11, 0x04, 0x14], n,
                    p=[0.5, 0.45 - fin_share, 0.05, fin_share / 2, fin_share / 4, fin_share / 4])
    h.tcpflags = np.where(h.proto == 6, fl, 0).astype(np.uint8)
    ts = b.ts_sec * 1_000_000 + b.ts_usec
    return h, ts


SYNTH_SETTINGS = [dict(), dict(idle_timeout=0.5, active_timeout=3.0, tcp_end_timeout=0.2),
                  dict(idle_timeout=2.0, active_timeout=2.0, tcp_end_timeout=2.0),
                  dict(max_flows=20), dict(max_flows=1),
                  dict(biflow=True, idle_timeout=1.0, active_timeout=5.0, tcp_end_timeout=0.3),
                  dict(biflow=True, max_flows=30)]


@needs_accel
@pytest.mark.parametrize("kw", SYNTH_SETTINGS, ids=str)
@pytest.mark.parametrize("step", [1, 7, 250, 4000])
def test_synthetic_identical(kw, step):
    h, ts = _synth(seed=step)
    run_batches(h, ts, step, **kw)


@needs_accel
@pytest.mark.parametrize("kw", SYNTH_SETTINGS[:4], ids=str)
def test_synthetic_sampled_and_biflow_addresses(kw):
    h, ts = _synth(seed=3, n=6000)
    # biflow: make half the flows' packets go the other way
    rng = np.random.default_rng(4)
    flip = rng.random(len(ts)) < 0.4
    for a, b in (("src4", "dst4"), ("src6", "dst6"), ("sport", "dport")):
        x, y = getattr(h, a).copy(), getattr(h, b).copy()
        x[flip], y[flip] = getattr(h, b)[flip], getattr(h, a)[flip]
        setattr(h, a, x)
        setattr(h, b, y)
    sel = rng.random(len(ts)) < 0.3
    run_batches(h, ts, 333, sel=sel, **kw)
    run_batches(h, ts, 333, sel=sel, **dict(kw, biflow=True))


@needs_accel
def test_timeouts_fin_rst_exact_timelines():
    A, B = "10.0.0.1", "10.0.0.2"
    pk = []
    for i, t in enumerate(np.arange(0, 4000, 37.5)):
        pk.append(dict(t=float(t), src=A, dst=B, flags=[0x10, 0x11, 0x04, 0x10][i % 4]))
        pk.append(dict(t=float(t) + 0.5, src=B, dst=A, sport=80, dport=1234, flags=0x10))
    pk.append(dict(t=4100.0, src=None, dst=None))
    b, h = headers(pk)
    ts = b.ts_sec * 1_000_000 + b.ts_usec
    for kw in (dict(), dict(idle_timeout=30.0, active_timeout=300.0, tcp_end_timeout=1.0),
               dict(biflow=True, tcp_end_timeout=40.0), dict(idle_timeout=37.5, active_timeout=75.0)):
        for step in (1, 2, 5, len(ts)):
            run_batches(h, ts, step, **kw)


@needs_accel
def test_unordered_and_equal_timestamps():
    h, ts = _synth(seed=9, n=3000, n_flows=50)
    rng = np.random.default_rng(9)
    ts = ts[rng.permutation(len(ts))]                      # time goes back and forth
    ts[::5] = ts[0]
    for kw in (dict(idle_timeout=0.5, active_timeout=2.0, tcp_end_timeout=0.1),
               dict(biflow=True, idle_timeout=3.0), dict(max_flows=5)):
        run_batches(h, ts, 100, **kw)
        run_batches(h, ts, 100, advance=False, **kw)


@needs_accel
def test_hash_collisions_fall_back_identically(monkeypatch):
    h, ts = _synth(seed=5, n=3000, n_flows=200)
    monkeypatch.setattr(flows, "_HASH_C", np.zeros(5, dtype=np.uint64))
    p = run_batches(h, ts, 250, idle_timeout=2.0)
    assert p.acc.stats.hash_fallbacks == 12
    # a few colliding bits only: occasional fallbacks
    monkeypatch.setattr(flows, "_HASH_C", np.array([1, 0, 0, 1, 0], dtype=np.uint64))
    run_batches(h, ts, 250, idle_timeout=2.0, biflow=True)


@needs_accel
def test_table_growth_and_slot_reuse():
    h, ts = _synth(seed=11, n=20000, n_flows=5000, span=20.0)
    run_batches(h, ts, 4096, idle_timeout=0.3)
    run_batches(h, ts, 1500, max_flows=3000)


# ---- hostile input ---------------------------------------------------------------------------

def _hostile(rng, n, wide_time=False):
    h = SimpleNamespace(
        l3=rng.integers(-300, 300, n).astype(np.int64),
        ipver=rng.choice(np.array([0, 4, 6, 5, 255], np.uint8), n),
        vlan=rng.integers(-2**31, 2**31, n).astype(np.int32),
        proto=rng.integers(0, 256, n).astype(np.uint8),
        sport=rng.integers(0, 3, n).astype(np.uint16),
        dport=rng.integers(0, 65536, n).astype(np.uint16),
        tcpflags=rng.integers(0, 256, n).astype(np.uint8),
        tos=rng.integers(0, 256, n).astype(np.uint8),
        iplen=rng.integers(-2**62, 2**62, n).astype(np.int64),
        src4=rng.integers(0, 3, n).astype(np.uint32), dst4=rng.integers(0, 3, n).astype(np.uint32),
        src6=rng.integers(0, 2, (n, 16)).astype(np.uint8),
        dst6=rng.integers(0, 2, (n, 16)).astype(np.uint8))
    if wide_time:
        ts = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    else:
        ts = rng.integers(0, 5_000_000, n).astype(np.int64)
    return h, ts


@needs_accel
@pytest.mark.parametrize("seed", range(40))
def test_hostile_headers_identical(seed):
    rng = np.random.default_rng(seed)
    kw = dict(idle_timeout=float(rng.choice([0.1, 1.0, 300.0])),
              active_timeout=float(rng.choice([0.2, 2.0, 1800.0])),
              tcp_end_timeout=float(rng.choice([0.0, 0.05, 30.0])),
              max_flows=int(rng.choice([1, 3, 1000])), biflow=bool(seed % 2))
    p = Pair(**kw)
    for _ in range(6):
        n = int(rng.integers(0, 300))
        h, ts = _hostile(rng, n)
        sel = rng.random(n) < 0.8
        p.add(ts, h, sel)
        buf = rng.integers(0, 256, int(rng.integers(0, 400))).astype(np.uint8)
        p.add(ts, h, sel, buf=buf)              # usually IndexError on both sides
        h.l3 = np.minimum(np.abs(h.l3), max(len(buf) - 41, 0))
        if len(buf) > 41:
            assert p.add(ts, h, sel, buf=buf)
        if n:
            p.advance(int(ts.max()) + int(rng.integers(0, 2_000_000)))
    p.flush()


@needs_accel
@pytest.mark.parametrize("seed", range(10))
def test_hostile_extreme_values_never_crash(seed):
    rng = np.random.default_rng(100 + seed)
    m = flows.CFlowMeter(idle_timeout=1e-6, active_timeout=1e-6, tcp_end_timeout=0.0,
                         max_flows=int(rng.integers(1, 50)), biflow=bool(seed % 2))
    total = 0
    for _ in range(5):
        n = int(rng.integers(0, 2000))
        h, ts = _hostile(rng, n, wide_time=True)
        sel = rng.random(n) < 0.9
        m.add(ts, h, sel)
        buf = rng.integers(0, 256, 64).astype(np.uint8)
        if n:                       # network headers outside the buffer: refused, no crash
            h.l3[:] = 10**12
            h.ipver[:1] = 4
            with pytest.raises(IndexError):
                m.add(ts, h, sel, buf=buf)
        m.advance(int(rng.integers(-2**63, 2**63 - 1)))
        total += ((sel & ((h.ipver == 4) | (h.ipver == 6)))).sum()
    m.flush()
    r = m.take_records()
    assert r["packets"].sum() + r["rpackets"].sum() == m.stats.packets
    assert m.active_flows == 0


@needs_accel
def test_bad_buffers_are_refused():
    m = flows.CFlowMeter()
    h, ts = _hostile(np.random.default_rng(0), 10)
    with pytest.raises(ValueError):
        m.add(ts[:5], h, np.ones(5, bool))
    with pytest.raises(ValueError):
        m._m.add(ts, *[np.zeros(3, np.uint8)] * 13, None, None)
    with pytest.raises(TypeError):
        h.sport = np.full(10, 70000, np.int64)
        m.add(ts, h, np.ones(10, bool))


# ---- flushing in parts -------------------------------------------------------------------

@needs_accel
@pytest.mark.parametrize("part", [1, 3, 64, 10_000])
def test_flush_in_parts_same_records(part):
    h, ts = _synth(seed=21, n=5000, n_flows=800)
    recs = []
    for in_parts in (False, True):
        m = flows.CFlowMeter(idle_timeout=5.0, biflow=part == 3)
        ref = flows.NumpyFlowMeter(idle_timeout=5.0, biflow=part == 3)
        for x in (m, ref):
            x.add(ts[:4000], _sub(h, slice(0, 4000)), np.ones(4000, bool))
        m.take_records()
        ref.take_records()
        if in_parts:
            out, rounds = [], 0
            while not m.flush_part(part):
                out.append(m.take_records())
                assert len(out[-1]) <= max(part, 1) or rounds == 0
                rounds += 1
            out.append(m.take_records())
            assert rounds >= 1 or part >= 10_000
            got = np.concatenate(out)
        else:
            m.flush()
            got = m.take_records()
        ref.flush()
        assert got.tobytes() == ref.take_records().tobytes()
        assert m.active_flows == 0
        recs.append(got)
        # the meter goes on after a flush in parts
        m.add(ts[4000:], _sub(h, slice(4000, 5000)), np.ones(1000, bool))
        m.flush()
        r = m.take_records()
        assert r["packets"].sum() + r["rpackets"].sum() == 1000


@needs_accel
def test_flow_output_file_same_with_either_meter(monkeypatch):
    """FlowOutput writes the same IPFIX bytes whichever meter runs; with the C meter the final
    flush is encoded in parts (monkeypatched tiny here)."""
    import io
    from capture_daemon import flow_output
    monkeypatch.setattr(flow_output, "_ENCODE_RECORDS", 5)
    h, ts = _synth(seed=22, n=6000, n_flows=700)
    b = SimpleNamespace(ts_sec=ts // 1_000_000, ts_usec=ts % 1_000_000)
    files = []
    for cls in (flows.NumpyFlowMeter, flows.CFlowMeter):
        fo = flow_output.FlowOutput(idle_timeout=4.0, read_back_addresses=False)
        fo.meter = cls(idle_timeout=4.0)
        f = io.BytesIO()
        fo.start_file(f, 1_700_000_000)
        for i in range(0, 6000, 1000):
            sl = slice(i, i + 1000)
            fo.add(SimpleNamespace(ts_sec=b.ts_sec[sl], ts_usec=b.ts_usec[sl]), _sub(h, sl),
                   np.ones(1000, bool))
        meta = fo.end_file(1_700_000_100, final=True)
        files.append((f.getvalue(), meta["flows"]["records"]))
    assert files[0] == files[1] and files[0][1] > 50
