"""What the upload process leaves in an experiment's spool, and how others read it.

Spool contract (docs/ARCHITECTURE.md): a data file is complete iff ``<name>.meta.json`` exists;
dot-files are not ours to touch. The upload process keeps, as hidden files in the spool:
- ``.gims-upload-status.json``: counters and the last error, replaced atomically;
- ``.gims-upload.log``: its log, one line per event (also sent to the journal under systemd);
- ``.failed/``: files that cannot be delivered as they are (unreadable metadata, a data file that
  does not match its own metadata), kept for the operator, never deleted;
- ``.delivered/``: delivered files, when the operator keeps local copies.
All hidden, so the ``.path`` unit (DirectoryNotEmpty=) does not trigger on them.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import threading
import time
from typing import Any

from capture_daemon.atomic import write_json_atomic as _write_json_atomic

STATUS_FILE = ".gims-upload-status.json"
LOG_FILE = ".gims-upload.log"
# Result of the last storage probe (gims-upload --test, run by gims-upload-probe@<id>.service):
# {"ok": bool, "reason": str, "time": epoch seconds, "invocation": systemd's INVOCATION_ID}.
PROBE_FILE = ".gims-probe.json"
FAILED_DIR = ".failed"
DELIVERED_DIR = ".delivered"
META_SUFFIX = ".meta.json"
LOG_MAX_BYTES = 1 << 20

_TS_RE = re.compile(r"_(\d{14})(?:_(\d+))?\.[A-Za-z0-9]+$")


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _order_key(spool: str, name: str) -> tuple:
    """Oldest first: the UTC start time in the file name, then the collision counter, then
    mtime for names that carry no time stamp."""
    m = _TS_RE.search(name)
    try:
        mtime = os.stat(os.path.join(spool, name)).st_mtime
    except OSError:
        mtime = 0.0
    if m:
        return (m.group(1), int(m.group(2) or 0), mtime, name)
    stamp = _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).strftime("%Y%m%d%H%M%S")
    return (stamp, 0, mtime, name)


def pending_files(spool: str) -> list[str]:
    """Complete data files waiting in the spool, oldest first."""
    try:
        names = os.listdir(spool)
    except FileNotFoundError:
        return []
    present = set(names)
    out = []
    for n in names:
        if n.startswith(".") or n.endswith(META_SUFFIX):
            continue
        if n + META_SUFFIX in present and os.path.isfile(os.path.join(spool, n)):
            out.append(n)
    out.sort(key=lambda n: _order_key(spool, n))
    return out


def incomplete_entries(spool: str) -> list[str]:
    """Visible names that are not part of a complete pair: a data file whose record has not
    appeared (yet, or ever: a capture process killed between the two renames), or a stray."""
    try:
        names = set(os.listdir(spool))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith("."):
            continue
        if n.endswith(META_SUFFIX):
            continue  # orphan records are the upload's own business (orphan_metadata)
        if n + META_SUFFIX not in names or not os.path.isfile(os.path.join(spool, n)):
            out.append(n)
    return sorted(out)


def orphan_metadata(spool: str) -> list[str]:
    """Metadata records whose data file is gone (a crash between deleting the two)."""
    try:
        names = set(os.listdir(spool))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(META_SUFFIX) and not n.startswith(".")
                  and n[: -len(META_SUFFIX)] not in names)


def failed_files(spool: str) -> list[str]:
    d = os.path.join(spool, FAILED_DIR)
    try:
        return sorted(n for n in os.listdir(d) if not n.endswith(META_SUFFIX)
                      and not n.startswith("."))
    except FileNotFoundError:
        return []


def write_json_atomic(path: str, obj: Any, mode: int = 0o640) -> None:
    """temp file in the same directory, fsync, rename: readers see the old or the new file."""
    _write_json_atomic(path, obj, mode=mode, sort_keys=True)


_STATUS_DEFAULTS: dict[str, Any] = {
    "experiment": None, "state": "never-run", "pid": None, "updated": None,
    "files_uploaded": 0, "bytes_uploaded": 0, "attempts": 0,
    "last_upload_time": None, "last_uploaded_file": None,
    "last_upload_error": None, "last_upload_error_time": None,
    "last_upload_error_permanent": None, "next_retry_at": None, "destination": None,
}


def load_status(spool: str) -> dict[str, Any]:
    st = dict(_STATUS_DEFAULTS)
    try:
        with open(os.path.join(spool, STATUS_FILE), encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):
            st.update(data)
    except (OSError, ValueError):
        pass
    return st


class StatusFile:
    """Thread-safe counters of one upload process, persisted after every change."""

    def __init__(self, spool: str, experiment: str):
        self.spool = spool
        self.path = os.path.join(spool, STATUS_FILE)
        self._lock = threading.Lock()
        self.data = load_status(spool)  # counters carry over from earlier runs
        self.data.update(experiment=experiment, pid=os.getpid())

    def update(self, **kw: Any) -> None:
        with self._lock:
            self.data.update(kw)
            self._save()

    def add_attempt(self) -> None:
        with self._lock:
            self.data["attempts"] = int(self.data.get("attempts") or 0) + 1
            self._save()

    def success(self, name: str, size: int) -> None:
        with self._lock:
            self.data["files_uploaded"] = int(self.data.get("files_uploaded") or 0) + 1
            self.data["bytes_uploaded"] = int(self.data.get("bytes_uploaded") or 0) + size
            self.data["last_upload_time"] = utcnow()
            self.data["last_uploaded_file"] = name
            # the problem is over once a file goes through again; the log keeps the history
            self.data["last_upload_error"] = None
            self.data["last_upload_error_time"] = None
            self.data["last_upload_error_permanent"] = None
            self._save()

    def error(self, message: str, permanent: bool) -> None:
        with self._lock:
            self.data["last_upload_error"] = message
            self.data["last_upload_error_time"] = utcnow()
            self.data["last_upload_error_permanent"] = permanent
            self._save()

    def _save(self) -> None:
        self.data["updated"] = utcnow()
        try:
            write_json_atomic(self.path, self.data)
        except OSError as e:  # a full spool disk must not stop deliveries that free it
            print(f"gims-upload: cannot write {self.path}: {e.strerror}", file=sys.stderr)


def read_status(spool_dir: str) -> dict[str, Any]:
    """Upload state of one experiment for gimsd: counters from the upload process plus what is
    pending in the spool right now (so it is right even when no upload process runs)."""
    st = load_status(spool_dir)
    pending = pending_files(spool_dir)
    failed = failed_files(spool_dir)
    incomplete = incomplete_entries(spool_dir)
    out = {
        "files_uploaded": int(st.get("files_uploaded") or 0),
        "bytes_uploaded": int(st.get("bytes_uploaded") or 0),
        "files_pending": len(pending),
        "files_failed": len(failed),
        "files_incomplete": len(incomplete),
        "failed_files": failed,
        "last_upload_error": st.get("last_upload_error"),
        "last_upload_error_time": st.get("last_upload_error_time"),
        "last_upload_time": st.get("last_upload_time"),
        "upload_state": st.get("state"),
        "upload_attempts": int(st.get("attempts") or 0),
        "next_retry_at": st.get("next_retry_at"),
        "destination": st.get("destination"),
        "delivered_all": not pending and not failed and not incomplete,
    }
    if failed and not out["last_upload_error"]:
        out["last_upload_error"] = f"{len(failed)} file(s) set aside in {FAILED_DIR}/"
    return out


class UploadLog:
    """The upload process's log: a line-oriented file in the spool (readable by gimsd's group),
    plus the journal with EXPERIMENT=<id> when running under systemd, else stderr."""

    def __init__(self, spool: str, experiment: str, secrets: list[str] | None = None,
                 use_journal: bool | None = None):
        self.path = os.path.join(spool, LOG_FILE)
        self.experiment = experiment
        self.secrets = list(secrets or [])
        self._lock = threading.Lock()
        self._journal = None
        if use_journal is None:
            use_journal = bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))
        if use_journal:
            try:
                from systemd import journal
                self._journal = journal
            except Exception:
                self._journal = None

    def _emit(self, level: str, msg: str) -> None:
        from .storage.base import redact
        msg = redact(msg, self.secrets).replace("\n", " ")
        line = f"{utcnow()} {level} {msg}\n"
        with self._lock:
            try:
                if os.path.exists(self.path) and os.path.getsize(self.path) > LOG_MAX_BYTES:
                    os.replace(self.path, self.path + ".1")
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line.encode("utf-8", "replace"))
                finally:
                    os.close(fd)
            except OSError:
                pass  # a full disk; the journal / stderr still get it
            if self._journal is not None:
                prio = {"ERROR": 3, "WARNING": 4, "INFO": 6}.get(level, 6)
                try:
                    self._journal.send(msg, PRIORITY=str(prio), EXPERIMENT=self.experiment,
                                       SYSLOG_IDENTIFIER="gims-upload")
                except Exception:
                    pass
            else:
                sys.stderr.write(f"gims-upload[{self.experiment}]: {level} {msg}\n")

    def info(self, msg: str) -> None:
        self._emit("INFO", msg)

    def warning(self, msg: str) -> None:
        self._emit("WARNING", msg)

    def error(self, msg: str) -> None:
        self._emit("ERROR", msg)


def _journal_tail(experiment: str, n: int) -> list[str] | None:
    try:
        from systemd import journal
    except Exception:
        return None
    try:
        r = journal.Reader()
        r.add_match(EXPERIMENT=experiment, SYSLOG_IDENTIFIER="gims-upload")
        r.seek_tail()
        lines = []
        while len(lines) < n:
            e = r.get_previous()
            if not e:
                break
            ts = e.get("__REALTIME_TIMESTAMP")
            stamp = ts.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else "?"
            lvl = {3: "ERROR", 4: "WARNING"}.get(int(e.get("PRIORITY", 6)), "INFO")
            lines.append(f"{stamp} {lvl} {e.get('MESSAGE', '')}")
        r.close()
        lines.reverse()
        return lines
    except Exception:
        return None


def log_tail(experiment: str, n: int, spool_dir: str) -> list[str]:
    """The last n lines of the experiment's upload log: from the journal when it has entries for
    this experiment (EXPERIMENT=<id>, SYSLOG_IDENTIFIER=gims-upload), else from the log file."""
    n = max(0, int(n))
    if n == 0:
        return []
    lines = _journal_tail(experiment, n)
    if lines:
        return lines
    out: list[str] = []
    path = os.path.join(spool_dir, LOG_FILE)
    for p in (path + ".1", path):
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                out.extend(ln.rstrip("\n") for ln in f)
        except OSError:
            continue
    return out[-n:]


def write_probe_result(spool_dir: str, ok: bool, reason: str) -> bool:
    """Leave the probe's verdict where gimsd (group gims-spool) can read it; False when the
    spool cannot take it (a full disk: gimsd then falls back to the unit's result)."""
    try:
        write_json_atomic(os.path.join(spool_dir, PROBE_FILE),
                          {"ok": bool(ok), "reason": str(reason), "time": time.time(),
                           "invocation": os.environ.get("INVOCATION_ID", "")})
        return True
    except OSError:
        return False


def read_probe_result(spool_dir: str, not_before: float) -> dict[str, Any] | None:
    """The probe verdict written at or after not_before (epoch seconds), else None."""
    try:
        with open(os.path.join(spool_dir, PROBE_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("time"), (int, float)):
        return None
    if data["time"] < not_before or not isinstance(data.get("ok"), bool):
        return None
    return {"ok": data["ok"], "reason": str(data.get("reason") or "")}
