"""Crypto-PAn throughput on never-seen addresses: gims vs yacryptopan (issue #6 row).

    python bench/bench_cryptopan.py [--n4 N] [--n6 N] [--peer-n4 N] [--peer-n6 N] [--rounds R]
                                    [--packets-repeat K] [--batch N]

Each round anonymizes fresh random addresses (a new CryptoPAn object per round, so nothing is
cached) with gims's batched implementation and with yacryptopan (one address at a time, as it is
used), alternating, and prints addresses/s and the ratio (median over rounds). yacryptopan is far
slower, so it gets fewer addresses (its rate does not depend on how many).

Then packet rewriting: every trace in tests/data (read with the capture path's OfflineSource)
repeated K times, cut into batches of N packets, parsed, and anonymized in place (Anonymizer.apply
timed alone), as captured (whole packets: checksums recomputed over the payload) and cut to a
snaplen of 128 (incremental checksum updates).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from capture_daemon.cryptopan import CryptoPAn  # noqa: E402


def _rate(n, fn):
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n4", type=int, default=1_000_000)
    ap.add_argument("--n6", type=int, default=250_000)
    ap.add_argument("--peer-n4", type=int, default=5_000)
    ap.add_argument("--peer-n6", type=int, default=1_500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--packets-repeat", type=int, default=5,
                    help="times the traces are repeated for the packet benchmark (0: skip it)")
    ap.add_argument("--batch", type=int, default=8192)
    args = ap.parse_args(argv)
    try:
        import yacryptopan
    except ImportError:
        yacryptopan = None
    rng = np.random.default_rng(12345)
    rows = {"v4": ([], []), "v6": ([], [])}
    cached = {"v4": [], "v6": []}
    for _ in range(args.rounds):
        key = os.urandom(32)
        # np.unique: "never-seen" means every address distinct.
        v4 = np.unique(rng.integers(0, 2**32, int(args.n4 * 1.01), dtype=np.uint32))[: args.n4]
        rng.shuffle(v4)
        v6 = rng.integers(0, 256, (args.n6, 16), dtype=np.uint8)
        cp = CryptoPAn(key)
        rows["v4"][0].append(_rate(len(v4), lambda: cp.anonymize_v4(v4)))
        rows["v6"][0].append(_rate(len(v6), lambda: cp.anonymize_v6(v6)))
        # the same addresses again, in another order: cache lookups (misses where two
        # addresses collided in the direct-mapped table are recomputed)
        v4b, v6b = v4[::-1].copy(), v6[::-1].copy()
        cached["v4"].append(_rate(len(v4b), lambda: cp.anonymize_v4(v4b)))
        cached["v6"].append(_rate(len(v6b), lambda: cp.anonymize_v6(v6b)))
        if yacryptopan:
            ref = yacryptopan.CryptoPAn(key)
            s4 = [str(ipaddress.IPv4Address(int(a))) for a in v4[: args.peer_n4]]
            s6 = [str(ipaddress.IPv6Address(a.tobytes())) for a in v6[: args.peer_n6]]
            rows["v4"][1].append(_rate(len(s4), lambda: [ref.anonymize(a) for a in s4]))
            rows["v6"][1].append(_rate(len(s6), lambda: [ref.anonymize(a) for a in s6]))
    print(f"Crypto-PAn on never-seen addresses, {args.rounds} rounds, "
          f"gims n4={args.n4} n6={args.n6}, yacryptopan n4={args.peer_n4} n6={args.peer_n6}")
    print(f"{'family':6} {'gims addr/s':>14} {'yacryptopan addr/s':>19} {'ratio':>8} "
          f"{'gims cached addr/s':>19}")
    for fam, (g, y) in rows.items():
        gm = statistics.median(g)
        if y:
            ym = statistics.median(y)
            ratio = statistics.median(a / b for a, b in zip(g, y))
            print(f"{fam:6} {gm:14,.0f} {ym:19,.0f} {ratio:7.0f}x "
                  f"{statistics.median(cached[fam]):19,.0f}")
        else:
            print(f"{fam:6} {gm:14,.0f} {'(not installed)':>19} {'-':>8} "
                  f"{statistics.median(cached[fam]):19,.0f}")
    if args.packets_repeat > 0:
        bench_packets(args)
    return 0


def _packed(batch, snaplen=None):
    """The batch's packets back to back (no record headers), cut to snaplen if given."""
    from capture_daemon.batch import Batch
    cap = batch.caplen if snaplen is None else np.minimum(batch.caplen, snaplen)
    off = np.zeros(len(cap), dtype=np.int64)
    np.cumsum(cap[:-1], out=off[1:])
    src = np.repeat(batch.off - off, cap) + np.arange(int(cap.sum()))
    return Batch(batch.buf[src], off, cap, batch.wirelen, batch.ts_sec, batch.ts_usec,
                 batch.linktype)


def bench_packets(args) -> None:
    from capture_daemon.anonymize import Anonymizer
    from capture_daemon.batch import Batch
    from capture_daemon.parse import parse
    from capture_daemon.source import OfflineSource

    packets = []
    for trace in sorted((Path(__file__).resolve().parents[1] / "tests" / "data").glob("*.pcap")):
        src = OfflineSource(str(trace))
        packets += [b for b in src.batches() if b is not None and len(b)]
        src.close()
    if not packets:
        return
    parts = [_packed(b) for b in packets] * args.packets_repeat
    cat = lambda name: np.concatenate([getattr(b, name) for b in parts])  # noqa: E731
    offs, base = [], 0
    for b in parts:
        offs.append(b.off + base)
        base += len(b.buf)
    whole = Batch(cat("buf"), np.concatenate(offs), cat("caplen"), cat("wirelen"), cat("ts_sec"),
                  cat("ts_usec"), parts[0].linktype)
    n = len(whole)
    print(f"\nAnonymizer.apply on the tests/data traces x{args.packets_repeat}: {n} packets, "
          f"batches of {args.batch}, median of {args.rounds} rounds (parse not included)")
    print(f"{'input':22} {'checksums of whole pkts':>24} {'packets/s':>12} {'MB/s':>8}")
    for label, snap in (("as captured", None), ("snaplen 128", 128)):
        big = _packed(whole, snap)
        batches = [big.take(np.arange(s, min(s + args.batch, n))) for s in range(0, n, args.batch)]
        headers = [parse(b) for b in batches]
        for recompute in (True, False):
            rates = []
            for _ in range(args.rounds):
                work = [Batch(b.buf.copy(), b.off, b.caplen, b.wirelen, b.ts_sec, b.ts_usec,
                              b.linktype) for b in batches]
                anon = Anonymizer(CryptoPAn(os.urandom(32)), recompute_whole=recompute)
                t = time.perf_counter()
                for b, h in zip(work, headers):
                    anon.apply(b, h, np.ones(len(b), dtype=bool))
                rates.append(n / (time.perf_counter() - t))
            r = statistics.median(rates)
            mode = "recomputed" if recompute else "incremental"
            print(f"{label:22} {mode:>24} {r:12,.0f} {r * len(big.buf) / n / 1e6:8.0f}")


if __name__ == "__main__":
    sys.exit(main())
