"""The capture process's memory allocator settings.

Why: every batch is a fresh buffer of a few MiB (the savefile chunk, or a live batch gathered
for the writer thread), freed once it is written. With glibc's defaults the heap top past
4 MiB free is handed back to the kernel, so nearly every batch faulted in and zeroed new pages:
on an anonymized copy of 600 MB that was ~0.1 CPU-s of kernel time out of 1.4 (measured with
perf: page faults, clear_page, unmap). Keeping up to TRIM_THRESHOLD of freed heap lets the next
batch reuse the same pages. Allocations over MMAP_THRESHOLD (the flow meter's tables) still get
their own mappings, returned whole on free: peak RSS grew by ~2 MB (measured on the bench's
anonymized copy, flows and counts).
"""
from __future__ import annotations

import ctypes

from . import libc

M_TRIM_THRESHOLD = -1   # glibc malloc.h
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 32 << 20
MMAP_THRESHOLD = 4 << 20


def keep_freed_batches() -> bool:
    """Tune glibc malloc for batch reuse (see module doc); False where there is no mallopt."""
    mallopt = libc.function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:  # not glibc: its own defaults stay
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
