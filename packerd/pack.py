"""The packing loop: ordered documents -> tokens (tokenizer threads) -> fixed windows -> committed chunks.

The packed stream of a cache is a pure function of the source documents in order, the tokenizer, seq_len
and the chunk size. Every chunk records the source position of its first token and of the token after its
last ([document index, token offset]); forward mode restarts at the last committed end, inverse mode
regenerates a missing chunk from its recorded start, byte for byte.

With a holdout (`--holdout F`) one read of the source feeds two caches: each document goes, by a hash of
its index (packerd/holdout.py), to the main cache or to the held-out one in CACHE/holdout/. Each has its own
token stream, chunks, manifest and restart point (a CacheWriter); a restart reads from the earlier of the
two points and gives a document to a cache only at or after that cache's own.

Commit order for each chunk: chunk file (temporary name, fsync, rename, fsync folder) -> manifest (one
record appended to its commit log and fsynced, shared/manifest.py ManifestWriter) -> notification.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from shared.chunk import Chunk, encode_chunk, file_checksum
from shared.fsutil import atomic_write_bytes
from shared.manifest import HOLDOUT_DIR, ChunkEntry, Manifest, ManifestWriter, chunk_filename
from shared.tokenizer import TokenizerInfo

from .holdout import held_out
from .source import Source, SourceError
from .tokenizer import GUARD_EVERY, BatchEncoder, Diverged, Engine

log = logging.getLogger("packerd")

BATCH_CHARS = 1 << 18  # text per tokenizer task: a few hundred ms of work, small enough to keep order cheap
IN_FLIGHT = 4  # batches queued per worker thread: enough that they keep busy while the main thread commits
MAX_CUTS = 2  # chunks cut and waiting for compression before the main thread waits for the oldest


class PackError(RuntimeError):
    pass


def build_chunk(tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int) -> Chunk:
    """Cut `tokens` into windows of seq_len (the last one may be short); doc_starts are positions in tokens."""
    n = len(tokens)
    num_seq = max(1, math.ceil(n / seq_len))
    lengths = np.full(num_seq, seq_len, dtype=np.uint32)
    lengths[-1] = n - seq_len * (num_seq - 1)
    seq_of_start = doc_starts // seq_len
    doc_ptr = np.searchsorted(seq_of_start, np.arange(num_seq + 1), side="left").astype(np.uint32)
    return Chunk(seq_len=seq_len, tokens=tokens, lengths=lengths, doc_ptr=doc_ptr,
                 doc_starts=(doc_starts % seq_len).astype(np.uint32))


class TokenStream:
    """Tokens read but not yet committed, with where each document starts (absolute stream positions).

    Appended batches are kept as pieces and joined only when a position is looked up or a chunk is taken:
    joining on every append copied the whole buffer once per batch (up to a chunk's worth, 16 times a
    chunk at 1024 x 1024 tokens and 256 KB batches)."""

    def __init__(self, base: int, dtype):
        self.base = base                                 # absolute position of the first buffered token
        self._tokens = [np.empty(0, dtype=dtype)]
        self._doc_index = [np.empty(0, dtype=np.int64)]  # source index of each document still buffered
        self._doc_start = [np.empty(0, dtype=np.int64)]  # its absolute start (may be < base: began earlier)
        self._len = 0
        # the source index after the last record appended (records of the other cache included, once their
        # batch is): where a cut at the end of the buffer ends
        self.next_doc = 0

    def __len__(self) -> int:
        return self._len

    def _joined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        for pieces in (self._tokens, self._doc_index, self._doc_start):
            if len(pieces) > 1:
                pieces[:] = [np.concatenate(pieces)]
        return self._tokens[0], self._doc_index[0], self._doc_start[0]

    def append(self, tokens: np.ndarray, lengths: np.ndarray, indices: np.ndarray, first_doc_skip: int = 0):
        """Append documents (tokens with EOS); the first one loses `first_doc_skip` leading tokens."""
        end = self.base + self._len
        self._doc_start.append(end + np.concatenate(([0], np.cumsum(lengths)[:-1])) - first_doc_skip)
        self._doc_index.append(np.asarray(indices, dtype=np.int64))
        self._tokens.append(tokens[first_doc_skip:])
        self._len += len(tokens) - first_doc_skip

    def position(self, p: int) -> list[int]:
        """[document index, offset] of absolute stream position p (p <= end of buffer)."""
        if p == self.base + self._len:
            return [self.next_doc, 0]
        _, doc_index, doc_start = self._joined()
        i = int(np.searchsorted(doc_start, p, side="right")) - 1
        return [int(doc_index[i]), int(p - doc_start[i])]

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
        """Remove the first n tokens: (tokens, document starts relative to them, start, end positions)."""
        start, end = self.position(self.base), self.position(self.base + n)
        all_tokens, doc_index, doc_start = self._joined()
        tokens = all_tokens[:n]
        rel = doc_start - self.base
        starts = rel[(rel >= 0) & (rel < n)]
        self._tokens = [all_tokens[n:].copy()]
        self._len -= n
        self.base += n
        keep = doc_start >= self.base  # documents starting at or after the new base...
        if len(doc_start):
            # ...plus the one the new base falls inside
            inside = int(np.searchsorted(doc_start, self.base, side="right")) - 1
            if inside >= 0:
                keep[inside] = True
        self._doc_index, self._doc_start = [doc_index[keep]], [doc_start[keep]]
        return tokens, starts.astype(np.int64), start, end


class Progress:
    """A status line: refreshed in place on a TTY, a plain log line every `every` seconds otherwise."""

    def __init__(self, every: float = 10.0, stream=sys.stderr, engine: str = ""):
        self.engine = f" ({engine})" if engine else ""  # the tokenizer engine, named after the rate
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 0.5 if self.tty else every
        self.t0 = time.monotonic()
        self.last = 0.0
        self.tokens = 0
        self.docs = 0

    def update(self, manifest: Manifest, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        t = manifest.totals()
        est = manifest.estimate.get("tokens")
        eta = ""
        if est and self.tokens and not manifest.finished:
            left = max(est - t["tokens"], 0) / (self.tokens / dt)
            eta = f" | est {100 * t['tokens'] / est:5.1f}% ETA {int(left // 3600):02d}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        bpt = f"{t['bytes_per_token']:.2f}" if t["bytes_per_token"] else "-"
        line = (f"chunks {t['chunks']:,} | sequences {t['sequences']:,} | tokens {t['tokens']:,} | "
                f"{self.tokens / dt:,.0f} tok/s{self.engine} | {self.docs / dt:,.0f} docs/s | {bpt} bytes/token{eta}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Batch:
    """Records read for one tokenizer task, in source order."""
    idx: np.ndarray      # source index of each non-empty document
    texts: list[str]
    empty: list[int]     # source indices of the empty records among them (skipped, counted)
    upto: int            # the index after the last record read: where a cut at the end of the batch ends
    units: float = 0.0   # their size in progress units (bytes or rows), counted once they are tokenized


class CacheWriter:
    """One cache folder's side of packing: its manifest, its token stream, its chunks waiting to be committed.

    A Packer reads and tokenizes the source once and hands each document to the writer of the cache it
    belongs to: the main cache, or with --holdout the held-out one (packerd/holdout.py)."""

    def __init__(self, packer: "Packer", cache_dir: Path, manifest: Manifest, held_out: bool = False):
        self.packer = packer
        self.dir = Path(cache_dir)
        self.m = manifest
        self.writer = ManifestWriter(cache_dir)  # appends one commit-log record per commit
        self.held_out = held_out  # True: takes the documents the hash selects; False: all the others
        self.tag = {"cache": HOLDOUT_DIR} if held_out else {}  # the optional field of its notifications
        self.stream = TokenStream(manifest.total_tokens, packer.dtype)
        self.since = [0, 0]  # the source position the stream starts at
        self._cuts: deque = deque()  # (sequences, tokens, documents, start, end, bytes or pending result)
        self.skipped_at: list[int] = []  # indices of skipped empty records not yet counted in the manifest
        self.tokens_seen = 0  # tokens of the documents routed here, for the size estimate
        self._files_seen: int | None = None  # how much of source.changed the manifest has taken in

    def open(self, since: list[int], base: int) -> None:
        """Start an empty stream at source position `since`, absolute token position `base`."""
        self.since = list(since)
        self.stream = TokenStream(base, self.packer.dtype)
        self.stream.next_doc = since[0]

    def resume_point(self) -> list[int]:
        return list(self.m.chunks[-1].end) if self.m.chunks else [0, 0]

    def add(self, batch: Batch, tokens: np.ndarray, lengths: np.ndarray, mine: np.ndarray, mine_empty) -> int:
        """Append the batch's documents routed here (the mask `mine`) that lie at or after self.since; the
        document at self.since loses the tokens committed before. Returns the tokens appended."""
        self.tokens_seen += int(lengths[mine].sum())
        # the manifest counts the empty records before m.documents (a finished cache: past its last chunk)
        counted = max(self.since[0], self.m.documents)
        self.skipped_at += [i for i, m in zip(batch.empty, mine_empty) if m and i >= counted]
        keep = mine & (batch.idx >= self.since[0])
        added = 0
        if keep.any():
            idx = batch.idx[keep]
            skip = self.since[1] if idx[0] == self.since[0] else 0
            self.stream.append(tokens if keep.all() else tokens[np.repeat(keep, lengths)], lengths[keep], idx, skip)
            added = int(lengths[keep].sum()) - skip
        self.stream.next_doc = max(self.stream.next_doc, batch.upto)
        return added

    # -- cutting and committing ----------------------------------------------------------------
    def cut_chunks(self) -> None:
        """Cut every full chunk the stream holds."""
        size = self.m.chunk_sequences * self.m.seq_len
        while len(self.stream) >= size:
            self._cut(size)

    def cut_windows(self) -> None:
        """Follow mode: cut every complete window; the partial one stays in memory for more text."""
        whole = len(self.stream) // self.m.seq_len * self.m.seq_len
        if whole:
            self._cut(whole)

    def cut_rest(self) -> None:
        """The source is finished: the rest, with a short final window of its real length."""
        if len(self.stream):
            self._cut(len(self.stream))

    def _cut(self, n: int) -> None:
        """Take the next n tokens as a chunk and have it compressed (Packer.compress: by a worker thread when
        there are any). Chunks are still committed strictly in order, by commit_ready."""
        tokens, starts, start, end = self.stream.take(n)
        chunk = build_chunk(tokens, starts, self.m.seq_len)
        self._cuts.append((chunk.num_sequences, len(tokens), len(starts), start, end,
                           self.packer.compress(chunk, self.m.chunk_format)))

    def commit_ready(self, wait: bool = False) -> None:
        """Commit the compressed chunks at the head of the queue; with wait, all of them.

        At most MAX_CUTS chunks wait for compression, which bounds memory."""
        while self._cuts:
            data = self._cuts[0][-1]
            if not isinstance(data, bytes) and not data.done() and not wait and len(self._cuts) <= MAX_CUTS:
                return
            sequences, tokens, documents, start, end, data = self._cuts.popleft()
            self._commit(data if isinstance(data, bytes) else data.result(), sequences, tokens, documents, start, end)

    def _commit(self, data: bytes, sequences: int, tokens: int, documents: int, start: list[int], end: list[int]) -> None:
        cid = self.m.next_chunk_id()
        atomic_write_bytes(self.dir / chunk_filename(cid), data)
        entry = ChunkEntry(id=cid, sequences=sequences, tokens=tokens, bytes=len(data),
                           checksum=file_checksum(data), start=start, end=end,
                           documents=documents, committed_at=time.time())
        self.m.chunks.append(entry)
        self.m.documents = end[0]
        self._count_skipped(end[0])
        self.save_manifest()
        if self.packer.pub:
            self.packer.pub.chunk(chunk_id=cid, sequences=entry.sequences, tokens=entry.tokens,
                                  total_sequences=self.m.total_sequences, total_tokens=self.m.total_tokens,
                                  est_total_sequences=self.m.estimated_total_sequences(),
                                  committed_at=entry.committed_at, **self.tag)

    def _count_skipped(self, before: int) -> None:
        counted = [i for i in self.skipped_at if i < before]
        if counted:
            self.m.skipped["empty"] = self.m.skipped.get("empty", 0) + len(counted)
            self.skipped_at = [i for i in self.skipped_at if i >= before]

    def save_manifest(self) -> None:
        files, listed = self.packer.source.files, self.m.source_files
        if self._files_seen is None:  # the first commit compares every entry with the manifest's
            self.m.source_files = [f.to_json() for f in files]
            changed = None
        else:  # then only the files that came or were counted since the last commit
            changed = sorted(set(self.packer.source.changed[self._files_seen:]))
            for i in changed:
                if i < len(listed):
                    listed[i] = files[i].to_json()
                else:
                    listed.append(files[i].to_json())
        seen = len(self.packer.source.changed)
        self.m.estimate = self.packer.estimate(self)
        # a finished cache's manifest.json is complete
        self.writer.commit(self.m, snapshot=self.m.finished, files=changed)
        self._files_seen = seen  # after the commit: one that failed hands its files to the next

    def finish(self) -> None:
        """Mark the cache finished (its last chunk is committed) and announce it."""
        self.m.documents = max(self.m.documents, self.stream.next_doc)
        self._count_skipped(self.stream.next_doc)  # empty records after the last chunk
        self.m.finished = True
        self.save_manifest()
        if self.packer.pub:
            self.packer.pub.finished(total_sequences=self.m.total_sequences, total_tokens=self.m.total_tokens,
                                     **self.tag)

    def rewrite(self, entry: ChunkEntry) -> None:
        """Inverse mode: write the chunk `entry` again from the stream; it must come out byte-identical."""
        tokens, starts, start, end = self.stream.take(entry.tokens)
        data = encode_chunk(build_chunk(tokens, starts, self.m.seq_len), self.packer.level, self.m.chunk_format)
        checksum = file_checksum(data)
        if start != entry.start or checksum != entry.checksum or len(data) != entry.bytes:
            raise PackError(f"regenerated chunk {entry.id} of {self.dir} differs from the manifest (source "
                            f"changed, or another tokenizer, level or chunk format); not written")
        atomic_write_bytes(self.dir / entry.file, data)
        log.info("regenerated chunk %d of %s (%d sequences)", entry.id, self.dir, entry.sequences)


class Packer:
    """Reads and tokenizes the source once, in order, and feeds the main cache's writer and, with a holdout
    (`holdout=(folder, manifest)`), the held-out cache's."""

    def __init__(self, cache_dir: Path, manifest: Manifest, source: Source, tok: TokenizerInfo,
                 workers: int, level: int, publisher=None, stop: threading.Event | None = None,
                 estimate_tokens: int | None = None, progress: Progress | None = None,
                 holdout: tuple[Path, Manifest] | None = None, max_tokens_per_s: int = 0,
                 engine: Engine | None = None):
        self.source = source
        self.engine = engine or Engine("hf", tok)
        self.max_rate = max_tokens_per_s
        self._paced: tuple[float, int] | None = None  # (when pacing began, tokens handed over since)
        self.tok = tok
        self.workers = workers
        self.level = level
        self.pub = publisher
        self.stop = stop or threading.Event()
        self.estimate_tokens = estimate_tokens
        self.progress = progress
        self.dtype = np.dtype(manifest.dtype)
        self.fraction = (manifest.holdout or {}).get("fraction")
        self.main = CacheWriter(self, cache_dir, manifest)
        self.held = CacheWriter(self, holdout[0], holdout[1], held_out=True) if holdout else None
        self.writers = [self.main] + ([self.held] if self.held else [])
        self._pool: ThreadPoolExecutor | None = None
        self._encode: BatchEncoder | None = None
        # running ratio of source units (bytes, or rows) to tokens, for the size estimate
        self.units_seen = 0.0
        self.tokens_seen = 0

    # -- tokenizing ----------------------------------------------------------------------------
    def _batches(self, start_doc: int) -> Iterator[Batch]:
        idx, texts, empty, chars, upto, units = [], [], [], 0, start_doc, 0.0

        def batch() -> Batch:
            return Batch(np.asarray(idx, dtype=np.int64), texts, empty, upto, units)
        try:
            for i, text, doc_units in self.source.documents(start_doc):
                if self.stop.is_set():
                    break
                upto = i + 1
                units += doc_units
                if text is None:
                    empty.append(i)
                    continue
                idx.append(i)
                texts.append(text)
                chars += len(text)
                if chars >= BATCH_CHARS:
                    yield batch()
                    idx, texts, empty, chars, units = [], [], [], 0, 0.0
        except SourceError:
            if texts or empty:  # what was read before the bad record still gets packed and committed
                yield batch()
            raise
        if texts or empty:
            yield batch()

    def _tokenized(self, batches: Iterator[Batch]):
        """(batch, tokens, lengths) in source order; at most IN_FLIGHT batches per worker in flight.

        Every GUARD_EVERY-th batch of the session, the first included, is also encoded by `tokenizers` and
        compared (packerd/tokenizer.py): a difference is a PackError before the batch reaches a cache."""
        self.start_workers()
        numbered = ((b, n % GUARD_EVERY == 0) for n, b in enumerate(batches))
        if self._pool is None:
            for b, guard in numbered:
                yield (b, *self._encode_checked(b, guard))
            return
        pending: deque = deque()
        error = None
        try:
            for b, guard in numbered:
                pending.append((b, self._pool.submit(self._encode_checked, b, guard)))
                if len(pending) >= IN_FLIGHT * self.workers:
                    b, r = pending.popleft()
                    yield (b, *r.result())
        except SourceError as e:
            error = e  # hand over the batches read before the bad record first
        while pending:
            b, r = pending.popleft()
            yield (b, *r.result())
        if error is not None:
            raise error

    def _encode_checked(self, b: Batch, guard: bool) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self._encode(b.texts, guard)
        except Diverged as e:
            raise PackError(f"tokenizer engines differ: {self.engine.name} and tokenizers encode document "
                            f"{int(b.idx[e.position])} differently; nothing of its batch was committed "
                            f"(pack with --tokenizer-engine hf, and report the document)") from None

    def start_workers(self) -> None:
        """Load the tokenizer and start the tokenizer threads (none with workers=0: encode inline).

        Threads, not processes: `tokenizers` and LZ4 release the GIL for the work itself, and threads
        share one tokenizer in memory (measured faster per token; README, Packer throughput)."""
        if self._encode is None:
            self._encode = BatchEncoder(self.engine, self.tok.eos_id, self.dtype.str)
        if self._pool is None and self.workers > 0:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tokenize")

    def compress(self, chunk: Chunk, version: int):
        """The chunk file's bytes, or a future of them from a worker thread.

        LZ4 high compression costs about as much time as everything else the main thread does together;
        it releases the GIL, so in a worker thread it runs in parallel and the main thread stays off the
        critical path."""
        if self._pool is not None:
            return self._pool.submit(encode_chunk, chunk, self.level, version)
        return encode_chunk(chunk, self.level, version)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for w in self.writers:
            w.writer.close()

    def _feed(self, writers: list[CacheWriter], start_doc: int):
        """Yield after each tokenized batch, read from record `start_doc` on, is handed to `writers`: each
        document to the writer of its cache (by the hash of its index), if that writer is among them."""
        for batch, tokens, lengths in self._tokenized(self._batches(start_doc)):
            held = held_out(batch.idx, self.fraction)
            held_empty = held_out(batch.empty, self.fraction)
            added = sum(w.add(batch, tokens, lengths, held == w.held_out, held_empty == w.held_out) for w in writers)
            # units and tokens of the same documents: the reader runs batches ahead of the tokenizer
            self.units_seen += batch.units
            n = int(lengths.sum())
            self.tokens_seen += n
            if self.progress:
                self.progress.tokens += added
                self.progress.docs += len(batch.idx)
            yield
            self._pace(n)

    def _pace(self, tokens: int) -> None:
        """With max_tokens_per_s, wait until the tokens handed over so far are due at that rate."""
        if not self.max_rate:
            return
        t0, done = self._paced or (time.monotonic(), 0)
        self._paced = (t0, done + tokens)
        self.stop.wait(max(0.0, t0 + (done + tokens) / self.max_rate - time.monotonic()))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, follow: bool = False, poll_seconds: float = 2.0) -> None:
        """Pack from where each cache stopped: read from the earlier of their restart points."""
        for w in self.writers:
            w.open(w.resume_point(), w.m.total_tokens)
        read_from = min(w.since for w in self.writers)[0]
        try:
            while not self.stop.is_set():
                for _ in self._feed(self.writers, read_from):
                    for w in self.writers:
                        w.cut_chunks()
                        w.commit_ready()
                    self._show()
                read_from = min(w.stream.next_doc for w in self.writers)
                if self.stop.is_set():
                    break
                if not follow:
                    self._finish()
                    break
                # follow mode: hand the trainer every complete window now, keep the partial ones in memory
                for w in self.writers:
                    w.cut_windows()
                    w.commit_ready(wait=True)
                self._show()
                while not self.stop.is_set() and not self.source.rescan():
                    self.stop.wait(poll_seconds)
        except SourceError:
            self._commit_all()  # the chunks cut before the bad record are complete: commit them
            raise
        self._commit_all()  # after a stop, likewise
        self._show(force=True)

    def _commit_all(self) -> None:
        for w in self.writers:
            w.commit_ready(wait=True)

    def _finish(self) -> None:
        """The last short chunks, then each cache marked finished. The held-out cache goes first, so a main
        manifest that says finished means both are."""
        for w in reversed(self.writers):
            w.cut_rest()
            w.commit_ready(wait=True)
        for w in reversed(self.writers):
            w.finish()

    def _show(self, force: bool = False) -> None:
        if self.progress:
            self.progress.update(self.main.m, force=force)

    def estimate(self, w: CacheWriter) -> dict:
        """The size estimate of w's cache: its share of the whole source's tokens."""
        if self.estimate_tokens:
            tokens, method = int(self.estimate_tokens * self._share(w)), "--estimate-tokens"
        else:
            units, method = self.source.total_units()
            if units is None or not self.units_seen or not self.tokens_seen:
                return w.m.estimate
            tokens = int(units * self.tokens_seen / self.units_seen * self._share(w))
        tokens = max(tokens, w.m.total_tokens)
        return {"tokens": tokens, "sequences": math.ceil(tokens / w.m.seq_len), "method": method}

    def _share(self, w: CacheWriter) -> float:
        """w's share of the tokens: as measured so far, or before any reading as the fraction expects."""
        if self.tokens_seen:
            return w.tokens_seen / self.tokens_seen
        f = self.fraction or 0.0
        return f if w.held_out else 1.0 - f

    # -- inverse -------------------------------------------------------------------------------
    def regenerate(self, w: CacheWriter, chunk_ids: list[int]) -> list[int]:
        """Rewrite the given chunks of w's cache from their recorded source ranges, each byte-identical."""
        done = []
        ids = sorted(chunk_ids)
        while ids and not self.stop.is_set():
            run = [ids.pop(0)]
            while ids and ids[0] == run[-1] + 1:
                run.append(ids.pop(0))
            first = w.m.chunks[run[0]]
            w.open(first.start, sum(c.tokens for c in w.m.chunks[:run[0]]))
            pending = list(run)
            feed = self._feed([w], first.start[0])
            for _ in feed:
                while pending and len(w.stream) >= w.m.chunks[pending[0]].tokens:
                    w.rewrite(w.m.chunks[pending.pop(0)])
                if not pending:
                    break
            feed.close()
            if pending and not self.stop.is_set():
                raise PackError(f"the source ended before chunk {pending[0]} could be regenerated; has it changed?")
            done += run
        return done
