"""The spool writer: data files appear in the output directory only when complete.

Each file is written as ``.<name>.tmp`` (hidden: the upload .path unit ignores dot files),
hashed while it is written, fsynced and renamed into place; then its metadata record
``<name>.meta.json`` is written the same way and the directory is fsynced. A data file is
complete iff its metadata record exists (docs/ARCHITECTURE.md, "The spool").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone

WRITE_BUFFER_BYTES = 1 << 20


class SpoolFullError(OSError):
    """The spool's file system is full (ENOSPC/EDQUOT): capture keeps counting, not writing."""


class HashingFile:
    """A buffered binary file that keeps a running sha256 and size of what was written."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "xb", buffering=WRITE_BUFFER_BYTES)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        n = self._f.write(data)
        self.size += n
        return n

    def finish(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abandon(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


def utc_iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def file_stamp(t: float) -> str:
    return datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y%m%d%H%M%S")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a hidden temp file, fsync, rename over path."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name.lstrip('.')}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class OpenFile:
    """The file being written: its final name, temp file and per-file counters."""

    def __init__(self, name: str, tmp_path: str, start_time: float):
        self.name = name
        self.file = HashingFile(tmp_path)
        self.start_time = start_time
        self.first_packet = None
        self.last_packet = None
        self.counters = dict(packets_observed=0, bytes_observed=0, packets_sampled=0,
                             bytes_sampled=0, packets_written=0, malformed_packets=0)
        self.stats_updates: list[dict] = []


class Spool:
    def __init__(self, directory: str, experiment: str, site: str, ext: str):
        self.directory = directory
        self.prefix = f"{experiment}_{site}"
        self.ext = ext
        self.files_written = 0
        os.makedirs(directory, exist_ok=True)

    def _final_name(self, start_time: float) -> str:
        base = f"{self.prefix}_{file_stamp(start_time)}"
        name = f"{base}.{self.ext}"
        n = 0
        while (os.path.exists(os.path.join(self.directory, name))
               or os.path.exists(os.path.join(self.directory, f".{name}.tmp"))):
            n += 1
            name = f"{base}_{n}.{self.ext}"
        return name

    def open(self, start_time: float) -> OpenFile:
        while True:
            name = self._final_name(start_time)
            tmp = os.path.join(self.directory, f".{name}.tmp")
            try:
                return OpenFile(name, tmp, start_time)
            except FileExistsError:
                continue  # another writer took this name between our check and the create
            except OSError as exc:
                raise _classify(exc) from None

    def commit(self, of: OpenFile, metadata: dict) -> str:
        """fsync + rename the data file, then write its metadata record; returns the path."""
        try:
            of.file.finish()
            final = self._place(of)
            metadata.update(data_file=of.name, size=of.file.size, sha256=of.file.sha256.hexdigest())
            write_json_atomic(final + ".meta.json", metadata)
            fsync_dir(self.directory)
        except OSError as exc:
            of.file.abandon()
            raise _classify(exc) from None
        self.files_written += 1
        return final

    def _place(self, of: OpenFile) -> str:
        """Give the finished temp file its final name without ever replacing a file.

        link() fails when the name exists (another writer in this spool took it: e.g. a
        fan-out sibling in the same second), and then the next free name is used.
        """
        while True:
            final = os.path.join(self.directory, of.name)
            try:
                os.link(of.file.path, final)
            except FileExistsError:
                of.name = self._final_name(of.start_time)
                continue
            os.unlink(of.file.path)
            return final

    def write_status(self, status: dict) -> None:
        try:
            write_json_atomic(os.path.join(self.directory, ".gims-status.json"),
                              dict(status, updated=utc_iso(time.time()), pid=os.getpid()))
        except OSError:
            pass  # status is best effort; a full disk is reported through metadata and STATUS=


def _classify(exc: OSError) -> OSError:
    import errno
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(exc.errno, f"spool full: {exc.strerror}")
    return exc
