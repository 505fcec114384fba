"""Atomic file writes shared by every part of gims: a reader sees the old file or the new one.

Temp file in the same directory (hidden, exclusive, never through a symlink), mode set
explicitly (the umask must neither widen nor narrow it), fsync, rename over the target, and
optionally fsync the directory so the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
import secrets


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path, data: bytes, mode: int = 0o640, sync_dir: bool = True) -> None:
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name.lstrip('.')}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(directory or ".")


def write_json_atomic(path, obj, mode: int = 0o640, sort_keys: bool = False,
                      sync_dir: bool = False) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n").encode("utf-8")
    write_bytes_atomic(path, data, mode=mode, sync_dir=sync_dir)
