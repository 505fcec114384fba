"""S3 (and S3-compatible) storage with boto3.

- key = file name under an optional ``s3prefix``;
- single PUT below the multipart threshold with Content-MD5 *and* a SHA-256 checksum the server
  checks; multipart above it (TransferConfig) with ChecksumAlgorithm=SHA256 per part. Either way
  the final key appears atomically: an interrupted upload leaves nothing under the final name and
  is simply sent again;
- botocore's ``standard`` retry mode for throttling/5xx inside one attempt;
- endpoint URL from ``s3endpoint`` or the node default; the bucket is created only when the
  operator set ``create_bucket``.
"""
from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from .base import (CHUNK, PermanentStorageError, Receipt, StorageBackend,
                   TransientStorageError)

STORAGETYPE = "s3"

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024

#: S3 error codes that waiting will not fix.
PERMANENT_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "AllAccessDisabled",
    "NoSuchBucket", "InvalidBucketName", "AccountProblem", "InvalidToken", "ExpiredToken",
    "AuthorizationHeaderMalformed", "InvalidRequest", "InvalidArgument", "MethodNotAllowed",
    "403", "404", "NoSuchKey", "PermanentRedirect", "InvalidObjectState",
}

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")


def library_status() -> tuple[bool, str]:
    try:
        from ._botocompat import ensure_botocore_importable
        ensure_botocore_importable()
        import boto3  # noqa: F401
    except Exception as e:
        return False, f"boto3 not importable: {type(e).__name__}: {e}"
    return True, f"boto3 {boto3.__version__}"


def _first(params: dict[str, Any], *names: str) -> Any:
    for n in names:
        if params.get(n) not in (None, ""):
            return params[n]
    return None


def _hashes(path: str) -> tuple[int, bytes, bytes]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return size, md5.digest(), sha.digest()


class Backend(StorageBackend):
    storagetype = STORAGETYPE

    def __init__(self, experiment: str, params: dict[str, Any], node: dict[str, Any]):
        super().__init__(experiment, params, node)
        self.bucket = params["s3bucket"]
        self.prefix = (params.get("s3prefix") or "").strip("/")
        self.endpoint = params.get("s3endpoint") or self.node.get("s3_endpoint") or None
        self.region = params.get("s3region") or self.node.get("s3_region") or "us-east-1"
        self._key_id = _first(params, "s3key", "s3accesskey")
        self._secret = _first(params, "s3secret", "s3secretkey")
        self.multipart_threshold = int(self.node.get("s3_multipart_threshold") or MULTIPART_THRESHOLD)
        self.multipart_chunksize = int(self.node.get("s3_multipart_chunksize") or MULTIPART_CHUNKSIZE)
        self._client = None
        self._bucket_checked = False
        #: name -> (size, sha256) the server accepted with checksums it verified (single PUT);
        #: used by verify() when the credentials may write but not read (HEAD forbidden)
        self._accepted: dict[str, tuple[int, str]] = {}

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        if not _first(params, "s3key", "s3accesskey"):
            raise ValueError("s3key: required (or s3accesskey)")
        if not _first(params, "s3secret", "s3secretkey"):
            raise ValueError("s3secret: required (or s3secretkey)")
        for k in ("s3key", "s3accesskey", "s3secret", "s3secretkey"):
            if params.get(k) is not None and not isinstance(params[k], str):
                raise ValueError(f"{k}: must be a string")
        b = params.get("s3bucket")
        if not isinstance(b, str) or not _BUCKET_RE.match(b):
            raise ValueError("s3bucket: required, 3-255 characters of letters, digits, '.', '_', '-'")
        ep = params.get("s3endpoint")
        if ep not in (None, "") and (not isinstance(ep, str) or not re.match(r"^https?://[^\s/]+", ep)):
            raise ValueError("s3endpoint: must be an http:// or https:// URL")
        pre = params.get("s3prefix")
        if pre not in (None, "") and (not isinstance(pre, str) or "\0" in pre or ".." in pre.split("/")):
            raise ValueError("s3prefix: must be a plain key prefix")

    def secrets(self) -> list[str]:
        return [s for s in (self._secret, self._key_id) if s]

    def destination(self) -> str:
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}"

    def uri(self, remote_name: str) -> str:
        return f"s3://{self.bucket}/{self.key(remote_name)}"

    def key(self, remote_name: str) -> str:
        return f"{self.prefix}/{remote_name}" if self.prefix else remote_name

    # -- client and errors ---------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from ._botocompat import ensure_botocore_importable
            ensure_botocore_importable()
            import boto3
            from botocore.config import Config
            s3cfg = {"addressing_style": "path"} if self.endpoint else {}
            cfg = Config(retries={"mode": "standard", "max_attempts": 3},
                         connect_timeout=10, read_timeout=60, s3=s3cfg,
                         signature_version="s3v4",
                         max_pool_connections=max(10, 4 * int(self.node.get("parallel") or 4)))
            session = boto3.session.Session()
            self._client = session.client(
                "s3", endpoint_url=self.endpoint, region_name=self.region,
                aws_access_key_id=self._key_id, aws_secret_access_key=self._secret, config=cfg)
        return self._client

    def _error(self, what: str, e: Exception) -> Exception:
        from botocore import exceptions as bx
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = f"{what}: {code}" + (f" (HTTP {status})" if status else "")
            if code == "NoSuchBucket" or (code == "404" and "bucket" in what):
                return PermanentStorageError(f"{what}: bucket {self.bucket} does not exist")
            if code in PERMANENT_CODES or status in (400, 401, 403, 404, 405):
                reason = {"InvalidAccessKeyId": "access key not recognised (check s3key)",
                          "SignatureDoesNotMatch": "signature mismatch (check s3secret)",
                          "AccessDenied": "access denied"}.get(code)
                return PermanentStorageError(msg + (f": {reason}" if reason else ""))
            return TransientStorageError(msg)
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return PermanentStorageError(f"{what}: no usable credentials")
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectionError,
                          bx.ConnectionClosedError, bx.ReadTimeoutError,
                          bx.ConnectTimeoutError)):
            return TransientStorageError(f"{what}: cannot reach {self.endpoint or 'S3'}")
        if isinstance(e, OSError):
            return TransientStorageError(f"{what}: {e.strerror or e}")
        if isinstance(e, bx.BotoCoreError):
            return TransientStorageError(f"{what}: {type(e).__name__}")
        return TransientStorageError(f"{what}: {type(e).__name__}")

    def _check_bucket(self) -> None:
        if self._bucket_checked:
            return
        from botocore import exceptions as bx
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            if code in ("404", "NoSuchBucket") and self.node.get("create_bucket"):
                try:
                    kw = {} if self.region == "us-east-1" else {
                        "CreateBucketConfiguration": {"LocationConstraint": self.region}}
                    self.client.create_bucket(Bucket=self.bucket, **kw)
                except Exception as e2:
                    raise self._error(f"create bucket {self.bucket}", e2) from None
            elif code in ("404", "NoSuchBucket"):
                raise PermanentStorageError(
                    f"bucket {self.bucket} does not exist (the node does not create buckets "
                    f"unless create_bucket is set)") from None
            elif code in ("403", "AccessDenied", "Forbidden"):
                # HEAD answers carry no error code: bad key, bad secret and a policy without
                # s3:ListBucket all look alike. The PUT that follows says which (or succeeds,
                # for upload-only credentials).
                return
            else:
                raise self._error(f"bucket {self.bucket}", e) from None
        except Exception as e:
            raise self._error(f"bucket {self.bucket}", e) from None
        self._bucket_checked = True

    # -- the interface -------------------------------------------------------------------
    def put(self, local_path: str, remote_name: str) -> Receipt:
        self._check_bucket()
        key = self.key(remote_name)
        try:
            size, md5, sha = _hashes(local_path)
        except OSError as e:
            raise TransientStorageError(f"read {local_path}: {e.strerror}") from None
        meta = {"gims-sha256": sha.hex()}
        try:
            if size < self.multipart_threshold:
                with open(local_path, "rb") as f:
                    resp = self.client.put_object(
                        Bucket=self.bucket, Key=key, Body=f, ContentLength=size,
                        ContentMD5=base64.b64encode(md5).decode(),
                        ChecksumSHA256=base64.b64encode(sha).decode(), Metadata=meta)
                # the server refuses a body that does not match Content-MD5 / the SHA-256
                # checksum, so a 200 here is proof of what it stored
                if resp.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200:
                    self._accepted[remote_name] = (size, sha.hex())
            else:
                from boto3.s3.transfer import TransferConfig
                cfg = TransferConfig(multipart_threshold=self.multipart_threshold,
                                     multipart_chunksize=self.multipart_chunksize,
                                     max_concurrency=4, use_threads=True)
                self.client.upload_file(local_path, self.bucket, key, Config=cfg,
                                        ExtraArgs={"ChecksumAlgorithm": "SHA256",
                                                   "Metadata": meta})
        except Exception as e:
            raise self._error(f"upload s3://{self.bucket}/{key}", e) from None
        return Receipt(uri=self.uri(remote_name), size=size, sha256=sha.hex())

    def _head(self, remote_name: str) -> dict | None:
        from botocore import exceptions as bx
        key = self.key(remote_name)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except bx.ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(f"head s3://{self.bucket}/{key}", e) from None
        except Exception as e:
            raise self._error(f"head s3://{self.bucket}/{key}", e) from None

    def verify(self, remote_name: str, size: int, sha256: str | None) -> bool:
        try:
            head = self._head(remote_name)
        except PermanentStorageError:
            acc = self._accepted.get(remote_name)
            if acc and acc[0] == size and (sha256 is None or acc[1] == sha256):
                return True  # write-only credentials: the checksummed PUT is the proof
            raise
        if head is None or int(head.get("ContentLength", -1)) != size:
            return False
        if sha256 is None:
            return True
        server_sum = head.get("ChecksumSHA256")
        multipart = "-" in str(head.get("ETag", "")) or "-" in str(server_sum or "")
        if server_sum and not multipart:  # whole-object checksum computed by the server
            return base64.b64decode(server_sum).hex() == sha256
        # multipart: the server checked every part's SHA-256; the whole-file digest rides along
        return (head.get("Metadata") or {}).get("gims-sha256") == sha256

    def read(self, remote_name: str) -> bytes:
        key = self.key(remote_name)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as e:
            raise self._error(f"read s3://{self.bucket}/{key}", e) from None

    def delete(self, remote_name: str) -> None:
        key = self.key(remote_name)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            raise self._error(f"delete s3://{self.bucket}/{key}", e) from None

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
