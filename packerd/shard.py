"""Packing on several machines (`packerd run --shard I/N`): which documents shard I of N packs.

N packers given the same sources and the shard specs 0/N .. N-1/N, each writing its own cache, pack every
document exactly once between them, with no coordination beyond the spec. Per kind of source:
- local files: when the sources hold at least N files, whole files: a file belongs to shard
  xxh64(its path relative to its source root) mod N. The choice depends on that path alone, so machines that
  mount the data at different places agree, and a file that appears later (--follow) goes to one shard
  without moving any other. With fewer files than N, every Nth record of each file (record j of a file to
  shard j mod N). Which of the two applies is decided on the cache's first run and recorded in its manifest,
  so files that appear later never switch it; N packers started on the same file list decide alike.
- `hf:` sources: the streaming dataset's own shards (datasets' IterableDataset.shard: contiguous blocks of
  its files) when it has at least N of them; otherwise every Nth record.
- builtin sources: every Nth record.
The document indices of a sharded cache (its restart points, the holdout hash) count its own documents.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import xxhash

SHARD_SEED = 0x7368617264  # fixed for the life of every cache: "shard" in ASCII
# recorded in the manifest, so a packer that assigned files another way refuses to continue the cache
FILE_HASH = f"xxh64(path relative to the source root, UTF-8, seed=0x{SHARD_SEED:x}) mod N"
WHOLE, DOCUMENTS = "whole", "documents"  # how local files are split: whole files, or every Nth record


class ShardError(ValueError):
    pass


@dataclass
class Shard:
    index: int
    count: int
    files: str | None = None  # WHOLE or DOCUMENTS; None until the first run decides (Source does)

    @classmethod
    def parse(cls, spec: str, files: str | None = None) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
        if not m:
            raise ShardError(f"shard must be I/N, shard I of N counted from 0, e.g. 0/4 (got {spec!r})")
        index, count = int(m[1]), int(m[2])
        if count < 1:
            raise ShardError(f"shard count N must be at least 1 (got {spec!r})")
        if index >= count:
            raise ShardError(f"shard index I must be below N: the shards of {count} are 0/{count} to "
                             f"{count - 1}/{count} (got {spec!r})")
        return cls(index, count, files)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def decide(self, local_files: int) -> None:
        """Whole files when there are at least N local files, else every Nth record; kept once decided."""
        if self.files is None:
            self.files = WHOLE if local_files >= self.count else DOCUMENTS

    def owns_file(self, rel: str) -> bool:
        """Whether the local file at `rel` (relative to its source root) is packed whole by this shard."""
        return xxhash.xxh64_intdigest(rel.encode(), seed=SHARD_SEED) % self.count == self.index

    def record(self) -> dict:
        """What the manifest records: the spec, how local files are split, and the file hash."""
        return {"spec": str(self), "files": self.files, "hash": FILE_HASH}
