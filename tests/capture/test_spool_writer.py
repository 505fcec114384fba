"""The spool's HashingFile: what it writes and hashes is exactly what it was given, whatever the
write sizes, and it starts the disk write-out as the file grows (so the fsync before publishing
a file does not wait for all of it)."""

import hashlib
import os

import numpy as np

from capture_daemon import spool


def _pieces(rng, total):
    """Writes of mixed sizes (tiny live batches to multi-MiB offline chunks), as bytes and
    numpy arrays, adding up to total bytes."""
    out, left = [], total
    while left:
        n = int(min(left, rng.choice([1, 100, 70_000, 300_000, 3 << 20])))
        data = rng.integers(0, 256, n, dtype=np.uint8)
        out.append(data if len(out) % 2 else data.tobytes())
        left -= n
    return out


def test_file_and_digest_are_the_bytes_written(tmp_path):
    rng = np.random.default_rng(5)
    pieces = _pieces(rng, 21 << 20)
    path = str(tmp_path / ".f.tmp")
    f = spool.HashingFile(path)
    for p in pieces:
        f.write(p)
    f.finish()
    expected = b"".join(bytes(p) for p in pieces)
    with open(path, "rb") as fh:
        assert fh.read() == expected
    assert f.size == len(expected)
    assert f.sha256.hexdigest() == hashlib.sha256(expected).hexdigest()


def test_write_out_is_started_as_the_file_grows(tmp_path, monkeypatch):
    assert spool._SYNC_FILE_RANGE is not None, "libc has no sync_file_range on this Linux?"
    calls = []
    real = spool.start_writeback
    monkeypatch.setattr(spool, "start_writeback", lambda fd: (calls.append(fd), real(fd)))
    f = spool.HashingFile(str(tmp_path / ".g.tmp"))
    total = 5 * spool.WRITEBACK_BYTES + 123
    for p in _pieces(np.random.default_rng(6), total):
        f.write(p)
    f.finish()
    # one call per WRITEBACK_BYTES handed to the writer thread (hand-overs may straddle)
    assert 4 <= len(calls) <= 5
    assert os.path.getsize(tmp_path / ".g.tmp") == total
