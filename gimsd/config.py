"""gimsd's configuration: /etc/gims/gimsd.toml, read with tomllib into typed, validated values.

Every field is checked when the file is loaded, so a bad config stops gimsd at start with a
message naming the field (``server.port: must be an integer in 1..65535, got 'x'``) instead of
failing later. Unknown tables and keys are errors too: a typo must not silently fall back to a
default (e.g. ``allowed_subject`` for ``allowed_subjects`` would otherwise open the door).
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PATH = "/etc/gims/gimsd.toml"

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_SITE_RE = re.compile(r"[A-Z0-9][A-Z0-9.-]{0,31}")


class ConfigError(ValueError):
    """A bad configuration value; ``field`` is the dotted TOML name (``tls.client_ca``)."""

    def __init__(self, field_name: str, reason: str, path: str | None = None):
        self.field = field_name
        self.reason = reason
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{field_name}: {reason}")


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    cert: str = ""
    key: str = ""
    client_ca: str = ""
    # RFC 4514 subject strings as cryptography prints them ("CN=am.example.net,O=GENI");
    # ["*"] admits any certificate the client CA signed.
    allowed_subjects: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    # [server]
    listen_address: str = "127.0.0.1"
    port: int = 8001
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_request_bytes: int = 1 << 20
    socket_timeout: float = 30.0
    max_nesting_depth: int = 16
    max_connections: int = 32
    distinct_fault_codes: bool = False
    reconcile_interval: float = 5.0
    # [tls]
    tls: TlsConfig = field(default_factory=TlsConfig)
    # [node]
    site_location: str = "LOC"
    allowed_interfaces: tuple[str, ...] = ("eth1",)
    default_device: str = "eth1"
    # [paths]
    spool_dir: str = "/var/spool/gims"
    state_dir: str = "/var/lib/gims"
    local_storage_roots: tuple[str, ...] = ("/srv/gims",)
    # [storage]
    s3_endpoint: str = ""
    known_hosts: str = "/etc/gims/known_hosts"
    trust_on_first_use: bool = False
    keep_local: bool = False
    create_bucket: bool = False
    upload_parallel: int = 4
    # [limits]
    max_experiments: int = 32
    spool_quota_bytes: int = 10 << 30
    # [defaults] (the original capture daemon's defaults; rollover 300 s, not the proxy's 30 s bug)
    snaplen: int = 64
    rollover_seconds: int = 300
    filter: str = "ip"
    promiscuous: bool = True
    timeout_ms: int = 1000
    buffer_bytes: int = 32 << 20  # the original: 1 MiB, which drops at ~75k packets/s
    stats_interval: int = 30
    counts_interval: int = 1
    flow_idle_timeout: int = 300
    flow_active_timeout: int = 1800

    @property
    def is_loopback_listen(self) -> bool:
        return _is_loopback(self.listen_address)

    def peer_allowed_plain(self, host: str) -> bool:
        """Whether a plain-HTTP peer may talk to us: loopback, or inside a trusted network."""
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if addr.is_loopback:
            return True
        return any(addr.version == net.version and addr in net for net in self.trusted_networks)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Table:
    """Typed accessors over one TOML table; every read records the key so leftovers are typos."""

    def __init__(self, name: str, data: Any, path: str | None):
        if not isinstance(data, dict):
            raise ConfigError(name, f"must be a table, got {type(data).__name__}", path)
        self.name, self.data, self.path = name, data, path
        self.seen: set[str] = set()

    def _err(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.name}.{key}", reason, self.path)

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def boolean(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self._err(key, f"must be true or false, got {v!r}")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self._err(key, f"must be an integer in {lo}..{hi}, got {v!r}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise self._err(key, f"must be a number in {lo}..{hi}, got {v!r}")
        return float(v)

    def string(self, key: str, default: str) -> str:
        v = self._get(key, default)
        if not isinstance(v, str) or "\0" in v:
            raise self._err(key, f"must be a string, got {v!r}")
        return v

    def abspath(self, key: str, default: str, allow_empty: bool = False) -> str:
        v = self.string(key, default)
        if allow_empty and v == "":
            return v
        if not os.path.isabs(v):
            raise self._err(key, f"must be an absolute path, got {v!r}")
        return os.path.normpath(v)

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self._get(key, list(default))
        if not isinstance(v, list) or not all(isinstance(s, str) and "\0" not in s for s in v):
            raise self._err(key, f"must be a list of strings, got {v!r}")
        return tuple(v)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self._err(unknown[0], "unknown setting (misspelt?)")


def load(path: str = DEFAULT_PATH) -> Config:
    """Read and validate the config file. A missing file is an error naming it."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("(file)", "not found", path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(syntax)", str(e), path) from None
    except OSError as e:
        raise ConfigError("(file)", f"cannot read: {e.strerror}", path) from None
    return from_dict(raw, path)


def from_dict(raw: dict[str, Any], path: str | None = None) -> Config:
    known_tables = ("server", "tls", "node", "paths", "storage", "limits", "defaults")
    for name in raw:
        if name not in known_tables:
            raise ConfigError(name, "unknown table or setting (misspelt?)", path)
    t = {name: _Table(name, raw.get(name, {}), path) for name in known_tables}
    d = Config()

    s = t["server"]
    listen = s.string("listen_address", d.listen_address)
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        if listen != "localhost":
            raise ConfigError("server.listen_address", f"must be an IP address, got {listen!r}", path) from None
    nets = []
    for i, n in enumerate(s.strings("trusted_networks", ())):
        try:
            nets.append(ipaddress.ip_network(n, strict=False))
        except ValueError:
            raise ConfigError(f"server.trusted_networks[{i}]", f"not a network (CIDR) {n!r}", path) from None
    server = dict(
        listen_address=listen,
        port=s.integer("port", d.port, 1, 65535),
        trusted_networks=tuple(nets),
        max_request_bytes=s.integer("max_request_bytes", d.max_request_bytes, 1024, 64 << 20),
        socket_timeout=s.number("socket_timeout", d.socket_timeout, 0.5, 3600),
        max_nesting_depth=s.integer("max_nesting_depth", d.max_nesting_depth, 2, 64),
        max_connections=s.integer("max_connections", d.max_connections, 1, 1024),
        distinct_fault_codes=s.boolean("distinct_fault_codes", d.distinct_fault_codes),
        reconcile_interval=s.number("reconcile_interval", d.reconcile_interval, 0.1, 3600),
    )

    tt = t["tls"]
    tls = TlsConfig(
        enabled=tt.boolean("enabled", False),
        cert=tt.abspath("cert", "", allow_empty=True),
        key=tt.abspath("key", "", allow_empty=True),
        client_ca=tt.abspath("client_ca", "", allow_empty=True),
        allowed_subjects=tt.strings("allowed_subjects", ()),
    )
    if tls.enabled:
        for name in ("cert", "key", "client_ca"):
            value = getattr(tls, name)
            if not value:
                raise ConfigError(f"tls.{name}", "required when tls.enabled = true", path)
            if not os.path.isfile(value):
                raise ConfigError(f"tls.{name}", f"no such file {value!r}", path)
        if not tls.allowed_subjects:
            raise ConfigError("tls.allowed_subjects",
                              'must list the client certificate subjects allowed (or ["*"] for any '
                              "certificate tls.client_ca signed)", path)
    if not tls.enabled and not _is_loopback(listen) and not nets:
        raise ConfigError("server.listen_address",
                          f"plain HTTP on the non-loopback address {listen!r} needs either [tls] "
                          "enabled or server.trusted_networks naming the networks allowed in", path)

    n = t["node"]
    site = n.string("site_location", d.site_location).upper()
    if not _SITE_RE.fullmatch(site):
        raise ConfigError("node.site_location", "must be 1-32 characters A-Z 0-9 . - (it goes into file names)", path)
    ifaces = n.strings("allowed_interfaces", d.allowed_interfaces)
    for i, name in enumerate(ifaces):
        if not _IFNAME_RE.fullmatch(name):
            raise ConfigError(f"node.allowed_interfaces[{i}]", f"not an interface name {name!r}", path)
    default_device = n.string("default_device", ifaces[0] if ifaces else "")
    if default_device and default_device not in ifaces:
        raise ConfigError("node.default_device", f"{default_device!r} is not in node.allowed_interfaces", path)

    p = t["paths"]
    roots = p.strings("local_storage_roots", d.local_storage_roots)
    for i, r in enumerate(roots):
        if not os.path.isabs(r):
            raise ConfigError(f"paths.local_storage_roots[{i}]", f"must be an absolute path, got {r!r}", path)
    paths = dict(
        spool_dir=p.abspath("spool_dir", d.spool_dir),
        state_dir=p.abspath("state_dir", d.state_dir),
        local_storage_roots=tuple(os.path.normpath(r) for r in roots),
    )

    st = t["storage"]
    s3_endpoint = st.string("s3_endpoint", d.s3_endpoint)
    if s3_endpoint and not re.match(r"https?://[^\s/]+", s3_endpoint):
        raise ConfigError("storage.s3_endpoint", f"must be an http:// or https:// URL, got {s3_endpoint!r}", path)
    storage = dict(
        s3_endpoint=s3_endpoint,
        known_hosts=st.abspath("known_hosts", d.known_hosts, allow_empty=True),
        trust_on_first_use=st.boolean("trust_on_first_use", d.trust_on_first_use),
        keep_local=st.boolean("keep_local", d.keep_local),
        create_bucket=st.boolean("create_bucket", d.create_bucket),
        upload_parallel=st.integer("upload_parallel", d.upload_parallel, 1, 64),
    )

    lim = t["limits"]
    limits = dict(
        max_experiments=lim.integer("max_experiments", d.max_experiments, 1, 10000),
        spool_quota_bytes=lim.integer("spool_quota_bytes", d.spool_quota_bytes, 1 << 20, 1 << 50),
    )

    df = t["defaults"]
    defaults = dict(
        snaplen=df.integer("snaplen", d.snaplen, 14, 262144),
        rollover_seconds=df.integer("rollover_seconds", d.rollover_seconds, 1, 7 * 86400),
        filter=df.string("filter", d.filter),
        promiscuous=df.boolean("promiscuous", d.promiscuous),
        timeout_ms=df.integer("timeout_ms", d.timeout_ms, 1, 60000),
        buffer_bytes=df.integer("buffer_bytes", d.buffer_bytes, 65536, 1 << 31),
        stats_interval=df.integer("stats_interval", d.stats_interval, 1, 86400),
        counts_interval=df.integer("counts_interval", d.counts_interval, 1, 86400),
        flow_idle_timeout=df.integer("flow_idle_timeout", d.flow_idle_timeout, 1, 86400),
        flow_active_timeout=df.integer("flow_active_timeout", d.flow_active_timeout, 1, 7 * 86400),
    )
    for table in t.values():
        table.finish()
    return Config(**server, tls=tls, site_location=site, allowed_interfaces=ifaces,
                  default_device=default_device, **paths, **storage, **limits, **defaults)
