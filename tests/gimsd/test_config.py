"""/etc/gims/gimsd.toml: the shipped default parses, and every bad field is named."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gimsd import config as configmod

REPO = Path(__file__).resolve().parents[2]


def test_shipped_default_config_is_valid_and_documented():
    text = (REPO / "etc" / "gimsd.toml").read_text()
    cfg = configmod.from_dict(tomllib.loads(text))
    assert cfg == configmod.Config()  # everything in it is commented out: the defaults
    # every commented setting is a real one: uncommenting all of them still parses to the defaults
    uncommented = "\n".join(line[1:] if line.startswith("#") and "=" in line.split("#")[1][:40] and
                            not line.startswith("# ") else line for line in text.splitlines())
    cfg2 = configmod.from_dict(tomllib.loads(uncommented.replace('#enabled = false', 'enabled = false')))
    assert cfg2.port == 8001 and cfg2.spool_dir == "/var/spool/gims" and cfg2.state_dir == "/var/lib/gims"
    assert cfg2.local_storage_roots == ("/srv/gims",) and cfg2.rollover_seconds == 300


BAD = [
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"port": "8001"}}, "server.port"),
    ({"server": {"listen_address": "example.org"}}, "server.listen_address"),
    ({"server": {"listen_address": "0.0.0.0"}}, "server.listen_address"),  # plain HTTP off loopback
    ({"server": {"trusted_networks": ["10.0.0.0/33"]}}, "server.trusted_networks[0]"),
    ({"server": {"max_request_bytes": 10}}, "server.max_request_bytes"),
    ({"server": {"socket_timeout": "long"}}, "server.socket_timeout"),
    ({"server": {"prot": 1}}, "server.prot"),
    ({"tls": {"enabled": "yes"}}, "tls.enabled"),
    ({"tls": {"enabled": True}}, "tls.cert"),
    ({"tls": {"cert": "relative.pem"}}, "tls.cert"),
    ({"node": {"allowed_interfaces": "eth1"}}, "node.allowed_interfaces"),
    ({"node": {"allowed_interfaces": ["eth1", "bad name!"]}}, "node.allowed_interfaces[1]"),
    ({"node": {"default_device": "eth7"}}, "node.default_device"),
    ({"node": {"site_location": "a b"}}, "node.site_location"),
    ({"paths": {"spool_dir": "spool"}}, "paths.spool_dir"),
    ({"paths": {"local_storage_roots": ["srv"]}}, "paths.local_storage_roots[0]"),
    ({"storage": {"s3_endpoint": "ftp://x"}}, "storage.s3_endpoint"),
    ({"limits": {"max_experiments": 0}}, "limits.max_experiments"),
    ({"limits": {"spool_quota_bytes": -1}}, "limits.spool_quota_bytes"),
    ({"defaults": {"rollover_seconds": 0}}, "defaults.rollover_seconds"),
    ({"defaults": {"snaplen": True}}, "defaults.snaplen"),
    ({"defualts": {}}, "defualts"),
    ({"node": "eth1"}, "node"),
]


@pytest.mark.parametrize("raw,field", BAD, ids=[b[1] for b in BAD])
def test_bad_field_is_named(raw, field):
    with pytest.raises(configmod.ConfigError) as e:
        configmod.from_dict(raw)
    assert e.value.field == field
    assert str(e.value).startswith(field + ": ")


def test_tls_needs_files_and_subjects(tmp_path):
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    tls = {"enabled": True, "cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem"),
           "client_ca": str(tmp_path / "ca.pem")}
    with pytest.raises(configmod.ConfigError, match="tls.allowed_subjects"):
        configmod.from_dict({"tls": tls})
    with pytest.raises(configmod.ConfigError, match="tls.client_ca: no such file"):
        configmod.from_dict({"tls": dict(tls, client_ca=str(tmp_path / "nope.pem"), allowed_subjects=["*"])})
    cfg = configmod.from_dict({"tls": dict(tls, allowed_subjects=["CN=a"]), "server": {"listen_address": "::"}})
    assert cfg.tls.enabled and cfg.listen_address == "::"  # TLS may listen anywhere


def _gimsd(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("JOURNAL_STREAM", None)
    return subprocess.run([sys.executable, "-m", "gimsd.server", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_gimsd_refuses_to_start_with_a_bad_config(tmp_path):
    bad = tmp_path / "gimsd.toml"
    bad.write_text('[server]\nport = 8001\n[node]\nallowed_interfaces = ["eth1"]\ndefault_device = "eth2"\n')
    r = _gimsd("--config", str(bad))
    assert r.returncode == 2
    assert "bad configuration" in r.stderr and "node.default_device" in r.stderr and str(bad) in r.stderr
    bad.write_text("[server\n")
    r = _gimsd("--config", str(bad))
    assert r.returncode == 2 and "(syntax)" in r.stderr
    r = _gimsd("--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_check_config_says_how_it_will_listen(tmp_path):
    good = tmp_path / "gimsd.toml"
    good.write_text('[server]\nlisten_address = "0.0.0.0"\ntrusted_networks = ["10.9.0.0/16"]\n')
    r = _gimsd("--config", str(good), "--check-config")
    assert r.returncode == 0, r.stderr
    assert "plain HTTP, no TLS: serving loopback peers and trusted networks 10.9.0.0/16" in r.stdout


def test_unusable_state_dir_and_tls_files_are_named(tmp_path):
    import dataclasses

    from gimsd.server import build_server
    (tmp_path / "file").write_text("not a directory")
    cfg = dataclasses.replace(configmod.Config(), port=0, state_dir=str(tmp_path / "file" / "state"))
    with pytest.raises(configmod.ConfigError, match=r"^paths.state_dir: cannot use"):
        build_server(cfg, None)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    tls = configmod.TlsConfig(enabled=True, cert=str(bad), key=str(bad), client_ca=str(bad), allowed_subjects=("*",))
    cfg = dataclasses.replace(configmod.Config(), port=0, state_dir=str(tmp_path / "state"), tls=tls)
    with pytest.raises(configmod.ConfigError, match=r"^tls: cannot load"):
        build_server(cfg, None)
