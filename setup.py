"""Build the C accelerators of the capture path (everything else is in pyproject.toml).

Every ``capture_daemon/_accel_*.c`` is one extension module of the same name. They use the
CPython C API and the buffer protocol (no numpy headers: numpy arrays go in as buffers);
_accel_anon also links OpenSSL's libcrypto for AES, _accel_live libpcap.
Each has a numpy reference implementation in the module that imports it; the tests compare
both on every trace (see docs/PERFORMANCE.md, "C accelerators").
"""
import glob
import os

from setuptools import Extension, setup

ACCEL_SOURCES = sorted(glob.glob(os.path.join("capture_daemon", "_accel_*.c")))
# _accel_anon computes Crypto-PAn's AES blocks with OpenSSL (libssl-dev to build, libssl3 to run:
# the library python3-cryptography already loads).
# _accel_live reads live interfaces with libpcap (libpcap-dev to build, libpcap0.8 to run).
LIBRARIES = {"_accel_anon": ["crypto"], "_accel_live": ["pcap"]}

setup(
    ext_modules=[
        Extension(f"capture_daemon.{os.path.basename(src)[:-2]}", [src],
                  libraries=LIBRARIES.get(os.path.basename(src)[:-2], []),
                  depends=["capture_daemon/_parse_packet.h"],
                  extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"])
        for src in ACCEL_SOURCES
    ],
)
