"""Build the C accelerators of the capture path (everything else is in pyproject.toml).

Every ``capture_daemon/_accel_*.c`` is one extension module of the same name. They use only
the CPython C API and the buffer protocol (no numpy headers): numpy arrays go in as buffers.
Each has a numpy reference implementation in the module that imports it; the tests compare
both on every trace (see docs/PERFORMANCE.md, "C accelerators").
"""
import glob
import os

from setuptools import Extension, setup

ACCEL_SOURCES = sorted(glob.glob(os.path.join("capture_daemon", "_accel_*.c")))

setup(
    ext_modules=[
        Extension(f"capture_daemon.{os.path.basename(src)[:-2]}", [src],
                  extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"])
        for src in ACCEL_SOURCES
    ],
)
