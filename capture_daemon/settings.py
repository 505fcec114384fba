"""Capture settings: the JSON file gimsd writes (``--config``), overridden by flags.

Every field has one meaning documented in docs/ARCHITECTURE.md ("Capture settings");
unknown keys and bad values are errors that name the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields

EXPERIMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SITE_RE = re.compile(r"^[A-Z0-9][A-Z0-9_.-]{0,31}$")
AGGREGATES = ("pcap", "counts", "flows")
MAX_WORKERS = 64  # PACKET_FANOUT allows far more; beyond the cores it only costs memory


class SettingsError(ValueError):
    pass


@dataclass
class Settings:
    experiment: str = "capture"
    site: str = "LOCAL"
    interface: str | None = None
    read: str | None = None
    output_dir: str | None = None
    filter: str = ""
    vlan: int | None = None
    snaplen: int = 64
    promiscuous: bool = True
    timeout_ms: int = 1000
    buffer_bytes: int = 32 << 20  # kernel buffer; 1 MiB (the original) drops at ~75k pkt/s
    sample: str = "none"
    anon_key_hex: str | None = field(default=None, repr=False)
    anon_key_file: str | None = None
    aggregate: str = "pcap"
    counts_interval: float = 1.0
    rollover_seconds: float = 300.0
    max_file_bytes: int | None = None
    stats_interval: float = 30.0
    ipfix_export: str | None = None
    flow_idle_timeout: float = 300.0
    flow_active_timeout: float = 1800.0
    flow_max_flows: int = 1_000_000
    spool_quota_bytes: int | None = None
    user_text: str = ""
    device_name: str = ""
    config_name: str = ""
    workers: int = 1  # live capture processes sharing the interface (PACKET_FANOUT)

    @property
    def effective_filter(self) -> str:
        """The BPF expression handed to libpcap: the VLAN restriction wraps the filter."""
        if self.vlan is None:
            return self.filter
        return f"vlan {self.vlan} and ({self.filter})" if self.filter else f"vlan {self.vlan}"

    def validate(self) -> "Settings":
        if not EXPERIMENT_RE.match(self.experiment or ""):
            raise SettingsError(f"experiment: {self.experiment!r} is not a valid name "
                                "(letters, digits, '_', '.', '-'; at most 64)")
        self.site = (self.site or "LOCAL").upper()
        if not SITE_RE.match(self.site):
            raise SettingsError(f"site: {self.site!r} is not a valid location name")
        if bool(self.read) == bool(self.interface):
            raise SettingsError("give exactly one of --read FILE or --interface IF")
        if not self.output_dir:
            raise SettingsError("output_dir: --output-dir is required")
        if self.aggregate not in AGGREGATES:
            raise SettingsError(f"aggregate: {self.aggregate!r} is not one of {', '.join(AGGREGATES)}")
        for name in ("snaplen", "timeout_ms", "buffer_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise SettingsError(f"{name}: must be a positive integer")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) \
                or not 1 <= self.workers <= MAX_WORKERS:
            raise SettingsError(f"workers: --workers must be an integer 1..{MAX_WORKERS}")
        if self.workers > 1 and self.read:
            raise SettingsError("workers: --workers is for live capture (--interface) only, "
                                "not with --read")
        if self.vlan is not None and not (isinstance(self.vlan, int) and 0 <= self.vlan <= 4095):
            raise SettingsError("vlan: must be an integer 0..4095")
        for name in ("rollover_seconds", "stats_interval", "counts_interval",
                     "flow_idle_timeout", "flow_active_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise SettingsError(f"{name}: must be a number >= 0")
        if self.counts_interval <= 0:
            raise SettingsError("counts_interval: must be > 0")
        if self.max_file_bytes is not None and (not isinstance(self.max_file_bytes, int)
                                                or self.max_file_bytes < 1024):
            raise SettingsError("max_file_bytes: must be an integer >= 1024")
        if self.spool_quota_bytes is not None and (not isinstance(self.spool_quota_bytes, int)
                                                   or self.spool_quota_bytes < 1 << 20):
            raise SettingsError("spool_quota_bytes: must be an integer >= 1 MiB")
        if self.anon_key_hex is not None and self.anon_key_file is not None:
            raise SettingsError("give the anonymization key once: anon_key_hex or --anon-key-file")
        if self.anon_key_hex is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.anon_key_hex):
            raise SettingsError("anon_key_hex: must be 64 hex characters (32 bytes)")
        return self


_TYPES = {f.name: f.type for f in fields(Settings)}


def load_settings_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise SettingsError(f"cannot read settings {path!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"settings {path!r} are not valid JSON: line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"settings {path!r}: expected a JSON object")
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise SettingsError(f"settings {path!r}: unknown key {unknown[0]!r}")
    for key, value in data.items():
        if value is None:
            continue
        want = _TYPES[key]
        ok = {
            "str": isinstance(value, str), "str | None": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "int | None": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
        }.get(want, True)
        if not ok:
            raise SettingsError(f"settings {path!r}: {key} has the wrong type (want {want})")
    return data


def build_settings(config_path: str | None, overrides: dict) -> Settings:
    values = load_settings_file(config_path) if config_path else {}
    values = {k: v for k, v in values.items() if v is not None}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("anon_key_file"):
        values.pop("anon_key_hex", None)  # a key file on the command line wins
    return Settings(**values).validate()
