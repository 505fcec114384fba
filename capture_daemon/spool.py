"""The spool writer: data files appear in the output directory only when complete.

Each file is written as ``.<name>.tmp`` (hidden: the upload .path unit ignores dot files),
hashed while it is written, fsynced and renamed into place; then its metadata record
``<name>.meta.json`` is written the same way and the directory is fsynced. A data file is
complete iff its metadata record exists (docs/ARCHITECTURE.md, "The spool").
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import json
import mmap
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone

from . import libc
from .atomic import fsync_dir, write_json_atomic

WRITE_PIECE_BYTES = 1 << 20   # largest single write() (see HashingFile._drain)
WRITEBACK_BYTES = 8 << 20     # start the disk write-out every this many bytes (see start_writeback)
DIRECT_STAGE_BYTES = 4 << 20  # the direct writer's aligned staging buffer (one write() when full)
DIRECT_ALIGN = 4096           # O_DIRECT offsets and lengths: a multiple of every usual block size
DIRECT_IDLE_FLUSH = 256 << 10  # staged bytes written out when the writer has caught up (see
                               # DirectWriter.caught_up: about what the capture thread holds
                               # back itself before a hand-over, HashingFile.HANDOVER_BYTES)
# Bytes handed to a file's writer thread and not yet written, before write() waits for it
# (HashingFile.backlog_bytes). Reading a savefile, waiting costs nothing but time, so a few
# batches suffice and memory stays small. A live capture cannot wait: while write() waits the
# capture is not read, and once the kernel's buffer is full packets are dropped. With O_DIRECT
# nothing between the capture and the disk absorbs a disk that stalls for a moment (the page
# cache did that for buffered writes), so a live capture keeps up to this much in memory
# (only while the disk is behind; what waits there dies with the process, as what waits in
# the kernel's capture buffer does).
OFFLINE_BACKLOG_BYTES = 8 << 20
LIVE_BACKLOG_BYTES = 128 << 20


class HashingFile:
    """A binary file written and hashed (sha256) by a writer thread of its own.

    hashlib and file writes release the GIL on large buffers, so hashing and writing run
    on the second core while the capture loop prepares the next batch. Writes are queued up
    to backlog_bytes not yet written (memory stays bounded; see OFFLINE_BACKLOG_BYTES and
    LIVE_BACKLOG_BYTES), then write() waits for the thread; an error in the thread (ENOSPC) is
    raised by the next write() or by finish(). Small writes (a live capture's batches of a few
    hundred packets) are gathered to HANDOVER_BYTES before they go to the thread: one hand-over
    per batch cost a thread wake-up and GIL switch each, ~15 % of a live capture's CPU.
    """

    HANDOVER_BYTES = 256 << 10

    def __init__(self, path: str, backlog_bytes: int = OFFLINE_BACKLOG_BYTES):
        self.path = path
        self.backlog_bytes = backlog_bytes
        # Unbuffered: writes arrive gathered (HANDOVER_BYTES) and go out in WRITE_PIECE_BYTES;
        # a BufferedWriter copied every piece into its own buffer first (one more copy of every
        # output byte).
        self._f = open(path, "xb", buffering=0)
        # how the bytes reach the file: O_DIRECT where the file system takes it
        self._out = DirectWriter.open(path, self._f.fileno()) or PageCacheWriter(self._f)
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._error: OSError | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued_bytes = 0     # handed over, not yet written (guarded by _room)
        self._room = threading.Condition()
        self._held: list = []      # small writes not handed to the thread yet
        self._held_bytes = 0
        self._thread = threading.Thread(target=self._drain, name="gims-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            view = memoryview(data).cast("B")
            try:
                if self._error is None:
                    # In pieces: a write() of several MiB costs the kernel ~7x the CPU of the
                    # same bytes in 1 MiB writes (measured on ext4, docs/PERFORMANCE.md), and a
                    # piece hashed then written (or staged) stays in the CPU cache between the two.
                    for start in range(0, len(view), WRITE_PIECE_BYTES):
                        piece = view[start:start + WRITE_PIECE_BYTES]
                        self.sha256.update(piece)
                        self._out.write(piece)
                    if self._queue.empty():
                        self._out.caught_up()
            except OSError as exc:
                self._error = exc
            finally:
                with self._room:
                    self._queued_bytes -= len(view)
                    self._room.notify()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data) -> int:
        self._raise_pending()
        n = data.nbytes if hasattr(data, "nbytes") else len(data)
        self.size += n
        self._held.append(data)
        self._held_bytes += n
        if self._held_bytes >= self.HANDOVER_BYTES:
            self._hand_over()  # a lone large write goes as it is, without a join
        return n

    def _hand_over(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            n = self._held_bytes
            self._held, self._held_bytes = [], 0
            with self._room:  # a piece larger than the whole backlog still goes, alone
                while self._queued_bytes and self._queued_bytes + n > self.backlog_bytes:
                    self._room.wait()
                self._queued_bytes += n
            self._queue.put(data)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._hand_over()
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> None:
        self._stop()
        self._raise_pending()
        self._out.close()
        os.fsync(self._f.fileno())
        self._f.close()

    def detach(self) -> None:
        """Stop writing but leave the temp file for recovery (its tail may be torn)."""
        self._stop()
        try:  # what is staged still goes to the file: recovery keeps every whole record
            self._out.close()
        except OSError:
            pass
        try:
            self._f.close()
        except OSError:
            pass


class PageCacheWriter:
    """A file's bytes written through the page cache (where the file system has no O_DIRECT),
    with the disk write-out started every WRITEBACK_BYTES (see start_writeback). The same
    interface as DirectWriter: write(piece) in the writer thread, caught_up() when its queue is
    empty, close() before the fsync."""

    def __init__(self, f):
        self.f = f              # the unbuffered file object (HashingFile closes it)
        self.unsynced = 0       # bytes written since the last start_writeback

    def write(self, piece: memoryview) -> None:
        self.unsynced += len(piece)
        while len(piece):  # a raw write() may take less than it was given
            piece = piece[self.f.write(piece):]
        if self.unsynced >= WRITEBACK_BYTES:
            self.unsynced = 0
            start_writeback(self.f.fileno())

    def caught_up(self) -> None:
        """Nothing to do: written bytes are in the page cache already."""

    def close(self) -> None:
        """Nothing staged: the fsync that follows writes the rest."""


class DirectWriter:
    """A file's bytes written with O_DIRECT, from aligned staging buffers.

    Why: a buffered write() copies every output byte into the page cache, and the fsync before
    a file is published then writes it out, allocating its blocks, in the capture's own
    process. On this VM that copy was the capture's biggest cost whenever the page cache had
    to take memory the host had reclaimed (copy_folio_from_iter at half of all samples; the
    same 600 MB file took 0.2 to 1.9 s of system time buffered, 0.03 to 0.04 s direct:
    docs/PERFORMANCE.md); and a capture node's output, written once and uploaded, only evicts
    more useful pages from the cache. With O_DIRECT the disk reads the bytes straight from the
    staging buffer, which is copied into (cheap: it stays resident) and written out in
    aligned blocks; the last partial block goes through the ordinary descriptor (an O_DIRECT
    write must be a whole number of blocks) before the fsync, which then has only metadata
    and that block left to write.

    Two stages: while the disk writes one (an I/O thread of the writer's own waits for it), the
    writer thread hashes and stages into the other. With one stage written in the writer thread
    the hashing (~2.3 ms per 4 MiB) and the disk (~2.2 ms) took turns, the writer ran at half
    speed and the capture waited for it: a plain 600 MB copy took 1.1-1.3 s of wall clock for
    0.8 s of CPU (docs/PERFORMANCE.md). The second stage is allocated at the first write-out, so
    a file that never fills a stage never touches it.

    Bytes staged but not yet written are in no file: on the way to the disk they are what the
    writer thread's queue is in the buffered case, and the writer writes them out whenever it
    catches up with the capture (caught_up), so a crash loses no more than it did before
    (DIRECT_IDLE_FLUSH, about the capture thread's own hand-over size).
    """

    def __init__(self, fd: int, plain_fd: int):
        self.fd = fd              # O_DIRECT descriptor
        self.plain_fd = plain_fd  # the file's ordinary descriptor (the tail)
        self._stages = [mmap.mmap(-1, DIRECT_STAGE_BYTES)]   # page-aligned
        self.view = memoryview(self._stages[0])   # the stage being filled
        self._spare: memoryview | None = None     # the other one (being written, or free)
        self.fill = 0             # staged bytes
        self.pos = 0              # file offset of the stage's first byte
        self.plain_only = False   # O_DIRECT writes refused (EINVAL): the ordinary descriptor
        self._io: ThreadPoolExecutor | None = None  # the disk's thread, from the first write-out
        self._in_flight: Future | None = None       # the spare stage's write

    @classmethod
    def open(cls, path: str, plain_fd: int) -> "DirectWriter | None":
        """The direct writer of a file just created, or None where the file system has no
        O_DIRECT (tmpfs, some FUSE): the file is then written through the page cache."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except (OSError, AttributeError):
            return None
        try:
            return cls(fd, plain_fd)
        except BaseException:  # no memory for the stage: the descriptor must not leak
            os.close(fd)
            raise

    def write(self, data: memoryview) -> None:
        while len(data):
            n = min(len(data), DIRECT_STAGE_BYTES - self.fill)
            self.view[self.fill:self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == DIRECT_STAGE_BYTES:
                self._write_aligned()

    def caught_up(self) -> None:
        """Nothing more is waiting to be written: write what is staged if it is worth an I/O."""
        if self.fill >= DIRECT_IDLE_FLUSH:
            self._write_aligned()

    def _write_aligned(self) -> None:
        """Start writing the stage's whole blocks and go on in the other stage; a partial last
        block moves to the other stage's start."""
        whole = self.fill - self.fill % DIRECT_ALIGN
        if not whole:
            return
        self._wait()  # the other stage's write is done: it is free
        if self._spare is None:
            self._stages.append(mmap.mmap(-1, DIRECT_STAGE_BYTES))
            self._spare = memoryview(self._stages[1])
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="gims-disk")
        rest = self.fill - whole
        self._spare[:rest] = self.view[whole:self.fill]
        self._in_flight = self._io.submit(self._write_out, self.view, whole, self.pos)
        self.view, self._spare = self._spare, self.view
        self.fill = rest
        self.pos += whole

    def _wait(self) -> None:
        """Wait for the write in flight; its error (ENOSPC, EIO) is raised here, without the
        disk thread's traceback, whose frames hold views of a stage."""
        done, self._in_flight = self._in_flight, None
        if done is not None and (error := done.exception()) is not None:
            raise error.with_traceback(None)

    def _write_out(self, stage: memoryview, whole: int, offset: int) -> None:
        """stage[:whole] (whole blocks) at offset: direct, or the plain way once refused."""
        done = 0
        while done < whole and not self.plain_only:
            try:
                n = os.pwrite(self.fd, stage[done:whole], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.plain_only = True  # opened, but the file system takes no O_DIRECT write
                break
            done += n
            if n == 0 or n % DIRECT_ALIGN:
                break  # a short write that left the rest unaligned: the rest goes the plain way
        self._write_plain(stage[done:whole], offset + done)

    def _write_plain(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self.plain_fd, data, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"write of {self.plain_fd} made no progress")
            data, offset = data[n:], offset + n

    def close(self) -> None:
        """Write everything staged (the partial last block through the ordinary descriptor)
        and release the buffers; idempotent."""
        if self.fd < 0:
            return
        try:
            self._write_aligned()
            self._wait()
            self._write_plain(self.view[:self.fill], self.pos)
            self.pos += self.fill
            self.fill = 0
        finally:
            if self._io is not None:  # it finishes a write in flight first
                self._io.shutdown(wait=True)
            os.close(self.fd)
            self.fd = -1
            try:
                for view in (self.view, self._spare):
                    if view is not None:
                        view.release()
                for stage in self._stages:
                    stage.close()
            except BufferError:
                pass  # a view still held elsewhere (an error's frames): freed with it instead


_SYNC_FILE_RANGE = libc.function("sync_file_range",
                                 (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to disk now, without waiting for it.

    Why: a capture file is fsynced before it is published. Left to the kernel, its pages
    stay dirty until that fsync, which then waits for the whole file to reach the disk (0.25 s
    for a 600 MB file here, with the capture stopped meanwhile); started as the file grows,
    the write-out overlaps the capture and the fsync finds little left to do. Best effort: an
    error here shows up again, for certain, in the fsync.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def utc_iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _remove_unused(prepared: Future) -> None:
    """Remove a prepared file nobody wrote to (see Spool.discard_prepared)."""
    try:
        of = prepared.result()
    except Exception:  # never created (the error would have been raised had it been taken)
        return
    of.file.detach()
    try:
        os.unlink(of.file.path)
    except OSError:
        pass  # an empty temp file left: recovery removes it at the next start ("empty")


def file_stamp(t: float) -> str:
    return datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y%m%d%H%M%S")


class OpenFile:
    """The file being written: its final name, temp file and per-file counters."""

    def __init__(self, name: str, tmp_path: str, start_time: float,
                 backlog_bytes: int = OFFLINE_BACKLOG_BYTES):
        self.name = name
        self.file = HashingFile(tmp_path, backlog_bytes)
        self.start_time = start_time
        self.first_packet = None
        self.last_packet = None
        self.counters = dict(packets_observed=0, bytes_observed=0, packets_sampled=0,
                             bytes_sampled=0, packets_written=0, malformed_packets=0)
        self.stats_updates: list[dict] = []


class Spool:
    def __init__(self, directory: str, experiment: str, site: str, ext: str,
                 backlog_bytes: int = OFFLINE_BACKLOG_BYTES):
        self.directory = directory
        self.backlog_bytes = backlog_bytes  # for each data file's HashingFile
        self._status_fd: int | None = None   # .gims-status.json, open once created
        self._status_writer: LatestOnly | None = None
        self._committer: ThreadPoolExecutor | None = None  # see commit_later
        self._committing: collections.deque = collections.deque()  # (OpenFile, Future), in order
        self._preparer: ThreadPoolExecutor | None = None   # see prepare
        self._prepared: tuple[float, Future] | None = None  # (start time, the OpenFile's future)
        self._discarded: Future | None = None               # the last discard_prepared's job
        self.prefix = f"{experiment}_{site}"
        self.ext = ext
        self.files_written = 0
        self.bytes_written = 0  # bytes of the files committed by this process
        os.makedirs(directory, exist_ok=True)

    def _final_name(self, start_time: float) -> str:
        base = f"{self.prefix}_{file_stamp(start_time)}"
        name = f"{base}.{self.ext}"
        n = 0
        while (os.path.exists(os.path.join(self.directory, name))
               or os.path.exists(os.path.join(self.directory, f".{name}.tmp"))):
            n += 1
            name = f"{base}_{n}.{self.ext}"
        return name

    def open(self, start_time: float) -> OpenFile:
        """The file for packets from start_time on: the one prepare() made for this start
        time if there is one (no file system call here), else created now."""
        if self._prepared is not None and self._prepared[0] == start_time:
            future = self._prepared[1]
            self._prepared = None
            try:
                return future.result()
            except OSError:
                pass  # e.g. the disk was full then: creating it now tells whether it still is
        return self._create(start_time)

    def _create(self, start_time: float) -> OpenFile:
        while True:
            name = self._final_name(start_time)
            tmp = os.path.join(self.directory, f".{name}.tmp")
            try:
                return OpenFile(name, tmp, start_time, self.backlog_bytes)
            except FileExistsError:
                continue  # another writer took this name between our check and the create

    def prepare(self, start_time: float) -> None:
        """Create the file for start_time now, in a thread of its own, for open(start_time).

        A live capture calls this for its next file as soon as it opens one: at the rotation
        the file is there, so the capture thread makes no file system call (on a file system
        that stalls just then, creating the file waited for it while the kernel dropped
        packets). One file at a time: an earlier one not taken is discarded."""
        self.discard_prepared()
        if self._preparer is None:
            self._preparer = ThreadPoolExecutor(1, thread_name_prefix="gims-prepare")
        self._prepared = (start_time, self._preparer.submit(self._create, start_time))

    def discard_prepared(self, wait: bool = False) -> None:
        """Remove the file prepare() made and open() did not take, in the preparing thread
        (after its creation; removing waits for a stalled disk too). wait: until it is gone
        (before recovery, which would otherwise take the empty temp file for a torn one)."""
        if self._prepared is not None:
            future = self._prepared[1]
            self._prepared = None
            self._discarded = self._preparer.submit(_remove_unused, future)
        if wait and self._discarded is not None:
            self._discarded.result()
            self._discarded = None

    def commit(self, of: OpenFile, metadata: dict) -> str:
        """fsync + rename the data file, then write its metadata record; returns the path.

        On failure (a full disk) nothing is deleted: the temp file, or the data file already
        renamed but without its record, is left for recovery (capture_daemon.recovery)."""
        final = self._publish(of, metadata)
        self._count(of)
        return final

    def _publish(self, of: OpenFile, metadata: dict) -> str:
        try:
            of.file.finish()
            final = self._place(of)
            metadata.update(data_file=of.name, size=of.file.size, sha256=of.file.sha256.hexdigest())
            write_json_atomic(final + ".meta.json", metadata)
            fsync_dir(self.directory)
        except OSError:
            of.file.detach()
            raise
        return final

    def _count(self, of: OpenFile) -> None:
        self.files_written += 1
        self.bytes_written += of.file.size

    def commit_later(self, of: OpenFile, metadata: dict) -> None:
        """commit() in a thread of its own (one per spool, in order), so that the capture thread goes on at a
        rotation while the file's last bytes, its fsync, rename, metadata record and the
        directory's fsync are written: with a disk slow to sync just then, the capture thread
        waited in them. committed() hands back the outcomes."""
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="gims-commit")
        self._committing.append((of, self._committer.submit(self._publish, of, metadata)))

    def committed(self, wait: bool = False) -> list:
        """[(OpenFile, final path or the exception)] of the commits done since the last call,
        in order; counted here, in the caller's thread. wait: for every commit handed over."""
        done = []
        while self._committing and (wait or self._committing[0][1].done()):
            of, future = self._committing.popleft()
            error = future.exception()
            if error is None:
                self._count(of)
            done.append((of, future.result() if error is None else error))
        return done

    @property
    def committing_bytes(self) -> int:
        """Bytes of the files handed to commit_later and not handed back by committed() yet
        (the quota counts them)."""
        return sum(of.file.size for of, _ in self._committing)

    def _place(self, of: OpenFile) -> str:
        """Give the finished temp file its final name without ever replacing a file.

        link() fails when the name exists (another writer in this spool took it: e.g. a
        fan-out sibling in the same second), and then the next free name is used.
        """
        while True:
            final = os.path.join(self.directory, of.name)
            try:
                os.link(of.file.path, final)
            except FileExistsError:
                of.name = self._final_name(of.start_time)
                continue
            os.unlink(of.file.path)
            return final

    STATUS_BYTES = 4096

    def write_status(self, status: dict, wait: bool | None = None) -> None:
        """Have .gims-status.json rewritten with status (see _write_status_now).

        A thread of its own writes it (LatestOnly): the capture thread only hands the newest
        status over, so a disk that stalls does not stop the capture (a status write waiting
        for a frozen file system held up the capture thread, and packets were dropped:
        docs/PERFORMANCE.md). wait: return once this status is written; by default for any
        state but "running" (the last, at exit, must be in the file when the process ends).
        """
        if wait is None:
            wait = status.get("state") != "running"
        data = json.dumps(dict(status, updated=utc_iso(time.time()), pid=os.getpid()),
                          sort_keys=True).encode()
        if self._status_writer is None:
            self._status_writer = LatestOnly(self._write_status_now, "gims-status")
        self._status_writer.post(data, wait)

    def _write_status_now(self, data: bytes) -> None:
        """Rewrite .gims-status.json in place, in one page-sized write.

        The file is created once (atomically) at a fixed size and then overwritten in
        place, so updates need no new blocks and keep working when the spool is full —
        exactly when readers most need to see the counters.
        """
        path = os.path.join(self.directory, ".gims-status.json")
        try:
            if len(data) >= self.STATUS_BYTES:
                write_json_atomic(path, json.loads(data))
                return
            page = data.ljust(self.STATUS_BYTES - 1) + b"\n"
            if self._status_fd is None or not os.path.exists(path):
                tmp = os.path.join(self.directory, f".gims-status.{os.getpid()}.tmp")
                with open(tmp, "wb") as fh:
                    fh.write(page)
                os.replace(tmp, path)
                self._status_fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            else:
                os.pwrite(self._status_fd, page, 0)
        except OSError:
            pass  # best effort: STATUS= over sd_notify carries the same counters


class LatestOnly:
    """Hands items to a thread that writes them with write(item), newest only: an item posted
    while an earlier one is still being written replaces any other still waiting."""

    def __init__(self, write, name: str):
        self._write = write
        self._name = name
        self._cv = threading.Condition()
        self._pending = None      # the newest item not taken yet
        self._busy = False        # an item is being written
        self._thread: threading.Thread | None = None

    def post(self, item, wait: bool = False) -> None:
        with self._cv:
            self._pending = item
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify_all()
            while wait and (self._pending is not None or self._busy):
                self._cv.wait()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None:
                    self._cv.wait()
                item, self._pending = self._pending, None
                self._busy = True
            try:
                self._write(item)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()


def is_space_error(exc: OSError) -> bool:
    """The spool's file system is full (ENOSPC/EDQUOT): capture keeps counting, not writing."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class SpoolGuard:
    """Watches the spool's space: the file system's free bytes and the experiment's quota."""

    RESUME_FREE_BYTES = 4 << 20   # free space needed before writing resumes after ENOSPC
    RESUME_QUOTA_FRACTION = 0.9   # hysteresis: resume once uploads got usage below 90 %
    CHECK_EVERY = 1.0

    def __init__(self, directory: str, quota: int | None):
        self.directory = directory
        self.quota = quota
        self._usage = 0
        self._checked = 0.0
        self._written_at_check = 0

    def usage(self, written: int = 0) -> int:
        """Bytes of files in the spool (data, metadata, temp files).

        The directory is re-read once a second; in between, what this process wrote since
        (``written`` is its running total) is added, so a fast writer cannot overshoot.
        """
        now = time.monotonic()
        if now - self._checked >= self.CHECK_EVERY:
            self._checked = now
            self._written_at_check = written
            total = 0
            try:
                with os.scandir(self.directory) as it:
                    for entry in it:
                        try:
                            if entry.is_file(follow_symlinks=False):
                                total += entry.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            pass  # uploaded and removed while we looked
            except FileNotFoundError:
                pass
            self._usage = total
        return self._usage + (written - self._written_at_check)

    def over_quota(self, written: int) -> bool:
        return bool(self.quota) and self.usage(written) > self.quota

    RESERVE_BYTES = 64 << 10
    RESERVE_NAME = ".gims-reserve"

    def ensure_reserve(self) -> None:
        """Keep a little space set aside in the spool for the day it fills up.

        When the file system is full, releasing it leaves room to give the torn file a
        metadata record (recovery), so the uploader can ship it and free real space.
        """
        path = os.path.join(self.directory, self.RESERVE_NAME)
        try:
            if os.path.getsize(path) >= self.RESERVE_BYTES:
                return
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            pass  # no room for it now: tried again when writing resumes

    def release_reserve(self) -> None:
        try:
            os.unlink(os.path.join(self.directory, self.RESERVE_NAME))
        except FileNotFoundError:
            pass

    def can_resume(self, reason: str | None) -> bool:
        if reason == "quota":
            self._checked = 0.0
            return self.usage() <= self.quota * self.RESUME_QUOTA_FRACTION
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return False
        # a quarter of a small file system is enough to be worth trying again
        need = min(self.RESUME_FREE_BYTES, st.f_blocks * st.f_frsize // 4)
        return st.f_bavail * st.f_frsize >= need
