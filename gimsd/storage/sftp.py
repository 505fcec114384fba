"""SFTP storage with paramiko: key authentication from the experiment's ``sshkey``, host-key
checking, upload to a temporary name then (posix-)rename, size check after.

Host key trust, in order: the experiment's ``sshhostkey`` (a public key line or a known_hosts
line); else the operator's known_hosts file; else, only if the operator enabled
``trust_on_first_use``, the first key seen is pinned in a per-experiment file in the spool
(the upload unit cannot write /etc). Anything else is refused as a permanent error.

Each worker thread has its own SSH connection (paramiko's SFTP channel is not meant to be shared
by concurrent transfers); a connection that failed is dropped and reopened on the next try.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import posixpath
import socket
import stat as statmod
import threading
from typing import Any

from .base import PermanentStorageError, Receipt, StorageBackend, TransientStorageError

STORAGETYPE = "ssh"

CONNECT_TIMEOUT = 15.0
IO_TIMEOUT = 60.0


def library_status() -> tuple[bool, str]:
    try:
        import paramiko  # noqa: F401
    except Exception as e:  # ImportError, or a broken dependency chain
        return False, f"paramiko not importable: {type(e).__name__}: {e}"
    return True, f"paramiko {paramiko.__version__}"


def _fingerprint(key) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def load_private_key(text: str):
    """A paramiko key from PEM or OpenSSH private key text (RSA, ECDSA, Ed25519)."""
    import paramiko
    errors = []
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except paramiko.PasswordRequiredException:
            raise PermanentStorageError(
                "sshkey: the private key is encrypted with a passphrase; "
                "an unencrypted key is required") from None
        except Exception as e:
            errors.append(type(e).__name__)
    raise PermanentStorageError("sshkey: not a usable RSA, ECDSA or Ed25519 private key "
                                "(PEM or OpenSSH format)")


def parse_host_key(line: str):
    """A paramiko PKey from ``<type> <base64> [comment]`` or a known_hosts line
    ``<hosts> <type> <base64> [comment]``."""
    import paramiko
    fields = line.strip().split()
    for i in range(len(fields) - 1):
        if fields[i].startswith(("ssh-", "ecdsa-sha2-", "sk-")):
            try:
                blob = base64.b64decode(fields[i + 1], validate=True)
                return paramiko.PKey.from_type_string(fields[i], blob) \
                    if hasattr(paramiko.PKey, "from_type_string") else _pkey_from_blob(fields[i], blob)
            except Exception:
                break
    raise ValueError("sshhostkey: not a public key line (\"ssh-ed25519 AAAA...\") "
                     "or a known_hosts line")


def _pkey_from_blob(keytype: str, blob: bytes):
    import paramiko
    classes = {"ssh-rsa": paramiko.RSAKey, "ssh-ed25519": paramiko.Ed25519Key,
               "ecdsa-sha2-nistp256": paramiko.ECDSAKey, "ecdsa-sha2-nistp384": paramiko.ECDSAKey,
               "ecdsa-sha2-nistp521": paramiko.ECDSAKey}
    if keytype not in classes:
        raise ValueError(f"unsupported host key type {keytype}")
    return classes[keytype](data=blob)


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class Backend(StorageBackend):
    storagetype = STORAGETYPE

    def __init__(self, experiment: str, params: dict[str, Any], node: dict[str, Any]):
        super().__init__(experiment, params, node)
        from ._paramikocompat import speed_up_paramiko
        speed_up_paramiko()  # about 3x the upload rate of paramiko 2.12 (see the module)
        self.user = params["sshuser"]
        self.host = params["sshhost"]
        self.port = int(params.get("sshport") or 22)
        self.base = params.get("sshpath") or "."
        self.dir = posixpath.join(self.base, experiment)
        self._key_text = params["sshkey"]
        self._pkey = None
        self._local = threading.local()
        self._conns: list = []
        self._lock = threading.Lock()
        self._dir_ready = False
        #: where first-use pins go (the upload process sets it to a file in the spool)
        self.tofu_file: str | None = node.get("tofu_known_hosts")

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        for f in ("sshuser", "sshhost", "sshkey"):
            v = params.get(f)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{f}: required")
        if any(c in params["sshhost"] for c in " /@\0"):
            raise ValueError("sshhost: not a host name or address")
        port = params.get("sshport", 22)
        try:
            port = int(port if port not in (None, "") else 22)
        except (TypeError, ValueError):
            raise ValueError("sshport: must be an integer") from None
        if not 0 < port < 65536:
            raise ValueError("sshport: must be 1..65535")
        path = params.get("sshpath", "")
        if path is not None and not isinstance(path, str):
            raise ValueError("sshpath: must be a string")
        if path and "\0" in path:
            raise ValueError("sshpath: contains NUL")
        if "PRIVATE KEY" not in params["sshkey"]:
            raise ValueError("sshkey: not a PEM or OpenSSH private key")
        hk = params.get("sshhostkey")
        if hk not in (None, ""):
            if not isinstance(hk, str):
                raise ValueError("sshhostkey: must be a string")
            ok, _ = library_status()
            if ok:
                parse_host_key(hk)

    def secrets(self) -> list[str]:
        return [self._key_text]

    def destination(self) -> str:
        return f"sftp://{self.user}@{self.host}:{self.port}/{self.dir.lstrip('/')}" \
            if self.dir.startswith("/") else \
            f"sftp://{self.user}@{self.host}:{self.port}/~/{self.dir}"

    # -- connection ----------------------------------------------------------------------
    def _check_host_key(self, key) -> None:
        import paramiko
        name = _known_hosts_name(self.host, self.port)
        hk = self.params.get("sshhostkey")
        if hk:
            want = parse_host_key(hk)
            if want.get_name() == key.get_name() and want.asbytes() == key.asbytes():
                return
            raise PermanentStorageError(
                f"host key mismatch for {name}: server offered {_fingerprint(key)}, "
                f"sshhostkey says {_fingerprint(want)}")
        files = [f for f in (self.node.get("known_hosts"), self.tofu_file) if f]
        seen_other = None
        for path in files:
            if not os.path.exists(path):
                continue
            hostkeys = paramiko.HostKeys()
            try:
                hostkeys.load(path)
            except (OSError, Exception):
                continue
            entry = hostkeys.lookup(name)
            if not entry:
                continue
            if key.get_name() in entry:
                if entry[key.get_name()].asbytes() == key.asbytes():
                    return
                seen_other = entry[key.get_name()]
            elif entry:
                seen_other = next(iter(entry.values()))
        if seen_other is not None:
            raise PermanentStorageError(
                f"host key mismatch for {name}: server offered {_fingerprint(key)}, "
                f"known_hosts has {_fingerprint(seen_other)}")
        if self.node.get("trust_on_first_use") and self.tofu_file:
            with self._lock:
                with open(self.tofu_file, "a") as f:
                    f.write(f"{name} {key.get_name()} {key.get_base64()}\n")
            return
        raise PermanentStorageError(
            f"host key of {name} ({_fingerprint(key)}) is unknown: give it in sshhostkey "
            f"or the node's known_hosts")

    def _connect(self):
        import paramiko
        if self._pkey is None:
            self._pkey = load_private_key(self._key_text)
        where = f"{self.host}:{self.port}"
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except OSError as e:
            raise TransientStorageError(f"cannot connect to {where}: {e.strerror or e}") from None
        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = CONNECT_TIMEOUT
            transport.start_client(timeout=CONNECT_TIMEOUT)
            self._check_host_key(transport.get_remote_server_key())
            try:
                transport.auth_publickey(self.user, self._pkey)
            except paramiko.AuthenticationException:
                raise PermanentStorageError(
                    f"authentication failed for {self.user}@{where} with the given sshkey "
                    f"({self._pkey.get_name()})") from None
            sftp = paramiko.SFTPClient.from_transport(transport)
            sftp.get_channel().settimeout(IO_TIMEOUT)
        except PermanentStorageError:
            transport.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as e:
            transport.close()
            raise TransientStorageError(f"SSH session to {where} failed: {e}") from None
        with self._lock:
            self._conns.append((transport, sftp))
        return transport, sftp

    def _sftp(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or not conn[0].is_active():
            if conn is not None:
                self._drop()
            conn = self._connect()
            self._local.conn = conn
        return conn[1]

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn[0].close()
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for transport, _ in conns:
            try:
                transport.close()
            except Exception:
                pass

    def _io(self, what: str, fn):
        """Run one SFTP operation, mapping failures to Transient/Permanent errors."""
        import paramiko
        try:
            return fn(self._sftp())
        except PermanentStorageError:
            raise
        except TransientStorageError:
            self._drop()
            raise
        except PermissionError as e:
            raise PermanentStorageError(f"{what}: permission denied") from None
        except FileNotFoundError:
            raise
        except (paramiko.SSHException, OSError, EOFError, socket.timeout) as e:
            self._drop()
            raise TransientStorageError(f"{what}: {e.strerror if isinstance(e, OSError) and e.strerror else e or type(e).__name__}") from None

    def _ensure_dir(self, sftp) -> None:
        if self._dir_ready:
            return
        parts = [p for p in self.dir.split("/") if p]
        path = "/" if self.dir.startswith("/") else ""
        for p in parts:
            path = posixpath.join(path, p) if path else p
            try:
                st = sftp.stat(path)
                if not statmod.S_ISDIR(st.st_mode):
                    raise PermanentStorageError(f"{path} exists and is not a directory")
            except FileNotFoundError:
                try:
                    sftp.mkdir(path)
                except OSError:
                    # created meanwhile by another worker?
                    st = sftp.stat(path)
                    if not statmod.S_ISDIR(st.st_mode):
                        raise
        self._dir_ready = True

    # -- the interface -------------------------------------------------------------------
    def put(self, local_path: str, remote_name: str) -> Receipt:
        if "/" in remote_name:
            raise PermanentStorageError(f"bad remote name {remote_name!r}")
        final = posixpath.join(self.dir, remote_name)
        tmp = posixpath.join(self.dir, "." + remote_name + ".gims-part")
        size = os.path.getsize(local_path)

        def do(sftp):
            self._ensure_dir(sftp)
            try:
                sftp.put(local_path, tmp, confirm=False)
            except FileNotFoundError:
                raise PermanentStorageError(f"upload to {tmp}: no such directory") from None
            try:
                sftp.posix_rename(tmp, final)
            except OSError:
                # server without posix-rename@openssh.com: plain rename refuses to overwrite
                try:
                    sftp.remove(final)
                except FileNotFoundError:
                    pass
                sftp.rename(tmp, final)
            return sftp.stat(final).st_size

        got = self._io(f"upload to {self.host}:{final}", do)
        if got != size:
            raise TransientStorageError(f"size after upload of {final} is {got}, expected {size}")
        return Receipt(uri=self.uri(remote_name), size=size, sha256=None)

    def verify(self, remote_name: str, size: int, sha256: str | None) -> bool:
        # SFTP has no server-side digest (OpenSSH lacks check-file): size is what it can prove.
        final = posixpath.join(self.dir, remote_name)
        try:
            return self._io(f"stat {final}", lambda s: s.stat(final).st_size) == size
        except FileNotFoundError:
            return False

    def read(self, remote_name: str) -> bytes:
        final = posixpath.join(self.dir, remote_name)

        def do(sftp):
            with sftp.open(final, "rb") as f:
                return f.read()
        return self._io(f"read {final}", do)

    def delete(self, remote_name: str) -> None:
        final = posixpath.join(self.dir, remote_name)
        try:
            self._io(f"delete {final}", lambda s: s.remove(final))
        except FileNotFoundError:
            pass
