"""Running under systemd: sd_notify (READY, STATUS, WATCHDOG) and journal logging.

Outside systemd both quietly step aside: no NOTIFY_SOCKET means no notifications, no
JOURNAL_STREAM means plain stderr logging.
"""

from __future__ import annotations

import logging
import os
import sys
import time


class Notifier:
    def __init__(self):
        self._sd = None
        if os.environ.get("NOTIFY_SOCKET"):
            try:
                import sdnotify
                self._sd = sdnotify.SystemdNotifier()
            except ImportError:
                logging.getLogger("gims-capture").warning("sdnotify missing: no readiness notification")
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        # Ping at a third of the deadline; only the capture loop pings, so a hung loop is seen.
        self._watchdog_every = usec / 3e6 if usec and str(os.getpid()) == os.environ.get(
            "WATCHDOG_PID", str(os.getpid())) else 0
        self._last_ping = 0.0

    def _send(self, text: str) -> None:
        if self._sd is not None:
            self._sd.notify(text)

    def ready(self, status: str = "") -> None:
        self._send("READY=1\nSTATUS=" + status if status else "READY=1")

    def status(self, status: str) -> None:
        self._send("STATUS=" + status)

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        if not self._watchdog_every:
            return
        now = time.monotonic()
        if now - self._last_ping >= self._watchdog_every:
            self._last_ping = now
            self._send("WATCHDOG=1")


def setup_logging(experiment: str, verbose: bool = False) -> logging.Logger:
    log = logging.getLogger("gims-capture")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.handlers.clear()
    handler = None
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler
            handler = JournalHandler(SYSLOG_IDENTIFIER="gims-capture", EXPERIMENT=experiment)
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"gims-capture[{experiment}]: %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    return log
