"""Which C accelerators of the capture path are built (capture_daemon/_accel_*.c, setup.py).

Each accelerated module keeps its numpy implementation as the reference and falls back to it
when its extension does not import; this module only reports which ones are missing, so a
capture running several times slower than it should says so in the journal.
"""
from __future__ import annotations

import importlib
import pathlib

SOURCES_DIR = pathlib.Path(__file__).parent


def names() -> list[str]:
    """Accelerators this tree has sources for (a built package ships .so files only)."""
    found = {p.name.split(".")[0][len("_accel_"):] for p in SOURCES_DIR.glob("_accel_*")
             if p.suffix in (".c", ".so")}
    return sorted(found)


def missing() -> list[str]:
    """Accelerators whose extension module does not import."""
    out = []
    for name in names():
        try:
            importlib.import_module(f"{__package__}._accel_{name}")
        except ImportError:
            out.append(name)
    return out
