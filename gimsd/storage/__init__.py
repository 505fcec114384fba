"""Storage back-ends for delivering spool files: a registry and the functions gimsd calls.

Every module of this package other than ``base`` and ``_*`` is a back-end: it defines
``STORAGETYPE``, ``library_status()`` and ``Backend``. Adding a back-end is adding one file.

Functions for gimsd (names are part of the contract):
- ``validate_params(storagetype, storageparams)`` raises ValueError naming the bad field;
- ``test_storage(settings) -> (ok, reason)`` runs the write/read-back/delete probe;
- ``available_backends() -> {name: {"available": bool, "reason": str}}``.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from .base import (PermanentStorageError, Receipt, StorageBackend, StorageError,
                   TransientStorageError, redact, sha256_file)

__all__ = [
    "PermanentStorageError", "Receipt", "StorageBackend", "StorageError",
    "TransientStorageError", "available_backends", "make_backend", "redact",
    "sha256_file", "test_storage", "validate_params", "DEFAULT_NODE",
]

#: Node-wide storage settings (gimsd copies these from gimsd.toml into storage.json).
DEFAULT_NODE: dict[str, Any] = {
    "s3_endpoint": None,
    "allowed_local_roots": ["/srv/gims"],
    "known_hosts": "/etc/gims/known_hosts",
    "trust_on_first_use": False,
    "keep_local": False,
    "create_bucket": False,
    "parallel": 4,
}

_modules: dict[str, ModuleType] | None = None


def _backend_modules() -> dict[str, ModuleType]:
    """storagetype -> module, found once by listing this package."""
    global _modules
    if _modules is None:
        found: dict[str, ModuleType] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name == "base" or info.name.startswith("_"):
                continue
            mod = importlib.import_module(f"{__name__}.{info.name}")
            stype = getattr(mod, "STORAGETYPE", None)
            if stype:
                found[stype] = mod
        _modules = found
    return _modules


def available_backends() -> dict[str, dict[str, Any]]:
    """Every known back-end and whether its library can be loaded here (never raises)."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in sorted(_backend_modules().items()):
        try:
            ok, reason = mod.library_status()
        except Exception as e:  # a broken library must not take gimsd down
            ok, reason = False, f"library failed to load: {type(e).__name__}: {e}"
        out[name] = {"available": bool(ok), "reason": reason}
    return out


def _module_for(storagetype: str) -> ModuleType:
    mods = _backend_modules()
    if storagetype not in mods:
        raise ValueError(f"storagetype: unknown storage type {storagetype!r} "
                         f"(known: {', '.join(sorted(mods))})")
    return mods[storagetype]


def validate_params(storagetype: str, storageparams: dict[str, Any]) -> None:
    """Check a StorageSpec's parameters (syntax only, nothing contacted).
    Raises ValueError whose message starts with the bad field's name."""
    if not isinstance(storagetype, str):
        raise ValueError("storagetype: must be a string")
    mod = _module_for(storagetype)
    if not isinstance(storageparams, dict):
        raise ValueError("storageparams: must be a struct")
    mod.Backend.validate_params(storageparams)


def make_backend(settings: dict[str, Any]) -> StorageBackend:
    """Build the back-end an experiment's storage settings (storage.json) describe.
    Raises ValueError for bad settings, PermanentStorageError when the library is missing."""
    if not isinstance(settings, dict):
        raise ValueError("storage settings: must be a JSON object")
    experiment = settings.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise ValueError("experiment: missing")
    stype = settings.get("storagetype")
    params = settings.get("storageparams") or {}
    validate_params(stype, params)
    node = dict(DEFAULT_NODE)
    node.update(settings.get("node") or {})
    mod = _module_for(stype)
    ok, reason = mod.library_status()
    if not ok:
        raise PermanentStorageError(f"storage type {stype} unavailable on this node: {reason}")
    return mod.Backend(experiment, params, node)


def test_storage(settings: dict[str, Any]) -> tuple[bool, str]:
    """Write, read back and delete a probe object with the experiment's own credentials.
    Returns (True, "...") or (False, reason naming the failing step). Never raises and never
    puts a secret into the reason."""
    backend = None
    secrets: list[str] = []
    try:
        params = (settings or {}).get("storageparams") or {}
        secrets = [v for k, v in params.items()
                   if isinstance(v, str) and k in SECRET_KEYS]
        backend = make_backend(settings)
        secrets = backend.secrets()
        backend.probe()
        return True, f"probe object written, read back and deleted at {backend.destination()}"
    except ValueError as e:
        return False, redact(f"invalid storage settings: {e}", secrets)
    except StorageError as e:
        return False, redact(str(e), secrets)
    except Exception as e:  # unexpected: still a clear answer, never a traceback
        return False, redact(f"storage test failed: {type(e).__name__}: {e}", secrets)
    finally:
        if backend is not None:
            try:
                backend.close()
            except Exception:
                pass


#: storageparams keys whose values are secrets (for redaction before a back-end exists).
SECRET_KEYS = frozenset({"s3secret", "s3secretkey", "s3key", "s3accesskey", "sshkey"})
