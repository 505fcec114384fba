"""gimsd: the GIMS capture proxy's XML-RPC front end (``gimsd``, ``python -m gimsd.server``).

A thin layer: each method of docs/gims-xmlrpc-contract.md checks its argument count, calls the
core (gimsd.api) and returns what it returns; core errors become Faults in ``_guard`` and nowhere
else. Every method is registered in lowerCamel and UpperCamel spelling.

Return values (the original returned strings; old clients print them):
- configureExperiment, startExperiment, stopExperiment, pauseExperiment, resumeExperiment: a
  readable string starting "OK: " (failures are Faults);
- testExperimentStorage: "OK: ..." or, when the storage refused the probe, "FAILED: <reason>"
  (a Fault only when the test cannot be made: unknown experiment, no StorageSpec, ...);
- getStorageLog: the log lines joined by newlines, one string;
- getExperimentStats, getState: structs (the original's stats field names, plus more).
Fault codes: -1 for everything, as the original (default), or distinct codes when
``server.distinct_fault_codes = true``: 1 invalid parameters, 2 unknown experiment, 3 wrong
state, 4 systemd refused, 5 storage test failed, 6 limit reached, 7 internal error, 8 unknown
method, -32700 malformed request. The faultString is always a readable reason.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import signal
import ssl
import sys
import threading
import xmlrpc.client
from typing import Any, Callable

from . import config as configmod
from .api import ApiError, GimsAPI, UnitControl
from .store import Store
from .xmlrpc_hardening import HardenedXMLRPCServer, make_tls_context

log = logging.getLogger("gimsd")


class RpcMethods:
    """The contract's methods; names are the wire names (lowerCamel), docstrings are methodHelp."""

    def __init__(self, api: GimsAPI):
        self.api = api

    def configureExperiment(self, params):  # noqa: N802 - wire names
        """configureExperiment(params) -> string. Create or update an experiment; calls merge."""
        return self.api.configure(params)

    def startExperiment(self, params):  # noqa: N802
        """startExperiment(params) -> string. Start capture and delivery of a configured experiment."""
        return self.api.start(params)

    def stopExperiment(self, params):  # noqa: N802
        """stopExperiment(params) -> string. Stop capture; remaining files are still delivered."""
        return self.api.stop(params)

    def pauseExperiment(self, params):  # noqa: N802
        """pauseExperiment(params) -> string. Stop capturing without ending the experiment."""
        return self.api.pause(params)

    def resumeExperiment(self, params):  # noqa: N802
        """resumeExperiment(params) -> string. Capture again after a pause."""
        return self.api.resume(params)

    def getExperimentStats(self, params):  # noqa: N802
        """getExperimentStats(params) -> struct. State, counters, unit and upload status."""
        return self.api.stats(params)

    def getStorageLog(self, params, n=20):  # noqa: N802
        """getStorageLog(params, n) -> string. The last n lines of the experiment's upload log."""
        return "\n".join(self.api.storage_log(params, n))

    def testExperimentStorage(self, params):  # noqa: N802
        """testExperimentStorage(params) -> string. Write, read back and delete a probe object:
        "OK: ..." or "FAILED: <reason>"."""
        return self.api.test_storage(params)

    def getState(self):  # noqa: N802
        """getState() -> struct. Every experiment and the storage back-ends of this node."""
        return self.api.state()


METHOD_NAMES = ("configureExperiment", "startExperiment", "stopExperiment", "pauseExperiment",
                "resumeExperiment", "getExperimentStats", "getStorageLog", "testExperimentStorage",
                "getState")


class GimsdServer(HardenedXMLRPCServer):
    distinct_fault_codes = False

    def fault_code(self, distinct: int) -> int:
        return distinct if self.distinct_fault_codes else -1


def _guard(server: GimsdServer, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where core errors become Faults."""
    sig = inspect.signature(fn)
    usage = f"{name}({', '.join(sig.parameters)})"

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            sig.bind(*args)
        except TypeError:
            raise xmlrpc.client.Fault(server.fault_code(1),
                                      f"{name}: wrong number of arguments ({len(args)} given); usage: {usage}") from None
        try:
            return fn(*args)
        except ApiError as e:
            raise xmlrpc.client.Fault(server.fault_code(e.code), f"{name}: {e}") from None

    return call


def _method_name_arg(server: GimsdServer, name: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The standard library's introspection looks its argument up in a dict: a struct or array
    there raised TypeError (an "internal error"); refuse anything but a string with a reason."""
    @functools.wraps(fn)
    def call(method_name):
        if not isinstance(method_name, str):
            raise xmlrpc.client.Fault(server.fault_code(1), f"{name}: the method name must be a string, "
                                      f"got {type(method_name).__name__}")
        return fn(method_name)

    return call


def build_server(cfg: configmod.Config, units: UnitControl) -> tuple[GimsdServer, GimsAPI]:
    """Bind the server (cfg.port 0 picks a free port) and register every method twice."""
    try:
        store = Store(cfg.state_dir)
    except OSError as e:
        raise configmod.ConfigError("paths.state_dir", f"cannot use {cfg.state_dir}: {e.strerror or e}") from None
    api = GimsAPI(cfg, store, units)
    tls = cfg.tls
    context = None
    if tls.enabled:
        try:
            context = make_tls_context(tls.cert, tls.key, tls.client_ca)
        except (OSError, ssl.SSLError) as e:
            raise configmod.ConfigError("tls", f"cannot load the certificate, key or client CA: {e}") from None
    server = GimsdServer((cfg.listen_address, cfg.port), max_request_bytes=cfg.max_request_bytes,
                         socket_timeout=cfg.socket_timeout, max_depth=cfg.max_nesting_depth,
                         max_connections=cfg.max_connections, peer_allowed=cfg.peer_allowed_plain,
                         tls_context=context, allowed_subjects=tls.allowed_subjects)
    server.distinct_fault_codes = cfg.distinct_fault_codes
    server.register_introspection_functions()
    for name in ("system.methodHelp", "system.methodSignature"):
        server.funcs[name] = _method_name_arg(server, name, server.funcs[name])
    for name in ("system.listMethods", "system.methodHelp", "system.methodSignature"):
        server.funcs[name] = _guard(server, name, server.funcs[name])  # wrong arity: a Fault, not a crash
    methods = RpcMethods(api)
    for name in METHOD_NAMES:
        fn = _guard(server, name, getattr(methods, name))
        server.register_function(fn, name)
        server.register_function(fn, name[0].upper() + name[1:])
    return server, api


# --------------------------------------------------------------------------- logging
class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        exp = getattr(record, "EXPERIMENT", None)
        return f"{text} [EXPERIMENT={exp}]" if exp else text


def setup_logging(level: str = "INFO") -> None:
    """The journal (with EXPERIMENT= fields) under systemd, stderr otherwise."""
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler  # noqa: PLC0415
            handler = JournalHandler(SYSLOG_IDENTIFIER="gimsd")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter("%(asctime)s gimsd %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _notify(message: str) -> None:
    try:
        import sdnotify  # noqa: PLC0415
    except ImportError:
        return
    sdnotify.SystemdNotifier().notify(message)


def describe_transport(cfg: configmod.Config, port: int) -> str:
    if cfg.tls.enabled:
        subjects = "any certificate the CA signed" if "*" in cfg.tls.allowed_subjects else \
            f"{len(cfg.tls.allowed_subjects)} allowed subject(s)"
        return (f"listening on https://{cfg.listen_address}:{port}/ (TLS, client certificate required "
                f"from {cfg.tls.client_ca}; {subjects})")
    nets = ", ".join(str(n) for n in cfg.trusted_networks)
    who = "loopback peers" + (f" and trusted networks {nets}" if nets else " only")
    return f"listening on http://{cfg.listen_address}:{port}/ (plain HTTP, no TLS: serving {who})"


def _make_unit_manager() -> UnitControl:
    from gimsd.systemd import UnitManager  # noqa: PLC0415 - the D-Bus side, gimsd/systemd.py
    return UnitManager()


def serve(cfg: configmod.Config, units: UnitControl) -> int:
    server, api = build_server(cfg, units)
    port = server.server_address[1]
    log.info(describe_transport(cfg, port))
    stop = threading.Event()

    def reconcile_loop() -> None:
        while not stop.wait(cfg.reconcile_interval):
            try:
                api.reconcile()
                _notify(f"STATUS={api.summary()}")
            except Exception:  # keep watching whatever one round ran into
                log.exception("reconciliation round failed")

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    api.restore_after_boot()  # experiments that were running before the node restarted
    api.reconcile()  # learn every experiment's real state from systemd before answering
    threading.Thread(target=reconcile_loop, name="reconcile", daemon=True).start()
    _notify(f"READY=1\nSTATUS=listening on port {port}; {api.summary()}")
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        stop.set()
        server.server_close()
        _notify("STOPPING=1")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gimsd", description="GIMS capture node control daemon (XML-RPC)")
    ap.add_argument("--config", default=os.environ.get("GIMSD_CONFIG", configmod.DEFAULT_PATH),
                    help="configuration file (default %(default)s)")
    ap.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    ap.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as e:
        log.error("bad configuration: %s", e)
        return 2
    if args.check_config:
        print(f"gimsd: {args.config} is valid; {describe_transport(cfg, cfg.port)}")
        return 0
    try:
        units = _make_unit_manager()
    except Exception as e:  # import or D-Bus connection: say what is missing and stop
        log.error("cannot reach systemd over D-Bus: %s", e)
        return 1
    try:
        return serve(cfg, units)
    except configmod.ConfigError as e:
        log.error("bad configuration: %s", e)
        return 2
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", cfg.listen_address, cfg.port, e.strerror or e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
