"""gims-capture: capture (or read) packets, sample, anonymize, write spool files with metadata.

    gims-capture (--read FILE | --interface IF) --output-dir DIR
                 [--experiment NAME] [--site LOC] [--filter EXPR] [--snaplen N]
                 [--sample everyN:N | uniform:P[:SEED] | none] [--anon-key-file PATH]
                 [--aggregate pcap|counts|flows] [--rollover SECONDS] [--max-file-bytes N]
                 [--config FILE] [--workers N]

--workers N (live capture only) captures with N processes that share the interface through
a PACKET_FANOUT group, each writing its own files (see capture_daemon/fanout.py).

Bad arguments, an unreadable source or a filter that does not compile: a one-line reason on
stderr and exit status 2. SIGTERM/SIGINT finish the current file and exit 0; SIGHUP rotates.
"""

from __future__ import annotations

import argparse
import signal
import os
import sys

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the contract says
        sys.stderr.write(f"gims-capture: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gims-capture", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--read", metavar="FILE", help="read packets from a pcap/pcapng file")
    src.add_argument("--interface", metavar="IF", help="capture live on this interface")
    p.add_argument("--output-dir", metavar="DIR", dest="output_dir", help="spool directory for finished files")
    p.add_argument("--experiment", metavar="NAME")
    p.add_argument("--site", metavar="LOC")
    p.add_argument("--filter", metavar="EXPR", help="BPF filter expression")
    p.add_argument("--snaplen", type=int, metavar="N")
    p.add_argument("--buffer-bytes", type=int, metavar="N", dest="buffer_bytes",
                   help="kernel capture buffer (default 32 MiB)")
    p.add_argument("--sample", metavar="SPEC", help="everyN:N | uniform:P[:SEED] | none")
    p.add_argument("--anon-key-file", metavar="PATH", dest="anon_key_file",
                   help="Crypto-PAn key: 32 raw bytes or 64 hex characters")
    p.add_argument("--aggregate", choices=("pcap", "counts", "flows"))
    p.add_argument("--rollover", type=float, metavar="SECONDS", dest="rollover_seconds")
    p.add_argument("--max-file-bytes", type=int, metavar="N", dest="max_file_bytes")
    p.add_argument("--config", metavar="FILE", help="experiment settings as gimsd writes them (JSON)")
    p.add_argument("--ipfix-export", metavar="URL", dest="ipfix_export",
                   help="also export flows to udp://HOST:PORT or tcp://HOST:PORT")
    p.add_argument("--counts-interval", type=float, metavar="SECONDS", dest="counts_interval")
    p.add_argument("--stats-interval", type=float, metavar="SECONDS", dest="stats_interval")
    p.add_argument("--workers", type=int, metavar="N",
                   help="live capture with N processes sharing the interface (PACKET_FANOUT)")
    p.add_argument("--verbose", action="store_true")
    return p


def _fail(message: str) -> int:
    sys.stderr.write(f"gims-capture: {message}\n")
    _status_before_exit(message)
    return EXIT_USAGE


def _status_before_exit(message: str) -> None:
    """Leave the reason in the unit's StatusText (systemd keeps it after the process is
    gone), so gimsd's getExperimentStats shows why the capture failed, not only an exit code."""
    if os.environ.get("NOTIFY_SOCKET"):
        try:
            import sdnotify
            sdnotify.SystemdNotifier().notify("STATUS=failed: " + message.replace("\n", " ")[:400])
        except Exception:
            pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .memory import keep_freed_batches
    keep_freed_batches()
    from .settings import SettingsError, build_settings
    from .sampling import SamplingError, parse_sample_spec
    from .source import SourceError, open_source

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "verbose")}
    try:
        settings = build_settings(args.config, overrides)
        sampler = parse_sample_spec(settings.sample)
        anonymizer = _make_anonymizer(settings)
    except (SettingsError, SamplingError, ValueError) as exc:
        return _fail(str(exc))

    if settings.workers > 1:
        from .fanout import supervise
        return supervise(settings, args.verbose)

    from .service import Notifier, setup_logging
    log = setup_logging(settings.experiment, args.verbose)
    try:
        source = open_source(read=settings.read, interface=settings.interface,
                             filter_expr=settings.effective_filter, snaplen=settings.snaplen,
                             promiscuous=settings.promiscuous, timeout_ms=settings.timeout_ms,
                             buffer_bytes=settings.buffer_bytes)
    except SourceError as exc:
        # stderr reaches the journal too under systemd (with the unit's EXPERIMENT= field)
        return _fail(str(exc))

    try:
        output = _make_output(settings, source, sampler)
    except (ValueError, OSError) as exc:
        source.close()
        return _fail(str(exc))

    from .pipeline import Pipeline
    notifier = Notifier()
    pipeline = Pipeline(settings, source, output, sampler, anonymizer, notifier)
    signal.signal(signal.SIGTERM, pipeline.request_stop)
    signal.signal(signal.SIGINT, pipeline.request_stop)
    signal.signal(signal.SIGHUP, pipeline.request_rotate)
    log.info("capturing from %s into %s (%s, filter %r, sampling %s, anonymization %s)",
             source.description, settings.output_dir, settings.aggregate, settings.effective_filter,
             settings.sample, "on" if anonymizer else "off")
    from .accel import missing
    not_built = missing()
    if not_built:
        log.warning("C accelerators not built (%s): running the numpy fallbacks, several times "
                    "slower (build them with `make build`, or install the gims package)",
                    ", ".join(not_built))
    try:
        totals = pipeline.run()
    except Exception as exc:  # report, don't dump a traceback into the journal as the only clue
        log.exception("capture from %s failed: %s", source.description, exc)
        _status_before_exit(f"capture from {source.description} stopped: {exc}")
        return 1
    finally:
        notifier.stopping()
        source.close()
    log.info("done: %d packets observed, %d sampled, %d written, %d files",
             totals["packets_observed"], totals["packets_sampled"], totals["packets_written"],
             pipeline.spool.files_written)
    return 0


def _make_anonymizer(settings):
    if not (settings.anon_key_hex or settings.anon_key_file):
        return None
    from .cryptopan import CryptoPAn, load_key
    from .anonymize import Anonymizer
    key = bytes.fromhex(settings.anon_key_hex) if settings.anon_key_hex else load_key(settings.anon_key_file)
    return Anonymizer(CryptoPAn(key))


def _make_output(settings, source, sampler):
    from .outputs import CountsOutput, PcapOutput
    if settings.aggregate == "pcap":
        return PcapOutput(source.linktype, source.snaplen)
    if settings.aggregate == "counts":
        return CountsOutput(settings.counts_interval)
    from .flow_output import FLOW_BATCH_PACKETS, FLOW_CHUNK_BYTES, FlowOutput
    # the flow meter's cost per packet does not grow with smaller batches; its memory (and
    # parse's, the reader's) per batch does
    from .source import BATCH_PACKETS, CHUNK_BYTES
    source.batch_packets = min(source.batch_packets or BATCH_PACKETS, FLOW_BATCH_PACKETS)
    source.chunk_bytes = min(getattr(source, "chunk_bytes", None) or CHUNK_BYTES, FLOW_CHUNK_BYTES)
    return FlowOutput(idle_timeout=settings.flow_idle_timeout,
                      active_timeout=settings.flow_active_timeout,
                      max_flows=settings.flow_max_flows, sampling=sampler.describe(),
                      export_url=settings.ipfix_export,
                      read_back_addresses=bool(settings.anon_key_hex or settings.anon_key_file))


if __name__ == "__main__":
    sys.exit(main())
