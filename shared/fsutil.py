"""Durable file operations: write to a temporary name, fsync, rename, fsync the folder; one-owner locks."""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # Linux, macOS and the other Unixes
except ImportError:
    fcntl = None
try:
    import msvcrt  # Windows
except ImportError:
    msvcrt = None

TMP_PREFIX = ".tmp-"

# Windows has no O_DIRECTORY and os.open cannot open a folder there, so a folder is not fsynced; NTFS
# journals its own folder changes.
CAN_FSYNC_DIRS = hasattr(os, "O_DIRECTORY")


def fsync_dir(path: str | os.PathLike) -> None:
    if not CAN_FSYNC_DIRS:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one.

    Order: temporary file in the same folder -> write -> fsync -> rename -> fsync the folder.
    The file gets the user's umask (mkstemp would force 0600, so the mode is set explicitly).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # absent on Windows before Python 3.13, where a umask shapes no mode anyway
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what an interrupted atomic write left behind; returns the removed paths."""
    removed = []
    for p in Path(folder).glob(TMP_PREFIX + "*"):
        try:
            p.unlink()
            removed.append(p)
        except (FileNotFoundError, IsADirectoryError):
            pass
    return removed


class LockHeld(RuntimeError):
    pass


# How a FolderLock locks. Whatever the platform, the OS drops the lock when its holder dies (kill -9
# leaves no stale lock) and the holder's pid, written at offset 0, stays readable for the LockHeld message.
# - With fcntl (Linux, macOS): flock on the whole file. It belongs to the open file, so a second
#   FolderLock in the same process is refused too.
# - Without it (Windows): a lock on the single byte REGION_BYTE, with msvcrt.locking. Windows region locks
#   are mandatory (no other process can read the locked bytes), so the byte lies far past the pid; SQLite
#   puts its Windows lock bytes at this offset for the same reason. A POSIX Python without fcntl takes
#   this path with os.lockf, the same call on the same byte: that is how tests/test_portable.py runs it
#   on Linux. (lockf's locks belong to the process, not the open file: there a process is not refused
#   its own lock twice.)
# The filelock package is not used: where fcntl is missing off Windows its FileLock is a SoftFileLock,
# which a kill -9 leaves behind, and its Windows lock holds byte 0, where the pid is.
REGION_BYTE = 1 << 30
_CONTENDED = {errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK}

if fcntl is not None:
    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
else:
    def _region(fd: int, take: bool) -> None:
        os.lseek(fd, REGION_BYTE, os.SEEK_SET)
        if msvcrt is not None:
            msvcrt.locking(fd, msvcrt.LK_NBLCK if take else msvcrt.LK_UNLCK, 1)
        else:
            os.lockf(fd, os.F_TLOCK if take else os.F_ULOCK, 1)

    def _lock(fd: int) -> None:
        _region(fd, True)

    def _unlock(fd: int) -> None:
        _region(fd, False)

# a probe opens a lock file without creating it; os.lockf's exclusive lock needs it open for writing
_PROBE_FLAGS = os.O_RDONLY if fcntl is not None else os.O_RDWR


def _try_lock(fd: int) -> bool:
    """True when `fd` now holds the lock; False when another holder has it."""
    try:
        _lock(fd)
    except OSError as e:
        if e.errno in _CONTENDED:
            return False
        raise
    return True


def _release(fd: int) -> None:
    # unlocked before the close: Windows drops the locks of a closed file only when it gets to it
    try:
        _unlock(fd)
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive lock on FOLDER/NAME holding its owner's pid. The OS drops it when the process dies,
    even on kill -9."""

    def __init__(self, folder: str | os.PathLike, name: str = ".lock"):
        self.path = Path(folder) / name
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _try_lock(fd):
                os.lseek(fd, 0, os.SEEK_SET)
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                raise LockHeld(f"{self.path.parent} is in use by another process (pid {holder})")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, str(os.getpid()).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            _release(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def probe_locks(paths):
    """Hold the FolderLock files PATHS for a moment; yields False when a process holds one of them now.

    A probe: a missing file counts as free and is not created, and nothing is written (the holder's pid
    stays)."""
    opened, held = [], []
    try:
        for p in paths:
            try:
                fd = os.open(p, _PROBE_FLAGS)
            except FileNotFoundError:
                continue
            opened.append(fd)
            if not _try_lock(fd):
                yield False
                return
            held.append(fd)
        yield True
    finally:
        for fd in opened:
            if fd in held:
                _release(fd)
            else:
                os.close(fd)
