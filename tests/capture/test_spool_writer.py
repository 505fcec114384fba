"""The spool's HashingFile: what it writes and hashes is exactly what it was given, whatever the
write sizes, written with O_DIRECT where the file system has it (DirectWriter) and through the
page cache where not; through the page cache it starts the disk write-out as the file grows (so
the fsync before publishing a file does not wait for all of it).

tmp_path is on the root file system here (ext4 in CI), which has O_DIRECT."""

import errno
import hashlib
import json
import os
import threading
import time

import numpy as np
import pytest

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


def _write_all(path, pieces):
    f = spool.HashingFile(path)
    direct = isinstance(f._out, spool.DirectWriter)
    for p in pieces:
        f.write(p)
    f.finish()
    return f, direct


def _intercept_direct_writes(monkeypatch, before):
    """Every pwrite on a DirectWriter's O_DIRECT descriptor calls before() first (which may
    raise, as a file system that refuses, or wait, as a disk that stalls); returns the list of
    the DirectWriters opened."""
    writers = []
    real_open = spool.DirectWriter.open.__func__
    real_pwrite = os.pwrite

    def remember(cls, path, fd):
        w = real_open(cls, path, fd)
        writers.append(w)
        return w

    def pwrite(fd, data, offset):
        if any(w.fd == fd for w in writers):
            before()
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(spool.DirectWriter, "open", classmethod(remember))
    monkeypatch.setattr(spool.os, "pwrite", pwrite)
    return writers


def _check(path, f, pieces):
    expected = b"".join(bytes(p) for p in pieces)
    with open(path, "rb") as fh:
        assert fh.read() == expected
    assert f.size == len(expected)
    assert f.sha256.hexdigest() == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("total", [21 << 20, spool.DIRECT_STAGE_BYTES, 4096 * 3, 4095, 1, 0])
def test_file_and_digest_are_the_bytes_written(tmp_path, total):
    """Direct: whole stages, a stage exactly full, whole blocks only, a lone partial block."""
    pieces = _pieces(np.random.default_rng(5 + total), total)
    path = str(tmp_path / ".f.tmp")
    f, direct = _write_all(path, pieces)
    assert direct, "O_DIRECT is not available under tmp_path: the direct writer went untested"
    _check(path, f, pieces)


def test_a_file_system_without_o_direct_is_written_through_the_page_cache(tmp_path, monkeypatch):
    """Where open(O_DIRECT) fails (EINVAL: tmpfs before Linux 6.6, so bookworm's 6.1; this
    machine's newer kernel accepts it, so the refusal is simulated here), the same bytes go
    through the page cache."""
    real_open = os.open

    def open_without_direct(path, flags, *args, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(spool.os, "open", open_without_direct)
    pieces = _pieces(np.random.default_rng(7), 9 << 20)
    path = str(tmp_path / ".p.tmp")
    f, direct = _write_all(path, pieces)
    assert not direct
    _check(path, f, pieces)


def test_o_direct_writes_refused_after_the_open_go_the_plain_way(tmp_path, monkeypatch):
    """Some file systems accept open(O_DIRECT) and refuse the writes (EINVAL): simulated here
    (this machine's file systems take them), the file is still written whole and right."""
    def refuse():
        raise OSError(errno.EINVAL, "Invalid argument")

    _intercept_direct_writes(monkeypatch, refuse)
    pieces = _pieces(np.random.default_rng(9), 11 << 20)
    path = str(tmp_path / ".e.tmp")
    f, direct = _write_all(path, pieces)
    assert direct and f._out.plain_only
    _check(path, f, pieces)


def test_staged_bytes_reach_the_file_when_the_writer_catches_up(tmp_path):
    """A slow capture's bytes do not wait in the stage for 4 MiB: once the writer has nothing
    more to do, what is staged (from DIRECT_IDLE_FLUSH on) goes to the file, whole blocks."""
    path = str(tmp_path / ".s.tmp")
    f = spool.HashingFile(path)
    assert isinstance(f._out, spool.DirectWriter)
    n = spool.DIRECT_IDLE_FLUSH + 5000
    f.write(os.urandom(n))
    f._hand_over()
    deadline = time.monotonic() + 5
    while os.path.getsize(path) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.path.getsize(path) == n - n % spool.DIRECT_ALIGN
    f.finish()
    assert os.path.getsize(path) == n


def test_detach_leaves_every_staged_byte_in_the_file(tmp_path):
    """Recovery cuts a temp file at its last whole record: it must find all that was written."""
    path = str(tmp_path / ".d.tmp")
    f = spool.HashingFile(path)
    data = os.urandom(10_000)
    f.write(data)
    f.detach()
    with open(path, "rb") as fh:
        assert fh.read() == data


def test_write_out_is_started_as_the_file_grows(tmp_path, monkeypatch):
    """Through the page cache (a file system without O_DIRECT)."""
    assert spool._SYNC_FILE_RANGE is not None, "libc has no sync_file_range on this Linux?"
    monkeypatch.setattr(spool.DirectWriter, "open", classmethod(lambda cls, path, fd: None))
    calls = []
    real = spool.start_writeback
    monkeypatch.setattr(spool, "start_writeback", lambda fd: (calls.append(fd), real(fd)))
    f = spool.HashingFile(str(tmp_path / ".g.tmp"))
    total = 5 * spool.WRITEBACK_BYTES + 123
    for p in _pieces(np.random.default_rng(6), total):
        f.write(p)
    f.finish()
    # one call per WRITEBACK_BYTES written (a piece may straddle the mark)
    assert 4 <= len(calls) <= 5
    assert os.path.getsize(tmp_path / ".g.tmp") == total


def test_an_error_of_the_disk_thread_is_raised_by_finish_and_detach_still_closes(tmp_path, monkeypatch):
    """The stages are written by an I/O thread of their own: its error (ENOSPC here, simulated
    on the direct descriptor) must reach the capture through write() or finish(), and detach() must still
    stop the thread and close the file."""
    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    writers = _intercept_direct_writes(monkeypatch, full)
    f = spool.HashingFile(str(tmp_path / ".n.tmp"))
    with pytest.raises(OSError) as err:  # from a later write(), or at the latest from finish()
        for _ in range(3):
            f.write(os.urandom(spool.DIRECT_STAGE_BYTES))
        f.finish()
    assert err.value.errno == errno.ENOSPC
    f.detach()
    w = writers[0]
    assert w.fd == -1 and not [t for t in threading.enumerate() if t.name.startswith("gims-disk")]
    assert all(stage.closed for stage in w._stages)  # the error kept no view of them alive


def _stalled_disk(monkeypatch):
    """Every O_DIRECT write waits until the returned event is set: a disk that stalls."""
    release = threading.Event()
    _intercept_direct_writes(monkeypatch, lambda: release.wait(30))
    return release


def _writes_while_stalled(path, backlog, total, piece):
    """How many bytes write() accepts within 2 s while the disk is stalled."""
    f = spool.HashingFile(path, backlog)
    accepted = []

    def capture():
        for _ in range(total // piece):
            f.write(bytes(piece))
            accepted.append(piece)

    t = threading.Thread(target=capture, daemon=True)
    t.start()
    t.join(2)
    return f, t, sum(accepted)


def test_a_stalled_disk_does_not_stop_a_live_capture_before_its_backlog_is_full(tmp_path, monkeypatch):
    """While the disk stalls, a live capture's writes still return (the capture thread goes on
    reading the interface) until LIVE_BACKLOG_BYTES wait in memory; a savefile's reader waits
    after OFFLINE_BACKLOG_BYTES. Nothing is lost either way once the disk comes back."""
    release = _stalled_disk(monkeypatch)
    piece = spool.HashingFile.HANDOVER_BYTES
    live, live_t, live_ok = _writes_while_stalled(str(tmp_path / ".l.tmp"), spool.LIVE_BACKLOG_BYTES,
                                                  64 << 20, piece)
    off, off_t, off_ok = _writes_while_stalled(str(tmp_path / ".o.tmp"), spool.OFFLINE_BACKLOG_BYTES,
                                               64 << 20, piece)
    try:
        assert live_ok == 64 << 20 and not live_t.is_alive()  # all of it, disk still stalled
        # the offline writer waits once its backlog (plus the stages the thread has filled) is full
        assert off_t.is_alive() and off_ok <= spool.OFFLINE_BACKLOG_BYTES + 2 * spool.DIRECT_STAGE_BYTES + piece
    finally:
        release.set()
    off_t.join(30)
    for f in (live, off):
        f.finish()
        assert os.path.getsize(f.path) == f.size == 64 << 20


def test_a_status_write_stalled_by_the_disk_does_not_hold_up_the_capture(tmp_path, monkeypatch):
    """The capture thread hands .gims-status.json's content to a thread of its own: with that
    write stalled, write_status returns at once, a newer status replaces the one waiting, and
    wait=True (the last status, at exit) returns once the newest is in the file."""
    s = spool.Spool(str(tmp_path), "e", "S", "pcap")
    s.write_status({"state": "running", "n": 0}, wait=True)  # creates the file (no stall yet)
    release, entered = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if fd == s._status_fd:
            entered.set()
            release.wait(30)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(spool.os, "pwrite", pwrite)
    t0 = time.monotonic()
    s.write_status({"state": "running", "n": 1})
    assert entered.wait(5)  # the writer thread is now stuck in the write
    for n in range(2, 50):
        s.write_status({"state": "running", "n": n})
    assert time.monotonic() - t0 < 1  # none of them waited for the disk
    done = threading.Thread(target=s.write_status, args=({"state": "stopped", "n": 50},),
                            kwargs={"wait": True})
    done.start()
    done.join(0.3)
    assert done.is_alive()  # the last status waits for the disk...
    release.set()
    done.join(5)
    assert not done.is_alive()
    with open(tmp_path / ".gims-status.json") as fh:  # ...and is what the file holds after it
        assert json.load(fh)["n"] == 50


def _file_with(s, start_time, data):
    of = s.open(start_time)
    of.file.write(data)
    return of


def test_a_rotation_does_not_wait_for_the_disk_to_sync(tmp_path, monkeypatch):
    """At a rotation the closed file is committed by a thread of its own (Spool.commit_later):
    with every fsync stalled, handing it over returns at once, the next file is written
    meanwhile, and once the disk syncs the file is published and counted, in order."""
    s = spool.Spool(str(tmp_path), "e", "S", "pcap")
    release = threading.Event()
    real_fsync = os.fsync
    monkeypatch.setattr(spool.os, "fsync", lambda fd: (release.wait(30), real_fsync(fd)))
    monkeypatch.setattr("capture_daemon.atomic.os.fsync", lambda fd: (release.wait(30), real_fsync(fd)))
    a = _file_with(s, 1000.0, os.urandom(300_000))
    t0 = time.monotonic()
    s.commit_later(a, {"n": 1})
    b = _file_with(s, 1001.0, os.urandom(1000))  # the capture goes on into the next file
    assert time.monotonic() - t0 < 1
    assert s.committed() == [] and s.files_written == 0
    assert s.committing_bytes == 300_000  # the quota still counts it
    release.set()
    done = s.committed(wait=True)
    assert [(of.name, os.path.basename(p)) for of, p in done] == [(a.name, a.name)]
    assert (s.files_written, s.bytes_written, s.committing_bytes) == (1, 300_000, 0)
    with open(tmp_path / (a.name + ".meta.json")) as fh:
        assert json.load(fh)["sha256"] == a.file.sha256.hexdigest()
    s.commit(b, {"n": 2})
    assert s.files_written == 2


def test_a_background_commit_that_finds_the_disk_full_leaves_the_file_for_recovery(tmp_path, monkeypatch):
    """ENOSPC in the committer: handed back as the outcome, the temp file left (detached)
    for recovery, nothing counted."""
    s = spool.Spool(str(tmp_path), "e", "S", "pcap")

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "write_json_atomic", full)
    a = _file_with(s, 1000.0, os.urandom(5000))
    s.commit_later(a, {})
    [(of, result)] = s.committed(wait=True)
    assert of is a and isinstance(result, OSError) and result.errno == errno.ENOSPC
    assert (s.files_written, s.bytes_written, s.committing_bytes) == (0, 0, 0)
    assert not (tmp_path / (a.name + ".meta.json")).exists()


def _hidden(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))


def test_a_prepared_file_is_opened_without_touching_the_disk(tmp_path, monkeypatch):
    """prepare(t) creates the file for start time t in a thread of its own; open(t) then takes
    it without a file system call (creating it is what blocks on a stalled file system), and
    the file is written and committed like any other."""
    s = spool.Spool(str(tmp_path), "e", "S", "pcap")
    s.prepare(1000.0)
    s._prepared[1].result(10)  # made in the background
    assert _hidden(tmp_path) == [".e_S_19700101001640.pcap.tmp"]

    def no_disk(*args, **kwargs):
        raise AssertionError("open() touched the file system")

    monkeypatch.setattr(spool, "OpenFile", no_disk)
    monkeypatch.setattr(spool.os, "open", no_disk)
    of = s.open(1000.0)
    monkeypatch.undo()
    assert of.start_time == 1000.0 and of.name == "e_S_19700101001640.pcap"
    data = os.urandom(10_000)
    of.file.write(data)
    final = s.commit(of, {})
    with open(final, "rb") as fh:
        assert fh.read() == data
    s.discard_prepared(wait=True)  # nothing prepared: nothing to do
    assert _hidden(tmp_path) == []


def test_a_prepared_file_not_taken_is_removed(tmp_path):
    """A prepared file for another start time (a rotation requested by SIGHUP, a quiet spell)
    is not taken: open() creates the right one, and discard_prepared removes the unused one;
    so does prepare() for a later start time."""
    s = spool.Spool(str(tmp_path), "e", "S", "pcap")
    s.prepare(1000.0)
    of = s.open(999.0)
    assert of.name == "e_S_19700101001639.pcap"
    s.prepare(1001.0)  # the one for 1000 goes
    s.discard_prepared(wait=True)
    assert _hidden(tmp_path) == [f".{of.name}.tmp"]
    assert not [t for t in threading.enumerate() if t.name == "gims-writer" and t.is_alive()
                and t is not of.file._thread]
    s.commit(of, {})
    assert _hidden(tmp_path) == []


def test_a_prepared_file_that_could_not_be_made_is_made_at_open(tmp_path, monkeypatch):
    """prepare() on a full disk: the error is not lost, open() creates the file itself and
    raises what the disk says then."""
    s = spool.Spool(str(tmp_path), "e", "S", "pcap")
    real = spool.OpenFile
    full = {"on": True}

    def open_file(*args, **kwargs):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(spool, "OpenFile", open_file)
    s.prepare(1000.0)
    s._prepared[1].exception(10)
    with pytest.raises(OSError) as e:
        s.open(1000.0)
    assert e.value.errno == errno.ENOSPC
    s.prepare(2000.0)
    s._prepared[1].exception(10)
    full["on"] = False  # room again
    of = s.open(2000.0)
    assert of.start_time == 2000.0
    s.commit(of, {})
    assert s.files_written == 1
