"""Experiment specs: parse the AM's configureExperiment struct, merge partial calls, validate a
whole spec, and turn it into the capture settings and storage settings files (docs/ARCHITECTURE.md).

Nothing here knows about XML-RPC. A spec is kept in one canonical, flat form (``CANONICAL_KEYS``);
a configure call yields only the keys it set, and merging is a dict update, so an AM may send
CaptureSpec in one call and StorageSpec in a later one (docs/gims-xmlrpc-contract.md).

What is accepted, and how it is spelt, is documented next to each parser; every refusal is a
``SpecError`` naming the field as the AM spelt the contract (``TransformSpec.AnonSpec.anonkey``).
"""
from __future__ import annotations

import math
import os
import re
from typing import Any

from .bpf import FilterError, check_filter
from .config import Config

# docs/ARCHITECTURE.md: used verbatim as a systemd instance name and a directory name.
# fullmatch, because "$" would also match before a trailing newline.
EXPERIMENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SITE_RE = re.compile(r"[A-Z0-9][A-Z0-9.-]{0,31}")
_HEX64_RE = re.compile(r"[0-9A-Fa-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

MAX_TEXT = 65536
MAX_FILTER = 4096

# Storage parameters whose values are secrets: never shown in stats, state, logs or faults.
# s3key (the access key id) is not secret by AWS's rules, but the storage side redacts it too.
SECRET_STORAGE_KEYS = frozenset({"s3key", "s3secret", "sshkey", "sshpassword", "sshpassphrase"})
# Spellings the original test client used (contract: accept both).
STORAGE_KEY_ALIASES = {"s3accesskey": "s3key", "s3secretkey": "s3secret"}
STORAGE_TYPES = ("local", "s3", "ssh")
# Without gimsd.storage (not installed yet), at least the keys a back-end cannot work without.
_REQUIRED_STORAGE_KEYS = {"local": ("local_storage_dir",), "s3": ("s3key", "s3secret", "s3bucket"),
                          "ssh": ("sshuser", "sshhost", "sshpath", "sshkey")}

CANONICAL_KEYS = ("experiment_id", "vlan", "site", "device_name", "config_name", "user_text",
                  "filterexpr", "device", "sample", "anon", "aggregate", "storage", "rollover_minutes")

_AGG_ALIASES = {"count_pkts": "counts", "combine_pkt_flows": "flows", "combine_pkts_flows": "flows",
                "combine_pkts": "flows", "none": "pcap", "pcap": "pcap", "": "pcap"}
_SAMPLE_ALIASES = {"everyn": "everyN", "uniformrandom": "uniformrandom", "uniform": "uniformrandom",
                   "none": "none", "": "none"}
_ANON_ALIASES = {"anonymize": "cryptopan", "cryptopan": "cryptopan", "none": "none", "": "none"}


class SpecError(ValueError):
    """A refused spec value. ``field`` is the contract's name for it; the message never contains
    the value of a secret field."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


# --------------------------------------------------------------------------- small checkers
def validate_experiment_id(value: Any, field: str = "ExperimentId") -> str:
    if not isinstance(value, str):
        raise SpecError(field, f"must be a string, got {_typename(value)}")
    if not EXPERIMENT_ID_RE.fullmatch(value):
        raise SpecError(field, "must be 1-64 characters from A-Z a-z 0-9 _ . -, starting with a letter "
                               f"or digit (got {_show(value)})")
    return value


def _typename(v: Any) -> str:
    return {bool: "boolean", int: "int", float: "double", str: "string", dict: "struct",
            list: "array", type(None): "nil"}.get(type(v), type(v).__name__)


def _show(v: Any, limit: int = 40) -> str:
    """A short, printable rendering of a (non-secret) bad value for an error message."""
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "...'"


def _text(value: Any, field: str, limit: int = 256, allow_newlines: bool = False) -> str:
    if not isinstance(value, str):
        raise SpecError(field, f"must be a string, got {_typename(value)}")
    if len(value) > limit:
        raise SpecError(field, f"longer than {limit} characters")
    bad = _CONTROL_RE.search(value) or (not allow_newlines and re.search(r"[\r\n\t]", value))
    if bad:
        raise SpecError(field, "must not contain control characters")
    return value


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    """An int; decimal strings are accepted too, since some AMs send every value as a string."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,12}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer in {lo}..{hi}, got {_typename(value)}")
    if not lo <= value <= hi:
        raise SpecError(field, f"must be an integer in {lo}..{hi}, got {value}")
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SpecError(field, f"must be a number, got {_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(field, f"must be a finite number, got {_typename(value)}")
    return float(value)


def _struct(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(field, f"must be a struct, got {_typename(value)}")
    return value


def _ci(struct: dict, field: str, known: dict[str, str]) -> dict[str, Any]:
    """Case-insensitive view of a struct: {canonical name: value} for the keys in ``known``
    (lowercase -> canonical). Unknown keys are refused here (below top level the contract is
    small and a typo would silently drop a setting); the same key in two spellings with different
    values is refused."""
    out: dict[str, Any] = {}
    for k, v in struct.items():
        if not isinstance(k, str):
            raise SpecError(field, "struct keys must be strings")
        canon = known.get(k.lower())
        if canon is None:
            raise SpecError(f"{field}.{_printable_key(k)}",
                            f"unknown key (expected one of {', '.join(sorted(set(known.values())))})")
        if canon in out and out[canon] != v:
            raise SpecError(f"{field}.{canon}", "given twice (in different spellings) with different values")
        out[canon] = v
    return out


def _printable_key(k: str) -> str:
    k = _CONTROL_RE.sub("?", k)
    return k if len(k) <= 40 else k[:40] + "..."


# --------------------------------------------------------------------------- parsing one call
_TOP_KEYS = {"experimentid": "ExperimentId", "methodname": "MethodName", "vlan": "VLAN",
             "sitelocation": "SiteLocation", "devicename": "DeviceName", "configname": "ConfigName",
             "metadataspec": "MetaDataSpec", "capturespec": "CaptureSpec",
             "transformspec": "TransformSpec", "storagespec": "StorageSpec",
             "anonspec": "AnonSpec", "aggregationspec": "AggregationSpec"}


def experiment_id_of(params: Any) -> str:
    """The validated ExperimentId (or ExperimentID, any case) of a method's params struct."""
    params = _struct(params, "params")
    found = [v for k, v in params.items() if isinstance(k, str) and k.lower() == "experimentid"]
    if not found:
        raise SpecError("ExperimentId", "missing (the params struct must carry ExperimentId)")
    if any(v != found[0] for v in found):
        raise SpecError("ExperimentId", "given twice (in different spellings) with different values")
    return validate_experiment_id(found[0])


def parse_configure(params: Any, config: Config) -> tuple[str, dict[str, Any], list[str]]:
    """Parse one configureExperiment struct into (id, partial canonical spec, ignored keys).

    Top-level keys are case-insensitive (contract). Unknown top-level keys are ignored and
    reported back, because an unchanged AM may send keys this node does not use; unknown keys
    inside the sub-structs are refused."""
    exp_id = experiment_id_of(params)
    part: dict[str, Any] = {"experiment_id": exp_id}
    ignored: list[str] = []
    top: dict[str, Any] = {}
    for k, v in params.items():
        canon = _TOP_KEYS.get(k.lower()) if isinstance(k, str) else None
        if canon is None:
            ignored.append(_printable_key(str(k)))
            continue
        if canon in top and top[canon] != v and canon != "ExperimentId":
            raise SpecError(canon, "given twice (in different spellings) with different values")
        top[canon] = v

    if "VLAN" in top:
        vlan = top["VLAN"]
        # 0 / "" / nil: no VLAN (what some AMs send for "untagged")
        part["vlan"] = None if (vlan in (None, "", 0, "0") and not isinstance(vlan, bool)) \
            else _int(vlan, "VLAN", 1, 4094)
    if "SiteLocation" in top:
        site = _text(top["SiteLocation"], "SiteLocation", 32).upper()
        if not _SITE_RE.fullmatch(site):
            raise SpecError("SiteLocation", "must be 1-32 characters A-Z 0-9 . - (it goes into file names), "
                                            f"got {_show(site)}")
        part["site"] = site
    if "DeviceName" in top:
        part["device_name"] = _text(top["DeviceName"], "DeviceName")
    if "ConfigName" in top:
        part["config_name"] = _text(top["ConfigName"], "ConfigName")
    if "MetaDataSpec" in top:
        md = _ci(_struct(top["MetaDataSpec"], "MetaDataSpec"), "MetaDataSpec", {"usertext": "UserText"})
        if "UserText" in md:
            part["user_text"] = _text(md["UserText"], "MetaDataSpec.UserText", MAX_TEXT, allow_newlines=True)
    if "CaptureSpec" in top:
        cs = _ci(_struct(top["CaptureSpec"], "CaptureSpec"), "CaptureSpec",
                 {"filterexpr": "filterexpr", "device": "device"})
        if "filterexpr" in cs:
            expr = _text(cs["filterexpr"], "CaptureSpec.filterexpr", MAX_FILTER, allow_newlines=True)
            compile_filter(expr, "CaptureSpec.filterexpr")
            part["filterexpr"] = expr
        if "device" in cs:
            part["device"] = check_device(cs["device"], config, "CaptureSpec.device")
    transform: dict[str, Any] = {}
    if "TransformSpec" in top:
        transform = _ci(_struct(top["TransformSpec"], "TransformSpec"), "TransformSpec",
                        {"samplespec": "SampleSpec", "anonspec": "AnonSpec",
                         "aggregationspec": "AggregationSpec"})
    # AnonSpec and AggregationSpec may also appear at top level (contract).
    for name in ("AnonSpec", "AggregationSpec"):
        if name in top:
            if name in transform and transform[name] != top[name]:
                raise SpecError(name, "given both at top level and in TransformSpec with different values")
            transform[name] = top[name]
    if "SampleSpec" in transform:
        part["sample"] = _parse_sample(transform["SampleSpec"], "TransformSpec.SampleSpec")
    if "AnonSpec" in transform:
        part["anon"] = _parse_anon(transform["AnonSpec"], "TransformSpec.AnonSpec")
    if "AggregationSpec" in transform:
        part["aggregate"] = _parse_aggregation(transform["AggregationSpec"], "TransformSpec.AggregationSpec")
    if "StorageSpec" in top:
        storage, rollover = _parse_storage(top["StorageSpec"], config)
        part["storage"] = storage
        part["rollover_minutes"] = rollover  # a new StorageSpec replaces the old one, rollover too
    return exp_id, part, ignored


def _parse_sample(value: Any, field: str) -> dict[str, Any]:
    """{sampletype: everyN|uniformrandom|none, sampleparams: {N} | {p[, seed]}}; {} means none.
    N is an integer >= 1; p a probability in (0, 1]; seed (an extension) an integer >= 0."""
    s = _ci(_struct(value, field), field, {"sampletype": "sampletype", "sampleparams": "sampleparams"})
    if not s:
        return {"type": "none"}
    stype = s.get("sampletype", "none")
    if not isinstance(stype, str) or stype.lower() not in _SAMPLE_ALIASES:
        raise SpecError(f"{field}.sampletype", f"must be everyN, uniformrandom or none, got {_show(stype)}")
    stype = _SAMPLE_ALIASES[stype.lower()]
    sp = _ci(_struct(s.get("sampleparams", {}), f"{field}.sampleparams"), f"{field}.sampleparams",
             {"n": "N", "p": "p", "seed": "seed"})
    pf = f"{field}.sampleparams"
    if stype == "none":
        return {"type": "none"}
    if stype == "everyN":
        if "N" not in sp:
            raise SpecError(f"{pf}.N", "missing (everyN needs N, an integer >= 1)")
        return {"type": "everyN", "N": _int(sp["N"], f"{pf}.N", 1, 2**31 - 1)}
    if "p" not in sp:
        raise SpecError(f"{pf}.p", "missing (uniformrandom needs p, a probability in (0, 1])")
    p = _number(sp["p"], f"{pf}.p")
    if not 0.0 < p <= 1.0:
        raise SpecError(f"{pf}.p", f"must be a probability in (0, 1], got {p}")
    out: dict[str, Any] = {"type": "uniformrandom", "p": p}
    if "seed" in sp:
        out["seed"] = _int(sp["seed"], f"{pf}.seed", 0, 2**31 - 1)
    return out


def _parse_anon(value: Any, field: str) -> dict[str, Any]:
    """{anontype: 'anonymize', anonkey}; {} means none. The key is Crypto-PAn's 32 bytes written
    as exactly 64 hexadecimal characters (nothing else is accepted: the original's short
    passphrases gave 8 bytes of key). The key is never echoed in an error."""
    a = _ci(_struct(value, field), field, {"anontype": "anontype", "anonkey": "anonkey"})
    if not a:
        return {"type": "none"}
    atype = a.get("anontype", "anonymize")
    if not isinstance(atype, str) or atype.lower() not in _ANON_ALIASES:
        raise SpecError(f"{field}.anontype", f"must be 'anonymize' or 'none', got {_show(atype)}")
    if _ANON_ALIASES[atype.lower()] == "none":
        return {"type": "none"}
    key = a.get("anonkey")
    if key is None:
        raise SpecError(f"{field}.anonkey", "missing (anonymize needs a 32-byte key as 64 hex characters)")
    if not isinstance(key, str) or not _HEX64_RE.fullmatch(key.strip()):
        raise SpecError(f"{field}.anonkey", "must be 64 hexadecimal characters (a 32-byte Crypto-PAn key); "
                                            "the value given is not shown")
    return {"type": "cryptopan", "key_hex": key.strip().lower()}


def _parse_aggregation(value: Any, field: str) -> str:
    """{aggtype: count_pkts | combine_pkt_flows (also combine_pkts_flows, combine_pkts) | none};
    {} means none (pcap)."""
    a = _ci(_struct(value, field), field, {"aggtype": "aggtype"})
    agg = a.get("aggtype", "none")
    if not isinstance(agg, str) or agg.lower() not in _AGG_ALIASES:
        raise SpecError(f"{field}.aggtype", "must be count_pkts, combine_pkt_flows (or combine_pkts_flows, "
                                            f"combine_pkts) or none, got {_show(agg)}")
    return _AGG_ALIASES[agg.lower()]


def _parse_storage(value: Any, config: Config) -> tuple[dict[str, Any] | None, float | None]:
    """{storagetype: local|s3|ssh, storageparams: {...}}; keys in storageparams are
    case-sensitive (contract); s3accesskey/s3secretkey are taken as s3key/s3secret.
    rollover_interval (minutes, > 0, at most a week) is taken out of storageparams: it is a
    capture setting. An empty StorageSpec removes the storage configuration."""
    field = "StorageSpec"
    s = _ci(_struct(value, field), field, {"storagetype": "storagetype", "storageparams": "storageparams"})
    if not s:
        return None, None
    stype = s.get("storagetype")
    if not isinstance(stype, str) or stype.lower() not in STORAGE_TYPES:
        raise SpecError(f"{field}.storagetype", f"must be one of {', '.join(STORAGE_TYPES)}, got {_show(stype)}")
    stype = stype.lower()
    raw = _struct(s.get("storageparams", {}), f"{field}.storageparams")
    params: dict[str, Any] = {}
    rollover = None
    for k, v in raw.items():
        if not isinstance(k, str):
            raise SpecError(f"{field}.storageparams", "keys must be strings")
        canon = STORAGE_KEY_ALIASES.get(k, k)
        pf = f"{field}.storageparams.{_printable_key(k)}"
        if canon in params and params[canon] != v:
            raise SpecError(pf, f"given twice (as {canon} and an alias) with different values")
        if canon == "rollover_interval":
            rollover = _number(v, pf)
            if not 0 < rollover <= 7 * 24 * 60:
                raise SpecError(pf, f"must be minutes > 0 and at most a week, got {rollover}")
            if round(rollover * 60) < 1:
                raise SpecError(pf, "must be at least one second (1/60 minute)")
            continue
        if isinstance(v, str) and "\0" in v:
            raise SpecError(pf, "must not contain NUL characters")
        params[canon] = v
    if stype == "local" and "local_storage_dir" in params:
        params["local_storage_dir"] = check_local_dir(params["local_storage_dir"], config,
                                                      f"{field}.storageparams.local_storage_dir")
    _validate_storage_params(stype, params)
    return {"storagetype": stype, "storageparams": params}, rollover


def _validate_storage_params(stype: str, params: dict[str, Any]) -> None:
    """Delegate to the storage back-ends' own checks (gimsd.storage); without that module, check at
    least the required keys and string types here."""
    field = "StorageSpec.storageparams"
    try:
        from gimsd import storage  # noqa: PLC0415 - optional part, lands separately
        validate = storage.validate_params
    except (ImportError, AttributeError):
        validate = None
    if validate is not None:
        try:
            validate(stype, params)
        except (ValueError, TypeError, KeyError) as e:
            # The storage module names the field; prefix the contract's path and make sure no
            # secret value slipped into the text.
            msg = redact_text(str(e), [v for k, v in params.items() if k in SECRET_STORAGE_KEYS])
            named = re.match(r"([A-Za-z_][A-Za-z0-9_]*): (.*)", msg, re.S)
            if named and named.group(1) in ("storagetype", "storageparams"):
                raise SpecError(f"StorageSpec.{named.group(1)}", named.group(2)) from None
            if named:  # "sshport: must be ..." names a key inside storageparams
                raise SpecError(f"{field}.{named.group(1)}", named.group(2)) from None
            raise SpecError(field, msg) from None
        return
    for key in _REQUIRED_STORAGE_KEYS[stype]:
        if key not in params:
            raise SpecError(f"{field}.{key}", f"missing (storagetype {stype} needs it)")
    for k, v in params.items():
        if k == "sshport":
            _int(v, f"{field}.sshport", 1, 65535)
        elif not isinstance(v, str):
            raise SpecError(f"{field}.{k}", f"must be a string, got {_typename(v)}")


def secret_values(spec: dict[str, Any]) -> list[str]:
    """Every secret string in a spec (for redaction of any text that might echo one)."""
    out = []
    anon = spec.get("anon") or {}
    if anon.get("key_hex"):
        out.append(anon["key_hex"])
    storage = spec.get("storage") or {}
    for k, v in (storage.get("storageparams") or {}).items():
        if k in SECRET_STORAGE_KEYS and isinstance(v, str) and v:
            out.append(v)
    return out


def redact_text(text: str, secrets: list[str]) -> str:
    """Replace every secret (and every long line of a multi-line secret such as a PEM key) in
    ``text`` by <redacted>."""
    pieces = set()
    for s in secrets:
        if isinstance(s, str) and len(s) >= 4:
            pieces.add(s)
            pieces.update(line.strip() for line in s.splitlines() if len(line.strip()) >= 8)
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "<redacted>")
    return text


# --------------------------------------------------------------------------- node policy
def check_device(value: Any, config: Config, field: str) -> str:
    if not isinstance(value, str):
        raise SpecError(field, f"must be a string, got {_typename(value)}")
    if value not in config.allowed_interfaces:
        allowed = ", ".join(config.allowed_interfaces) or "(none)"
        raise SpecError(field, f"interface {_show(value)} is not one this node allows (allowed: {allowed})")
    return value


def check_local_dir(value: Any, config: Config, field: str) -> str:
    """The directory, resolved (symlinks and ..), must lie under one of the operator's roots."""
    if not isinstance(value, str) or not value:
        raise SpecError(field, f"must be a non-empty string, got {_typename(value)}")
    if "\0" in value or not os.path.isabs(value):
        raise SpecError(field, f"must be an absolute path, got {_show(value)}")
    resolved = os.path.realpath(value)
    for root in config.local_storage_roots:
        real_root = os.path.realpath(root)
        if resolved != real_root and os.path.commonpath([resolved, real_root]) == real_root:
            return resolved
    raise SpecError(field, f"{_show(value)} is not under the local storage roots this node allows "
                           f"({', '.join(config.local_storage_roots)})")


def compile_filter(expr: str, field: str) -> None:
    """Refuse a BPF expression libpcap cannot compile, at configure time (gimsd/bpf.py)."""
    if "\0" in expr:
        raise SpecError(field, "must not contain NUL characters")
    try:
        check_filter(expr)
    except FilterError as e:
        raise SpecError(field, f"BPF filter does not compile: {e}") from None
    except OSError as e:
        raise SpecError(field, f"cannot be checked on this node: {e}") from None


def effective_filter(spec: dict[str, Any], config: Config) -> str:
    expr = spec.get("filterexpr")
    if expr is None:
        expr = config.filter
    vlan = spec.get("vlan")
    if vlan:
        return f"vlan {vlan} and ({expr})" if expr.strip() else f"vlan {vlan}"
    return expr


# --------------------------------------------------------------------------- whole spec
def merge(old: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Later calls override what they set and keep the rest (StorageSpec replaces as a whole)."""
    merged = dict(old or {})
    merged.update(part)
    if "storage" in part and part["storage"] is None:
        merged.pop("storage")
    return merged


def validate_for_start(spec: dict[str, Any], config: Config) -> None:
    """Check the merged spec as a whole, against the node's current policy, before a start."""
    device = spec.get("device") or config.default_device
    if not device:
        raise SpecError("CaptureSpec.device", "missing and this node has no default_device")
    check_device(device, config, "CaptureSpec.device")
    compile_filter(effective_filter(spec, config), "CaptureSpec.filterexpr" if not spec.get("vlan") else "VLAN")
    storage = spec.get("storage")
    if not storage:
        raise SpecError("StorageSpec", "missing: configure where the files go before starting")
    if storage["storagetype"] == "local":
        params = storage["storageparams"]
        if "local_storage_dir" not in params:
            raise SpecError("StorageSpec.storageparams.local_storage_dir", "missing (storagetype local needs it)")
        check_local_dir(params["local_storage_dir"], config, "StorageSpec.storageparams.local_storage_dir")
    _validate_storage_params(storage["storagetype"], storage["storageparams"])


def _sample_setting(sample: dict[str, Any] | None) -> str:
    if not sample or sample["type"] == "none":
        return "none"
    if sample["type"] == "everyN":
        return f"everyN:{sample['N']}"
    seed = f":{sample['seed']}" if "seed" in sample else ""
    return f"uniform:{sample['p']!r}{seed}"


def rollover_seconds(spec: dict[str, Any], config: Config) -> int:
    minutes = spec.get("rollover_minutes")
    return config.rollover_seconds if minutes is None else max(1, round(minutes * 60))


def to_capture_settings(spec: dict[str, Any], config: Config) -> dict[str, Any]:
    """The capture settings JSON of docs/ARCHITECTURE.md, exactly those keys. The VLAN is folded
    into the filter (``vlan N and (expr)``), so ``vlan`` stays null: applying it twice would
    match QinQ inner tags instead."""
    exp_id = spec["experiment_id"]
    anon = spec.get("anon") or {}
    return {
        "experiment": exp_id,
        "site": spec.get("site") or config.site_location,
        "interface": spec.get("device") or config.default_device,
        "read": None,
        "output_dir": os.path.join(config.spool_dir, exp_id),
        "filter": effective_filter(spec, config),
        "vlan": None,
        "snaplen": config.snaplen,
        "promiscuous": config.promiscuous,
        "timeout_ms": config.timeout_ms,
        "buffer_bytes": config.buffer_bytes,
        "sample": _sample_setting(spec.get("sample")),
        "anon_key_hex": anon.get("key_hex") if anon.get("type") == "cryptopan" else None,
        "aggregate": spec.get("aggregate") or "pcap",
        "counts_interval": config.counts_interval,
        "rollover_seconds": rollover_seconds(spec, config),
        "max_file_bytes": None,
        "stats_interval": config.stats_interval,
        "ipfix_export": None,
        "flow_idle_timeout": config.flow_idle_timeout,
        "flow_active_timeout": config.flow_active_timeout,
        "user_text": spec.get("user_text") or "",
        "device_name": spec.get("device_name") or "",
        "config_name": spec.get("config_name") or "",
        "spool_quota_bytes": config.spool_quota_bytes,
    }


def to_storage_settings(spec: dict[str, Any], config: Config) -> dict[str, Any]:
    """storage.json, the upload unit's credential: {experiment, storagetype, storageparams, node}."""
    storage = spec["storage"]
    return {
        "experiment": spec["experiment_id"],
        "storagetype": storage["storagetype"],
        "storageparams": dict(storage["storageparams"]),
        "node": {  # gimsd.storage.DEFAULT_NODE's keys, from gimsd.toml [storage] and [paths]
            "s3_endpoint": config.s3_endpoint or None,
            "allowed_local_roots": list(config.local_storage_roots),
            "known_hosts": config.known_hosts or None,
            "trust_on_first_use": config.trust_on_first_use,
            "keep_local": config.keep_local,
            "create_bucket": config.create_bucket,
            "parallel": config.upload_parallel,
            "site": spec.get("site") or config.site_location,
            "spool_dir": os.path.join(config.spool_dir, spec["experiment_id"]),
            "spool_quota_bytes": config.spool_quota_bytes,
        },
    }


def public_storage_params(spec: dict[str, Any]) -> dict[str, Any]:
    """storageparams for stats/state: secrets replaced by '<set>' so a user can see they are there."""
    storage = spec.get("storage") or {}
    out = {}
    for k, v in (storage.get("storageparams") or {}).items():
        out[k] = "<set>" if k in SECRET_STORAGE_KEYS or "secret" in k.lower() or "password" in k.lower() else v
    if spec.get("rollover_minutes") is not None:
        out["rollover_interval"] = spec["rollover_minutes"]
    return out


def public_summary(spec: dict[str, Any], config: Config) -> dict[str, Any]:
    """The spec as shown to clients: everything but secret values."""
    anon = spec.get("anon") or {"type": "none"}
    anon_view = {"type": anon["type"]}
    if anon.get("key_hex"):
        import hashlib  # noqa: PLC0415
        # Same fingerprint as the metadata records (docs/ARCHITECTURE.md), never the key.
        anon_view["key_fingerprint"] = hashlib.sha256(
            b"gims-key-fingerprint" + bytes.fromhex(anon["key_hex"])).hexdigest()[:16]
    return {
        "site": spec.get("site") or config.site_location,
        "device": spec.get("device") or config.default_device,
        "filter": effective_filter(spec, config),
        "vlan": spec.get("vlan") or 0,
        "sample": _sample_setting(spec.get("sample")),
        "anonymization": anon_view,
        "aggregate": spec.get("aggregate") or "pcap",
        "rollover_seconds": rollover_seconds(spec, config),
        "user_text": spec.get("user_text") or "",
        "device_name": spec.get("device_name") or "",
        "config_name": spec.get("config_name") or "",
    }
