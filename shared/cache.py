"""Reading a cache folder: `open_cache(DIR).iter_sequences()`.

Readers trust only the manifest: a chunk file that the manifest does not list does not exist for them,
and every chunk read is checked against the checksum the manifest recorded.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .chunk import Chunk, ChunkError, decode_chunk, file_checksum
from .commitlog import LogError, read_from
from .manifest import (
    LOG_NAME,
    MANIFEST_NAME,
    ChunkEntry,
    LogPosition,
    Manifest,
    ManifestError,
    apply_records,
    read_manifest,
    snapshot_log_id,
    stat_key,
)

QUARANTINE_DIR = "quarantine"

_read_buffers = threading.local()  # one reusable file buffer per reading thread (fresh memory costs page faults)


def _read_file(path: Path, size: int) -> memoryview:
    """The file's bytes in this thread's reusable buffer (valid until the thread's next call); raises
    ValueError when the file's size is not `size`, FileNotFoundError when it is gone."""
    buf = getattr(_read_buffers, "buf", None)
    if buf is None or len(buf) < size:
        buf = _read_buffers.buf = bytearray(max(size, 2 * len(buf) if buf else 0))
    view = memoryview(buf)[:size]
    with open(path, "rb", buffering=0) as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise ValueError(f"size {actual} bytes, manifest says {size}")
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"size {got} bytes, manifest says {size}")  # truncated while reading
            got += n
    return view


class CacheError(RuntimeError):
    pass


class CacheReplaced(CacheError):
    """The manifest now describes another cache: rebuilt (`packerd run --force-rebuild`) or swapped under a reader."""


def replaced_reason(old: Manifest, new: Manifest) -> str | None:
    """Why `new` is not a later state of the cache `old` describes, or None when it is one.

    A cache only grows: its layout and tokenizer never change, and a chunk once listed keeps its checksum
    (`--mode inverse` rewrites a lost chunk byte for byte). Anything else is another cache.
    """
    for name in ("seq_len", "chunk_sequences", "dtype"):
        if getattr(new, name) != getattr(old, name):
            return f"{name} is {getattr(new, name)}, was {getattr(old, name)}"
    if new.tokenizer.get("vocab_hash") != old.tokenizer.get("vocab_hash"):
        return f"the tokenizer is {new.tokenizer.get('name')} (vocab_hash {new.tokenizer.get('vocab_hash')}), " \
               f"was {old.tokenizer.get('name')} (vocab_hash {old.tokenizer.get('vocab_hash')})"
    if len(new.chunks) < len(old.chunks):
        return f"it lists {len(new.chunks)} chunks, {len(old.chunks)} before"
    for a, b in zip(old.chunks, new.chunks):
        if a.checksum != b.checksum:
            return f"chunk {a.id} has checksum {b.checksum}, was {a.checksum}"
    return None


def unlike(m: Manifest, ref: Manifest, name: str, ref_name: str) -> str | None:
    """What keeps cache m (called `name` in the answer) from being read beside cache ref (`ref_name`) by one
    model, in words: another seq_len or another tokenizer; None when nothing does."""
    if m.seq_len != ref.seq_len:
        return f"{name} has seq_len {m.seq_len}, {ref_name} {ref.seq_len}"
    if m.tokenizer.get("vocab_hash") != ref.tokenizer.get("vocab_hash"):
        return (f"{name} was packed with another tokenizer ({m.tokenizer.get('name')}) than {ref_name} "
                f"({ref.tokenizer.get('name')})")
    return None


def check_same_cache(cache_dir, old: Manifest, new: Manifest) -> None:
    """Raise CacheReplaced when `new` (just read from cache_dir) belongs to another cache than `old`."""
    why = replaced_reason(old, new)
    if why:
        raise CacheReplaced(f"{cache_dir} holds another cache now: {why} (rebuilt with --force-rebuild "
                            f"or replaced under this reader)")


class ManifestGone(CacheError):
    """The manifest is not there now: the cache is being rebuilt (`--force-rebuild` deletes it first) or was
    deleted. A follower keeps the last one it read until one appears again."""

    def __init__(self, cache_dir):
        super().__init__(f"{cache_dir}: the manifest disappeared (the cache is being rebuilt or was deleted)")


class CorruptChunk(CacheError):
    def __init__(self, chunk_id: int, reason: str):
        super().__init__(f"chunk {chunk_id} is corrupt: {reason}")
        self.chunk_id = chunk_id
        self.reason = reason


class Cache:
    def __init__(self, cache_dir: str | os.PathLike, manifest: Manifest, log: LogPosition | None = None):
        self.dir = Path(cache_dir)
        self.manifest = manifest
        self.log = log  # where the commit log was read up to; None for a cache of manifest.json alone

    # -- manifest ------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read what is new in the manifest; True when it changed (more chunks, or finished). Raises
        CacheReplaced when the folder holds another cache now, CacheError when its manifest is gone.

        With a commit log this reads only the records appended since the last read and applies them to
        self.manifest in place (entries are only appended, so other threads' reads stay valid): its cost
        does not depend on the number of chunks. A new log (a rebuilt cache, or one of version 1 continued
        by a newer packer) means reading the whole manifest and comparing it, as for a version-1 cache."""
        if self._same_log():
            try:
                payloads, end = read_from(self.dir / LOG_NAME, self.log.id, self.log.offset)
            except (FileNotFoundError, LogError):
                payloads = None  # replaced between the check and the read: the whole way below
            if payloads is not None:
                try:
                    apply_records(self.manifest, payloads)
                except ManifestError as e:
                    raise CacheError(f"{self.dir}: {e}") from None
                self.log.offset = end
                return bool(payloads)
        m, log = self._read_same()
        changed = (len(m.chunks), m.finished, m.updated_at) != (
            len(self.manifest.chunks), self.manifest.finished, self.manifest.updated_at)
        self.manifest, self.log = m, log
        return changed

    def check_unchanged(self) -> None:
        """refresh()'s checks without taking anything new (other threads use self.manifest)."""
        if not self._same_log():
            self._read_same()

    def _same_log(self) -> bool:
        """True when the folder still holds the snapshot this reader read, or a newer one naming the same
        commit log (a log id is random, new for every log created). CacheError when the manifest is gone."""
        path = self.dir / MANIFEST_NAME
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ManifestGone(self.dir) from None
        if self.log is None:
            return False
        key = stat_key(st)
        if key == self.log.snapshot_stat:
            return True
        try:
            if snapshot_log_id(path) != self.log.id:
                return False
        except FileNotFoundError:
            return False
        self.log.snapshot_stat = key
        return True

    def _read_same(self) -> tuple[Manifest, LogPosition | None]:
        try:
            m, log = read_manifest(self.dir)
        except ManifestError as e:
            raise CacheError(str(e)) from None
        if m is None:
            raise ManifestGone(self.dir)
        check_same_cache(self.dir, self.manifest, m)
        return m, log

    @property
    def chunks(self) -> list[ChunkEntry]:
        return self.manifest.chunks

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def eos_id(self) -> int:
        return int(self.manifest.tokenizer["eos_id"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest.tokenizer.get("pad_id", self.eos_id))

    def entry(self, chunk_id: int) -> ChunkEntry:
        # ids are contiguous from 0 in the manifest, so the id is also the index
        e = self.manifest.chunks[chunk_id]
        if e.id != chunk_id:
            raise CacheError(f"manifest chunk list is out of order at {chunk_id}")
        return e

    # -- chunks --------------------------------------------------------------------------------
    def chunk_path(self, chunk_id: int) -> Path:
        return self.dir / self.entry(chunk_id).file

    def read_chunk(self, chunk_id: int) -> Chunk:
        """The decoded chunk, checked against the manifest; raises CorruptChunk when it is not intact, and
        CacheError instead when the manifest is gone or names another cache: a cache rebuilt under the reader
        has no corrupt chunks, and quarantining them would damage the new one."""
        try:
            return self._read_chunk(chunk_id)
        except CorruptChunk:
            self.check_unchanged()
            raise

    def _read_chunk(self, chunk_id: int) -> Chunk:
        entry = self.entry(chunk_id)
        try:
            data = _read_file(self.dir / entry.file, entry.bytes)
        except FileNotFoundError:
            raise CorruptChunk(chunk_id, "file is missing") from None
        except ValueError as e:
            raise CorruptChunk(chunk_id, str(e)) from None
        try:
            if file_checksum(data) != entry.checksum:
                raise ChunkError("header checksum differs from the manifest")
            chunk = decode_chunk(data, verify=True)
        except ChunkError as e:
            raise CorruptChunk(chunk_id, str(e)) from None
        # the index arrays are views of the reused buffer: copy them (the tokens are LZ4's own output)
        chunk.lengths, chunk.doc_ptr, chunk.doc_starts = chunk.lengths.copy(), chunk.doc_ptr.copy(), chunk.doc_starts.copy()
        if chunk.num_sequences != entry.sequences or chunk.num_tokens != entry.tokens:
            raise CorruptChunk(chunk_id, "sequence or token count differs from the manifest")
        return chunk

    def quarantine(self, chunk_id: int) -> Path | None:
        """Move a bad chunk file aside so `packerd run --mode inverse` regenerates it."""
        src = self.chunk_path(chunk_id)
        dst_dir = self.dir / QUARANTINE_DIR
        dst_dir.mkdir(exist_ok=True)
        dst = dst_dir / f"{src.name}.{int(time.time())}"
        try:
            os.replace(src, dst)
        except FileNotFoundError:  # moved aside already (by another rank): where it went
            moved = sorted(dst_dir.glob(f"{src.name}.*"))
            return moved[-1] if moved else None
        return dst

    def missing_chunks(self) -> list[int]:
        return [e.id for e in self.manifest.chunks if not (self.dir / e.file).exists()]

    # -- sequences -----------------------------------------------------------------------------
    def iter_chunks(self) -> Iterator[tuple[ChunkEntry, Chunk]]:
        for entry in list(self.manifest.chunks):
            yield entry, self.read_chunk(entry.id)

    def iter_sequences(self) -> Iterator[np.ndarray]:
        """Each sequence's real tokens (1-D array), in chunk order, checksums checked."""
        for _, chunk in self.iter_chunks():
            offs = chunk.offsets()
            for i in range(chunk.num_sequences):
                yield chunk.tokens[offs[i]:offs[i + 1]]

    def iter_documents(self) -> Iterator[np.ndarray]:
        """The cache's token stream split after each EOS: every source document with its EOS."""
        eos = self.eos_id
        pending: list[np.ndarray] = []
        for seq in self.iter_sequences():
            ends = np.flatnonzero(seq == eos)
            start = 0
            for e in ends:
                pending.append(seq[start:e + 1])
                yield np.concatenate(pending)
                pending = []
                start = e + 1
            if start < len(seq):
                pending.append(seq[start:])
        if pending:
            yield np.concatenate(pending)


def open_cache(cache_dir: str | os.PathLike, wait: float = 0.0) -> Cache:
    """Open a cache folder; with wait > 0, wait up to that many seconds for its manifest to appear."""
    deadline = time.monotonic() + wait
    while True:
        try:
            manifest, log = read_manifest(cache_dir)
        except ManifestError as e:
            raise CacheError(str(e)) from None
        if manifest is not None:
            return Cache(cache_dir, manifest, log)
        if time.monotonic() >= deadline:
            if not Path(cache_dir).is_dir():
                raise CacheError(f"cache folder {cache_dir} does not exist")
            raise CacheError(f"{cache_dir} has no manifest.json (no packer has committed a chunk there)")
        time.sleep(0.2)
