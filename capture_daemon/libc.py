"""glibc functions the os module does not offer (sync_file_range, mallopt, prctl), via ctypes."""
from __future__ import annotations

import ctypes


def function(name: str, argtypes: tuple, restype=ctypes.c_int):
    """libc's function `name` with its C signature, or None where this libc lacks it."""
    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    f.argtypes = argtypes
    f.restype = restype
    return f
