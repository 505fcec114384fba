"""The one small interface every storage back-end implements, and its error classes.

A back-end module (one file in this package) defines ``STORAGETYPE`` (the contract's
``storagetype`` value), ``library_status() -> (bool, reason)`` and a ``Backend`` subclass of
``StorageBackend``. Third-party libraries are imported lazily inside the module's functions so a
missing library makes the back-end *unavailable*, never an import crash of gimsd.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets as _secrets
import tempfile
from typing import Any, Iterable

#: Local data files are hashed in chunks of this size (large enough for throughput,
#: small enough to keep memory flat).
CHUNK = 1 << 20


class StorageError(Exception):
    """A storage operation failed. ``str(err)`` is a human-readable reason without secrets."""

    transient = True


class TransientStorageError(StorageError):
    """Worth retrying later: connection refused or dropped, timeouts, 5xx, a full disk."""

    transient = True


class PermanentStorageError(StorageError):
    """Retrying will not help until someone changes something: bad credentials, a missing
    bucket, permission denied, a host key mismatch, a bad parameter."""

    transient = False


@dataclasses.dataclass(frozen=True)
class Receipt:
    """Proof of one delivered object: where it is and what the far side reported."""

    uri: str
    size: int
    sha256: str | None  # hex digest the back-end confirmed, None when it cannot tell


def sha256_file(path: str) -> tuple[int, str]:
    """Size and sha256 (hex) of a local file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret (and every line of a multi-line secret such as a private key)
    that occurs in ``text`` with ``***``. Errors of third-party libraries may echo
    what they were given; nothing they say leaves this package unredacted."""
    for s in secrets:
        if not s:
            continue
        parts = [s] + [ln.strip() for ln in s.splitlines() if len(ln.strip()) >= 8]
        for p in parts:
            if p and p in text:
                text = text.replace(p, "***")
    return text


class StorageBackend:
    """Base class: ``put``/``verify``/``delete``/``read`` per back-end; ``probe`` here."""

    storagetype = "?"

    def __init__(self, experiment: str, params: dict[str, Any], node: dict[str, Any]):
        self.experiment = experiment
        self.params = dict(params)
        self.node = dict(node or {})

    # -- what each back-end implements -------------------------------------------------
    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """Raise ValueError naming the bad field."""
        raise NotImplementedError

    def secrets(self) -> list[str]:
        """Values that must never appear in logs, status or errors."""
        return []

    def destination(self) -> str:
        """URI of the experiment's target (no secrets)."""
        raise NotImplementedError

    def uri(self, remote_name: str) -> str:
        return self.destination().rstrip("/") + "/" + remote_name

    def put(self, local_path: str, remote_name: str) -> Receipt:
        raise NotImplementedError

    def verify(self, remote_name: str, size: int, sha256: str | None) -> bool:
        raise NotImplementedError

    def read(self, remote_name: str) -> bytes:
        """Whole content of a (small) remote object; used by the probe."""
        raise NotImplementedError

    def delete(self, remote_name: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (called once, at the end)."""

    # -- shared ------------------------------------------------------------------------
    def probe(self) -> None:
        """Write, read back and delete a probe object with the experiment's credentials.
        Raises StorageError whose message names the step that failed."""
        name = ".gims-probe-" + _secrets.token_hex(6)
        payload = b"gims storage probe " + _secrets.token_bytes(16).hex().encode() + b"\n"
        with tempfile.NamedTemporaryFile(prefix="gims-probe-", delete=False) as f:
            f.write(payload)
            local = f.name
        try:
            step = "write"
            try:
                self.put(local, name)
                step = "read back"
                data = self.read(name)
                if data != payload:
                    raise PermanentStorageError(
                        f"content differs ({len(data)} bytes read, {len(payload)} written)")
                step = "delete"
                self.delete(name)
            except StorageError as e:
                raise type(e)(f"probe {step} failed at {self.destination()}: {e}") from None
        finally:
            os.unlink(local)
