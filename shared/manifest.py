"""The manifest: the single source of truth of a cache folder.

A chunk exists for readers only once the manifest lists it. The packer writes the chunk file first, then
replaces `manifest.json` atomically (temporary file, fsync, rename), then announces the chunk. Readers
never scan the folder for chunk files.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .fsutil import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
HOLDOUT_DIR = "holdout"  # CACHE/holdout/: the held-out cache (`packerd run --holdout`), a cache of its own
MANIFEST_VERSION = 1


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

    # totals are derived, never stored separately from the chunk list they summarise
    @property
    def total_sequences(self) -> int:
        return sum(c.sequences for c in self.chunks)

    @property
    def total_tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.chunks)

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
        if d.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"manifest version {d.get('version')} is not supported")
        d = dict(d)
        d.pop("totals", None)
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
        self.updated_at = time.time()
        data = json.dumps(self.to_json(), separators=(",", ":")).encode()
        atomic_write_bytes(Path(cache_dir) / MANIFEST_NAME, data)


def load_manifest(cache_dir: str | os.PathLike) -> Manifest | None:
    """The manifest of `cache_dir`, or None when there is none yet."""
    path = Path(cache_dir) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_json(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as e:
        raise ManifestError(f"{path} is not a valid manifest: {e}") from None
