"""Work around a paramiko 2.x hot spot that costs about half of an SFTP upload's CPU time.

paramiko.common.asbytes(msg) first tries ``b(msg)``, which for a Message (every SSH packet
sent) raises TypeError with ``repr(msg)`` in its text: a repr of the whole 32 KiB packet, built
and thrown away per packet. paramiko 3 checks for ``asbytes()`` first. Here ``b`` as seen by
paramiko.common gets the same semantics without the eager repr; nothing else changes.
"""


def _b(s, encoding="utf8"):
    if isinstance(s, bytes):
        return s
    if isinstance(s, str):
        return s.encode(encoding)
    raise TypeError("expected str or bytes")


def speed_up_paramiko() -> None:
    try:
        import paramiko.common as common
    except Exception:
        return
    if getattr(common, "b", None) is not None and getattr(common.b, "__module__", "") \
            == "paramiko.py3compat":
        common.b = _b
