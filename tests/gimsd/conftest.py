"""Fixtures for gimsd's tests: the real gimsd server on a free loopback port, in a thread, with a
temporary state/spool dir and an in-memory UnitManager.

FakeUnits is a TEST DOUBLE for the systemd side only (gimsd/systemd.py over D-Bus, which needs a
running systemd and polkit): those are covered with the real systemd by the sandbox integration
tests. Everything else here is real: the HTTP server, XML parsing, the API, the files on disk.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import xmlrpc.client
from pathlib import Path

import pytest

from gimsd import api as apimod
from gimsd import config as configmod
from gimsd.server import build_server

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for gimsd_fake_units, shared with subprocesses
from gimsd_fake_units import FakeUnits  # noqa: E402

class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def text(self) -> str:
        out = []
        for r in self.records:
            line = r.getMessage()
            if r.exc_info:
                line += "\n" + logging.Formatter().formatException(r.exc_info)
            out.append(line)
        return "\n".join(out)


@dataclasses.dataclass
class Node:
    cfg: configmod.Config
    url: str
    units: FakeUnits
    api: apimod.GimsAPI
    server: object
    root: Path
    logs: LogCapture

    def proxy(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(self.url)

    def exp_dir(self, exp_id: str) -> Path:
        return Path(self.cfg.state_dir) / "experiments" / exp_id

    def spool(self, exp_id: str) -> Path:
        return Path(self.cfg.spool_dir) / exp_id

    def write_status_file(self, exp_id: str, **counters) -> None:
        """What the capture process leaves in its spool at exit (docs/ARCHITECTURE.md)."""
        self.spool(exp_id).mkdir(parents=True, exist_ok=True)
        (self.spool(exp_id) / ".gims-status.json").write_text(json.dumps(dict(counters, state="exited", pid=0)))

    def all_files(self) -> set[str]:
        """Every file under the node's root, relative to it."""
        return {os.path.relpath(os.path.join(d, f), self.root) for d, _, fs in os.walk(self.root) for f in fs}


def make_config(root: Path, **overrides) -> configmod.Config:
    (root / "srv").mkdir(exist_ok=True)
    base = configmod.from_dict({
        "server": {"listen_address": "127.0.0.1", "port": 8001, "max_request_bytes": 65536,
                   "socket_timeout": 3.0, "reconcile_interval": 3600.0},
        "node": {"site_location": "tst", "allowed_interfaces": ["gims-t0", "lo"], "default_device": "gims-t0"},
        "paths": {"spool_dir": str(root / "spool"), "state_dir": str(root / "state"),
                  "local_storage_roots": [str(root / "srv")]},
    })
    return dataclasses.replace(base, port=0, **overrides)  # port 0: a free port, picked at bind


@pytest.fixture
def node_factory(tmp_path):
    started = []

    def start(**overrides) -> Node:
        root = tmp_path / f"node{len(started)}"
        root.mkdir()
        cfg = make_config(root, **overrides)
        units = FakeUnits()
        logs = LogCapture()
        logging.getLogger().addHandler(logs)
        logging.getLogger().setLevel(logging.DEBUG)
        server, api = build_server(cfg, units)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        host, port = server.server_address[:2]
        scheme = "https" if cfg.tls.enabled else "http"
        node = Node(cfg, f"{scheme}://{host}:{port}/RPC2", units, api, server, root, logs)
        started.append((node, thread))
        return node

    yield start
    for node, thread in started:
        node.server.shutdown()
        node.server.server_close()
        thread.join(5)
        logging.getLogger().removeHandler(node.logs)
        assert not thread.is_alive(), "server thread did not stop"


@pytest.fixture
def node(node_factory) -> Node:
    return node_factory()
