"""Anonymizer.apply, numpy reference vs the C accelerator (capture_daemon/_accel_anon.c), on the
first N packets of a savefile read as the capture path reads it (OfflineSource, parse, apply).
Packets per CPU-second (time.process_time) of apply alone and of read+parse+apply; the two
implementations alternate over rounds, each round with a fresh Crypto-PAn (cold cache). Run it
pinned: taskset -c 1 python bench/bench_anon_accel.py TRACE --packets 1500000."""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from capture_daemon.anonymize import Anonymizer  # noqa: E402
from capture_daemon.cryptopan import CryptoPAn  # noqa: E402
from capture_daemon.parse import parse  # noqa: E402
from capture_daemon.source import OfflineSource  # noqa: E402


def one(path, packets, accelerated, key):
    anon = Anonymizer(CryptoPAn(key), accelerated=accelerated)
    t_apply = t_parse = 0.0
    n = 0
    t0 = time.process_time()
    src = OfflineSource(path)
    try:
        for batch in src.batches():
            if batch is None or len(batch) == 0:
                continue
            a = time.process_time()
            h = parse(batch)
            b = time.process_time()
            anon.apply(batch, h, np.ones(len(batch), dtype=bool))
            c = time.process_time()
            t_parse += b - a
            t_apply += c - b
            n += len(batch)
            if n >= packets:
                break
    finally:
        src.close()
    return n, t_apply, t_parse, time.process_time() - t0, anon.counters()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--packets", type=int, default=1_500_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    key = os.urandom(32)
    res = {False: [], True: []}
    counters = {}
    for r in range(args.rounds):
        for acc in (False, True):
            n, ta, tp, tt, cnt = one(args.trace, args.packets, acc, key)
            res[acc].append((n / ta, n / tt, ta, tp, tt))
            counters[acc] = cnt
            print(f"round {r} {'C    ' if acc else 'numpy'}: {n} packets, apply {ta:.2f} CPU-s "
                  f"({n / ta / 1e6:.3f} M/CPU-s), parse {tp:.2f}, read+parse+apply {tt:.2f} "
                  f"({n / tt / 1e6:.3f} M/CPU-s)", flush=True)
    assert counters[False] == counters[True], counters
    for acc in (False, True):
        a = statistics.median(x[0] for x in res[acc])
        t = statistics.median(x[1] for x in res[acc])
        print(f"median {'C    ' if acc else 'numpy'}: apply {a / 1e6:.3f} M packets/CPU-s, "
              f"read+parse+apply {t / 1e6:.3f} M packets/CPU-s")
    print("counters (identical):", counters[True])


if __name__ == "__main__":
    main()
