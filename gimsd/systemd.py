"""gimsd's hands on systemd: start, stop and watch gims's own units over D-Bus.

`UnitManager` talks to org.freedesktop.systemd1 on the system bus with dbus-next. gimsd's
XML-RPC handlers are threads, so the methods are synchronous: the asyncio side runs in a
private event-loop thread and each call waits for its result there.

Every name is checked against UNIT_NAME_RE before anything reaches D-Bus, so a bad
experiment id can never name another unit. polkit (polkit/50-gims.rules) enforces the same
on systemd's side; its refusal ("Interactive authentication required", "Access denied")
comes back as UnitError with systemd's text.

unit_status() returns systemd's raw numbers: usec and bytes as unsigned 64-bit integers,
with 2**64-1 (UINT64_MAX, systemd's "unset") where a value is not known.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from typing import Any

from dbus_next import BusType, Message, MessageType
from dbus_next.aio import MessageBus

_INSTANCE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
UNIT_NAME_RE = re.compile(rf"^(capture@{_INSTANCE}\.service|gims-upload@{_INSTANCE}\.(service|path)"
                          rf"|gims-upload-probe@{_INSTANCE}\.service)$")
UINT64_MAX = 2**64 - 1

_SYSTEMD = "org.freedesktop.systemd1"
_MANAGER_PATH = "/org/freedesktop/systemd1"
_MANAGER = "org.freedesktop.systemd1.Manager"
_UNIT = "org.freedesktop.systemd1.Unit"
_PROPS = "org.freedesktop.DBus.Properties"
_JOB_REMOVED_MATCH = (f"type='signal',sender='{_SYSTEMD}',path='{_MANAGER_PATH}',"
                      f"interface='{_MANAGER}',member='JobRemoved'")
_CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


# systemd's own exit codes for a service that failed before running its program
# (systemd.exec(5) "Process Exit Codes"), so reasons read "243/CREDENTIALS", not "243".
SYSTEMD_EXIT_CODES = {
    200: "CHDIR", 201: "NICE", 202: "FDS", 203: "EXEC", 204: "MEMORY", 205: "LIMITS",
    206: "OOM_ADJUST", 207: "SIGNAL_MASK", 208: "STDIN", 209: "STDOUT", 210: "CHROOT",
    211: "IOPRIO", 212: "TIMERSLACK", 213: "SECUREBITS", 214: "SETSCHEDULER",
    215: "CPUAFFINITY", 216: "GROUP", 217: "USER", 218: "CAPABILITIES", 219: "CGROUP",
    220: "SETSID", 221: "CONFIRM", 222: "STDERR", 224: "PAM", 225: "NETWORK",
    226: "NAMESPACE", 227: "NO_NEW_PRIVILEGES", 228: "SECCOMP", 229: "SELINUX_CONTEXT",
    230: "PERSONALITY", 231: "APPARMOR_PROFILE", 232: "ADDRESS_FAMILIES",
    233: "RUNTIME_DIRECTORY", 235: "CHOWN", 236: "SMACK_PROCESS_LABEL", 237: "KEYRING",
    238: "STATE_DIRECTORY", 239: "CACHE_DIRECTORY", 240: "LOGS_DIRECTORY",
    241: "CONFIGURATION_DIRECTORY", 242: "NUMA_POLICY", 243: "CREDENTIALS", 245: "BPF",
}


class UnitError(Exception):
    """A unit operation failed; str() is the reason (systemd's or polkit's words)."""


def check_unit_name(name: str) -> str:
    # fullmatch: "$" alone would let a trailing newline through
    if not isinstance(name, str) or not UNIT_NAME_RE.fullmatch(name):
        raise UnitError(f"refused unit name {name!r}: gimsd manages only capture@<id>.service, "
                        "gims-upload@<id>.service/.path and gims-upload-probe@<id>.service")
    return name


def _interface_for(name: str) -> str:
    return "org.freedesktop.systemd1.Path" if name.endswith(".path") else "org.freedesktop.systemd1.Service"


def read_cgroup_cpu(control_group: str, roots: tuple[str, ...] = _CGROUP_ROOTS) -> tuple[int, int]:
    """(user_usec, system_usec) of a unit's cgroup, UINT64_MAX each when not readable.

    cgroup v2 keeps them in cpu.stat (also on a hybrid system's /sys/fs/cgroup/unified,
    where the basic cpu.stat needs no controller); cgroup v1's cpuacct has them in ns.
    """
    if not control_group:
        return UINT64_MAX, UINT64_MAX
    rel = control_group.lstrip("/")
    for root in roots:
        try:
            with open(os.path.join(root, rel, "cpu.stat")) as f:
                fields = dict(line.split() for line in f if line.strip())
            return int(fields["user_usec"]), int(fields["system_usec"])
        except (OSError, KeyError, ValueError):
            continue
    try:
        base = os.path.join("/sys/fs/cgroup/cpuacct", rel)
        with open(os.path.join(base, "cpuacct.usage_user")) as f:
            user = int(f.read()) // 1000
        with open(os.path.join(base, "cpuacct.usage_sys")) as f:
            system = int(f.read()) // 1000
        return user, system
    except (OSError, ValueError):
        return UINT64_MAX, UINT64_MAX


class UnitManager:
    """Synchronous facade over systemd's D-Bus API for gims's own units."""

    # gimsd runs its storage probe as gims-upload-probe@<id>.service (the uploads' own user
    # and sandbox) only with a real systemd; test doubles leave this False (in-process probe).
    runs_real_units = True

    def __init__(self, job_timeout: float = 120.0, call_timeout: float = 30.0,
                 bus_address: str | None = None):
        self.job_timeout = job_timeout
        self.call_timeout = call_timeout
        self._bus_address = bus_address
        self._bus: MessageBus | None = None
        self._connect_lock: asyncio.Lock | None = None  # made in the loop's thread
        self._waiters: dict[str, asyncio.Future] = {}
        self._finished: dict[str, str] = {}  # job path -> result, for jobs done before we waited
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gims-dbus", daemon=True)
        self._thread.start()

    # -- public, synchronous -------------------------------------------------------------

    def start_unit(self, name: str) -> str:
        """Start a unit and wait until its job finished; returns the job result ("done")."""
        return self._run(self._job("StartUnit", check_unit_name(name)), self.job_timeout + 5)

    def stop_unit(self, name: str) -> str:
        return self._run(self._job("StopUnit", check_unit_name(name)), self.job_timeout + 5)

    def restart_unit(self, name: str) -> str:
        return self._run(self._job("RestartUnit", check_unit_name(name)), self.job_timeout + 5)

    def reset_failed(self, name: str) -> None:
        """Forget a unit's failed state; a unit that is not loaded has none to forget."""
        try:
            self._run(self._call(_MANAGER_PATH, _MANAGER, "ResetFailedUnit", "s", [check_unit_name(name)]))
        except UnitError as exc:
            if "org.freedesktop.systemd1.NoSuchUnit" not in str(exc):
                raise

    def unit_status(self, name: str) -> dict[str, Any]:
        return self._run(self._status(check_unit_name(name)))

    def manager_boot_stamp(self) -> int:
        """When this systemd started (its UserspaceTimestamp, usec): differs after every boot of
        the node, equal across gimsd restarts. gimsd stores it with a started experiment so that
        at its own start it can tell a node reboot from a unit someone stopped in this boot."""
        (value,) = self._run(self._call(_MANAGER_PATH, _PROPS, "Get", "ss", [_MANAGER, "UserspaceTimestamp"]))
        return int(value.value)

    def list_units(self, pattern: str) -> list[str]:
        """Names of loaded units matching a shell-style pattern (e.g. "capture@*")."""
        reply = self._run(self._call(_MANAGER_PATH, _MANAGER, "ListUnitsByPatterns", "asas", [[], [pattern]]))
        return sorted(u[0] for u in reply[0])

    def close(self) -> None:
        if self._bus is not None:
            self._loop.call_soon_threadsafe(self._bus.disconnect)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- asyncio side --------------------------------------------------------------------

    def _run(self, coro, timeout: float | None = None):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout or self.call_timeout + 5)
        except TimeoutError:
            fut.cancel()
            raise UnitError("timed out waiting for systemd") from None

    async def _connected(self) -> MessageBus:
        if self._bus is not None and self._bus.connected:
            return self._bus
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:  # concurrent first calls share one connection
            if self._bus is not None and self._bus.connected:
                return self._bus
            return await self._connect()

    async def _connect(self) -> MessageBus:
        self._waiters.clear()
        self._finished.clear()
        try:
            bus = await MessageBus(bus_type=BusType.SYSTEM, bus_address=self._bus_address).connect()
        except Exception as exc:  # dbus-next raises several kinds; all mean "no bus"
            raise UnitError(f"cannot connect to the system bus: {exc}") from exc
        bus.add_message_handler(self._on_message)
        self._bus = bus
        await self._call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                         [_JOB_REMOVED_MATCH], destination="org.freedesktop.DBus")
        # Subscribe: systemd only emits JobRemoved while some client subscribed.
        await self._call(_MANAGER_PATH, _MANAGER, "Subscribe", "", [])
        return bus

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL or msg.member != "JobRemoved" or msg.interface != _MANAGER:
            return
        _id, job, _unit, result = msg.body
        fut = self._waiters.pop(job, None)
        if fut is not None and not fut.done():
            fut.set_result(result)
        else:
            self._finished[job] = result
            if len(self._finished) > 256:  # only recent ones matter
                self._finished.pop(next(iter(self._finished)))

    async def _call(self, path: str, interface: str, member: str, signature: str, body: list,
                    destination: str = _SYSTEMD) -> list:
        bus = self._bus if member in ("AddMatch", "Subscribe") else await self._connected()
        msg = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=body)
        try:
            reply = await asyncio.wait_for(bus.call(msg), self.call_timeout)
        except asyncio.TimeoutError:
            raise UnitError(f"{member}: no answer from systemd within {self.call_timeout:.0f} s") from None
        except Exception as exc:  # a broken connection: drop it, the next call reconnects
            self._bus = None
            raise UnitError(f"{member}: D-Bus error: {exc}") from exc
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            raise UnitError(f"{text} ({reply.error_name})")
        return reply.body

    async def _job(self, method: str, name: str) -> str:
        (job,) = await self._call(_MANAGER_PATH, _MANAGER, method, "ss", [name, "replace"])
        if job in self._finished:
            result = self._finished.pop(job)
        else:
            fut = self._loop.create_future()
            self._waiters[job] = fut
            try:
                result = await asyncio.wait_for(fut, self.job_timeout)
            except asyncio.TimeoutError:
                self._waiters.pop(job, None)
                raise UnitError(f"{method} {name}: job not finished after {self.job_timeout:.0f} s") from None
        if result != "done":
            raise UnitError(f"{method} {name}: job {result}{await self._why(name)}")
        return result

    async def _why(self, name: str) -> str:
        """systemd's reason a unit is not running, for error messages."""
        try:
            st = await self._status(name)
        except UnitError:
            return ""
        bits = [f"{st['active_state']}/{st['sub_state']}"]
        if st["result"] and st["result"] != "success":
            bits.append(f"result {st['result']}")
        if st["exec_main_status"]:
            code = st["exec_main_status"]
            name = SYSTEMD_EXIT_CODES.get(code)
            bits.append(f"exit status {code}" + (f"/{name}" if name else ""))
        if st["status_text"]:
            bits.append(st["status_text"])
        return ": " + ", ".join(bits)

    async def _props(self, path: str, interface: str) -> dict[str, Any]:
        (props,) = await self._call(path, _PROPS, "GetAll", "s", [interface])
        return {k: v.value for k, v in props.items()}

    async def _status(self, name: str) -> dict[str, Any]:
        # LoadUnit (not GetUnit): a unit that is not loaded yet still has a state ("inactive").
        (path,) = await self._call(_MANAGER_PATH, _MANAGER, "LoadUnit", "s", [name])
        unit = await self._props(path, _UNIT)
        kind = await self._props(path, _interface_for(name))
        cgroup = kind.get("ControlGroup", "") or ""
        cpu_user, cpu_system = read_cgroup_cpu(cgroup)
        return {
            "active_state": unit.get("ActiveState", ""),
            "sub_state": unit.get("SubState", ""),
            "load_state": unit.get("LoadState", ""),
            "result": kind.get("Result", ""),
            "main_pid": int(kind.get("MainPID", 0) or 0),
            "status_text": kind.get("StatusText", "") or "",
            "exec_main_status": int(kind.get("ExecMainStatus", 0) or 0),
            "exec_main_code": int(kind.get("ExecMainCode", 0) or 0),
            "n_restarts": int(kind.get("NRestarts", 0) or 0),
            "cpu_user_usec": cpu_user,
            "cpu_system_usec": cpu_system,
            "cpu_usage_nsec": int(kind.get("CPUUsageNSec", UINT64_MAX)),
            "memory_bytes": int(kind.get("MemoryCurrent", UINT64_MAX)),
            "active_enter_time": int(unit.get("ActiveEnterTimestamp", 0) or 0),
            "control_group": cgroup,
        }
