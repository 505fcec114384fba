"""Local directory storage: atomic copy (temp name, fsync, rename, fsync directory).

The target directory must lie under one of the operator's allowed roots; symlinks and ``..``
are resolved before that check, so a link pointing out of the root is refused.
"""
from __future__ import annotations

import errno
import hashlib
import os
from typing import Any

from capture_daemon.atomic import fsync_dir

from .base import (CHUNK, PermanentStorageError, Receipt, StorageBackend,
                   TransientStorageError)

STORAGETYPE = "local"

#: errno values that will not go away by waiting (anything else, ENOSPC included, is retried).
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                     errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST}


def library_status() -> tuple[bool, str]:
    return True, "standard library"


def resolve_under_roots(path: str, roots: list[str]) -> str:
    """Real path of ``path`` if it lies under one of ``roots`` (both resolved), else ValueError."""
    if not os.path.isabs(path):
        raise ValueError(f"local_storage_dir: must be an absolute path, got {path!r}")
    real = os.path.realpath(path)
    for root in roots or []:
        rroot = os.path.realpath(root)
        if real == rroot or real.startswith(rroot.rstrip("/") + "/"):
            return real
    raise ValueError(f"local_storage_dir: {path!r} is not under an allowed root "
                     f"({', '.join(roots or []) or 'none configured'})")


def _classify(e: OSError, what: str) -> Exception:
    msg = f"{what}: {os.strerror(e.errno) if e.errno else e}"
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return TransientStorageError(msg + " (disk full; will retry)")
    if e.errno in _PERMANENT_ERRNOS:
        return PermanentStorageError(msg)
    return TransientStorageError(msg)


class Backend(StorageBackend):
    storagetype = STORAGETYPE

    def __init__(self, experiment: str, params: dict[str, Any], node: dict[str, Any]):
        super().__init__(experiment, params, node)
        try:
            self.root = resolve_under_roots(params["local_storage_dir"],
                                            list(self.node.get("allowed_local_roots") or []))
        except ValueError as e:
            raise PermanentStorageError(str(e)) from None

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        d = params.get("local_storage_dir")
        if not isinstance(d, str) or not d.strip():
            raise ValueError("local_storage_dir: required (an absolute directory path)")
        if not os.path.isabs(d) or "\0" in d:
            raise ValueError(f"local_storage_dir: must be an absolute path, got {d!r}")

    def destination(self) -> str:
        return "file://" + self.root

    def _target(self, remote_name: str) -> str:
        if "/" in remote_name or remote_name in ("", ".", ".."):
            raise PermanentStorageError(f"bad remote name {remote_name!r}")
        return os.path.join(self.root, remote_name)

    def _ensure_root(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise _classify(e, f"cannot create {self.root}") from None
        # re-check after creation: a symlink may have been swapped in meanwhile
        try:
            resolve_under_roots(self.root, list(self.node.get("allowed_local_roots") or []))
        except ValueError as e:
            raise PermanentStorageError(str(e)) from None

    def put(self, local_path: str, remote_name: str) -> Receipt:
        target = self._target(remote_name)
        self._ensure_root()
        # A fixed temp name per file: an interrupted copy is overwritten by the next try,
        # never left behind under a second name.
        tmp = os.path.join(self.root, "." + remote_name + ".gims-part")
        h = hashlib.sha256()
        size = 0
        try:
            with open(local_path, "rb") as src, open(tmp, "wb") as dst:
                while True:
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    dst.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
            fsync_dir(self.root)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise _classify(e, f"copy to {target} failed") from None
        return Receipt(uri=self.uri(remote_name), size=size, sha256=h.hexdigest())

    def verify(self, remote_name: str, size: int, sha256: str | None) -> bool:
        target = self._target(remote_name)
        try:
            if os.stat(target).st_size != size:
                return False
            if sha256 is None:
                return True
            h = hashlib.sha256()
            with open(target, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            return h.hexdigest() == sha256
        except FileNotFoundError:
            return False
        except OSError as e:
            raise _classify(e, f"cannot read {target}") from None

    def read(self, remote_name: str) -> bytes:
        try:
            with open(self._target(remote_name), "rb") as f:
                return f.read()
        except OSError as e:
            raise _classify(e, "read failed") from None

    def delete(self, remote_name: str) -> None:
        try:
            os.unlink(self._target(remote_name))
            fsync_dir(self.root)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _classify(e, "delete failed") from None
