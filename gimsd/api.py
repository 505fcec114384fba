"""gimsd's core: the experiment operations of the GIMS contract, independent of any transport.

The XML-RPC front end (gimsd.server) converts wire values, calls these methods and maps
``ApiError`` to Faults in one place; gimsctl reaches the same methods through it. Nothing here
keeps experiment state in memory: specs and desired states live in the Store, and what the units
are really doing is asked of systemd (UnitManager) each time, so a restarted gimsd reports the
truth at once.

State model (desired state in state.json, reported state computed with the units' real state):
  configured --start--> running --pause--> paused --resume--> running
  running/paused --stop--> stopping (capture stopped, its last file finalized; uploads go on)
  stopping --(spool drained, upload .path unit stopped)--> stopped
  running + capture unit failed/exited  -> reported "failed"/"exited" with the reason
"""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from . import spec as specmod
from .config import Config
from .spec import SpecError
from .store import Store, StoreError, read_json

log = logging.getLogger("gimsd")

try:  # the systemd side (gimsd/systemd.py) raises this with systemd's/polkit's reason
    from gimsd.systemd import UnitError
except ImportError:  # not landed/installed: same shape, so the mapping below stays one place
    class UnitError(Exception):  # type: ignore[no-redef]
        pass

COUNTER_KEYS = ("packets_observed", "bytes_observed", "packets_sampled", "bytes_sampled",
                "packets_written", "files_written", "ps_recv", "ps_drop", "ps_ifdrop", "malformed",
                "packets_unwritten")
# .gims-status.json spells some counters as the metadata records do
_STATUS_FILE_ALIASES = {"malformed_packets": "malformed"}
_UNSET = 2**64 - 1  # systemd's "no value" for the cgroup accounting properties


# --------------------------------------------------------------------------- errors
class ApiError(Exception):
    """A refusal with a human-readable reason; ``code`` is the distinct fault code (used when the
    operator enables distinct codes; otherwise every fault is -1, as the original sent)."""
    code = 7

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidParams(ApiError):
    code = 1


class UnknownExperiment(ApiError):
    code = 2


class WrongState(ApiError):
    code = 3


class UnitControlFailed(ApiError):
    code = 4


class StorageCheckFailed(ApiError):
    code = 5


class LimitReached(ApiError):
    code = 6


class UnitControl(Protocol):
    def start_unit(self, name: str) -> Any: ...
    def stop_unit(self, name: str) -> Any: ...
    def restart_unit(self, name: str) -> Any: ...
    def reset_failed(self, name: str) -> Any: ...
    def unit_status(self, name: str) -> dict[str, Any]: ...
    def list_units(self, pattern: str) -> list[str]: ...


def capture_unit(exp_id: str) -> str:
    return f"capture@{specmod.validate_experiment_id(exp_id)}.service"


def upload_path_unit(exp_id: str) -> str:
    return f"gims-upload@{specmod.validate_experiment_id(exp_id)}.path"


def upload_service_unit(exp_id: str) -> str:
    return f"gims-upload@{specmod.validate_experiment_id(exp_id)}.service"


def upload_probe_unit(exp_id: str) -> str:
    return f"gims-upload-probe@{specmod.validate_experiment_id(exp_id)}.service"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _optional(module: str, attr: str):
    """A function of a part that lands separately (gimsd.storage, gimsd.upload), or None."""
    try:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)
    except (ImportError, AttributeError):
        return None


def parse_status_text(text: str) -> dict[str, int]:
    """The capture process's STATUS= (space-separated key=value; docs/ARCHITECTURE.md)."""
    out = {}
    for token in (text or "").split():
        key, sep, value = token.partition("=")
        if sep and key in COUNTER_KEYS and value.isdigit():
            out[key] = int(value)
    return out


def _never_active(status: dict[str, Any] | None) -> bool:
    return bool(status) and status.get("active_state") == "inactive" and not status.get("active_enter_time") \
        and str(status.get("result") or "success") == "success"


def _uint(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= _UNSET:
        return None
    return value


def _probe_journal_line(exp_id: str, since: float) -> str:
    """The probe's own last line in the journal (SYSLOG_IDENTIFIER=gims-upload-probe,
    EXPERIMENT=<id>), written at or after since; "" when there is none or no journal access."""
    try:
        from systemd import journal  # noqa: PLC0415 - python3-systemd, optional
        r = journal.Reader()
        r.add_match(EXPERIMENT=exp_id, SYSLOG_IDENTIFIER="gims-upload-probe")
        r.seek_realtime(since)
        last = ""
        for entry in r:
            msg = str(entry.get("MESSAGE") or "").strip()
            if msg:  # gims-upload --test prints "OK: <reason>" or "FAILED: <reason>"
                last = msg.removeprefix("OK: ").removeprefix("FAILED: ")
        r.close()
        return last
    except Exception:
        return ""


class GimsAPI:
    def __init__(self, config: Config, store: Store, units: UnitControl):
        self.config = config
        self.store = store
        self.units = units
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._failure_logged: set[str] = set()

    # ------------------------------------------------------------------ helpers
    def _lock(self, exp_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(exp_id, threading.Lock())

    def _id(self, params: Any) -> str:
        try:
            return specmod.experiment_id_of(params)
        except SpecError as e:
            raise InvalidParams(str(e), e.field) from None

    def _load(self, exp_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            spec = self.store.load_spec(exp_id)
            if spec is None:
                raise UnknownExperiment(f"no experiment {exp_id!r} on this node (configureExperiment first)")
            return spec, self.store.load_state(exp_id)
        except StoreError as e:
            raise ApiError(str(e)) from None

    def _unit(self, action: str, unit: str, exp_id: str) -> None:
        try:
            getattr(self.units, action)(unit)
        except UnitError as e:
            reason = specmod.redact_text(str(e), self._secrets(exp_id))
            log.error("%s %s refused by systemd: %s", action, unit, reason, extra={"EXPERIMENT": exp_id})
            raise UnitControlFailed(f"systemd refused {action.replace('_', ' ')} of {unit}: {reason}") from None

    def _unit_status(self, unit: str) -> tuple[dict[str, Any] | None, str]:
        try:
            return dict(self.units.unit_status(unit)), ""
        except UnitError as e:
            return None, f"cannot read the state of {unit} from systemd: {e}"

    def _secrets(self, exp_id: str) -> list[str]:
        try:
            spec = self.store.load_spec(exp_id)
        except (StoreError, ValueError):
            return []
        return specmod.secret_values(spec or {})

    def _spool(self, exp_id: str) -> str:
        return os.path.join(self.config.spool_dir, specmod.validate_experiment_id(exp_id))

    def _boot_stamp(self) -> int | None:
        """systemd's start time (UnitManager.manager_boot_stamp), None when unknown (test doubles,
        an older UnitManager, D-Bus trouble): then restore_after_boot falls back to unit state."""
        stamp = getattr(self.units, "manager_boot_stamp", None)
        if stamp is None:
            return None
        try:
            value = stamp()
            return value if isinstance(value, int) and not isinstance(value, bool) else None
        except Exception:
            return None

    def _save_state(self, exp_id: str, current: dict[str, Any], **changes: Any) -> dict[str, Any]:
        new = dict(current, **changes)
        self.store.save_state(exp_id, new)
        return new

    def _write_unit_files(self, exp_id: str, spec: dict[str, Any]) -> None:
        try:
            specmod.validate_for_start(spec, self.config)
        except SpecError as e:
            raise InvalidParams(f"experiment {exp_id} cannot start: {e}", e.field) from None
        self.store.write_capture_settings(exp_id, specmod.to_capture_settings(spec, self.config))
        self.store.write_storage_settings(exp_id, specmod.to_storage_settings(spec, self.config))
        # The spool directory itself belongs to the capture side (gims-capture:gims-spool, 2770;
        # created by its own unit): gimsd only reads it.

    def _missing_for_start(self, spec: dict[str, Any]) -> list[str]:
        missing = []
        if not spec.get("storage"):
            missing.append("StorageSpec")
        if not (spec.get("device") or self.config.default_device):
            missing.append("CaptureSpec.device")
        return missing

    # ------------------------------------------------------------------ the contract's methods
    def configure(self, params: Any) -> str:
        try:
            exp_id, part, ignored = specmod.parse_configure(params, self.config)
        except SpecError as e:
            raise InvalidParams(str(e), e.field) from None
        with self._lock(exp_id):
            try:
                old = self.store.load_spec(exp_id)
                state = self.store.load_state(exp_id) if old else None
            except StoreError as e:
                raise ApiError(str(e)) from None
            if old is None:
                with self._locks_guard:  # count and create under one lock: no overshoot by racing ids
                    if len(self.store.list_ids()) >= self.config.max_experiments:
                        raise LimitReached(f"this node already holds {self.config.max_experiments} experiments "
                                           "(limits.max_experiments)")
                    self.store.save_spec(exp_id, specmod.merge(None, part))
            if state and state.get("state") == "running":
                cap, _ = self._unit_status(capture_unit(exp_id))
                if cap is None or cap.get("active_state") in ("active", "activating", "reloading"):
                    raise WrongState(f"experiment {exp_id} is running: pause or stop it before changing "
                                     "its configuration")
            merged = specmod.merge(old, part)
            self.store.save_spec(exp_id, merged)
            if state is None:
                self.store.save_state(exp_id, {"state": "configured", "configured_at": _now()})
            else:
                self._save_state(exp_id, state, configured_at=_now())
        sections = sorted(k for k in part if k != "experiment_id")
        log.info("experiment %s configured (%s)%s", exp_id, ", ".join(sections) or "no settings",
                 f"; ignored keys {ignored}" if ignored else "", extra={"EXPERIMENT": exp_id})
        msg = f"OK: experiment {exp_id} configured"
        missing = self._missing_for_start(merged)
        if missing:
            msg += f"; still needed before start: {', '.join(missing)}"
        if ignored:
            msg += f"; ignored unknown keys: {', '.join(ignored)}"
        return msg

    def start(self, params: Any) -> str:
        exp_id = self._id(params)
        with self._lock(exp_id):
            spec, state = self._load(exp_id)
            cap, err = self._unit_status(capture_unit(exp_id))
            if cap and cap.get("active_state") in ("active", "activating", "reloading"):
                raise WrongState(f"experiment {exp_id} is already running")
            self._write_unit_files(exp_id, spec)
            try:
                self._start_units(exp_id)
            except UnitControlFailed as e:  # kept for getExperimentStats' last_error
                self._save_state(exp_id, state, last_error=f"{_now()} start failed: {e}")
                raise
            self._save_state(exp_id, state, state="running", started_at=_now(), stopped_at=None,
                             delivered_at=None, last_error=None, runs=int(state.get("runs") or 0) + 1,
                             systemd_boot=self._boot_stamp())
        self._failure_logged.discard(exp_id)
        log.info("experiment %s started", exp_id, extra={"EXPERIMENT": exp_id})
        return f"OK: experiment {exp_id} started ({capture_unit(exp_id)})"

    def _start_units(self, exp_id: str) -> None:
        try:  # a unit that failed before refuses nothing, but clearing it keeps the reason fresh
            self.units.reset_failed(capture_unit(exp_id))
        except UnitError:
            pass
        self._unit("start_unit", upload_path_unit(exp_id), exp_id)
        self._unit("start_unit", capture_unit(exp_id), exp_id)

    def pause(self, params: Any) -> str:
        exp_id = self._id(params)
        with self._lock(exp_id):
            _, state = self._load(exp_id)
            if state.get("state") == "paused":
                return f"OK: experiment {exp_id} is already paused"
            if state.get("state") != "running":
                raise WrongState(f"experiment {exp_id} is {state.get('state')}, not running: nothing to pause")
            # Only the capture unit: its last file is finalized and uploads carry on.
            self._unit("stop_unit", capture_unit(exp_id), exp_id)
            self._save_state(exp_id, state, state="paused", paused_at=_now())
        log.info("experiment %s paused", exp_id, extra={"EXPERIMENT": exp_id})
        return f"OK: experiment {exp_id} paused (capture stopped, its files are still delivered)"

    def resume(self, params: Any) -> str:
        exp_id = self._id(params)
        with self._lock(exp_id):
            spec, state = self._load(exp_id)
            if state.get("state") == "running":
                return f"OK: experiment {exp_id} is already running"
            if state.get("state") != "paused":
                raise WrongState(f"experiment {exp_id} is {state.get('state')}, not paused: use startExperiment")
            self._write_unit_files(exp_id, spec)  # the spec may have been changed while paused
            try:
                self._start_units(exp_id)
            except UnitControlFailed as e:
                self._save_state(exp_id, state, last_error=f"{_now()} resume failed: {e}")
                raise
            self._save_state(exp_id, state, state="running", resumed_at=_now(), systemd_boot=self._boot_stamp())
        self._failure_logged.discard(exp_id)
        log.info("experiment %s resumed", exp_id, extra={"EXPERIMENT": exp_id})
        return f"OK: experiment {exp_id} resumed"

    def stop(self, params: Any) -> str:
        exp_id = self._id(params)
        with self._lock(exp_id):
            _, state = self._load(exp_id)
            desired = state.get("state")
            if desired in ("stopping", "stopped"):
                return f"OK: experiment {exp_id} is already {desired}"
            if desired not in ("running", "paused"):
                raise WrongState(f"experiment {exp_id} is {desired}: it was never started")
            self._unit("stop_unit", capture_unit(exp_id), exp_id)
            self._save_state(exp_id, state, state="stopping", stopped_at=_now())
        log.info("experiment %s stopped; delivering its remaining files", exp_id, extra={"EXPERIMENT": exp_id})
        delivered, pending = self.reconcile_one(exp_id)
        if delivered:
            return f"OK: experiment {exp_id} stopped; every file is delivered"
        return (f"OK: experiment {exp_id} stopped; last file finalized, {pending} file(s) still being "
                "delivered (getExperimentStats shows when all are)")

    def stats(self, params: Any) -> dict[str, Any]:
        exp_id = self._id(params)
        spec, state = self._load(exp_id)
        return self._observe(exp_id, spec, state)

    def storage_log(self, params: Any, n: Any = 20) -> list[str]:
        exp_id = self._id(params)
        self._load(exp_id)
        try:
            n = specmod._int(n, "n", 1, 10000)
        except SpecError as e:
            raise InvalidParams(str(e), e.field) from None
        log_tail = _optional("gimsd.upload", "log_tail")
        if log_tail is None:
            raise ApiError("the storage log is not available: gimsd.upload is not installed on this node")
        try:
            lines = log_tail(exp_id, n, self._spool(exp_id))
        except Exception as e:  # a part we do not own; report, never pass a traceback on
            log.error("reading the storage log of %s failed: %s", exp_id, e, extra={"EXPERIMENT": exp_id})
            raise ApiError(f"cannot read the storage log of {exp_id}: {type(e).__name__}") from None
        secrets = self._secrets(exp_id)
        return [specmod.redact_text(str(line), secrets) for line in list(lines)[-n:]]

    def test_storage(self, params: Any) -> str:
        """"OK: ..." when a probe object was written, read back and deleted with the experiment's
        credentials; "FAILED: <reason>" when the storage refused a step. Faults only for a call
        that cannot be made (unknown experiment, no or invalid StorageSpec, no storage module)."""
        exp_id = self._id(params)
        spec, _ = self._load(exp_id)
        if not spec.get("storage"):
            raise InvalidParams(f"experiment {exp_id} has no StorageSpec to test", "StorageSpec")
        try:
            specmod._validate_storage_params(spec["storage"]["storagetype"], spec["storage"]["storageparams"])
            if spec["storage"]["storagetype"] == "local":
                specmod.check_local_dir(spec["storage"]["storageparams"].get("local_storage_dir"), self.config,
                                        "StorageSpec.storageparams.local_storage_dir")
        except SpecError as e:
            raise InvalidParams(str(e), e.field) from None
        secrets = specmod.secret_values(spec)
        if getattr(self.units, "runs_real_units", False):
            # Under systemd: the probe runs as the uploads run (gims-upload-probe@<id>.service:
            # user gims-upload, the storage.json credential, the upload unit's sandbox), so the
            # answer is about the uploads, not about gimsd's own identity and read-only sandbox.
            ok, reason = self._probe_in_unit(exp_id, spec)
        else:
            # No systemd to run the unit (gimsd with a test double): probe in this process.
            test = _optional("gimsd.storage", "test_storage")
            if test is None:
                raise StorageCheckFailed("storage cannot be tested: gimsd.storage is not installed on this node")
            try:
                ok, reason = test(specmod.to_storage_settings(spec, self.config))
            except Exception as e:  # a back-end bug must still come back as a reason, not a crash
                ok, reason = False, f"{type(e).__name__}: {e}"
        reason = specmod.redact_text(str(reason), secrets)
        dest = spec["storage"]["storagetype"]
        if not ok:
            # A storage that refuses the probe is the answer to this call, not a failed call: it
            # comes back as a readable string (the original's style), "FAILED: <step and reason>".
            log.warning("storage test of %s failed: %s", exp_id, reason, extra={"EXPERIMENT": exp_id})
            return f"FAILED: {dest} storage of experiment {exp_id} did not pass the probe: {reason}"
        log.info("storage test of %s passed", exp_id, extra={"EXPERIMENT": exp_id})
        return f"OK: {dest} storage of experiment {exp_id} accepted a write, read and delete" + (
            f" ({reason})" if reason else "")

    def _probe_in_unit(self, exp_id: str, spec: dict[str, Any]) -> tuple[bool, str]:
        """Start gims-upload-probe@<id>.service, wait for it, and read its verdict: the result
        file it leaves in the spool, else its journal line, else systemd's unit result."""
        unit = upload_probe_unit(exp_id)
        with self._lock(exp_id):  # storage.json is what the probe (and the uploads) will read
            self.store.write_storage_settings(exp_id, specmod.to_storage_settings(spec, self.config))
        started = time.time() - 1.0  # result-file times are wall clock, written by another process
        job_error = ""
        try:
            self.units.start_unit(unit)  # a oneshot: the job finishes when the probe has run
        except UnitError as e:
            job_error = str(e)
        read_probe = _optional("gimsd.uploadstate", "read_probe_result")
        verdict = read_probe(self._spool(exp_id), started) if read_probe else None
        if verdict is not None:
            return verdict["ok"], verdict["reason"]
        line = _probe_journal_line(exp_id, started)
        if not job_error:
            return True, line or f"{unit} finished successfully"
        status, _ = self._unit_status(unit)
        why = ""
        if status:
            code = status.get("exec_main_status")
            why = f" (result {status.get('result') or 'unknown'}" + (f", exit status {code}" if code else "") + ")"
        return False, (line or f"{unit} did not succeed: {job_error}") + why

    def state(self) -> dict[str, Any]:
        experiments: dict[str, Any] = {}
        for exp_id in self.store.list_ids():
            try:
                spec, state = self._load(exp_id)
                full = self._observe(exp_id, spec, state)
            except ApiError as e:
                experiments[exp_id] = {"exp_id": exp_id, "state": "unreadable", "failure_reason": str(e)}
                continue
            experiments[exp_id] = {k: full[k] for k in (
                "exp_id", "state", "desired_state", "failure_reason", "storage_type", "capture_pid",
                "packets_observed", "packets_after_sampling", "files_written", "files_uploaded",
                "files_pending", "delivered_all", "last_upload_error", "started_at", "stopped_at")}
            experiments[exp_id]["capture_unit_state"] = full["capture_unit"].get("active_state", "unknown")
        return {
            "node": {
                "software": "gims gimsd",
                "site_location": self.config.site_location,
                "allowed_interfaces": list(self.config.allowed_interfaces),
                "default_device": self.config.default_device,
                "local_storage_roots": list(self.config.local_storage_roots),
                "max_experiments": self.config.max_experiments,
                "time": _now(),
            },
            "experiments": experiments,
            "storage_backends": self.storage_backends(),
        }

    def storage_backends(self) -> dict[str, Any]:
        available = _optional("gimsd.storage", "available_backends")
        if available is None:
            return {name: {"available": False, "reason": "gimsd.storage is not installed on this node"}
                    for name in specmod.STORAGE_TYPES}
        try:
            return {str(k): {"available": bool(v.get("available")), "reason": str(v.get("reason") or "")}
                    for k, v in available().items()}
        except Exception as e:
            log.error("listing storage back-ends failed: %s", e)
            return {name: {"available": False, "reason": f"cannot be determined: {type(e).__name__}"}
                    for name in specmod.STORAGE_TYPES}

    # ------------------------------------------------------------------ observation
    def _counters(self, exp_id: str, cap: dict[str, Any] | None) -> tuple[dict[str, int], str]:
        if cap and cap.get("active_state") in ("active", "reloading", "deactivating"):
            counters = parse_status_text(cap.get("status_text") or "")
            if counters:
                return counters, "unit_status"
        try:
            raw = read_json(Path(self._spool(exp_id), ".gims-status.json"), limit=1 << 20)
        except (OSError, ValueError, StoreError):
            return {}, "none"
        if not isinstance(raw, dict):
            return {}, "none"
        out = {}
        for k, v in raw.items():
            k = _STATUS_FILE_ALIASES.get(k, k)
            if k in COUNTER_KEYS and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                out[k] = v
        return out, "status_file"

    def _upload_status(self, exp_id: str) -> tuple[dict[str, Any], str]:
        read_status = _optional("gimsd.upload", "read_status")
        if read_status is None:
            return {}, "gimsd.upload is not installed on this node"
        try:
            status = read_status(self._spool(exp_id))
            return (dict(status) if isinstance(status, dict) else {}), ""
        except Exception as e:
            return {}, f"upload status unreadable: {type(e).__name__}"

    def _spool_usage(self, exp_id: str) -> tuple[int, int, int]:
        """(bytes in the spool, complete data files waiting, all visible files)."""
        total = waiting = visible = 0
        try:
            with os.scandir(self._spool(exp_id)) as it:
                names = []
                for entry in it:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                        if not entry.name.startswith("."):
                            visible += 1
                            names.append(entry.name)
        except OSError:
            return 0, 0, 0
        present = set(names)
        waiting = sum(1 for n in names if not n.endswith(".meta.json") and f"{n}.meta.json" in present)
        return total, waiting, visible

    def _observe(self, exp_id: str, spec: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        cap, cap_err = self._unit_status(capture_unit(exp_id))
        path, path_err = self._unit_status(upload_path_unit(exp_id))
        counters, source = self._counters(exp_id, cap)
        upload, upload_err = self._upload_status(exp_id)
        spool_bytes, waiting, _ = self._spool_usage(exp_id)
        desired = state.get("state", "configured")
        reported, reason = self._reported_state(exp_id, desired, cap, cap_err, upload, waiting)
        files_pending = _uint(upload.get("files_pending"))
        if files_pending is None:
            files_pending = waiting
        cap = cap or {}
        storage = spec.get("storage") or {}
        secrets = specmod.secret_values(spec)

        def clean(v: Any) -> Any:
            return specmod.redact_text(v, secrets) if isinstance(v, str) else v

        ps_drop = counters.get("ps_drop", 0)
        ps_ifdrop = counters.get("ps_ifdrop", 0)
        cpu_user = _uint(cap.get("cpu_user_usec"))
        cpu_sys = _uint(cap.get("cpu_system_usec"))
        stats = {
            # the original's fields
            "exp_id": exp_id,
            "storage_type": storage.get("storagetype", ""),
            "storage_params": specmod.public_storage_params(spec),
            "local_staging_folder": self._spool(exp_id),
            "memory_consumed": _uint(cap.get("memory_bytes")) or 0,
            "cpu_time_user": (cpu_user or 0) / 1e6,
            "cpu_time_system": (cpu_sys or 0) / 1e6,
            "capture_enabled": desired == "running",
            "capture_started": cap.get("active_state") in ("active", "reloading"),
            "capture_pid": _uint(cap.get("main_pid")) or 0,
            "bytes_observed": counters.get("bytes_observed", 0),
            "packets_observed": counters.get("packets_observed", 0),
            "bytes_after_sampling": counters.get("bytes_sampled", 0),
            "packets_after_sampling": counters.get("packets_sampled", 0),
            "files_written": counters.get("files_written", 0),
            "files_uploaded": _uint(upload.get("files_uploaded")) or 0,
            # gims additions
            "state": reported,
            "desired_state": desired,
            "failure_reason": clean(reason),
            "packets_written": counters.get("packets_written", 0),
            "ps_recv": counters.get("ps_recv", 0),
            "ps_drop": ps_drop,
            "ps_ifdrop": ps_ifdrop,
            "packets_dropped": ps_drop + ps_ifdrop,
            "malformed_packets": counters.get("malformed", 0),
            "packets_unwritten": counters.get("packets_unwritten", 0),
            "counters_source": source,
            "bytes_uploaded": _uint(upload.get("bytes_uploaded")) or 0,
            "files_pending": files_pending,
            "last_upload_error": clean(str(upload.get("last_upload_error") or "")),
            "last_upload_error_time": str(upload.get("last_upload_error_time") or ""),
            "delivered_all": self._delivered(upload, waiting),
            "upload_status_note": upload_err,
            "spool_bytes": spool_bytes,
            "spool_quota_bytes": self.config.spool_quota_bytes,
            "last_error": clean(reason or str(state.get("last_error") or "")
                                or str(upload.get("last_upload_error") or "")),
            "capture_unit": {
                "name": capture_unit(exp_id),
                "active_state": str(cap.get("active_state") or ("unknown" if cap_err else "")),
                "sub_state": str(cap.get("sub_state") or ""),
                "result": str(cap.get("result") or ""),
                "exec_main_status": cap.get("exec_main_status") if isinstance(cap.get("exec_main_status"), int) else 0,
                "status_text": clean(str(cap.get("status_text") or "")),
                "active_enter_time": str(cap.get("active_enter_time") or ""),
            },
            "upload_unit": {
                "name": upload_path_unit(exp_id),
                "active_state": str((path or {}).get("active_state") or ("unknown" if path_err else "")),
                "sub_state": str((path or {}).get("sub_state") or ""),
            },
            "configured_at": str(state.get("configured_at") or ""),
            "started_at": str(state.get("started_at") or ""),
            "stopped_at": str(state.get("stopped_at") or ""),
            "delivered_at": str(state.get("delivered_at") or ""),
            "spec": specmod.public_summary(spec, self.config),
        }
        return stats

    @staticmethod
    def _delivered(upload: dict[str, Any], waiting: int) -> bool:
        # Both the upload side's own verdict and an empty spool (no complete data file waiting):
        # a file finalized a moment ago may not be known to the upload process yet.
        pending = _uint(upload.get("files_pending"))
        return bool(upload.get("delivered_all", True)) and not pending and waiting == 0

    def _reported_state(self, exp_id: str, desired: str, cap: dict[str, Any] | None, cap_err: str,
                        upload: dict[str, Any], waiting: int) -> tuple[str, str]:
        if desired in ("configured", "paused", "stopped"):
            return desired, ""
        if cap is None:
            return "unknown", cap_err
        active = cap.get("active_state")
        if desired == "stopping":
            if active in ("active", "activating", "deactivating"):
                return "stopping", ""
            return ("stopped", "") if self._delivered(upload, waiting) else ("stopping", "")
        # desired running
        if active in ("active", "reloading"):
            return "running", ""
        if active == "activating":
            return "starting", ""
        if active == "deactivating":
            return "running", "capture unit is deactivating"
        result = str(cap.get("result") or "")
        status = cap.get("exec_main_status")
        text = str(cap.get("status_text") or "")
        if active == "failed" or result not in ("", "success"):
            reason = f"{capture_unit(exp_id)} failed (result: {result or 'unknown'}"
            if isinstance(status, int) and status:
                reason += f", exit status {status}"
            reason += ")" + (f": {text}" if text else "")
            return "failed", reason
        return "exited", f"{capture_unit(exp_id)} is {active or 'inactive'}: the capture process ended on its own"

    # ------------------------------------------------------------------ background reconciliation
    def reconcile_one(self, exp_id: str) -> tuple[bool, int]:
        """For a stopping experiment: once capture is down and the spool is delivered, stop the
        upload .path unit and mark it stopped. Returns (delivered, files still pending)."""
        with self._lock(exp_id):
            try:
                spec, state = self._load(exp_id)
            except ApiError:
                return False, 0
            obs = self._observe(exp_id, spec, state)
            if state.get("state") == "running" and obs["state"] in ("failed", "exited"):
                if exp_id not in self._failure_logged:
                    self._failure_logged.add(exp_id)
                    log.error("experiment %s: %s", exp_id, obs["failure_reason"], extra={"EXPERIMENT": exp_id})
            if state.get("state") != "stopping":
                return state.get("state") == "stopped", obs["files_pending"]
            if obs["state"] != "stopped":
                return False, obs["files_pending"]
            try:
                self.units.stop_unit(upload_path_unit(exp_id))
            except UnitError as e:
                log.warning("stopping %s failed: %s", upload_path_unit(exp_id), e, extra={"EXPERIMENT": exp_id})
                return False, obs["files_pending"]
            self._save_state(exp_id, state, state="stopped", delivered_at=_now())
        log.info("experiment %s: every file delivered; experiment stopped", exp_id, extra={"EXPERIMENT": exp_id})
        return True, 0

    def restore_after_boot(self) -> list[str]:
        """At gimsd start: units of experiments that should be running but have never been active
        since systemd started (ActiveEnterTimestamp 0: the node rebooted) are started again. A
        capture that ran in this boot and ended is left as it is (reported failed/exited)."""
        restored = []
        boot = self._boot_stamp()
        for exp_id in self.store.list_ids():
            with self._lock(exp_id):
                try:
                    spec, state = self._load(exp_id)
                except ApiError:
                    continue
                desired = state.get("state")
                if desired not in ("running", "paused", "stopping"):
                    continue
                try:
                    path, _ = self._unit_status(upload_path_unit(exp_id))
                    if _never_active(path):  # files may be waiting: delivery resumes in any case
                        self._unit("start_unit", upload_path_unit(exp_id), exp_id)
                    cap, _ = self._unit_status(capture_unit(exp_id))
                    # Same systemd as when it was started: no reboot. A capture unit that looks
                    # never-active was stopped by hand and garbage-collected: leave it be.
                    same_boot = boot is not None and state.get("systemd_boot") == boot
                    if desired == "running" and _never_active(cap) and not same_boot:
                        self._write_unit_files(exp_id, spec)
                        self._unit("start_unit", capture_unit(exp_id), exp_id)
                        self._save_state(exp_id, state, systemd_boot=boot)
                        restored.append(exp_id)
                        log.info("experiment %s: capture started again after a node restart", exp_id,
                                 extra={"EXPERIMENT": exp_id})
                except ApiError as e:
                    log.error("experiment %s could not be restored after a node restart: %s", exp_id, e,
                              extra={"EXPERIMENT": exp_id})
        return restored

    def reconcile(self) -> None:
        for exp_id in self.store.list_ids():
            try:
                self.reconcile_one(exp_id)
            except Exception:  # one experiment's trouble must not stop the others' reconciliation
                log.exception("reconciling experiment %s failed", exp_id, extra={"EXPERIMENT": exp_id})

    def summary(self) -> str:
        """One line for sd_notify STATUS=."""
        counts: dict[str, int] = {}
        for exp_id in self.store.list_ids():
            try:
                desired = self.store.load_state(exp_id).get("state", "configured")
            except StoreError:
                desired = "unreadable"
            counts[desired] = counts.get(desired, 0) + 1
        if not counts:
            return "no experiments"
        return "experiments: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
