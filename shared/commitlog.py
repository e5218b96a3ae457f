"""The manifest's commit log: an append-only file of checksummed records beside the manifest snapshot.

Layout (little-endian):

    header   16 bytes   b"PKMLOG\\x00\\x01" and the log's id (8 random bytes, a new one for every log created)
    records  each       uint32 payload length, uint64 xxh64 of the payload (seeded with the id), payload

A record is valid when it is whole and its checksum matches. Reading stops at the first record that is not:
that is the tail a kill -9 (or a power cut) left half-written, or one the writer is appending right now, so
it is not an error. The writer, the one process that holds the cache folder's lock, cuts such a tail off
before it appends, so valid records never follow an invalid one.

Appending is one write() and one fdatasync(): its cost does not depend on how many records precede it.
"""
from __future__ import annotations

import os
import signal
import struct
from pathlib import Path

import xxhash

from .fsutil import atomic_write_bytes

LOG_MAGIC = b"PKMLOG\x00\x01"
LOG_HEADER_SIZE = 16
RECORD = struct.Struct("<IQ")
MAX_RECORD = 64 << 20  # a longer length field is damage, not a record (records are a few hundred bytes)


def _fault_hook() -> int | None:
    """The fault tests' hook: STREAMPACK_FAULT=torn-append:N makes the Nth append of this process write half
    its record and SIGKILL the process, the torn record a kill -9 mid-append leaves."""
    kind, _, n = os.environ.get("STREAMPACK_FAULT", "").partition(":")
    return int(n) if kind == "torn-append" and n.isdigit() else None


class LogError(ValueError):
    """A commit log that is not one (bad magic), or not the log a snapshot names."""


def _seed(log_id: str) -> int:
    return int(log_id, 16)


def create_log(path: str | os.PathLike) -> str:
    """Create (or replace) the log at `path` with a new id, durably; returns the id as 16 hex digits."""
    log_id = os.urandom(8).hex()
    atomic_write_bytes(path, LOG_MAGIC + bytes.fromhex(log_id))
    return log_id


# reads and writes at an offset through seek: os.pread and os.pwrite do not exist on Windows. The log's writer
# is the only one using its descriptor (it holds the cache folder's lock), so nothing moves the offset between.
def _read_at(f, size: int, offset: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _write_at(fd: int, data: bytes, offset: int) -> int:
    os.lseek(fd, offset, os.SEEK_SET)
    done = 0
    while done < len(data):
        n = os.write(fd, data[done:])
        if n <= 0:
            break
        done += n
    return done


# the record's data, without the file's times; fsync where the platform lacks fdatasync (Windows, macOS)
_datasync = getattr(os, "fdatasync", os.fsync)


def read_log_id(f) -> str:
    """The id in the header of the open log file `f`."""
    head = _read_at(f, LOG_HEADER_SIZE, 0)
    if len(head) != LOG_HEADER_SIZE or head[:8] != LOG_MAGIC:
        raise LogError("not a manifest commit log (bad header)")
    return head[8:].hex()


def encode_record(log_id: str, payload: bytes) -> bytes:
    return RECORD.pack(len(payload), xxhash.xxh64(payload, seed=_seed(log_id)).intdigest()) + payload


def parse_records(log_id: str, data: bytes | memoryview, offset: int) -> tuple[list[bytes], int]:
    """The payloads of the valid records in `data` (the log's bytes from file offset `offset` on), and the
    file offset after the last of them. Stops at the first incomplete or damaged record."""
    seed = _seed(log_id)
    out, pos, n = [], 0, len(data)
    while pos + RECORD.size <= n:
        length, checksum = RECORD.unpack_from(data, pos)
        end = pos + RECORD.size + length
        if length > MAX_RECORD or end > n:
            break
        payload = bytes(data[pos + RECORD.size:end])
        if xxhash.xxh64(payload, seed=seed).intdigest() != checksum:
            break
        out.append(payload)
        pos = end
    return out, offset + pos


def read_from(path: str | os.PathLike, log_id: str, offset: int) -> tuple[list[bytes], int]:
    """Open the log at `path`, check it is the log `log_id`, and return the valid records from `offset` and
    the offset after them (a torn or growing record after them is left for a later read). Raises FileNotFoundError when there is no log, LogError when it is another log."""
    with open(path, "rb", buffering=0) as f:
        if read_log_id(f) != log_id:
            raise LogError(f"{path} is another commit log than the one expected")
        size = os.fstat(f.fileno()).st_size
        if offset > size:
            raise LogError(f"{path} holds {size} bytes, fewer than the {offset} already read from it")
        data = _read_at(f, size - offset, offset) if size > offset else b""
    payloads, end = parse_records(log_id, data, offset)
    return payloads, end


class LogWriter:
    """Appends records to an existing log; only the process holding the cache folder's lock uses one."""

    def __init__(self, path: str | os.PathLike, log_id: str, end: int):
        """Open the log for appending after its last valid record at `end`, cutting off what follows (a
        record torn by a crash: it was never acknowledged, since a commit is complete only after fsync)."""
        self.path = Path(path)
        self.log_id = log_id
        self.fd = os.open(self.path, os.O_WRONLY)
        try:
            with open(self.path, "rb") as f:
                if read_log_id(f) != log_id:
                    raise LogError(f"{path} is another commit log than the one expected")
            if os.fstat(self.fd).st_size != end:
                os.ftruncate(self.fd, end)
                os.fsync(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.end = end
        self.appends = 0
        self._tear_at = _fault_hook()

    def append(self, payload: bytes) -> int:
        """Append one record and make it durable; returns the offset after it."""
        if len(payload) > MAX_RECORD:  # every reader would take it for damage and stop before it
            raise ValueError(f"a commit log record of {len(payload)} bytes (at most {MAX_RECORD})")
        rec = encode_record(self.log_id, payload)
        self.appends += 1
        if self.appends == self._tear_at:
            _write_at(self.fd, rec[:len(rec) // 2], self.end)
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            n = _write_at(self.fd, rec, self.end)
            if n != len(rec):
                raise OSError(f"short write to {self.path} ({n} of {len(rec)} bytes)")
        except BaseException:
            # (disk full, say) cut off what part of it got written, so a later append follows a valid record;
            # no reader has taken a part of a record. A whole record stays even when the fsync below fails:
            # a reader may have taken it already.
            try:
                os.ftruncate(self.fd, self.end)
            except OSError:
                pass  # the next writer cuts it off when it opens the log
            raise
        self.end += n
        _datasync(self.fd)
        return self.end

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
