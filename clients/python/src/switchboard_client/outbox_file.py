"""The on-disk journal of an `Outbox` opened with `Client.outbox_on_disk`: an append-only file the
outbox owns (an exclusive `flock` on `<file>.lock` keeps a second outbox off it), so that messages
queued but not yet answered survive the process and are sent, with their idempotency keys, by the
next outbox opened on the file.

The format is the Rust client's (client/src/outbox_file.rs), byte for byte, so either client can
replay a file the other wrote (and their locks exclude each other: both `flock` the same lock
file). The file is a sequence of records, each `[length u32 LE][crc32 u32 LE][kind u8][body]`,
the length counting the body and the checksum (CRC-32/ISO-HDLC, what `zlib.crc32` and `crc32fast`
compute) covering the kind and the body:

- `QUEUED` (1): the body is an encoded `switchboard.v1.PublishRequest` (its idempotency key set).
  Written and `fdatasync`ed before `Outbox.publish` returns: a message the caller was told is
  queued is on disk.
- `DONE` (2): the body is a `u64` LE, how many `QUEUED` records of the file (from its start) the
  broker has answered (stored or refused for good); the outbox answers in order, so they are
  always the first ones. Not synced: lost in a crash, it only makes the next outbox send again a
  message that was stored, which its key turns into a `duplicate` answer.

When everything queued is answered the file is truncated to nothing (and synced). Opening replays
it: the records up to the first one that is incomplete, longer than 64 MiB, fails its checksum,
has an unknown kind or a body that does not decode are read; that damaged tail is dropped with a
warning, and the file is rewritten (a new file, synced, renamed over the old, the directory
synced) with only the messages not yet answered.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from typing import List, Tuple

from google.protobuf.message import DecodeError

from switchboard.v1 import broker_pb2

from .errors import OutboxStorageError

try:  # Unix; elsewhere an on-disk outbox cannot be opened (no lock to keep a second one off).
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms the client is tested on
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("switchboard_client.outbox")

HEADER = struct.Struct("<IIB")
HEADER_BYTES = HEADER.size  # 9
KIND_QUEUED = 1
KIND_DONE = 2
# No record is larger: a length past it is damage, not a record to allocate for.
MAX_RECORD_BYTES = 64 * 1024 * 1024


def record(kind: int, body: bytes) -> bytes:
    """One record: header (length, CRC32 of kind and body, kind), then the body."""
    checksum = zlib.crc32(body, zlib.crc32(bytes([kind])))
    return HEADER.pack(len(body), checksum, kind) + body


def parse(data: bytes) -> Tuple[List[broker_pb2.PublishRequest], int, int]:
    """The records of `data` up to the first damaged one: the queued messages, how many of them
    are answered, and where the whole records end."""
    queued: List[broker_pb2.PublishRequest] = []
    done = 0
    at = 0
    while len(data) - at >= HEADER_BYTES:
        length, expected, kind = HEADER.unpack_from(data, at)
        if length > MAX_RECORD_BYTES or len(data) - at - HEADER_BYTES < length:
            break
        body = data[at + HEADER_BYTES : at + HEADER_BYTES + length]
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != expected:
            break
        if kind == KIND_QUEUED:
            request = broker_pb2.PublishRequest()
            try:
                request.ParseFromString(body)
            except DecodeError:
                break
            queued.append(request)
        elif kind == KIND_DONE and len(body) == 8:
            done = max(done, struct.unpack("<Q", body)[0])
        else:
            break
        at += HEADER_BYTES + length
    return queued, done, at


def _sync_data(fd: int) -> None:
    # fdatasync where there is one (Linux); fsync elsewhere (macOS has no fdatasync).
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover
        os.fsync(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass
class Replayed:
    """What opening a journal found: the journal, the messages queued and not answered (in
    order), and the bytes dropped from a damaged tail (0 when the file was whole)."""

    journal: "Journal"
    pending: List[broker_pb2.PublishRequest]
    dropped_bytes: int


class Journal:
    """The file and its lock; not thread-safe (the outbox calls it under its own lock)."""

    def __init__(self, path: str, fd: int, lock_fd: int, length: int, queued: int) -> None:
        self.path = path
        self._fd = fd
        self._lock_fd = lock_fd
        # The file's length after the last complete record.
        self._len = length
        # QUEUED records in the file, and how many of them are answered.
        self._queued = queued
        self._done = 0

    @classmethod
    def open(cls, path: "os.PathLike[str] | str") -> Replayed:
        """Opens (or creates) the journal at `path`, replays it and compacts it. Raises
        `OutboxStorageError` when the file cannot be read or rewritten, or another outbox (in this
        process or another) holds it."""
        path = os.fspath(path)
        if fcntl is None:  # pragma: no cover
            raise OutboxStorageError(path, "an on-disk outbox needs flock (a Unix system)")
        lock_path = path + ".lock"
        try:
            lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutboxStorageError(lock_path, f"cannot open the lock file: {error}") from error
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                raise OutboxStorageError(path, f"another outbox has this file open: {error}") from error
            return cls._replay(path, lock_fd)
        except BaseException:
            os.close(lock_fd)  # releases the lock too
            raise

    @classmethod
    def _replay(cls, path: str, lock_fd: int) -> Replayed:
        try:
            with open(path, "rb") as existing:
                data = existing.read()
        except FileNotFoundError:
            data = b""
        except OSError as error:
            raise OutboxStorageError(path, f"cannot read: {error}") from error
        queued, done, whole = parse(data)
        dropped_bytes = len(data) - whole
        if dropped_bytes:
            log.warning(
                "outbox file %s: a damaged record at the end (a torn write?) was dropped "
                "(offset %d, %d bytes)",
                path,
                whole,
                dropped_bytes,
                extra={"path": path, "offset": whole, "dropped_bytes": dropped_bytes},
            )
        pending = queued[min(done, len(queued)) :]

        # Rewrite with only what is pending: a new file, synced, renamed over the old one, so a
        # crash now leaves either file whole.
        contents = b"".join(record(KIND_QUEUED, r.SerializeToString()) for r in pending)
        fresh = path + ".compacting"
        try:
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, contents)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            raise OutboxStorageError(fresh, f"cannot write: {error}") from error
        try:
            os.replace(fresh, path)
        except OSError as error:
            raise OutboxStorageError(path, f"cannot replace: {error}") from error
        directory = os.path.dirname(path) or "."
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # best effort, as in Rust: some file systems refuse to sync a directory
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            raise OutboxStorageError(path, f"cannot open: {error}") from error
        return Replayed(cls(path, fd, lock_fd, len(contents), len(pending)), pending, dropped_bytes)

    def append_queued(self, request: broker_pb2.PublishRequest) -> None:
        """Appends `request` as queued and syncs it. Raises `OutboxStorageError` when it cannot be
        written; the file is cut back to its last whole record, so nothing half written stays in
        the middle."""
        data = record(KIND_QUEUED, request.SerializeToString())
        try:
            _write_all(self._fd, data)
            _sync_data(self._fd)
        except OSError as error:
            try:
                os.ftruncate(self._fd, self._len)
            except OSError:
                pass
            raise OutboxStorageError(self.path, f"cannot append: {error}") from error
        self._len += len(data)
        self._queued += 1

    def mark_done(self) -> None:
        """Records that the broker answered the oldest unanswered message; when that was the
        last, truncates the file (synced). A failure is logged, not raised: the next outbox on
        this file then sends answered messages again, and their keys make the broker answer
        `duplicate`."""
        self._done = min(self._done + 1, self._queued)
        try:
            if self._done == self._queued:
                os.ftruncate(self._fd, 0)
                _sync_data(self._fd)
                self._len = self._queued = self._done = 0
            else:
                data = record(KIND_DONE, struct.pack("<Q", self._done))
                _write_all(self._fd, data)
                self._len += len(data)
        except OSError as error:
            log.warning("outbox file %s: cannot record an answered message: %s", self.path, error)

    def close(self) -> None:
        """Closes the file and releases the lock (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
