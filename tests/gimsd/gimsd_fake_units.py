"""FakeUnits: a TEST DOUBLE for gimsd.systemd.UnitManager (the systemd side, which needs a running
systemd, D-Bus and polkit; the sandbox integration tests cover it with the real ones). It keeps unit
states in memory, refuses unit names outside gimsd's own the way the polkit rule does, and lets a
test set a unit's StatusText or make it crash."""
from __future__ import annotations

import fnmatch
import re
import threading

from gimsd.api import UnitError  # the real gimsd.systemd.UnitError once that module is present

# What the polkit rule allows gimsd's user (anchored patterns); anything else is refused the way
# polkit refuses it.
_ALLOWED = re.compile(r"^(capture@[A-Za-z0-9_.-]+\.service|gims-upload@[A-Za-z0-9_.-]+\.(path|service))$")


class FakeUnits:
    """In-memory stand-in for gimsd.systemd.UnitManager (see module docstring)."""

    def __init__(self):
        self.units: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse_start: dict[str, str] = {}
        self.lock = threading.Lock()
        self._pid = 1000

    def _check(self, name: str) -> None:
        if not _ALLOWED.match(name):
            raise UnitError(f"Interactive authentication required. ({name})")

    def _unit(self, name: str) -> dict:
        return self.units.setdefault(name, {
            "active_state": "inactive", "sub_state": "dead", "result": "success", "main_pid": 0,
            "status_text": "", "exec_main_status": 0, "cpu_user_usec": 2**64 - 1,
            "cpu_system_usec": 2**64 - 1, "memory_bytes": 2**64 - 1, "active_enter_time": 0})

    def start_unit(self, name):
        with self.lock:
            self.calls.append(("start", name))
            self._check(name)
            if name in self.refuse_start:
                raise UnitError(self.refuse_start[name])
            u = self._unit(name)
            self._pid += 1
            u.update(active_state="active", sub_state="running", result="success",
                     main_pid=self._pid if name.endswith(".service") else 0, status_text="",
                     exec_main_status=0, cpu_user_usec=150000, cpu_system_usec=50000,
                     memory_bytes=12 << 20, active_enter_time=1700000000000000)

    def stop_unit(self, name):
        with self.lock:
            self.calls.append(("stop", name))
            self._check(name)
            u = self._unit(name)
            u.update(active_state="inactive", sub_state="dead", main_pid=0, status_text="",
                     memory_bytes=2**64 - 1)

    def restart_unit(self, name):
        self.stop_unit(name)
        self.start_unit(name)

    def reset_failed(self, name):
        with self.lock:
            self.calls.append(("reset_failed", name))
            self._check(name)
            u = self._unit(name)
            if u["active_state"] == "failed":
                u.update(active_state="inactive", result="success")

    def unit_status(self, name):
        with self.lock:
            self._check(name)
            return dict(self._unit(name))

    def list_units(self, pattern):
        with self.lock:
            return sorted(n for n in self.units if fnmatch.fnmatch(n, pattern))

    # -- test controls
    def set_status(self, name, **fields):
        with self.lock:
            self._unit(name).update(fields)

    def crash(self, name, status=1, text=""):
        self.set_status(name, active_state="failed", sub_state="failed", result="exit-code",
                        exec_main_status=status, main_pid=0, status_text=text)
