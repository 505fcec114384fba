"""gims-upload: drain one experiment's spool into its storage, every file exactly once, verified.

Run by ``gims-upload@<id>.service`` (started by ``gims-upload@<id>.path`` while the spool holds
visible files). It reads the experiment's storage settings from the systemd credential
``$CREDENTIALS_DIRECTORY/storage.json`` (or ``--storage FILE``), then loops:

  scan the spool (complete files only, oldest first) → deliver them with N worker threads →
  rescan; exit 0 once the spool is empty.

Per file: upload the data file (temp name + rename / atomic PUT under the final name), verify
size (and sha256 where the back-end gives it back), annotate the metadata record with an
``upload`` object, upload it, verify it, only then delete (or, with keep_local, move aside) the
local copies. A crash at any point leaves the local files in place, and the next run sends them
again under the same names: nothing lost, nothing duplicated under another name.

Failures: transient errors are retried per file with exponential backoff and jitter; when a round
leaves files behind the process waits (backoff growing to ``round_backoff_max``) and rescans,
so a failing destination never becomes a tight restart loop of the .path unit. A permanent
error (bad credentials, missing bucket, permission denied, host key mismatch) stops all workers
at once (no retry storm), is recorded, and after ``permanent_retry_seconds`` the process exits
75 so the next start of the unit re-reads the (maybe corrected) credential.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import re
import signal
import sys
import threading
import time
from typing import Any

from . import storage
from .storage.base import (PermanentStorageError, StorageError, TransientStorageError,
                           sha256_file)
from .uploadstate import (DELIVERED_DIR, FAILED_DIR, META_SUFFIX, StatusFile, UploadLog,
                          incomplete_entries, log_tail, orphan_metadata, pending_files,
                          read_status, utcnow, write_json_atomic, write_probe_result)

__all__ = ["main", "read_status", "log_tail", "Uploader"]

EXIT_DRAINED = 0
EXIT_USAGE = 2
EXIT_PENDING = 75  # EX_TEMPFAIL: files remain; the .path unit starts us again later

EXPERIMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Retry tuning; the node section of storage.json may override any of these.
DEFAULT_TUNING = {
    "attempts_per_file": 5,          # transient failures of one file before the round gives up
    "retry_initial_seconds": 1.0,    # first per-file backoff (doubles, with jitter)
    "retry_max_seconds": 30.0,
    "round_backoff_initial": 5.0,    # wait before rescanning after a round left files behind
    "round_backoff_max": 300.0,
    "permanent_retry_seconds": 600.0,
    "incomplete_poll_seconds": 5.0,  # how often to look again at a data file without record
}


class FileSetAside(Exception):
    """This file cannot be delivered as it is; it goes to .failed/ for the operator."""


class Uploader:
    def __init__(self, settings: dict[str, Any], spool: str, experiment: str,
                 log: UploadLog, once: bool = False):
        self.spool = spool
        self.experiment = experiment
        self.once = once
        node = dict(storage.DEFAULT_NODE)
        node.update(settings.get("node") or {})
        node.setdefault("tofu_known_hosts", os.path.join(spool, ".gims-known_hosts"))
        settings = dict(settings, node=node)
        self.tuning = {k: float(node.get(k, v)) for k, v in DEFAULT_TUNING.items()}
        self.parallel = max(1, int(node.get("parallel") or 4))
        self.keep_local = bool(node.get("keep_local"))
        self.backend = storage.make_backend(settings)
        self.log = log
        log.secrets.extend(self.backend.secrets())
        self.status = StatusFile(spool, experiment)
        self.stop = threading.Event()
        self.halt = threading.Event()  # set on a permanent error: stop starting transfers

    def _redact(self, text: str) -> str:
        """Back-end errors should never carry a secret; make sure of it before they are
        written anywhere (status file, log, journal)."""
        return storage.redact(text, self.backend.secrets())

    # -- one file ------------------------------------------------------------------------
    def _set_aside(self, name: str, reason: str) -> None:
        d = os.path.join(self.spool, FAILED_DIR)
        os.makedirs(d, exist_ok=True)
        for n in (name, name + META_SUFFIX):
            try:
                os.replace(os.path.join(self.spool, n), os.path.join(d, n))
            except FileNotFoundError:
                pass
        msg = self._redact(f"{name} set aside in {FAILED_DIR}/: {reason}")
        self.log.error(msg)
        self.status.error(msg, permanent=True)

    def deliver(self, name: str) -> int:
        """Deliver one data file and its metadata record. Returns the data size.
        Raises StorageError (to retry or give up) or FileSetAside."""
        data = os.path.join(self.spool, name)
        metap = data + META_SUFFIX
        try:
            with open(metap, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            raise
        except (ValueError, UnicodeDecodeError) as e:
            raise FileSetAside(f"metadata record unreadable: {e}") from None
        size, sha = sha256_file(data)
        # A data file that is not what its own record says (truncated, overwritten) is never
        # delivered as if it were complete.
        if meta.get("size") is not None and meta.get("size") != size:
            raise FileSetAside(f"data file has {size} bytes, its metadata says {meta.get('size')}")
        if meta.get("sha256") and meta.get("sha256") != sha:
            raise FileSetAside("data file sha256 differs from its metadata record")

        done = meta.get("upload") or {}
        if not (done.get("verified") and done.get("sha256") == sha
                and self.backend.verify(name, size, sha)):
            self.status.add_attempt()
            receipt = self.backend.put(data, name)
            if receipt.size != size or (receipt.sha256 and receipt.sha256 != sha):
                raise TransientStorageError(f"{name}: back-end reports {receipt.size} bytes / "
                                            f"a different sha256 after upload")
            if not self.backend.verify(name, size, sha):
                raise TransientStorageError(f"{name}: remote copy failed verification")
            uri = receipt.uri
            digest_checked = receipt.sha256 is not None
            # Record the proof locally first (atomic replace), so a crash from here on
            # does not cost a second data transfer.
            meta["upload"] = {
                "destination": uri, "uploaded_at": utcnow(), "size": size, "sha256": sha,
                "verified": True,
                "verified_by": "size+sha256" if digest_checked else "size",
            }
            write_json_atomic(metap, meta, mode=0o640)
        msize, msha = sha256_file(metap)
        self.backend.put(metap, name + META_SUFFIX)
        if not self.backend.verify(name + META_SUFFIX, msize, msha):
            raise TransientStorageError(f"{name}{META_SUFFIX}: remote copy failed verification")
        self._remove_local(name)
        self.status.success(name, size)
        self.log.info(f"delivered {name} ({size} bytes, sha256 {sha[:16]}…) to "
                      f"{meta['upload']['destination']}")
        return size

    def _remove_local(self, name: str) -> None:
        data = os.path.join(self.spool, name)
        metap = data + META_SUFFIX
        if self.keep_local:
            d = os.path.join(self.spool, DELIVERED_DIR)
            os.makedirs(d, exist_ok=True)
            os.replace(data, os.path.join(d, name))
            os.replace(metap, os.path.join(d, name + META_SUFFIX))
        else:
            # data first: a crash in between leaves an annotated record without data,
            # which the next run recognises as delivered (see _clean_orphans).
            os.unlink(data)
            os.unlink(metap)
        fd = os.open(self.spool, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _clean_orphans(self) -> None:
        for m in orphan_metadata(self.spool):
            path = os.path.join(self.spool, m)
            try:
                with open(path, encoding="utf-8") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                meta = {}
            up = meta.get("upload") if isinstance(meta, dict) else None
            if isinstance(up, dict) and up.get("verified"):
                try:
                    msize, msha = sha256_file(path)
                    if not self.backend.verify(m, msize, msha):
                        self.backend.put(path, m)
                    os.unlink(path)
                    self.log.info(f"finished delivery of {m} after an interrupted run")
                except StorageError as e:
                    self.log.warning(f"{m}: {e}")
            else:
                name = m[: -len(META_SUFFIX)]
                self._set_aside(name, "metadata record without its data file")

    def deliver_with_retries(self, name: str) -> str:
        """'ok', 'transient', 'permanent', 'aside', 'gone' or 'stopped'."""
        delay = self.tuning["retry_initial_seconds"]
        attempts = int(self.tuning["attempts_per_file"])
        for attempt in range(1, attempts + 1):
            if self.stop.is_set() or self.halt.is_set():
                return "stopped"
            try:
                self.deliver(name)
                return "ok"
            except FileNotFoundError:
                return "gone"  # someone else (an earlier run, the operator) removed it
            except FileSetAside as e:
                self._set_aside(name, str(e))
                return "aside"
            except PermanentStorageError as e:
                self.halt.set()
                self.log.error(f"{name}: {e} (permanent; not retrying)")
                self.status.error(self._redact(str(e)), permanent=True)
                return "permanent"
            except (StorageError, OSError) as e:
                what = str(e) if isinstance(e, StorageError) else f"local I/O: {e.strerror or e}"
                what = self._redact(what)
                self.status.error(what, permanent=False)
                if attempt == attempts:
                    self.log.error(f"{name}: {what} (attempt {attempt}/{attempts}; "
                                   f"giving up for this round)")
                    return "transient"
                wait = random.uniform(delay / 2, delay)  # jitter: workers do not retry in step
                self.log.warning(f"{name}: {what} (attempt {attempt}/{attempts}; "
                                 f"retrying in {wait:.1f}s)")
                if self.stop.wait(wait):
                    return "stopped"
                delay = min(delay * 2, self.tuning["retry_max_seconds"])
        return "transient"

    # -- the drain loop ------------------------------------------------------------------
    def round(self, files: list[str]) -> dict[str, int]:
        self.halt.clear()
        results: dict[str, int] = {}
        with cf.ThreadPoolExecutor(max_workers=self.parallel,
                                   thread_name_prefix="gims-upload") as pool:
            for r in pool.map(self.deliver_with_retries, files):
                results[r] = results.get(r, 0) + 1
        return results

    def run(self) -> int:
        self.status.update(state="uploading", destination=self.backend.destination(),
                           next_retry_at=None)
        self.log.info(f"upload started to {self.backend.destination()} "
                      f"({self.parallel} parallel transfers)")
        backoff = self.tuning["round_backoff_initial"]
        waiting_reported = False
        try:
            while not self.stop.is_set():
                self._clean_orphans()
                files = pending_files(self.spool)
                if not files:
                    incomplete = incomplete_entries(self.spool)
                    if not incomplete or self.once:
                        self.status.update(state="idle", next_retry_at=None)
                        self.log.info("spool drained" if not incomplete else
                                      f"nothing complete to deliver ({len(incomplete)} "
                                      f"incomplete)")
                        return EXIT_DRAINED
                    # Visible files that are not complete (no metadata record yet, or a
                    # capture process died between the two renames). Exiting now would have
                    # the .path unit start us again at once, in a tight loop, until systemd's
                    # start limit disabled uploads for good; poll quietly instead.
                    if not waiting_reported:
                        self.log.warning(f"waiting for the metadata record of "
                                         f"{', '.join(incomplete[:5])}"
                                         f"{' ...' if len(incomplete) > 5 else ''}")
                        waiting_reported = True
                    self.status.update(state="waiting-for-metadata", next_retry_at=None)
                    if self.stop.wait(self.tuning["incomplete_poll_seconds"]):
                        break
                    continue
                waiting_reported = False
                results = self.round(files)
                if self.stop.is_set():
                    break
                left = results.get("transient", 0) + results.get("permanent", 0) + \
                    results.get("stopped", 0)
                if not left:
                    backoff = self.tuning["round_backoff_initial"]
                    continue
                permanent = bool(results.get("permanent"))
                if self.once:
                    self.status.update(state="failed" if permanent else "waiting")
                    return EXIT_PENDING
                if results.get("ok"):
                    backoff = self.tuning["round_backoff_initial"]  # progress: keep going
                wait = self.tuning["permanent_retry_seconds"] if permanent else \
                    random.uniform(backoff / 2, backoff)
                self.status.update(state="failed" if permanent else "waiting",
                                   next_retry_at=time.strftime(
                                       "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + wait)))
                self.log.warning(f"{left} file(s) not delivered; "
                                 f"{'exiting' if permanent else 'retrying'} in {wait:.0f}s")
                if self.stop.wait(wait):
                    break
                if permanent:
                    # exit so the next start of the unit loads the (maybe corrected) credential
                    return EXIT_PENDING
                backoff = min(backoff * 2, self.tuning["round_backoff_max"])
            self.status.update(state="stopped", next_retry_at=None)
            self.log.info("stopped")
            return EXIT_DRAINED if not pending_files(self.spool) else EXIT_PENDING
        finally:
            self.backend.close()


def load_settings(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    if not isinstance(settings, dict):
        raise ValueError("storage settings: not a JSON object")
    return settings


def _default_storage_path() -> str | None:
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    return os.path.join(creds, "storage.json") if creds else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gims-upload",
                                 description="Deliver an experiment's spool to its storage.")
    ap.add_argument("experiment_pos", nargs="?", metavar="EXPERIMENT", help=argparse.SUPPRESS)
    ap.add_argument("--experiment", help="experiment id (the unit instance name)")
    ap.add_argument("--storage", help="storage settings JSON "
                    "(default: $CREDENTIALS_DIRECTORY/storage.json)")
    ap.add_argument("--spool", help="spool directory (default: /var/spool/gims/<experiment>)")
    ap.add_argument("--once", action="store_true",
                    help="one pass: exit 75 if files remain instead of waiting and retrying")
    ap.add_argument("--test", action="store_true",
                    help="only run the storage probe (write, read back, delete) and report")
    args = ap.parse_args(argv)
    exp = args.experiment or args.experiment_pos
    if not exp or not EXPERIMENT_RE.match(exp):
        print(f"gims-upload: --experiment: missing or not a valid experiment id: {exp!r}",
              file=sys.stderr)
        return EXIT_USAGE
    spool = args.spool or os.path.join("/var/spool/gims", exp)
    spath = args.storage or _default_storage_path()
    if not spath:
        print("gims-upload: --storage: no settings file given and no $CREDENTIALS_DIRECTORY",
              file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isdir(spool):
        print(f"gims-upload: --spool: {spool} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    log = UploadLog(spool, exp)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def refuse(msg: str, node: dict | None = None) -> int:
        log.error(msg)
        if args.test:  # the probe's answer, for gimsd's testExperimentStorage
            write_probe_result(spool, False, msg)
            print(msg)
            return 1
        StatusFile(spool, exp).error(msg, permanent=True)
        if not args.once and not args.test:
            # Under the .path unit an immediate exit would be restarted at once, over and
            # over, until systemd's start limit stops the unit for good. Wait instead; the
            # next start reads the credential again (gimsd may have fixed it meanwhile).
            wait = DEFAULT_TUNING["permanent_retry_seconds"]
            try:
                wait = float((node or {}).get("permanent_retry_seconds", wait))
            except (TypeError, ValueError):
                pass
            stop.wait(wait)
        return EXIT_USAGE

    try:
        settings = load_settings(spath)
        if settings.get("experiment") != exp:
            # never deliver one experiment's files with another experiment's credentials
            raise ValueError(f"experiment: settings file is for {settings.get('experiment')!r}, "
                             f"not {exp!r}")
    except (OSError, ValueError) as e:
        return refuse(f"cannot use storage settings: "
                      f"{e.strerror if isinstance(e, OSError) else e}")

    if args.test:
        ok, reason = storage.test_storage(settings)  # never raises, never shows a secret
        # the verdict for gimsd (spool file) and the journal (stdout under systemd)
        write_probe_result(spool, ok, reason)
        print(("OK: " if ok else "FAILED: ") + reason, flush=True)
        return 0 if ok else 1
    try:
        up = Uploader(settings, spool, exp, log, once=args.once)
    except (ValueError, StorageError) as e:
        params = settings.get("storageparams") or {}
        secrets = [v for k, v in params.items() if k in storage.SECRET_KEYS and isinstance(v, str)]
        log.secrets.extend(secrets)
        node = settings.get("node") if isinstance(settings.get("node"), dict) else None
        return refuse(storage.redact(f"cannot use storage settings: {e}", secrets), node)

    up.stop = stop
    return up.run()


if __name__ == "__main__":
    sys.exit(main())
