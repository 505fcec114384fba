"""TLS with client certificates, against a throwaway CA made with `cryptography`."""
from __future__ import annotations

import datetime
import http.client
import ipaddress
import ssl
import time
import xmlrpc.client

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gimsd import config as configmod


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GENI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer_name: x509.Name, issuer_key, key, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert, key=None):
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


@pytest.fixture
def pki(tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("gims test CA", _name("gims test CA"), ca_key, ca_key, ca=True)
    files = {"ca": _write(d / "ca", ca)[0]}
    for name, server in (("server", True), ("am", False), ("intruder", False)):
        k = ec.generate_private_key(ec.SECP256R1())
        files[name] = _write(d / name, _cert(f"{name}.example.net", ca.subject, ca_key, k, server=server), k)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _cert("other CA", _name("other CA"), other_key, other_key, ca=True)
    k = ec.generate_private_key(ec.SECP256R1())
    files["stranger"] = _write(d / "stranger", _cert("am.example.net", other_ca.subject, other_key, k), k)
    return files


@pytest.fixture
def tls_node(node_factory, pki):
    tls = configmod.TlsConfig(enabled=True, cert=pki["server"][0], key=pki["server"][1], client_ca=pki["ca"],
                              allowed_subjects=("CN=am.example.net,O=GENI",))
    return node_factory(tls=tls)


def _client(pki, who):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if who:
        ctx.load_cert_chain(*pki[who])
    return ctx


def test_allowed_certificate_gets_in(tls_node, pki):
    assert tls_node.url.startswith("https://")
    p = xmlrpc.client.ServerProxy(tls_node.url, context=_client(pki, "am"))
    assert "experiments" in p.getState()
    assert p.configureExperiment({"ExperimentId": "tls1"}).startswith("OK")


@pytest.mark.parametrize("who", ["intruder", "stranger", None])
def test_other_clients_get_nothing(tls_node, pki, who):
    p = xmlrpc.client.ServerProxy(tls_node.url, context=_client(pki, who))
    with pytest.raises((xmlrpc.client.ProtocolError, ssl.SSLError, ConnectionError, OSError)) as e:
        p.getState()
    if who == "intruder":  # a valid certificate of our CA, not on the list: HTTP 403, no answer
        assert isinstance(e.value, xmlrpc.client.ProtocolError) and e.value.errcode == 403
    deadline = time.monotonic() + 5  # the server logs after it sent its alert: allow it a moment
    while "refused request from 127.0.0.1" not in tls_node.logs.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "refused request from 127.0.0.1" in tls_node.logs.text()
    if who == "intruder":
        assert "'CN=intruder.example.net,O=GENI' is not allowed" in tls_node.logs.text()
    else:
        assert "TLS handshake failed" in tls_node.logs.text()
    # and the allowed client still gets in afterwards
    assert "experiments" in xmlrpc.client.ServerProxy(tls_node.url, context=_client(pki, "am")).getState()


def test_plain_http_to_the_tls_port_gets_nothing(tls_node):
    host, port = tls_node.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    body = xmlrpc.client.dumps((), "getState").encode()
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        conn.request("POST", "/RPC2", body=body, headers={"Content-Type": "text/xml"})
        conn.getresponse().read()
    conn.close()


def test_star_admits_any_certificate_of_the_ca(node_factory, pki):
    tls = configmod.TlsConfig(enabled=True, cert=pki["server"][0], key=pki["server"][1], client_ca=pki["ca"],
                              allowed_subjects=("*",))
    n = node_factory(tls=tls)
    assert "experiments" in xmlrpc.client.ServerProxy(n.url, context=_client(pki, "intruder")).getState()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        xmlrpc.client.ServerProxy(n.url, context=_client(pki, "stranger")).getState()


def test_gimsctl_with_a_client_certificate(tls_node, pki):
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))

    def ctl(*extra):
        return subprocess.run([sys.executable, "-m", "gimsd.ctl", "--url", tls_node.url, "--cacert", pki["ca"],
                               *extra, "list"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)

    r = ctl("--cert", pki["am"][0], "--key", pki["am"][1])
    assert r.returncode == 0 and "STORAGE" in r.stdout, r.stderr
    r = ctl("--cert", pki["intruder"][0], "--key", pki["intruder"][1])
    assert r.returncode == 3 and "403" in r.stderr
    r = ctl()
    assert r.returncode == 3 and "cannot reach gimsd" in r.stderr
