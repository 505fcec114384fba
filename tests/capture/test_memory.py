"""The allocator setting of the capture process (capture_daemon/memory.py): freed batch buffers
are kept for the next batch instead of going back to the kernel."""
import subprocess
import sys

from capture_daemon import memory


def test_freed_batches_are_reused_not_refaulted():
    # In a fresh interpreter (the setting is process-wide), the capture's pattern: a new ~2 MiB
    # batch buffer per batch, a few in flight to the writer thread, per-batch header arrays.
    # Counted: minor page faults over 200 batches, with glibc's defaults and with the setting.
    code = """
import collections, resource, sys
import numpy as np
from capture_daemon import memory
if sys.argv[1] == "tuned":
    assert memory.keep_freed_batches()
in_flight = collections.deque()
rng = np.random.default_rng(1)
def batch():
    buf = np.empty((2 << 20) + int(rng.integers(0, 1 << 16)), np.uint8)
    buf.fill(1)
    in_flight.append(buf)
    if len(in_flight) > 4:
        in_flight.popleft()
    headers = [np.ones(17000, np.int64) for _ in range(12)]
for _ in range(10):
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {how: int(subprocess.run([sys.executable, "-c", code, how], check=True, text=True,
                                      capture_output=True).stdout)
              for how in ("default", "tuned")}
    batch_pages = (2 << 20) // 4096
    # glibc's default gives freed buffers back and faults them in again, batch after batch
    assert faults["default"] > 20 * batch_pages, faults
    # the setting keeps them: well under a batch's pages per batch over 200 batches
    assert faults["tuned"] < 5 * batch_pages, faults


def test_setting_is_applied():
    assert memory.keep_freed_batches() is True
