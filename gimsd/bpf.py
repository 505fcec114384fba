"""BPF filters checked with libpcap's own compiler, as the capture will compile them.

Why not pcapy.compile: pcapy-ng 2.1.0 closes its pcap handle before it reads the error
message from it (pcapy.cc bpf_compile: pcap_close(pp) then pcap_geterr(pp)), a use after free
that AddressSanitizer reports on the first filter that does not compile. The message a client
got back was whatever that freed memory held by then. Here the message is copied out before the
handle is closed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

DLT_EN10MB = 1
NETMASK = 0  # what pcapy-ng's setfilter on a savefile passes, and what gimsd used before


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


_lib = None
_lock = threading.Lock()  # libpcap's filter compiler is not reentrant in every version


class FilterError(ValueError):
    """libpcap refused the filter; the message is libpcap's (it quotes nothing secret)."""


def _libpcap():
    global _lib
    if _lib is None:
        lib = None
        # Debian's soname first (no ldconfig subprocess in the sandboxed gimsd), then a search
        for name in ("libpcap.so.0.8", "libpcap.so.1", ctypes.util.find_library("pcap")):
            try:
                lib = ctypes.CDLL(name) if name else None
            except OSError:
                continue
            if lib is not None:
                break
        if lib is None:
            raise OSError("libpcap is not installed")
        lib.pcap_open_dead.argtypes = (ctypes.c_int, ctypes.c_int)
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_compile.argtypes = (ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                     ctypes.c_int, ctypes.c_uint32)
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_geterr.argtypes = (ctypes.c_void_p,)
        lib.pcap_geterr.restype = ctypes.c_char_p  # ctypes copies it into a bytes object
        lib.pcap_freecode.argtypes = (ctypes.POINTER(_BpfProgram),)
        lib.pcap_close.argtypes = (ctypes.c_void_p,)
        _lib = lib
    return _lib


def check_filter(expr: str, linktype: int = DLT_EN10MB, snaplen: int = 65535) -> None:
    """Compile expr (optimized, as the capture does); FilterError with libpcap's reason if it
    does not compile, OSError if libpcap itself is missing."""
    if "\0" in expr:
        raise FilterError("must not contain NUL characters")
    lib = _libpcap()
    with _lock:
        handle = lib.pcap_open_dead(linktype, snaplen)
        if not handle:
            raise OSError("libpcap could not open a dead handle")
        try:
            prog = _BpfProgram()
            if lib.pcap_compile(handle, ctypes.byref(prog), expr.encode(), 1, NETMASK) != 0:
                message = (lib.pcap_geterr(handle) or b"").decode("utf-8", "replace")
                raise FilterError(message or "libpcap could not compile it")
            lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)
