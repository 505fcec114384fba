"""Make Debian's botocore importable next to a newer pip ``cryptography``.

botocore 1.29 imports ``urllib3.contrib.pyopenssl`` if it can. In a venv where pip installed a
newer cryptography (moto[server] pulls one in) Debian's pyOpenSSL 23 fails to import with an
AttributeError, which botocore does not expect (it only catches ImportError), so ``import boto3``
crashes. botocore falls back to the standard ssl module when that import raises ImportError;
marking the module as absent gets exactly that. Nothing changes where pyOpenSSL works (the
Debian package's own install).
"""
import sys


def ensure_botocore_importable() -> None:
    if "urllib3.contrib.pyopenssl" in sys.modules:
        return
    try:
        import OpenSSL.SSL  # noqa: F401
    except ImportError:
        return  # botocore handles a missing pyOpenSSL itself
    except Exception:
        sys.modules["urllib3.contrib.pyopenssl"] = None  # type: ignore[assignment]
