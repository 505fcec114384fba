"""Experiment specs and desired state on disk, under ``<state_dir>/experiments/<id>/``.

Files (docs/ARCHITECTURE.md): ``spec.json`` (the merged spec, secrets included), ``capture.json``
(capture settings; a credential of capture@<id>.service), ``storage.json`` (storage settings; a
credential of gims-upload@<id>.service), all mode 0600, and ``state.json`` (the desired state and
its timestamps). Every write is temp file + fsync + rename + fsync of the directory, so a crash
leaves either the old or the new file, never half of one. Nothing is cached in memory: what
survives a restart is exactly what is here.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from capture_daemon.atomic import write_bytes_atomic

from .spec import validate_experiment_id

log = logging.getLogger("gimsd.store")

MAX_JSON_BYTES = 4 << 20


class StoreError(Exception):
    pass


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    write_bytes_atomic(path, data, mode=mode, sync_dir=True)


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file we (or the capture process) wrote; no symlinks followed, size bounded."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StoreError(f"{path.name} is larger than {limit} bytes")
    return json.loads(data)


class Store:
    def __init__(self, state_dir: str):
        self.root = Path(state_dir) / "experiments"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)

    def exp_dir(self, exp_id: str, create: bool = False) -> Path:
        # Validated again here, whatever the caller did: this is where an id becomes a path.
        validate_experiment_id(exp_id)
        path = self.root / exp_id
        if path.parent != self.root:  # cannot happen with the id alphabet; belt and braces
            raise StoreError(f"experiment directory escapes the state dir: {exp_id!r}")
        if create:
            path.mkdir(mode=0o700, exist_ok=True)
        return path

    def exists(self, exp_id: str) -> bool:
        return (self.exp_dir(exp_id) / "spec.json").is_file()

    def list_ids(self) -> list[str]:
        out = []
        for entry in sorted(os.listdir(self.root)):
            try:
                validate_experiment_id(entry)
            except ValueError:
                continue
            if (self.root / entry / "spec.json").is_file():
                out.append(entry)
        return out

    def _load(self, exp_id: str, name: str, default: Any) -> Any:
        path = self.exp_dir(exp_id) / name
        try:
            value = read_json(path)
        except FileNotFoundError:
            return default
        except (OSError, ValueError, StoreError) as e:
            log.error("cannot read %s of experiment %s: %s", name, exp_id, e, extra={"EXPERIMENT": exp_id})
            raise StoreError(f"stored {name} of experiment {exp_id} is unreadable ({type(e).__name__})") from None
        if not isinstance(value, dict):
            raise StoreError(f"stored {name} of experiment {exp_id} is not a JSON object")
        return value

    def _save(self, exp_id: str, name: str, value: dict[str, Any]) -> None:
        atomic_write(self.exp_dir(exp_id, create=True) / name,
                     json.dumps(value, indent=1, sort_keys=True).encode() + b"\n")

    def load_spec(self, exp_id: str) -> dict[str, Any] | None:
        return self._load(exp_id, "spec.json", None)

    def save_spec(self, exp_id: str, spec: dict[str, Any]) -> None:
        self._save(exp_id, "spec.json", spec)

    def load_state(self, exp_id: str) -> dict[str, Any]:
        return self._load(exp_id, "state.json", {"state": "configured"})

    def save_state(self, exp_id: str, state: dict[str, Any]) -> None:
        self._save(exp_id, "state.json", state)

    def write_capture_settings(self, exp_id: str, settings: dict[str, Any]) -> Path:
        self._save(exp_id, "capture.json", settings)
        return self.exp_dir(exp_id) / "capture.json"

    def write_storage_settings(self, exp_id: str, settings: dict[str, Any]) -> Path:
        self._save(exp_id, "storage.json", settings)
        return self.exp_dir(exp_id) / "storage.json"
