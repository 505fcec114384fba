"""gimsctl: the operator's command line for gimsd, over the same XML-RPC API the AM uses.

    gimsctl [--url URL] list
    gimsctl show ID
    gimsctl configure ID FILE        (FILE: the configureExperiment struct as JSON or TOML)
    gimsctl start|stop|pause|resume ID
    gimsctl storage-log ID [N]
    gimsctl test-storage ID

Exit status: 0 done, 1 gimsd refused (the fault's reason on stderr), 2 bad usage or file,
3 gimsd unreachable.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import tomllib
import xmlrpc.client
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8001/"


class UsageError(Exception):
    pass


def load_spec_file(path: str, exp_id: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    text = data.decode("utf-8", errors="replace")
    try:
        spec = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise UsageError(f"{path} is not valid {kind}: {e}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path} must hold one struct (a JSON object / TOML table)")
    for key in list(spec):
        if key.lower() == "experimentid":
            if spec[key] != exp_id:
                raise UsageError(f"{path} is for experiment {spec[key]!r}, not {exp_id!r}")
            del spec[key]
    spec["ExperimentId"] = exp_id
    return spec


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _human_bytes(n: Any) -> str:
    try:
        n = float(n)
    except (TypeError, ValueError):
        return str(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _int(v: Any) -> str:
    return str(int(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def format_state(state: dict[str, Any]) -> str:
    exps = state.get("experiments") or {}
    rows = []
    for exp_id in sorted(exps):
        e = exps[exp_id]
        rows.append([exp_id, e.get("state", ""), e.get("capture_unit_state", ""),
                     _int(e.get("packets_observed", "")), _int(e.get("files_written", "")),
                     _int(e.get("files_uploaded", "")), _int(e.get("files_pending", "")),
                     (e.get("failure_reason") or e.get("last_upload_error") or "")[:60]])
    out = [_table(rows, ["EXPERIMENT", "STATE", "CAPTURE", "PACKETS", "FILES", "UPLOADED", "PENDING",
                         "PROBLEM"]) if rows else "no experiments"]
    backends = state.get("storage_backends") or {}
    if backends:
        out.append("")
        out.append(_table([[name, "yes" if b.get("available") else "no", b.get("reason", "")]
                           for name, b in sorted(backends.items())], ["STORAGE", "AVAILABLE", "NOTE"]))
    return "\n".join(out)


def format_stats(stats: dict[str, Any], indent: int = 0) -> str:
    lines = []
    pad = "  " * indent
    for key in sorted(stats):
        value = stats[key]
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(format_stats(value, indent + 1) if value else f"{pad}  (none)")
        else:
            if key in ("memory_consumed", "bytes_observed", "bytes_uploaded", "spool_bytes", "spool_quota_bytes"):
                value = f"{_int(value)} ({_human_bytes(value)})"
            elif isinstance(value, float) and value.is_integer() and "time" not in key:
                value = int(value)
            lines.append(f"{pad}{key}: {value}")
    return "\n".join(lines)


def _proxy(args: argparse.Namespace) -> xmlrpc.client.ServerProxy:
    context = None
    if args.url.startswith("https:"):
        context = ssl.create_default_context(cafile=args.cacert) if args.cacert else ssl.create_default_context()
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
    return xmlrpc.client.ServerProxy(args.url, context=context, allow_none=False)


def run(args: argparse.Namespace) -> str:
    p = _proxy(args)
    cmd = args.command
    ident = {"ExperimentId": getattr(args, "id", None)}
    if cmd == "list":
        return format_state(p.getState())
    if cmd == "show":
        return format_stats(p.getExperimentStats(ident))
    if cmd == "configure":
        return p.configureExperiment(load_spec_file(args.file, args.id))
    if cmd in ("start", "stop", "pause", "resume"):
        return getattr(p, f"{cmd}Experiment")(ident)
    if cmd == "storage-log":
        return p.getStorageLog(ident, args.n)
    if cmd == "test-storage":
        return p.testExperimentStorage(ident)
    raise UsageError(f"unknown command {cmd}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gimsctl", description="Operate a GIMS capture node through gimsd.")
    ap.add_argument("--url", default=os.environ.get("GIMSCTL_URL", DEFAULT_URL),
                    help="gimsd's XML-RPC URL (default %(default)s; env GIMSCTL_URL)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for gimsd")
    ap.add_argument("--cacert", help="CA file to check gimsd's TLS certificate with")
    ap.add_argument("--cert", help="client certificate (PEM) for TLS")
    ap.add_argument("--key", help="client certificate's private key (PEM)")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every experiment and the storage back-ends")
    for name, text in (("show", "an experiment's state and counters"), ("start", "start capture"),
                       ("stop", "stop capture and deliver what is left"), ("pause", "pause capture"),
                       ("resume", "resume capture"), ("test-storage", "probe the experiment's storage")):
        sub.add_parser(name, help=text).add_argument("id", metavar="ID")
    c = sub.add_parser("configure", help="send a configureExperiment struct from a JSON or TOML file")
    c.add_argument("id", metavar="ID")
    c.add_argument("file", metavar="FILE")
    s = sub.add_parser("storage-log", help="last lines of the experiment's upload log")
    s.add_argument("id", metavar="ID")
    s.add_argument("n", metavar="N", nargs="?", type=int, default=20)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import socket  # noqa: PLC0415
    socket.setdefaulttimeout(args.timeout)
    try:
        out = run(args)
    except UsageError as e:
        print(f"gimsctl: {e}", file=sys.stderr)
        return 2
    except xmlrpc.client.Fault as f:
        print(f"gimsctl: {f.faultString}", file=sys.stderr)
        return 1
    except xmlrpc.client.ProtocolError as e:
        print(f"gimsctl: gimsd at {args.url} answered HTTP {e.errcode} {e.errmsg}", file=sys.stderr)
        return 3
    except (OSError, ssl.SSLError) as e:
        print(f"gimsctl: cannot reach gimsd at {args.url}: {e}", file=sys.stderr)
        return 3
    if out:
        print(out)
    if args.command == "test-storage" and str(out).startswith("FAILED"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
