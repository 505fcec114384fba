"""Crypto-PAn throughput on never-seen addresses: gims vs yacryptopan (issue #6 row).

    python bench/bench_cryptopan.py [--n4 N] [--n6 N] [--peer-n4 N] [--peer-n6 N] [--rounds R]

Each round anonymizes fresh random addresses (a new CryptoPAn object per round, so nothing is
cached) with gims's batched implementation and with yacryptopan (one address at a time, as it is
used), alternating, and prints addresses/s and the ratio (median over rounds). yacryptopan is far
slower, so it gets fewer addresses (its rate does not depend on how many).
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
    args = ap.parse_args(argv)
    try:
        import yacryptopan
    except ImportError:
        yacryptopan = None
    rng = np.random.default_rng(12345)
    rows = {"v4": ([], []), "v6": ([], [])}
    for _ in range(args.rounds):
        key = os.urandom(32)
        # np.unique: "never-seen" means every address distinct.
        v4 = np.unique(rng.integers(0, 2**32, int(args.n4 * 1.01), dtype=np.uint32))[: args.n4]
        rng.shuffle(v4)
        v6 = rng.integers(0, 256, (args.n6, 16), dtype=np.uint8)
        cp = CryptoPAn(key)
        rows["v4"][0].append(_rate(len(v4), lambda: cp.anonymize_v4(v4)))
        rows["v6"][0].append(_rate(len(v6), lambda: cp.anonymize_v6(v6)))
        if yacryptopan:
            ref = yacryptopan.CryptoPAn(key)
            s4 = [str(ipaddress.IPv4Address(int(a))) for a in v4[: args.peer_n4]]
            s6 = [str(ipaddress.IPv6Address(a.tobytes())) for a in v6[: args.peer_n6]]
            rows["v4"][1].append(_rate(len(s4), lambda: [ref.anonymize(a) for a in s4]))
            rows["v6"][1].append(_rate(len(s6), lambda: [ref.anonymize(a) for a in s6]))
    print(f"Crypto-PAn on never-seen addresses, {args.rounds} rounds, "
          f"gims n4={args.n4} n6={args.n6}, yacryptopan n4={args.peer_n4} n6={args.peer_n6}")
    print(f"{'family':6} {'gims addr/s':>14} {'yacryptopan addr/s':>19} {'ratio':>8}")
    for fam, (g, y) in rows.items():
        gm = statistics.median(g)
        if y:
            ym = statistics.median(y)
            ratio = statistics.median(a / b for a, b in zip(g, y))
            print(f"{fam:6} {gm:14,.0f} {ym:19,.0f} {ratio:7.0f}x")
        else:
            print(f"{fam:6} {gm:14,.0f} {'(not installed)':>19} {'-':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
