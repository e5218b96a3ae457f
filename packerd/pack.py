"""The packing loop: ordered documents -> tokens (tokenizer threads) -> fixed windows -> committed chunks.

The packed stream is a pure function of the source documents in order, the tokenizer, seq_len and the
chunk size. Every chunk records the source position of its first token and of the token after its last
([document index, token offset]); forward mode restarts at the last committed end, inverse mode
regenerates a missing chunk from its recorded start, byte for byte.

Commit order for each chunk: chunk file (temporary name, fsync, rename, fsync folder) -> manifest
(the same way) -> notification.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from shared.chunk import Chunk, encode_chunk, file_checksum
from shared.fsutil import atomic_write_bytes
from shared.manifest import ChunkEntry, Manifest, chunk_filename
from shared.tokenizer import TokenizerInfo

from .source import Source, SourceError
from .tokenizer import BatchEncoder

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
    """Tokens read but not yet committed, with where each document starts (absolute stream positions)."""

    def __init__(self, base: int, dtype):
        self.base = base                                 # absolute position of tokens[0]
        self.tokens = np.empty(0, dtype=dtype)
        self.doc_index = np.empty(0, dtype=np.int64)     # source index of each document still buffered
        self.doc_start = np.empty(0, dtype=np.int64)     # its absolute start (may be < base: began earlier)
        self.next_doc = 0                                # index of the next source record to read

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, tokens: np.ndarray, lengths: np.ndarray, indices: np.ndarray, first_doc_skip: int = 0):
        """Append documents (tokens with EOS); the first one loses `first_doc_skip` leading tokens."""
        end = self.base + len(self.tokens)
        starts = end + np.concatenate(([0], np.cumsum(lengths)[:-1])) - first_doc_skip
        self.tokens = np.concatenate((self.tokens, tokens[first_doc_skip:]))
        self.doc_index = np.concatenate((self.doc_index, indices))
        self.doc_start = np.concatenate((self.doc_start, starts))

    def position(self, p: int) -> list[int]:
        """[document index, offset] of absolute stream position p (p <= end of buffer)."""
        if p == self.base + len(self.tokens):
            return [self.next_doc, 0]
        i = int(np.searchsorted(self.doc_start, p, side="right")) - 1
        return [int(self.doc_index[i]), int(p - self.doc_start[i])]

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
        """Remove the first n tokens: (tokens, document starts relative to them, start, end positions)."""
        start, end = self.position(self.base), self.position(self.base + n)
        tokens = self.tokens[:n]
        rel = self.doc_start - self.base
        starts = rel[(rel >= 0) & (rel < n)]
        self.tokens = self.tokens[n:].copy()
        self.base += n
        keep = self.doc_start + 0 >= self.base  # documents starting at or after the new base...
        if len(self.doc_start):
            # ...plus the one the new base falls inside
            inside = int(np.searchsorted(self.doc_start, self.base, side="right")) - 1
            if inside >= 0:
                keep[inside] = True
        self.doc_index, self.doc_start = self.doc_index[keep], self.doc_start[keep]
        return tokens, starts.astype(np.int64), start, end


class Progress:
    """A status line: refreshed in place on a TTY, a plain log line every `every` seconds otherwise."""

    def __init__(self, every: float = 10.0, stream=sys.stderr):
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
                f"{self.tokens / dt:,.0f} tok/s | {self.docs / dt:,.0f} docs/s | {bpt} bytes/token{eta}")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Packer:
    def __init__(self, cache_dir: Path, manifest: Manifest, source: Source, tok: TokenizerInfo,
                 workers: int, level: int, publisher=None, stop: threading.Event | None = None,
                 estimate_tokens: int | None = None, progress: Progress | None = None):
        self.dir = Path(cache_dir)
        self.m = manifest
        self.source = source
        self.tok = tok
        self.workers = workers
        self.level = level
        self.pub = publisher
        self.stop = stop or threading.Event()
        self.estimate_tokens = estimate_tokens
        self.progress = progress
        self.dtype = np.dtype(manifest.dtype)
        self._pool: ThreadPoolExecutor | None = None
        self._encode: BatchEncoder | None = None
        self._cuts: deque = deque()  # (sequences, tokens, documents, start, end, bytes or pending result)
        # running ratio of source units (bytes, or rows) to tokens, for the size estimate
        self.units_seen = 0.0
        self.tokens_seen = 0
        self.skipped_at: list[int] = []  # indices of skipped empty records not yet counted in the manifest

    # -- tokenizing ----------------------------------------------------------------------------
    def _batches(self, stream: TokenStream, start_doc: int) -> Iterator[tuple[np.ndarray, list[str]]]:
        idx, texts, chars = [], [], 0
        try:
            for i, text, units in self.source.documents(start_doc):
                if self.stop.is_set():
                    break
                stream.next_doc = i + 1  # provisional: only meaningful once the batch is appended
                self.units_seen += units
                if text is None:
                    self.skipped_at.append(i)
                    continue
                idx.append(i)
                texts.append(text)
                chars += len(text)
                if chars >= BATCH_CHARS:
                    yield np.asarray(idx, dtype=np.int64), texts
                    idx, texts, chars = [], [], 0
        except SourceError:
            if texts:  # what was read before the bad record still gets packed and committed
                yield np.asarray(idx, dtype=np.int64), texts
            raise
        if texts:
            yield np.asarray(idx, dtype=np.int64), texts

    def _tokenized(self, batches):
        """(indices, tokens, lengths) in source order; at most IN_FLIGHT batches per worker in flight."""
        self.start_workers()
        if self._pool is None:
            for idx, texts in batches:
                yield (idx, *self._encode(texts))
            return
        pending: deque = deque()
        error = None
        try:
            for idx, texts in batches:
                pending.append((idx, self._pool.submit(self._encode, texts)))
                if len(pending) >= IN_FLIGHT * self.workers:
                    i, r = pending.popleft()
                    yield (i, *r.result())
        except SourceError as e:
            error = e  # hand over the batches read before the bad record first
        while pending:
            i, r = pending.popleft()
            yield (i, *r.result())
        if error is not None:
            raise error

    def start_workers(self) -> None:
        """Load the tokenizer and start the tokenizer threads (none with workers=0: encode inline).

        Threads, not processes: `tokenizers` and LZ4 release the GIL for the work itself, and threads
        share one tokenizer in memory (measured faster per token; README, Packer throughput)."""
        if self._encode is None:
            self._encode = BatchEncoder(self.tok.backend, self.tok.eos_id, self.dtype.str)
        if self._pool is None and self.workers > 0:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tokenize")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _feed(self, stream: TokenStream, start: list[int]):
        """Yield after each tokenized batch is appended to `stream`, reading from source position `start`."""
        skip = start[1]
        for idx, tokens, lengths in self._tokenized(self._batches(stream, start[0])):
            first_skip = skip if len(idx) and idx[0] == start[0] else 0
            skip = 0
            stream.next_doc = int(idx[-1]) + 1 if stream.next_doc <= idx[-1] else stream.next_doc
            stream.append(tokens, lengths, idx, first_skip)
            self.tokens_seen += int(lengths.sum()) - first_skip
            if self.progress:
                self.progress.tokens += int(lengths.sum()) - first_skip
                self.progress.docs += len(idx)
            yield

    # -- forward -------------------------------------------------------------------------------
    def forward(self, follow: bool = False, poll_seconds: float = 2.0) -> None:
        L, S = self.m.seq_len, self.m.chunk_sequences
        start = list(self.m.chunks[-1].end) if self.m.chunks else [0, 0]
        base = self.m.total_tokens
        stream = TokenStream(base, self.dtype)
        stream.next_doc = start[0]
        read_from = start
        try:
            while not self.stop.is_set():
                for _ in self._feed(stream, read_from):
                    while len(stream) >= S * L:
                        self._cut(stream, S * L)
                    self._commit_ready()
                    if self.progress:
                        self.progress.update(self.m)
                read_from = [stream.next_doc, 0]
                if self.stop.is_set():
                    break
                if not follow:
                    if len(stream):
                        self._cut(stream, len(stream))  # the final window, short, with its real length
                    self._commit_ready(wait=True)
                    self.m.finished = True
                    self._save_manifest()
                    if self.pub:
                        self.pub.finished(total_sequences=self.m.total_sequences, total_tokens=self.m.total_tokens)
                    break
                # follow mode: hand the trainer every complete window now, keep the partial one in memory
                whole = len(stream) // L * L
                if whole:
                    self._cut(stream, whole)
                self._commit_ready(wait=True)
                if self.progress:
                    self.progress.update(self.m)
                while not self.stop.is_set() and not self.source.rescan():
                    self.stop.wait(poll_seconds)
        except SourceError:
            self._commit_ready(wait=True)  # the chunks cut before the bad record are complete: commit them
            raise
        self._commit_ready(wait=True)  # after a stop, likewise
        if self.progress:
            self.progress.update(self.m, force=True)

    def _estimate(self) -> dict:
        if self.estimate_tokens:
            tokens, method = self.estimate_tokens, "--estimate-tokens"
        else:
            units, method = self.source.total_units()
            if units is None or not self.units_seen or not self.tokens_seen:
                return self.m.estimate
            tokens = int(units * self.tokens_seen / self.units_seen)
        tokens = max(tokens, self.m.total_tokens)
        return {"tokens": tokens, "sequences": math.ceil(tokens / self.m.seq_len), "method": method}

    def _save_manifest(self) -> None:
        self.m.source_files = [f.to_json() for f in self.source.files]
        self.m.estimate = self._estimate()
        self.m.save(self.dir)

    def _cut(self, stream: TokenStream, n: int) -> None:
        """Take the next n tokens as a chunk and have it compressed (by a worker thread when there are any).

        LZ4 high compression costs about as much time as everything else the main thread does together;
        it releases the GIL, so in a worker thread it runs in parallel and the main thread stays off the
        critical path. Chunks are still committed strictly in order, by _commit_ready."""
        tokens, starts, start, end = stream.take(n)
        chunk = build_chunk(tokens, starts, self.m.seq_len)
        if self._pool is not None:
            data = self._pool.submit(encode_chunk, chunk, self.level)
        else:
            data = encode_chunk(chunk, self.level)
        self._cuts.append((chunk.num_sequences, len(tokens), len(starts), start, end, data))

    def _commit_ready(self, wait: bool = False) -> None:
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
        counted = [i for i in self.skipped_at if i < end[0]]
        if counted:
            self.m.skipped["empty"] = self.m.skipped.get("empty", 0) + len(counted)
            self.skipped_at = [i for i in self.skipped_at if i >= end[0]]
        self._save_manifest()
        if self.pub:
            self.pub.chunk(chunk_id=cid, sequences=entry.sequences, tokens=entry.tokens,
                           total_sequences=self.m.total_sequences, total_tokens=self.m.total_tokens,
                           est_total_sequences=self.m.estimated_total_sequences(), committed_at=entry.committed_at)

    # -- inverse -------------------------------------------------------------------------------
    def regenerate(self, chunk_ids: list[int]) -> list[int]:
        """Rewrite the given chunks from their recorded source ranges; each must come out byte-identical."""
        done = []
        ids = sorted(chunk_ids)
        while ids and not self.stop.is_set():
            run = [ids.pop(0)]
            while ids and ids[0] == run[-1] + 1:
                run.append(ids.pop(0))
            first = self.m.chunks[run[0]]
            base = sum(c.tokens for c in self.m.chunks[:run[0]])
            stream = TokenStream(base, self.dtype)
            stream.next_doc = first.start[0]
            pending = list(run)
            feed = self._feed(stream, first.start)
            for _ in feed:
                while pending and len(stream) >= self.m.chunks[pending[0]].tokens:
                    self._rewrite(stream, self.m.chunks[pending.pop(0)])
                if not pending:
                    break
            feed.close()
            if pending and not self.stop.is_set():
                raise PackError(f"the source ended before chunk {pending[0]} could be regenerated; has it changed?")
            done += run
        return done

    def _rewrite(self, stream: TokenStream, entry: ChunkEntry) -> None:
        tokens, starts, start, end = stream.take(entry.tokens)
        data = encode_chunk(build_chunk(tokens, starts, self.m.seq_len), self.level)
        checksum = file_checksum(data)
        if start != entry.start or checksum != entry.checksum or len(data) != entry.bytes:
            raise PackError(f"regenerated chunk {entry.id} differs from the manifest (source changed, "
                            f"or another tokenizer or level); not written")
        atomic_write_bytes(self.dir / entry.file, data)
        log.info("regenerated chunk %d (%d sequences)", entry.id, entry.sequences)
