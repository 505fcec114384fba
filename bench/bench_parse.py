"""parse() on a trace: the numpy reference (parse_numpy) against the C accelerator (parse_c).

    python bench/bench_parse.py [TRACE] [--rounds 3]

Reads the trace with capture_daemon.source.OfflineSource (reading is not timed), parses every
batch with both implementations (order alternating per batch), checks that every field is equal,
and prints packets per CPU-second (time.process_time around each call) per round and the median.
Pin it to one core (taskset -c 1) on a shared machine. Not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import fields

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from capture_daemon import parse as P  # noqa: E402
from capture_daemon.source import OfflineSource  # noqa: E402

DEFAULT_TRACE = "/var/tmp/gims-bench/trace-v2-5000000-f100000-s1-l128.pcap"


def one_round(path: str) -> tuple[int, float, float]:
    names = [f.name for f in fields(P.Headers)]
    t_np = t_c = 0.0
    n = 0
    src = OfflineSource(path)
    try:
        for k, b in enumerate(src.batches()):
            out = {}
            for which in (("numpy", "c") if k % 2 == 0 else ("c", "numpy")):
                t0 = time.process_time()
                out[which] = P.parse_numpy(b) if which == "numpy" else P.parse_c(b)
                dt = time.process_time() - t0
                if which == "numpy":
                    t_np += dt
                else:
                    t_c += dt
            if out["c"] is None:
                raise SystemExit("the C parser refused a batch of this trace")
            for f in names:
                if not np.array_equal(getattr(out["numpy"], f), getattr(out["c"], f)):
                    raise SystemExit(f"field {f} differs between numpy and C")
            n += len(b)
    finally:
        src.close()
    return n, t_np, t_c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="?", default=DEFAULT_TRACE)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not P.ACCELERATED:
        raise SystemExit("capture_daemon._accel_parse is not built: make build")
    res = []
    for r in range(args.rounds):
        n, a, c = one_round(args.trace)
        res.append((n, a, c))
        print(f"round {r}: {n} packets; numpy {a:.3f} CPU-s = {n / a / 1e6:.3f} M packets/CPU-s; "
              f"C {c:.3f} CPU-s = {n / c / 1e6:.2f} M packets/CPU-s; C is {a / c:.1f}x faster", flush=True)
    print(f"median: numpy {statistics.median(n / a for n, a, _ in res) / 1e6:.3f} M, "
          f"C {statistics.median(n / c for n, _, c in res) / 1e6:.2f} M packets per CPU-second, "
          f"ratio {statistics.median(a / c for _, a, c in res):.1f}x")


if __name__ == "__main__":
    main()
