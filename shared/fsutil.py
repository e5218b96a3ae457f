"""Durable file operations: write to a temporary name, fsync, rename, fsync the folder; one-owner locks."""
from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
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


class FolderLock:
    """An exclusive flock on FOLDER/NAME. The kernel drops it when the process dies, even on kill -9."""

    def __init__(self, folder: str | os.PathLike, name: str = ".lock"):
        self.path = Path(folder) / name
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockHeld(f"{self.path.parent} is in use by another process (pid {holder})") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def probe_locks(paths):
    """Hold the FolderLock files PATHS for a moment; yields False when a process holds one of them now.

    A probe: a missing file counts as free and is not created, and nothing is written (the holder's pid
    stays). Closing the descriptors drops the flocks."""
    fds = []
    try:
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                yield False
                return
        yield True
    finally:
        for fd in fds:
            os.close(fd)
