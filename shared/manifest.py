"""The manifest: the single source of truth of a cache folder.

A chunk exists for readers only once the manifest lists it. The packer writes the chunk file first, then
commits it to the manifest, then announces the chunk. Readers never scan the folder for chunk files.

The manifest is two files (version 2, written by ManifestWriter):

    manifest.json   a snapshot: the whole manifest as of offset `log.offset` of the log it names, replaced
                    atomically (temporary file, fsync, rename) now and then
    manifest.log    the commit log (shared/commitlog.py): one checksummed record per commit, appended and
                    fsynced, holding the new chunk entries and the top-level fields that changed

so a commit costs the same at 10 and at 1,000,000 chunks. The manifest is the snapshot with the log's valid
records from its offset on applied; a torn last record is not part of it. A cache of version 1 is
manifest.json alone (no "log" key) and is still read; Manifest.save writes that form.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .chunk import FORMAT_VERSION
from .commitlog import LOG_HEADER_SIZE, LogError, LogWriter, create_log, read_from
from .fsutil import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
LOG_NAME = "manifest.log"
HOLDOUT_DIR = "holdout"  # CACHE/holdout/: the held-out cache (`packerd run --holdout`), a cache of its own
MANIFEST_VERSION = 1     # manifest.json alone
SNAPSHOT_VERSION = 2     # manifest.json naming a commit log (older readers refuse it rather than miss the log)
RECORD_BYTES = 1 << 20  # a commit longer than this is logged as several records (see _pieces)
SNAPSHOT_MIN_BYTES = 1 << 20  # the log grows at least this much before a new snapshot (about 7,000 commits)
# a snapshot starts with its log's name, so a reader that sees a new snapshot tells a periodic rewrite (the
# same log) from another cache by reading its first bytes instead of parsing all of it
_SNAPSHOT_HEAD = re.compile(rb'\{"log":\{"id":"([0-9a-f]{16})","offset":(\d+)\}')


class ManifestError(ValueError):
    pass


def chunk_filename(chunk_id: int) -> str:
    return f"chunk-{chunk_id:07d}.lz4"


@dataclass
class ChunkEntry:
    id: int
    sequences: int
    tokens: int            # real tokens (no padding)
    bytes: int             # size of the chunk file
    checksum: str          # xxh64 from the chunk header, hex
    start: list[int]       # [document index, token offset inside that document] of the first token
    end: list[int]         # the same for the token after the last one
    documents: int         # documents that start inside this chunk
    committed_at: float

    @property
    def file(self) -> str:
        return chunk_filename(self.id)


@dataclass
class Manifest:
    seq_len: int
    chunk_sequences: int
    dtype: str                       # "uint16" or "uint32"
    tokenizer: dict                  # name, vocab_hash, vocab_size, eos_id, pad_id
    sources: list[str]
    text_field: str = "text"
    lz4_level: int = 9
    # the chunk format version its chunks are written in (shared/chunk.py): a cache keeps the one it was
    # started with, so that `--mode inverse` regenerates a chunk byte for byte; 2 in manifests without it
    chunk_format: int = FORMAT_VERSION
    chunks: list[ChunkEntry] = field(default_factory=list)
    source_files: list[dict] = field(default_factory=list)  # local files in the order they were packed
    documents: int = 0               # source documents fully consumed (including skipped empty ones)
    skipped: dict = field(default_factory=dict)             # reason -> count of source records skipped
    estimate: dict = field(default_factory=dict)            # tokens, sequences, method
    finished: bool = False
    # `packerd run --holdout F`: {"fraction": F, "hash": how documents are chosen} in both the main cache and
    # the held-out one (CACHE/holdout/); the held-out one also names its main cache's folder in holdout_of.
    # Absent (None) in caches without a holdout, and then left out of the JSON.
    holdout: dict | None = None
    holdout_of: str | None = None
    # `packerd run --shard I/N`: {"spec": "I/N", "files": "whole" | "documents", "hash": ...} (packerd/shard.py)
    shard: dict | None = None
    # where the packer announces this cache's chunks, as a subscriber connects to it (a wildcard bind such as
    # tcp://*:5557 recorded with the packer's host name); rewritten by each run that announces, so that a trainer given only the folder
    # subscribes to it
    endpoint: str | None = None
    # the tokenizer engine of each packing session that committed chunks ([{"engine": "tiktoken",
    # "from_chunk": 0}, ...]): for the record only; every engine packs the same bytes, so it is not part
    # of the tokenizer identity that trainers compare. Absent in caches packed before engines existed.
    tokenizer_engines: list | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    version: int = MANIFEST_VERSION

    # totals are derived from the chunk list, never stored beside it; they are summed once per chunk and
    # kept (the packer reads them on every commit): entries are only ever appended, never edited in place,
    # and a list replaced or cut short is summed again
    def _sums(self) -> tuple[int, int, int]:
        c = self.__dict__.get("_sums_cache")
        chunks, n = self.chunks, len(self.chunks)
        if c is None or c[0] is not chunks or c[1] > n or (c[1] and chunks[c[1] - 1] is not c[2]):
            c = self.__dict__["_sums_cache"] = [chunks, 0, None, 0, 0, 0]
        if c[1] < n:
            for e in chunks[c[1]:]:
                c[3] += e.sequences
                c[4] += e.tokens
                c[5] += e.bytes
            c[1], c[2] = n, chunks[n - 1]
        return c[3], c[4], c[5]

    @property
    def total_sequences(self) -> int:
        return self._sums()[0]

    @property
    def total_tokens(self) -> int:
        return self._sums()[1]

    @property
    def total_bytes(self) -> int:
        return self._sums()[2]

    def totals(self) -> dict:
        seqs, toks, nbytes = self.total_sequences, self.total_tokens, self.total_bytes
        return {
            "chunks": len(self.chunks),
            "sequences": seqs,
            "tokens": toks,
            "bytes": nbytes,
            "bytes_per_token": round(nbytes / toks, 4) if toks else None,
            # utilization: real tokens over slots; counts lengths, never a token id as padding
            "utilization": round(toks / (seqs * self.seq_len), 6) if seqs else None,
        }

    def estimated_total_sequences(self) -> int:
        """The best guess of the finished cache's size in sequences (never below what exists)."""
        have = self.total_sequences
        if self.finished:
            return have
        est = self.estimate.get("sequences") or 0
        return max(int(est), have)

    def next_chunk_id(self) -> int:
        return self.chunks[-1].id + 1 if self.chunks else 0

    # chunks are stored column by column: flat lists of numbers parse and print several times faster than
    # a list of objects, which matters once a cache holds tens of thousands of chunks (the packer writes
    # the manifest on every commit, the trainer re-reads it on every notification)
    _COLUMNS = ("id", "sequences", "tokens", "bytes", "checksum", "documents", "committed_at")
    _OPTIONAL = ("holdout", "holdout_of", "shard", "endpoint", "tokenizer_engines")  # written only when set

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "chunks"
             and not (f.name in self._OPTIONAL and getattr(self, f.name) is None)}
        cols = {name: [getattr(c, name) for c in self.chunks] for name in self._COLUMNS}
        cols["start_doc"] = [c.start[0] for c in self.chunks]
        cols["start_offset"] = [c.start[1] for c in self.chunks]
        cols["end_doc"] = [c.end[0] for c in self.chunks]
        cols["end_offset"] = [c.end[1] for c in self.chunks]
        d["chunks"] = cols
        d["totals"] = self.totals()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        if d.get("version") not in (MANIFEST_VERSION, SNAPSHOT_VERSION):
            raise ManifestError(f"manifest version {d.get('version')} is not supported")
        d = dict(d)
        d.pop("totals", None)
        d.pop("log", None)
        d.setdefault("chunk_format", 2)  # written before the field existed: version 2 chunks
        d["version"] = MANIFEST_VERSION  # the same Manifest either way: version 2 is only how it is stored
        cols = d.pop("chunks", None) or {}
        try:
            n = len(cols.get("id", []))
            if any(len(v) != n for v in cols.values()):
                raise ManifestError("manifest chunk columns differ in length")
            d["chunks"] = [
                ChunkEntry(id=i, sequences=s, tokens=t, bytes=b, checksum=c, start=[sd, so], end=[ed, eo],
                           documents=doc, committed_at=at)
                for i, s, t, b, c, doc, at, sd, so, ed, eo in zip(
                    *(cols[k] for k in cls._COLUMNS), cols["start_doc"], cols["start_offset"],
                    cols["end_doc"], cols["end_offset"])
            ] if n else []
            return cls(**d)
        except (TypeError, KeyError, AttributeError) as e:
            raise ManifestError(f"manifest has unexpected content: {e}") from None

    def save(self, cache_dir: str | os.PathLike) -> None:
        """Write the whole manifest as a version-1 manifest.json (no commit log): caches made by tests and
        benches (bench/gpu_check.py's synthetic one); packerd commits through ManifestWriter."""
        self.updated_at = time.time()
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        atomic_write_bytes(Path(cache_dir) / MANIFEST_NAME, data)


# -- the commit log ---------------------------------------------------------------------------------
_FIELDS = tuple(f.name for f in fields(Manifest) if f.name != "chunks")


def _row(e: ChunkEntry) -> list:
    return [e.id, e.sequences, e.tokens, e.bytes, e.checksum, e.documents, e.committed_at, *e.start, *e.end]


def _entry(r: list) -> ChunkEntry:
    i, s, t, b, c, doc, at, sd, so, ed, eo = r
    return ChunkEntry(id=i, sequences=s, tokens=t, bytes=b, checksum=c, start=[sd, so], end=[ed, eo],
                      documents=doc, committed_at=at)


def apply_records(m: Manifest, payloads: list[bytes]) -> None:
    """Apply commit-log records to `m` in place: all of them, or (ManifestError) none.

    A record holds "chunks" (rows of the chunks committed), "set" (top-level fields that changed, whole) and
    "files" ([index, entry] pairs of source_files that changed or came: a source of many files would
    otherwise put its whole list in every record)."""
    entries, sets, n = [], {}, len(m.chunks)
    files = None  # a copy of source_files once a record changes it
    try:
        for p in payloads:
            rec = json.loads(p)
            for r in rec.get("chunks", ()):
                e = _entry(r)
                if e.id != n + len(entries):  # ids are contiguous from 0: the id is also the index
                    raise ManifestError(f"commit log record for chunk {e.id} where chunk {n + len(entries)} is next")
                entries.append(e)
            unknown = set(rec.get("set", {})) - set(_FIELDS)
            if unknown:
                raise ManifestError(f"commit log record sets unknown fields {sorted(unknown)}")
            sets.update(rec.get("set", {}))
            if "source_files" in sets:
                files = list(sets.pop("source_files"))
            for i, entry in rec.get("files", ()):
                files = list(m.source_files) if files is None else files
                if not isinstance(i, int) or not isinstance(entry, dict) or not 0 <= i <= len(files):
                    raise ManifestError(f"commit log record changes source file {i!r} of {len(files)}")
                files[i:i + 1] = [entry]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"commit log record has unexpected content: {e}") from None
    m.chunks.extend(entries)
    for name, value in sets.items():
        setattr(m, name, value)
    if files is not None:
        m.source_files = files


@dataclass
class LogPosition:
    """Where a reader stands in a cache's commit log, and which snapshot it read (to notice a new one)."""
    id: str
    offset: int                # after the last record applied
    snapshot_offset: int       # the log offset the snapshot covers
    snapshot_bytes: int
    snapshot_stat: tuple       # (inode, mtime ns, size) of the manifest.json read


def stat_key(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_mtime_ns, st.st_size


def snapshot_log_id(path: Path) -> str | None:
    """The log id a snapshot names, from its first bytes; None for a manifest.json of version 1."""
    with open(path, "rb") as f:
        m = _SNAPSHOT_HEAD.match(f.read(96))
    return m.group(1).decode() if m else None


def read_manifest(cache_dir: str | os.PathLike) -> tuple[Manifest | None, LogPosition | None]:
    """The manifest of `cache_dir` and where its commit log was read up to (None for a version-1 cache);
    (None, None) when there is no manifest yet."""
    path, log_path = Path(cache_dir) / MANIFEST_NAME, Path(cache_dir) / LOG_NAME
    for _ in range(5):
        try:
            with open(path, "rb") as f:
                st, raw = os.fstat(f.fileno()), f.read()
        except FileNotFoundError:
            return None, None
        try:
            d = json.loads(raw)
            m = Manifest.from_json(d)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
            raise ManifestError(f"{path} is not a valid manifest: {e}") from None
        log = d.get("log")
        if log is None:
            return m, None
        try:
            payloads, end = read_from(log_path, log["id"], int(log["offset"]))
        except (FileNotFoundError, LogError):
            # rebuilt between the two reads (--force-rebuild deletes the snapshot first): read both again
            time.sleep(0.01)
            continue
        apply_records(m, payloads)
        return m, LogPosition(log["id"], end, int(log["offset"]), len(raw), stat_key(st))
    raise ManifestError(f"{path} names commit log {log['id']}, which {log_path} is not (missing or another)")


def load_manifest(cache_dir: str | os.PathLike) -> Manifest | None:
    """The manifest of `cache_dir` (snapshot and commit log), or None when there is none yet."""
    return read_manifest(cache_dir)[0]


class ManifestWriter:
    """Commits a cache's manifest: one commit-log record per commit, a new snapshot now and then.

    Only the process holding the cache folder's lock writes. The first commit reads the folder: a cache with
    a log continues it (a torn last record cut off); a new cache, or one of version 1, gets a new log and a
    snapshot. A new snapshot is written when the log has grown by more than the last snapshot's size since
    it (at least SNAPSHOT_MIN_BYTES), so snapshots cost O(1) per commit on average and a reader starting up
    parses at most about twice the snapshot; and on request (a finished cache: manifest.json complete).
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        self.log: LogWriter | None = None
        self.logged_chunks = 0
        self.logged: dict = {}     # the top-level fields as of the last record or snapshot
        self.snapshot_offset = self.snapshot_bytes = 0

    def commit(self, m: Manifest, snapshot: bool = False, files: list[int] | None = None) -> None:
        """Make `m` durable: its chunks beyond those committed before, and any field that changed. `files`:
        the indexes of m.source_files that may have changed or come since the last commit (None: any)."""
        m.updated_at = time.time()
        if self.log is None and not self._open(m):
            return  # a new log: the snapshot just written holds everything
        rec = self._record(m, files)
        for payload in _pieces(rec):
            self.log.append(payload)
        self._logged(m, rec)
        if snapshot or self.log.end - self.snapshot_offset > max(SNAPSHOT_MIN_BYTES, self.snapshot_bytes):
            self._snapshot(m)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def _open(self, m: Manifest) -> bool:
        """Continue the folder's log (True), or start a new one with a full snapshot (False)."""
        disk, pos = read_manifest(self.dir)
        if disk is None or pos is None:
            log_id = create_log(self.dir / LOG_NAME)  # replaces an older log no snapshot names
            self.log = LogWriter(self.dir / LOG_NAME, log_id, LOG_HEADER_SIZE)
            try:
                self._snapshot(m)
            except BaseException:
                self.close()  # no snapshot names this log yet: the next commit starts over
                raise
            return False
        k = len(disk.chunks)
        if k > len(m.chunks) or (k and m.chunks[k - 1].checksum != disk.chunks[-1].checksum):
            raise ManifestError(f"the manifest in {self.dir} changed under the packer ({k} chunks there)")
        self.log = LogWriter(self.dir / LOG_NAME, pos.id, pos.offset)
        self.logged_chunks, self.logged = k, _copy_fields(disk)
        self.snapshot_offset, self.snapshot_bytes = pos.snapshot_offset, pos.snapshot_bytes
        return True

    def _record(self, m: Manifest, files: list[int] | None) -> dict:
        """The next commit-log record: the chunks and fields of `m` not logged yet."""
        rec: dict = {}
        if len(m.chunks) > self.logged_chunks:
            rec["chunks"] = [_row(e) for e in m.chunks[self.logged_chunks:]]
        changed = {name: getattr(m, name) for name in _FIELDS
                   if name != "source_files" and getattr(m, name) != self.logged.get(name)}
        listed, new = self.logged.get("source_files", []), m.source_files
        if len(new) < len(listed):  # a shorter list (packerd only adds files): logged whole
            changed["source_files"] = new
        else:
            check = range(len(new)) if files is None else sorted(set(files) | set(range(len(listed), len(new))))
            if delta := [[i, new[i]] for i in check if i >= len(listed) or listed[i] != new[i]]:
                rec["files"] = delta
        if changed:
            rec["set"] = changed
        return rec

    def _logged(self, m: Manifest, rec: dict) -> None:
        """Count the record `rec` of `m` as logged (once it is durable)."""
        self.logged_chunks = len(m.chunks)
        # copies: the packer edits its dicts in place
        self.logged.update(json.loads(json.dumps(rec.get("set", {}))))
        listed = self.logged.setdefault("source_files", [])
        for i, entry in json.loads(json.dumps(rec.get("files", []))):
            listed[i:i + 1] = [entry]

    def _snapshot(self, m: Manifest) -> None:
        d = {"log": {"id": self.log.log_id, "offset": self.log.end}, **m.to_json(), "version": SNAPSHOT_VERSION}
        data = json.dumps(d, separators=(",", ":")).encode()
        atomic_write_bytes(self.dir / MANIFEST_NAME, data)
        self.snapshot_offset, self.snapshot_bytes = self.log.end, len(data)
        self.logged_chunks, self.logged = len(m.chunks), _copy_fields(m)


def _pieces(rec: dict) -> list[bytes]:
    """The payloads of record `rec`: itself, or when it is longer than RECORD_BYTES (thousands of source files
    found at once) its files in records of their own first, the chunks and fields with the last. A crash
    between them leaves file entries logged ahead of their chunks: facts about the files, taken as they are
    by a restart. Followers read every one (a snapshot in their place would never reach them)."""
    def dump(r: dict) -> bytes:
        return json.dumps(r, separators=(",", ":")).encode()
    whole = dump(rec)
    if len(whole) <= RECORD_BYTES or not rec.get("files"):
        return [whole]  # (LogWriter.append refuses one longer than any reader takes)
    out, piece, size = [], [], 0
    for item in rec["files"]:
        n = len(dump({"f": item}))
        if piece and size + n > RECORD_BYTES:
            out.append(dump({"files": piece}))
            piece, size = [], 0
        piece.append(item)
        size += n
    out.append(dump({**{k: v for k, v in rec.items() if k != "files"}, "files": piece}))
    return out


def _copy_fields(m: Manifest) -> dict:
    return json.loads(json.dumps({name: getattr(m, name) for name in _FIELDS}))
