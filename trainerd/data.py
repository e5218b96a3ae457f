"""The step plan over a growing chunk cache: which sequences each rank trains on at each step.

Order
    Global step s trains on the positions [s*G, (s+1)*G) of one stream of sequences (G = global_batch);
    rank r of W takes the positions s*G + r, s*G + r + W, ... The stream is epoch 0, epoch 1, ... back to
    back; each epoch contributes M = floor(f * N) positions (N = sequences in the cache, f = epoch_fraction
    times target_epochs when that is below 1, else epoch_fraction). Every chunk c takes its share of them,
    k_c = floor(f * S_(c+1)) - floor(f * S_c) rows (S_c: sequences of the chunks before c), which sum to M:
    with f < 1 the rows an epoch takes from chunk c are a random k_c of its rows, drawn from (seed, epoch,
    chunk), so the sample does not depend on when the chunk arrived. (Taking the first M of an order over a
    growing cache would not do: each arrival would reshuffle a pool that holds mostly older chunks, and the
    last chunks to arrive would be sampled least.) Epoch 0's order is a list of blocks (below); a later
    epoch is one block of every chunk. A block is a permutation of a range of chunk ids, cut into windows
    of near-equal size, floor(chunks / window_chunks) of them (at least window_chunks chunks each, fewer
    than twice that; one window when the block is smaller), window_chunks = ceil(shuffle_window /
    chunk_sequences) (data.shuffle_window, in sequences; its default is explained at
    trainerd.config.SHUFFLE_WINDOW); the sequences of one window are permuted among themselves (local
    shuffle). A rank reads from at most two windows at a time; a window is decoded once per epoch and
    rank into one token array holding that rank's rows in the order it reads them, and kept while in use
    (an LRU of 3 windows): every chunk is decompressed once per epoch, not once per sample, and a batch
    is one slice per window it spans (a cast to int32 and a copy), with no gather.
    Every permutation comes from a numpy Generator seeded by (seed, epoch, kind, index); the global
    torch/numpy/random generators are never touched.

Growth (epoch 0 only: later epochs start over the finished cache and never change)
    grow(known_chunks, finished, step) is called on every rank at the same step with the same values.
    Epoch 0 is blocks of consecutive chunk ids [a, b), trained one after the other, each in its own order
    (seeded by (seed, 0, a, b)). Positions before step*G are trained on; the block holding position step*G,
    if begun, stays as it is; the blocks after it, not begun, become one block with the new chunks. Hence
    every sequence of epoch 0 exactly once, including sequences that arrive mid-epoch, and a plan grown
    at step 0 equals a plan constructed with that many chunks: ranks that opened the cache at different
    moments agree once they all grow to rank 0's broadcast count before their first batch.
    While the cache is not finished, epoch 0 waits for fresh data: ready(step) is False for a step that
    needs positions beyond the sequences known now, or that begins the newest block before it holds the
    chunks it needs: window_chunks (so that a trainer that keeps up with its packer still draws each batch
    from a whole window, not from the one chunk that just arrived), except that the first blocks need 1,
    2, 4, ... chunks (training starts on the first chunk), and no block needs more chunks than the
    manifest's estimate says are still to come. What a block needs is set at the grows before it begins.
    Epoch 1 starts only once the cache is finished.

Totals and the last partial batch
    T = floor(max(target_epochs, 1) * M) positions and total_steps = T // G: the last partial global batch
    (T mod G < G sequences) is DROPPED, so that every step has the same rows on every rank. With
    target_epochs = 1 those few sequences (a random handful of the shuffled order) are never seen.
    total_steps grows with the cache and never shrinks within a run; estimated_total_steps is the same
    formula over the manifest's full-dataset estimate (for warmup and cosine).

Corrupt chunks
    Never trained on: a chunk that raises shared.cache.CorruptChunk is logged (logging.warning), moved to
    the cache's quarantine folder (`packerd run --mode inverse` regenerates it) and recorded as an event
    that the loop drains with take_events(). Each of its rows becomes a padding row: pad tokens, no real
    token (labels all -100, not counted in num_tokens), seq_ids (-1, -1). The batch keeps its shape, so
    every rank stays in step; no other sequence is trained twice to fill in, and the step's loss and token
    counts cover real rows only. A cache whose every known chunk is corrupt when the first one is found
    corrupt (no chunk decoded yet) stops the run with a CacheError; chunks that go bad later only warn.

Batches
    int32 input_ids, position_ids (0 at each sequence start and at each document start recorded in the
    chunk) and labels (input_ids with -100 past a sequence's real length; never masked by token id). A batch
    without padding (all but the few that reach a short final sequence) has labels = the input_ids tensor
    itself: a third less memory to write per token, and one host-to-device copy less. int32, not int64:
    half the bytes for the loader to write and for the host-to-device copy; Batch.to() widens to int64 on
    the device (on a GPU a cast of a few hundred KB per step; on the CPU it is part of the step's time).
    Batch arrays come from a small pool and are reused once no tensor or view of an earlier batch refers
    to them (fresh memory costs a page fault per 4 KB); so are window token arrays. Positions are built
    per batch: arange, then one slice assignment per document start in its rows (a vectorised path for
    many short documents). Every rank decompresses all chunks of the windows it reads, since ranks
    interleave within each global batch and a chunk is one LZ4 block: W times the decompression of the
    tokens a rank trains on. Everything after the decompression (copy into the window, positions, the
    int32 batch) is done for the rank's own rows only.

State
    state_dict(): seed, global batch, world size, window, the known chunk count and sequences, finished,
    the full-dataset estimate, a digest of the known chunks' checksums, and epoch 0's blocks from the one
    in use at the last grow on (one or two blocks, 4 ints each): a few hundred bytes however large the
    cache. Orders are recomputed from (seed, epoch, block); the position is the trainer's step (get_batch
    is random access), so load_state_dict reads no chunk and replays nothing. A format-1 state (epoch 0's
    whole chunk order with its seal points, written before blocks) resumes with that order kept as one block.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from shared.cache import Cache, CacheError, CorruptChunk

from .config import SHUFFLE_WINDOW

log = logging.getLogger("trainerd.data")

STATE_FORMAT = 2   # 1: epoch 0's whole chunk order with its seal points (read, see _epoch0_from_state)
IGNORE_INDEX = -100
MANIFEST_WAIT_SECONDS = 10.0   # a rank whose manifest lags the broadcast count waits this long for it
FEW_DOCUMENTS = 128            # up to this many document starts, positions restart with one slice assignment
                               # each (about a microsecond apiece); more take a vectorised path
_ORDER, _WINDOW, _SAMPLE = 1, 2, 3  # generator kinds: chunk order of an epoch, sequence order inside a
                                   # window, the rows of a chunk an epoch takes (f < 1)
SAMPLE_FORMAT = 2                  # f < 1 sampled per chunk (1: the first M of the order, before it)
_NEVER = 1 << 62


def _rng(seed: int, epoch: int, kind: int, *index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, kind, *index])))


def _floor(x: float) -> int:
    # round away float noise first (2.9999999999 -> 3) so that every rank and every resume agrees
    return math.floor(round(x, 6))


class _Column:
    """An int64 array that grows at its end in constant amortized time per value (its capacity doubles)."""

    def __init__(self, values: np.ndarray | None = None):
        self._buf = np.zeros(16, dtype=np.int64) if values is None else np.asarray(values, dtype=np.int64).copy()
        self.values = self._buf[:0 if values is None else len(self._buf)]

    def extend(self, more: np.ndarray) -> np.ndarray:
        """Append `more`; the values as a new view (views handed out before keep their length)."""
        n, end = len(self.values), len(self.values) + len(more)
        if end > len(self._buf):
            buf = np.zeros(max(end, 2 * len(self._buf)), dtype=np.int64)
            buf[:n] = self.values
            self._buf = buf
        self._buf[n:end] = more
        self.values = self._buf[:end]
        return self.values


def _legacy_cut(seals: list[int], n: int, window: int) -> list[int]:
    """Window bounds of format-1 states: `window` chunks from each seal point, the rest of a stretch short."""
    bounds: list[int] = []
    for a, b in zip(seals, seals[1:] + [n]):
        bounds.extend(range(a, b, window))
    return bounds + [n]


def _takes(sizes: np.ndarray, before: int, f: float) -> np.ndarray:
    """Rows each chunk contributes to an epoch: floor(f * S_(c+1)) - floor(f * S_c), S counted from `before`
    (the sequences of the chunks ahead of these). They sum to floor(f * S); f = 1 takes every row."""
    if f >= 1.0:
        return sizes.copy()
    ends = before + np.cumsum(sizes)
    cut = np.floor(np.round(f * np.concatenate([[before], ends]).astype(np.float64), 6)).astype(np.int64)
    return np.diff(cut)


class NotReady(ValueError):
    """A step asked for before the plan can train it: the plan must grow first. A step can also stop being
    ready without any chunk arriving, when a risen estimate asks the newest block for more chunks."""


@dataclass
class Batch:
    """One rank's rows of one global step. When no row is padded (every batch but those that reach a short
    final sequence), `labels` is the very tensor `input_ids`: never modify either in place."""
    input_ids: torch.Tensor        # [n, seq_len] int32, this rank's sequences for one optimizer step
    position_ids: torch.Tensor     # [n, seq_len] int32, restart at 0 at every document start
    labels: torch.Tensor           # [n, seq_len] int32, = input_ids with -100 on padding positions only
    num_tokens: int                # real (non-padding) tokens in this rank's batch
    seq_ids: list[tuple]           # (chunk_id, index in chunk) of each row, (-1, -1): a corrupt chunk's row;
                                   # several caches: (cache, chunk_id, index)
    empty_rows: int = 0            # rows without a real token (a corrupt chunk's rows)
    sources: list[int] | None = None  # several caches: the index of each row's cache in data.cache_dir

    @property
    def num_targets(self) -> int:
        """Positions with a next-token target: (labels[:, 1:] != -100).sum(), without reading labels."""
        return self.num_tokens - (len(self.input_ids) - self.empty_rows)

    def pin_memory(self) -> "Batch":
        ids = self.input_ids.pin_memory()
        labels = ids if self.labels is self.input_ids else self.labels.pin_memory()
        return Batch(ids, self.position_ids.pin_memory(), labels, self.num_tokens, self.seq_ids, self.empty_rows,
                     self.sources)

    def to(self, device, non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, position_ids, labels) on `device` as int64 (what embedding and cross-entropy take):
        copied as int32 and widened there; labels that are input_ids are copied and widened once."""
        def wide(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking).long()
        ids = wide(self.input_ids)
        labels = ids if self.labels is self.input_ids else wide(self.labels)
        return ids, wide(self.position_ids), labels


def restart(out: np.ndarray, lo: list[int], n: list[int], ar: np.ndarray, shift: int = 0) -> None:
    """Fill out [k, L] with positions 0.. in every row, restarted for a stretch of n[i] at each flat position
    lo[i] + shift (few document starts, their stretches known: one slice assignment each)."""
    out[:] = ar
    flat = out.reshape(-1)
    for a, m in zip(lo, n):
        flat[a + shift:a + shift + m] = ar[:m]


def _positions(out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> None:
    """Fill out [n, L]: positions 0.. from each sequence start, restarting at each (row, start) document start."""
    n, L = out.shape
    ar = np.arange(L, dtype=out.dtype)
    out[:] = ar
    keep = starts > 0
    rows, starts = rows[keep], starts[keep]
    if not starts.size:
        return
    if starts.size <= FEW_DOCUMENTS:
        # few documents (the usual case): rewrite each document's stretch of the flat array
        flat = out.reshape(-1)
        b = rows * L + starts
        b.sort()
        e = np.minimum(np.append(b[1:], n * L), (b // L + 1) * L)  # the next start, or the end of the row
        for lo, hi in zip(b.tolist(), e.tolist()):
            flat[lo:hi] = ar[:hi - lo]
    else:
        # many short documents (a loop would cost a few microseconds each): over the rows that hold a
        # start, cut the flat array at every row start and document start and subtract each piece's base
        u, slot = np.unique(rows, return_inverse=True)
        cuts = np.concatenate([np.arange(u.size, dtype=np.int64) * L, slot * L + starts])
        base = np.concatenate([np.zeros(u.size, dtype=np.int64), starts])
        order = np.argsort(cuts)
        size = np.diff(cuts[order], append=u.size * L)
        out[u] = ar - np.repeat(base[order].astype(out.dtype), size).reshape(u.size, L)


def _take_csr(ptr: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` of a CSR list (row r holds values[ptr[r]:ptr[r + 1]]): (count per taken row, their values)."""
    lo = ptr[rows].astype(np.int64)
    counts = ptr[rows + 1].astype(np.int64) - lo
    total = int(counts.sum())
    # each taken value's index: its row's first index plus its rank among the taken values of that row
    first = np.cumsum(counts) - counts
    return counts, values[np.arange(total) + np.repeat(lo - first, counts)]


class _Decoded:
    """A decoded chunk: [n, seq_len] tokens as its full rows (a view of the decoded tokens) and, from its
    first short row on, padded rows (a small copy); real lengths, and its document starts (CSR by row)."""
    __slots__ = ("head", "tail", "lengths", "full", "doc_ptr", "doc_starts", "n")

    def __init__(self, chunk, pad_id: int):
        n, L = chunk.num_sequences, chunk.seq_len
        self.full = chunk.num_tokens == n * L       # every sequence is seq_len long (all but a last chunk)
        if self.full:
            self.head, self.tail = chunk.tokens.reshape(n, L), None
        else:
            self.head, self.tail = chunk.padded_parts(pad_id)
        self.lengths, self.doc_ptr, self.doc_starts = chunk.lengths, chunk.doc_ptr, chunk.doc_starts
        self.n = n

    def copy_rows(self, out: np.ndarray, dest: np.ndarray, src: np.ndarray | None) -> None:
        """out[dest] = rows src of the chunk (all of them in order when None)."""
        if self.tail is None:
            out[dest] = self.head if src is None else self.head[src]
            return
        h = len(self.head)
        if src is None:
            out[dest[:h]], out[dest[h:]] = self.head, self.tail
            return
        early = src < h
        out[dest[early]] = self.head[src[early]]
        out[dest[~early]] = self.tail[src[~early] - h]


class _Window:
    """One rank's rows of one window, in the order that rank reads them: tokens, the source (chunk, index)
    of each row, real lengths (short rows only) and document starts as stretches to restart positions on.

    A batch is then one slice of each array it spans: no gather and no temporary per batch. Only this
    rank's rows are copied (the LZ4 block of a chunk decodes whole, but nothing else is paid for the
    rows of other ranks). Chunks are added one at a time, each dropped before the next is read, so
    that the next decompression reuses memory still in the CPU cache.

    Document starts past position 0 are kept sorted by flat start row*L+s, with each one's stretch length up
    to the next start or the row's end (as arrays, and as Python lists for the loop), and where each row's
    starts begin (_row_first): a batch restarts its few documents with one slice assignment each, and its
    many documents (short ones) with _positions.
    """
    __slots__ = ("tokens", "chunk", "index", "lengths", "short", "seq_ids", "doc_lo", "doc_len", "_docs",
                 "_doc_rows", "_doc_lo", "_doc_len", "_row_first", "kept")

    def __init__(self, tokens: np.ndarray, chunk: np.ndarray, index: np.ndarray):
        self.tokens = tokens                  # [n, seq_len] in the chunks' dtype (a pooled buffer), filled by add()
        self.chunk, self.index = chunk, index  # source of each row (int64 [n]); -1 for a corrupt chunk's rows
        self.lengths: np.ndarray | None = None  # real length of each row, only once a short row was added
        self.kept: np.ndarray | None = None   # a mixture source's window: the reading positions it holds
        self.seq_ids = np.zeros(0, dtype=object)  # (chunk, index) of each row, or (source, chunk, index)
        self._docs: list[tuple[np.ndarray, np.ndarray]] = []   # (window row, start) of each document start

    def add(self, c: int, d: _Decoded, dest: np.ndarray, src: np.ndarray | None) -> None:
        """Copy rows `src` of chunk d (all of them in order when None) to window rows `dest`."""
        if src is None:
            d.copy_rows(self.tokens, dest, None)
            self._docs.append((np.repeat(dest, np.diff(d.doc_ptr)), d.doc_starts))
        else:
            d.copy_rows(self.tokens, dest, src)
            counts, starts = _take_csr(d.doc_ptr, d.doc_starts, src)
            self._docs.append((np.repeat(dest, counts), starts))
        if not d.full:
            self._short()[dest] = d.lengths if src is None else d.lengths[src]

    def pad(self, dest: np.ndarray, pad_id: int) -> None:
        """Window rows `dest` become padding rows (a corrupt chunk's): no real token, no source."""
        self.tokens[dest] = pad_id
        self._short()[dest] = 0
        self.chunk[dest] = -1
        self.index[dest] = -1

    def _short(self) -> np.ndarray:
        if self.lengths is None:
            self.lengths = np.full(len(self.tokens), self.tokens.shape[1], dtype=np.int64)
        return self.lengths

    def finish(self, source: int | None = None) -> "_Window":
        n, L = self.tokens.shape
        none = np.zeros(0, dtype=np.int64)
        rows = np.concatenate([none] + [r for r, _ in self._docs]).astype(np.int64, copy=False)
        starts = np.concatenate([none] + [s for _, s in self._docs]).astype(np.int64, copy=False)
        keep = starts > 0  # a document starting at position 0 changes no position
        lo = rows[keep] * L + starts[keep]
        lo.sort()
        hi = np.minimum(np.append(lo[1:], n * L), (lo // L + 1) * L)  # the next start, or the end of the row
        self._doc_rows, self._doc_lo, self._doc_len = lo // L, lo, hi - lo
        self._row_first = np.zeros(n + 1, dtype=np.int64)  # row r's starts: _doc_rows[_row_first[r]:_row_first[r + 1]]
        np.cumsum(np.bincount(self._doc_rows, minlength=n), out=self._row_first[1:])
        self.doc_lo, self.doc_len = lo.tolist(), self._doc_len.tolist()
        if self.lengths is not None and bool((self.lengths == L).all()):
            self.lengths = None  # a short chunk's rows that this rank reads are all full
        self.short = [] if self.lengths is None else np.flatnonzero(self.lengths < L).tolist()  # short rows, ascending
        ids = (self.chunk.tolist(), self.index.tolist())
        # tuples in an object array: a mixture's block picks its rows' tuples by index, without a Python loop
        self.seq_ids = np.fromiter(zip(*ids) if source is None else zip(itertools.repeat(source), *ids),
                                   dtype=object, count=n)
        self._docs = []
        return self

    def positions(self, out: np.ndarray, q0: int, ar: np.ndarray) -> None:
        """Fill out [k, L] with the positions of rows q0 .. q0+k-1 (ar: arange(L) in out's dtype)."""
        k, L = out.shape
        i0, i1 = int(self._row_first[q0]), int(self._row_first[q0 + k])
        if i1 - i0 > FEW_DOCUMENTS:  # many short documents: vectorised
            lo = self._doc_lo[i0:i1]
            _positions(out, lo // L - q0, lo % L)
        else:
            restart(out, self.doc_lo[i0:i1], self.doc_len[i0:i1], ar, -q0 * L)

    def starts_in(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The document starts past position 0 in rows q (ascending, any gaps): for each, which of q holds
        it, its position in the row and the length of its stretch (to the next start or the row's end)."""
        first, L = self._row_first, self.tokens.shape[1]
        q0, k = int(q[0]), len(q)
        if int(q[-1]) - q0 == k - 1:  # consecutive rows (the usual case): one stretch of the starts
            a, b = int(first[q0]), int(first[q0 + k])
            rows = self._doc_rows[a:b]
            return rows - q0, self._doc_lo[a:b] - rows * L, self._doc_len[a:b]
        lo = first[q]
        counts = first[q + 1] - lo
        total = int(counts.sum())
        start = np.cumsum(counts) - counts
        idx = np.arange(total) + np.repeat(lo - start, counts)
        return np.repeat(np.arange(k), counts), self._doc_lo[idx] - self._doc_rows[idx] * L, self._doc_len[idx]

    def short_in(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(which of q, real length) of the short rows among rows q (ascending), or None when there is none."""
        if self.lengths is None or bisect.bisect_left(self.short, int(q[0])) == bisect.bisect_right(self.short, int(q[-1])):
            return None
        lengths = self.lengths[q]
        which = np.flatnonzero(lengths < self.tokens.shape[1])
        return which, lengths[which]


def _balanced(n: int, window: int) -> list[int]:
    """Bounds cutting n chunks into floor(n / window) windows (one when n < window) whose sizes differ by one at
    most: each holds at least `window` chunks and fewer than twice that (a block of window + 1 chunks is one
    window, not a full one and a window of one chunk)."""
    k = max(1, n // window)
    return [n * i // k for i in range(k + 1)]


class _Layout:
    """A stretch of an epoch's order starting at epoch offset `base`: chunk ids `order` cut into windows at
    `bounds` (indexes into order); maps epoch offsets to (window, row in window)."""

    def __init__(self, seed: int, epoch: int, order: np.ndarray, bounds: list[int], takes: np.ndarray, base: int):
        self.seed, self.epoch, self.order, self.bounds, self.base = seed, epoch, order, bounds, base
        chunk_pos = np.empty(len(order) + 1, dtype=np.int64)   # epoch offset where each order slot starts
        chunk_pos[0] = base
        np.cumsum(takes[order], out=chunk_pos[1:])
        chunk_pos[1:] += base
        self.win_pos = chunk_pos[bounds].tolist()               # epoch offset where each window starts
        self.end = int(chunk_pos[-1])
        self._perms: dict[int, np.ndarray] = {}

    def chunks_of(self, w: int) -> tuple[int, ...]:
        return tuple(self.order[self.bounds[w]:self.bounds[w + 1]].tolist())

    def perm(self, w: int) -> np.ndarray:
        """The shuffled order of window w's rows (rows numbered in the window's chunk order)."""
        p = self._perms.get(w)
        if p is None:
            if len(self._perms) >= 8:
                self._perms.pop(next(iter(self._perms)))
            n = self.win_pos[w + 1] - self.win_pos[w]
            p = self._perms[w] = _rng(self.seed, self.epoch, _WINDOW, int(self.order[self.bounds[w]])).permutation(n)
        return p

    def segments(self, start: int, stride: int, count: int) -> list[tuple[int, int, int]]:
        """(window, first row, row count) of the epoch offsets start, start+stride, ... (count of them, all
        below self.end): offset o is row o - lo of its window in shuffled order (lo: the window's first offset)."""
        out = []
        while count:
            w = bisect.bisect_right(self.win_pos, start) - 1
            lo, hi = self.win_pos[w], self.win_pos[w + 1]
            k = min(count, (hi - start + stride - 1) // stride)
            out.append((w, start - lo, k))
            count -= k
            start += stride * k
        return out


def assemble(parts: list[tuple[_Window, int, int]], buf: np.ndarray, arange: np.ndarray) -> Batch:
    """A batch of the rows (window, first row, count) of `parts` in that order, in buf ([2, n, L] int32: ids,
    positions, from a pool)."""
    L = buf.shape[2]
    ids, pos = buf[0], buf[1]
    r0, seq_ids, short, empty = 0, [], [], 0
    for win, q0, k in parts:
        r1 = r0 + k
        ids[r0:r1] = win.tokens[q0:q0 + k]        # one copy that casts to int32
        win.positions(pos[r0:r1], q0, arange)
        if win.lengths is not None:
            lengths = win.lengths[q0:q0 + k]
            short += [(r0 + r, int(lengths[r])) for r in np.flatnonzero(lengths < L).tolist()]
            empty += int((lengths == 0).sum())
        seq_ids += win.seq_ids[q0:q0 + k].tolist()
        r0 = r1
    return _batch(ids, pos, short, empty, seq_ids)


def _batch(ids: np.ndarray, pos: np.ndarray, short: list[tuple[int, int]], empty: int, seq_ids: list) -> Batch:
    """The Batch of filled ids and positions; `short`: (row, real length) of the rows with padding."""
    n, L = ids.shape
    input_ids = torch.from_numpy(ids)
    if not short:
        labels = input_ids                        # no padding: the labels ARE the ids (a third less to write)
    else:
        labels_np = ids.copy()                    # rare (a short final sequence): not pooled
        for r, length in short:
            labels_np[r, length:] = IGNORE_INDEX  # padding by real length, never by token id (EOS may equal pad)
        labels = torch.from_numpy(labels_np)
    num_tokens = n * L - sum(L - length for _, length in short)
    return Batch(input_ids, torch.from_numpy(pos), labels, num_tokens, seq_ids, empty)


class _BufferPool:
    """Recycled arrays (batches: [2, rows, seq_len] int32; windows: [rows, seq_len] tokens): a buffer is
    reused only once nothing refers to it.

    Fresh memory costs a page fault per 4 KB on first touch (several microseconds each on some VMs, more
    than building the batch) and is not in the CPU cache; a batch's tensors come from torch.from_numpy
    views of the buffer and a window's tokens are a view of it, so the buffer's reference count shows
    whether any tensor, view or slice of it is still alive.
    """

    def __init__(self, shape: tuple[int, ...], dtype=np.int64, keep: int = 16):
        self.shape, self.dtype, self.keep = shape, np.dtype(dtype), keep
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self) -> np.ndarray:
        with self._lock:
            for i in range(len(self._bufs)):
                if sys.getrefcount(self._bufs[i]) == 2:  # held by this list (and the call's argument) only
                    return self._bufs[i]
            buf = np.empty(self.shape, dtype=self.dtype)
            if len(self._bufs) < self.keep:
                self._bufs.append(buf)
            return buf


class DataPlan:
    """Which sequences rank `rank` trains on at each global step, over a cache that may still grow.

    Extra keyword arguments beyond the contract: `shuffle_window` (local shuffle window, in sequences: whole
    chunks of at least that many sequences together), `known_chunks`
    and `finished` (start from this chunk count instead of what the cache lists now), `cache_windows`
    (decoded windows kept: the one being read, the next, one spare for a prefetcher).
    """

    def __init__(self, cache: Cache, *, seed: int, global_batch: int, rank: int, world_size: int,
                 target_epochs: float = 1.0, epoch_fraction: float = 1.0, shuffle_window: int = SHUFFLE_WINDOW,
                 known_chunks: int | None = None, finished: bool | None = None, cache_windows: int = 3):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not a positive multiple of world_size {world_size}")
        if not target_epochs > 0:
            raise ValueError(f"target_epochs must be positive (got {target_epochs})")
        if not 0 < epoch_fraction <= 1:
            raise ValueError(f"epoch_fraction must be in (0, 1] (got {epoch_fraction})")
        if int(shuffle_window) != shuffle_window or shuffle_window < 1:
            raise ValueError(f"shuffle_window must be a positive number of sequences (got {shuffle_window})")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer (got {seed})")
        self.cache = cache
        self.seed, self.global_batch, self.rank, self.world_size = int(seed), global_batch, rank, world_size
        self.target_epochs, self.epoch_fraction = float(target_epochs), float(epoch_fraction)
        self.shuffle_window = int(shuffle_window)
        self.window_chunks = -(-self.shuffle_window // cache.manifest.chunk_sequences)  # whole chunks, rounded up
        self.rows = global_batch // world_size       # this rank's rows per step
        self.seq_len, self.pad_id = cache.seq_len, cache.pad_id
        self._lock = threading.RLock()
        self._wlock = threading.Lock()
        self._windows: OrderedDict[tuple, _Window] = OrderedDict()   # decoded windows in use
        self._cache_windows = self._keep_windows = cache_windows
        self._decoded = 0
        self._buffers = _BufferPool((2, self.rows, self.seq_len), np.int32)
        # window token arrays: the windows kept plus those being built or read by another thread, each this
        # rank's share of a window's rows: a window holds fewer than 2 x window_chunks chunks (more rows than
        # chunk_sequences per chunk is not expected; such a window gets fresh arrays). Only the rows written
        # take memory. A cache smaller than the window, by its estimate, needs no buffer of the whole window.
        rows = min(2 * self.window_chunks * cache.manifest.chunk_sequences,
                   max(cache.manifest.estimated_total_sequences(), cache.manifest.chunk_sequences))
        shape = (-(-rows // world_size), self.seq_len)
        self._window_tokens = _BufferPool(shape, cache.manifest.dtype, keep=8)
        self._arange = np.arange(self.seq_len, dtype=np.int32)
        self._events: list[dict] = []                 # data problems for the loop to log (take_events)
        self._changes: list[int] = []                 # first step each plan change may alter (index = version)
        self.corrupt: dict[int, str] = {}             # chunk id -> reason
        self.step = 0                                 # step of the last grow
        self.known_chunks, self.finished, self.total_steps = 0, False, 0
        self._known_seqs, self._m = 0, 0
        self._size_col, self._take_col = _Column(), _Column()
        self._sizes = self._takes = self._size_col.values  # sequences of each chunk; rows an epoch takes of it
        # the share of every chunk an epoch takes: epoch_fraction, and target_epochs when that is below 1
        # (a run shorter than one epoch samples it the same way, not as the first part of an order)
        self._frac = self.epoch_fraction * min(self.target_epochs, 1.0)
        # epoch 0's blocks [first chunk, end chunk, epoch offset, chunks needed to begin it], and their offsets
        self._blocks: list[list[int]] = [[0, 0, 0, 1]]
        self._bases: list[int] = [0]  # each block's epoch offset (its [2]), kept apart for bisect
        self._first_block = 0        # blocks before _blocks[0] (a resumed plan keeps the live ones only)
        self._legacy: dict | None = None  # a format-1 state's order, while it is still in use
        self._legacy_cut = False          # later epochs cut as format-1 states did (a resumed format-1 run)
        self._digest = xxhash.xxh64()     # of the known chunks' checksums
        self._built: OrderedDict[tuple, _Layout] = OrderedDict()   # layouts of blocks and later epochs
        # a mixture's source (one rank's plan read by gather) on several ranks: which stream positions this rank
        # draws under the mixture's segments so far, so that its windows hold those rows only (set_row_filter)
        self.row_filter = None
        self._filter_gen = 0  # bumped by each new row filter: windows built under an older one are not used
        self.source: int | None = None  # a mixture's source: its index, first in each row's seq_ids
        self._est_seqs = 0
        known = len(cache.chunks) if known_chunks is None else int(known_chunks)
        if finished is None:
            finished = cache.manifest.finished and known == len(cache.chunks)
        with self._lock:
            self._apply(known, bool(finished), 0, cache.manifest.estimated_total_sequences())
            self._changes.clear()

    # -- growth ----------------------------------------------------------------------------------
    def grow(self, known_chunks: int, finished: bool, step: int, est_total_sequences: int | None = None) -> bool:
        """Take in chunks up to `known_chunks` (and `finished`) from global step `step` on; True when the
        plan, its totals or its estimate changed. Call it on every rank at the same step with the same
        values (rank 0's, broadcast); pass rank 0's est_total_sequences too, else each rank's manifest is used."""
        with self._lock:
            before = (self.known_chunks, self.finished, self.total_steps, self._est_seqs)
            self.step = step
            self._apply(int(known_chunks), bool(finished), step, est_total_sequences)
            return (self.known_chunks, self.finished, self.total_steps, self._est_seqs) != before

    def _apply(self, known: int, finished: bool, step: int, est: int | None) -> bool:
        """Under the lock: move to `known` chunks and `finished`; True when the chunk set or finished changed."""
        if self.finished:
            if known > self.known_chunks:
                raise ValueError(f"the cache grew to {known} chunks after it was finished with {self.known_chunks}")
            finished = True
        known = max(known, self.known_chunks)  # a lagging count never takes chunks away
        grew = known > self.known_chunks
        changed = grew or finished != self.finished
        first_changed = _NEVER
        if grew:
            self._wait_for_manifest(known)
            new_sizes = np.fromiter((c.sequences for c in self.cache.chunks[self.known_chunks:known]), dtype=np.int64)
            new_takes = _takes(new_sizes, self._known_seqs, self._frac)
            self._sizes, self._takes = self._size_col.extend(new_sizes), self._take_col.extend(new_takes)
            first_changed = self._grow_blocks(known, step * self.global_batch)
            self._digest_chunks(self.known_chunks, known)
            self.known_chunks = known
            self._known_seqs += int(new_sizes.sum())
            self._m += int(new_takes.sum())
        self.finished = finished
        if est is None and changed:
            est = self.cache.manifest.estimated_total_sequences()  # this rank's manifest: pass rank 0's instead
        if est is not None:
            self._est_seqs = int(est)
        self._est_seqs = max(self._est_seqs, self._known_seqs)
        newest = self._blocks[-1]
        if step * self.global_batch <= newest[2]:  # not begun: what it needs follows the estimate
            newest[3] = self._needed(len(self._bases) - 1)
        self.total_steps = max(self.total_steps, self._total_positions(self._m) // self.global_batch)
        if changed:
            self._changes.append(first_changed)
        return changed

    def _total_positions(self, m: int) -> int:
        return _floor(max(self.target_epochs, 1.0) * m)

    def _sample(self, epoch: int, c: int) -> np.ndarray | None:
        """The rows of chunk c that `epoch` takes, ascending; None when it takes them all."""
        k, n = int(self._takes[c]), int(self._sizes[c])
        if k == n:
            return None
        return np.sort(_rng(self.seed, epoch, _SAMPLE, c).permutation(n)[:k])

    def _wait_for_manifest(self, known: int) -> None:
        deadline = time.monotonic() + MANIFEST_WAIT_SECONDS
        while len(self.cache.chunks) < known:
            self.cache.refresh()
            if len(self.cache.chunks) >= known:
                break
            if time.monotonic() > deadline:
                raise CacheError(f"the manifest in {self.cache.dir} lists {len(self.cache.chunks)} chunks, "
                                 f"fewer than the {known} announced")
            time.sleep(0.05)

    def _grow_blocks(self, known: int, pos: int) -> int:
        """Put the chunks from known_chunks to `known` into epoch 0's blocks, the trainer being at epoch offset
        `pos`; the first step whose batch may change."""
        j = bisect.bisect_right(self._bases, pos) - 1
        if pos > self._bases[j]:
            j += 1  # block j is under way: it stays as it is
        if j == len(self._blocks):
            self._blocks.append([self.known_chunks, known, self._m, 1])
            self._bases.append(self._m)
        else:  # the blocks not begun become one with the new chunks (in a new order)
            self._blocks[j:] = [[self._blocks[j][0], known, self._bases[j], 1]]
            del self._bases[j + 1:]
        if self._legacy is not None and self._legacy["key"] not in {(a, b) for a, b, _, _ in self._blocks}:
            self._legacy = None
        return self._bases[j] // self.global_batch

    def _needed(self, j: int) -> int:
        """Chunks block j needs before the trainer begins it (while the cache grows): the whole shuffle
        window, from the 1st, 2nd, 4th, ... chunk on for the first blocks (so that training starts early),
        and no more than the estimate says will come."""
        a, b = self._blocks[j][:2]
        coming = -(-max(0, self._est_seqs - self._known_seqs) // self.cache.manifest.chunk_sequences)
        return min(self.window_chunks, 1 << min(self._first_block + j, 40), b - a + coming)

    def _layout(self, epoch: int, offset: int) -> _Layout:
        """The layout holding `offset` of `epoch`: a block of epoch 0, or the whole of a later epoch."""
        if epoch == 0:
            j = bisect.bisect_right(self._bases, offset) - 1
            a, b, base, _ = self._blocks[j]
            key = (0, a, b)
        else:
            a, b, base, key = 0, self.known_chunks, 0, (epoch, self.known_chunks)
        lay = self._built.get(key)
        if lay is None:
            if len(self._built) >= 4:
                self._built.popitem(last=False)
            if self._legacy is not None and key[1:] == self._legacy["key"]:
                order, bounds = self._legacy["order"], self._legacy["bounds"]
            else:
                seed = _rng(self.seed, 0, _ORDER, a, b) if epoch == 0 else _rng(self.seed, epoch, _ORDER, 0)
                order = a + seed.permutation(b - a)
                cut = _legacy_cut([0], b - a, self.window_chunks) if self._legacy_cut and epoch else None
                bounds = cut or _balanced(b - a, self.window_chunks)
            lay = self._built[key] = _Layout(self.seed, epoch, order, bounds, self._takes, base)
        return lay

    # -- totals ----------------------------------------------------------------------------------
    @property
    def estimated_total_steps(self) -> int:
        """Steps over the full-dataset estimate (the manifest's, as of the last grow); final once finished."""
        with self._lock:
            if self.finished:
                return self.total_steps
            m = _floor(self._frac * self._est_seqs)
            return max(self.total_steps, self._total_positions(m) // self.global_batch)

    @property
    def known_sequences(self) -> int:
        return self._known_seqs

    @property
    def version(self) -> int:
        return len(self._changes)

    def epoch_of(self, step: int) -> int:
        return (step * self.global_batch) // self._m if self._m else 0

    def ready(self, step: int) -> bool:
        """The data of global step `step` can be trained on now (see holds)."""
        with self._lock:
            return 0 <= step < self.total_steps and self.holds((step + 1) * self.global_batch)

    def holds(self, end: int) -> bool:
        """The first `end` positions of this plan's stream can be trained on now: every position of a finished
        cache; in epoch 0 of a growing one, sequences that exist, and the newest block only once it holds
        the chunks it needs (see Growth)."""
        with self._lock:
            if end <= 0 or self.finished:
                return end <= 0 or self._m > 0
            a, b, base, need = self._blocks[-1]
            return end <= self._m and (end <= base or b - a >= need)

    def unchanged_since(self, step: int, version: int) -> bool:
        """A batch of `step` built at plan `version` is still what get_batch(step) returns now."""
        with self._lock:
            return min(self._changes[version:], default=_NEVER) > step

    # -- batches ---------------------------------------------------------------------------------
    def get_batch(self, step: int) -> Batch:
        """This rank's share of global step `step`; reads (and caches) the chunks it needs."""
        return self.build(step)[0]

    def build(self, step: int) -> tuple[Batch, int]:
        """get_batch(step) and the plan version it was planned at (for the prefetcher)."""
        with self._lock:
            if not self.ready(step):
                raise NotReady(f"step {step} is not in the plan yet ({self.total_steps} steps planned, "
                                 f"{self._known_seqs} sequences known, finished={self.finished})")
            version = len(self._changes)
            segments = self._segments(step)
        # keep at least the windows of two batches (small chunks make a batch span many windows)
        self._keep_windows = max(self._cache_windows, 2 * len(segments) + 1)
        W = self.world_size
        # this rank reads rows j, j+W, ... of a window: its own copy holds those only, so row j is its j // W
        return self._assemble([(self._window(lay, w, j % W), j // W, k) for lay, w, j, k in segments]), version

    def _segments(self, step: int) -> list[tuple[_Layout, int, int, int]]:
        """(epoch layout, window, first row, row count) for this rank's positions step*G + rank + W*j."""
        pos, count, m, W = step * self.global_batch + self.rank, self.rows, self._m, self.world_size
        out = []
        while count:
            epoch, offset = divmod(pos, m)
            lay = self._layout(epoch, offset)
            k = min(count, (lay.end - offset + W - 1) // W)  # rows left in this layout
            out += [(lay, *seg) for seg in lay.segments(offset, W, k)]
            count -= k
            pos += W * k
        return out

    def gather(self, p: np.ndarray) -> list[tuple[_Window, np.ndarray, np.ndarray]]:
        """(window, its rows, indexes into p) for the ascending positions p of this plan's stream (a plan of
        one rank: a source of a mixture, which draws its positions by the interleave). The caller checks
        that they are planned."""
        if self.world_size != 1:
            raise ValueError("gather reads every row of a window: a plan of one rank only")
        pieces = []
        with self._lock:
            i, m = 0, self._m
            while i < len(p):
                epoch, offset = divmod(int(p[i]), m)
                lay = self._layout(epoch, offset)
                w = bisect.bisect_right(lay.win_pos, offset) - 1
                if int(p[-1]) < epoch * m + lay.win_pos[w + 1]:  # the rest in one window: the usual case
                    pieces.append((lay, w, p[i:] - (epoch * m + lay.win_pos[w]), np.arange(i, len(p))))
                    break
                j = int(np.searchsorted(p, epoch * m + lay.end, side="left"))
                offs = p[i:j] - epoch * m
                w = np.searchsorted(lay.win_pos, offs, side="right") - 1
                cuts = [0, *(np.flatnonzero(w[1:] != w[:-1]) + 1).tolist(), j - i]
                for a, b in zip(cuts, cuts[1:]):
                    wa = int(w[a])
                    pieces.append((lay, wa, offs[a:b] - lay.win_pos[wa], np.arange(i + a, i + b)))
                i = j
        self._keep_windows = max(self._cache_windows, 2 * len(pieces) + 1)
        out = []
        for lay, w, q, sel in pieces:
            win = self._window(lay, w, 0)
            if win.kept is not None:  # rows of a window that holds only this rank's draws
                at = np.searchsorted(win.kept, q)
                if at[-1] >= len(win.kept) or not np.array_equal(win.kept[at], q):
                    raise RuntimeError(f"a window of {self.cache.dir} lacks rows this rank draws (row filter changed)")
                q = at
            out.append((win, q, sel))
        return out

    def set_row_filter(self, row_filter) -> None:
        """A mixture's source: keep in each window only the rows whose reading positions row_filter(positions)
        marks (this rank's draws); windows built before hold another set of rows, so they are dropped."""
        with self._wlock:
            self.row_filter = row_filter
            self._filter_gen += 1
            self._windows.clear()

    def _assemble(self, parts: list[tuple[_Window, int, int]]) -> Batch:
        return assemble(parts, self._buffers.take(), self._arange)

    def _window(self, lay: _Layout, w: int, j0: int) -> _Window:
        """This rank's rows j0, j0+W, ... of window w of an epoch, decoded (each is built once while it is
        in use: a small LRU)."""
        chunks = lay.chunks_of(w)
        # the filter's generation is read before the filter, so a newer filter never gets this window; the
        # window's place in the stream too, since a growing cache's newest block is laid out again at every grow
        # and its chunks can come back elsewhere (a mixture's rank then keeps other rows of them)
        key = (lay.epoch, chunks, j0, self._filter_gen, lay.win_pos[w])
        with self._wlock:
            win = self._windows.get(key)
            if win is not None:
                self._windows.move_to_end(key)
                return win
        # the rows this rank reads: the rows the epoch takes of the window's chunks, one chunk after another
        # (a corrupt chunk's rows become padding rows one for one, so the manifest's sizes hold for every chunk)
        src = lay.perm(w)[j0::self.world_size]
        kept = None
        if self.row_filter is not None:  # a mixture's source: only the rows this rank draws
            kept = np.flatnonzero(self.row_filter(lay.epoch * self._m + lay.win_pos[w] + np.arange(len(src))))
            src = src[kept]
        bounds = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(self._takes[list(chunks)], out=bounds[1:])
        slot = np.searchsorted(bounds, src, side="right") - 1
        index = src - bounds[slot]                   # the row in its chunk (among the rows the epoch takes)
        for i, c in enumerate(chunks):
            sample = self._sample(lay.epoch, c)
            if sample is not None:
                mine = slot == i
                index[mine] = sample[index[mine]]
        pool = self._window_tokens
        tokens = pool.take()[:len(src)] if len(src) <= pool.shape[0] else np.empty((len(src), self.seq_len), pool.dtype)
        win = _Window(tokens, np.asarray(chunks, dtype=np.int64)[slot], index)   # pad() marks only its own rows
        win.kept = kept
        order = np.argsort(src, kind="stable")       # reading positions sorted by source: a run per chunk
        cuts = np.searchsorted(src[order], bounds).tolist()
        for i, c in enumerate(chunks):
            a, b = cuts[i], cuts[i + 1]
            if a < b:
                full = b - a == int(self._sizes[c])
                self._add_chunk(win, c, order[a:b], None if full else index[order[a:b]])
        win.finish(self.source)
        with self._wlock:
            self._windows[key] = win
            while len(self._windows) > self._keep_windows:
                self._windows.popitem(last=False)
        return win

    def _add_chunk(self, win: _Window, c: int, dest: np.ndarray, rows: np.ndarray | None) -> None:
        """Decode chunk c and copy its `rows` (all when None) into the window at `dest`; the decoded chunk
        is dropped on return, before the next one is read."""
        d = self._decode(c)
        if d is None:  # corrupt: its rows become padding rows (nothing trained twice to fill in)
            if not self._decoded and all(self._decode(c2) is None for c2 in range(self.known_chunks)):
                # no chunk has decoded yet: look for one readable chunk (the first that decodes ends the
                # search), or steps of padding alone would follow
                raise CacheError(f"every chunk of {self.cache.dir} is corrupt; nothing to train on")
            win.pad(dest, self.pad_id)
        else:
            win.add(c, d, dest, rows)

    # -- corrupt chunks --------------------------------------------------------------------------
    def _decode(self, c: int) -> _Decoded | None:
        """Chunk c decoded, or None when it is corrupt (logged, quarantined and recorded once)."""
        if c in self.corrupt:
            return None
        try:
            d = _Decoded(self.cache.read_chunk(c), self.pad_id)
        except CorruptChunk as e:
            self._mark_corrupt(c, e.reason)
            return None
        with self._wlock:
            self._decoded += 1
        return d

    def _mark_corrupt(self, c: int, reason: str) -> None:
        with self._lock:
            if c in self.corrupt:
                return
            self.corrupt[c] = reason
        try:
            where = self.cache.quarantine(c)
        except OSError as e:
            where = None
            log.warning("could not quarantine chunk %d: %s", c, e)
        log.warning("chunk %d is corrupt (%s): not trained on, moved to %s; its rows are padding rows in the "
                    "batches that would hold them (packerd run --mode inverse regenerates it)", c, reason, where)
        with self._lock:
            self._events.append({"event": "corrupt_chunk", "chunk_id": c, "reason": reason,
                                 "quarantined": str(where) if where else None})

    def take_events(self) -> list[dict]:
        """Data events since the last call (corrupt chunks), for the loop to log."""
        with self._lock:
            out, self._events = self._events, []
            return out

    @property
    def chunks_decoded(self) -> int:
        """Chunks decompressed so far (each is decoded once per window build, i.e. once per epoch)."""
        return self._decoded

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        with self._lock:
            return {"format": STATE_FORMAT, "seed": self.seed, "global_batch": self.global_batch,
                    "world_size": self.world_size, "window_chunks": self.window_chunks,
                    "shuffle_window": self.shuffle_window,
                    "target_epochs": self.target_epochs, "epoch_fraction": self.epoch_fraction,
                    "sample_format": SAMPLE_FORMAT,
                    "known_chunks": self.known_chunks, "known_sequences": self._known_seqs,
                    "finished": self.finished, "est_total_sequences": self._est_seqs,
                    "total_steps": self.total_steps, "step": self.step,
                    "chunks_digest": self._digest.hexdigest(), **self._epoch0_state()}

    def _epoch0_state(self) -> dict:
        """Epoch 0's blocks from the one holding the last grow's position on (those before are trained on):
        a few numbers however large the cache."""
        live = min(bisect.bisect_right(self._bases, self.step * self.global_batch), len(self._blocks)) - 1
        out = {"blocks": [list(b) for b in self._blocks[live:]], "first_block": self._first_block + live,
               "cut": "legacy" if self._legacy_cut else "even"}
        if self._legacy is not None and self._legacy["key"] in {(a, b) for a, b, _, _ in self._blocks[live:]}:
            out["legacy_order"], out["legacy_bounds"] = self._legacy["order"].tolist(), list(self._legacy["bounds"])
        return out

    def _digest_chunks(self, start: int, end: int) -> None:
        """Take the checksums of chunks start..end-1 into the digest of the known chunks (the same cache on
        resume, not only the same sizes)."""
        for i, c in enumerate(self.cache.chunks[start:end], start):
            self._digest.update(("\n" + c.checksum if i else c.checksum).encode())

    def load_state_dict(self, d: dict) -> None:
        """Restore a state_dict; global batch, seed, window and epoch fraction must match (the world size may
        differ).
        target_epochs may differ (the totals follow this plan's value) as long as neither is below 1 (then
        it sets which rows epoch 0 takes). Reads the manifest, no chunk."""
        if d.get("kind") == "mixture":
            raise ValueError(f"the data state was saved by a run on {len(d['sources'])} caches, this run has one: "
                             f"the caches of a run cannot change")
        if d.get("format") not in (1, STATE_FORMAT):
            raise ValueError(f"data state format {d.get('format')!r} is not {STATE_FORMAT}")
        # the stream of positions depends on the global batch only: another number of ranks (with the
        # micro-batch or accumulation changed to keep it) takes the same sequences at the same steps
        if d["global_batch"] != self.global_batch:
            raise ValueError(f"the data state was saved with global batch {d['global_batch']} sequences "
                             f"({d['world_size']} process(es)), this run has {self.global_batch} ({self.world_size}): "
                             f"keep the global batch (micro-batch x gradient accumulation x processes) or start a new run")
        for key, mine in (("seed", self.seed), ("epoch_fraction", self.epoch_fraction)):
            if d[key] != mine:
                raise ValueError(f"the data state was saved with {key} {d[key]!r}, this run has {mine!r}")
        # the window decides the order of the epoch in progress (and of epoch 0's blocks): a resume
        # keeps it. Compared in chunks, what the order depends on (a state older than the setting has no
        # shuffle_window; its run's config is given the legacy window, see start._resumed_config)
        if d["window_chunks"] != self.window_chunks:
            saved = f"{d['shuffle_window']} sequences, " if "shuffle_window" in d else ""
            raise ValueError(f"the data state was saved with a shuffle window of {saved}{d['window_chunks']} chunks; this "
                             f"run has {self.shuffle_window} sequences, {self.window_chunks} chunks: resume with "
                             f"--shuffle-window {d.get('shuffle_window', d['window_chunks'] * self.cache.manifest.chunk_sequences)} "
                             f"or start a new run")
        if min(float(d["target_epochs"]), 1.0) != min(self.target_epochs, 1.0):
            raise ValueError(f"the data state was saved with target_epochs {d['target_epochs']!r}, this run has "
                             f"{self.target_epochs!r}: below 1 it decides which sequences epoch 0 takes, so it "
                             f"cannot change on resume")
        if self._frac < 1.0 and d.get("sample_format") != SAMPLE_FORMAT:
            raise ValueError("the data state was saved by an older trainerd, which sampled epoch_fraction below 1 "
                             "differently: resume it with that version, or start a new run")
        known = int(d["known_chunks"])
        sizes, digest = self._same_chunks(d, known)
        takes = _takes(sizes, 0, self._frac)
        blocks, first, legacy = _epoch0_from_state(d, known, takes, self.window_chunks)
        with self._lock:
            self.known_chunks, self.finished, self.step = known, bool(d["finished"]), int(d["step"])
            self._size_col, self._take_col = _Column(sizes), _Column(takes)
            self._sizes, self._takes = self._size_col.values, self._take_col.values
            self._known_seqs, self._m, self._digest = int(sizes.sum()), int(takes.sum()), digest
            self._blocks, self._bases, self._first_block = blocks, [blk[2] for blk in blocks], first
            self._legacy, self._legacy_cut = legacy, d.get("cut", "legacy") == "legacy"
            self._built.clear()
            self._est_seqs = max(int(d["est_total_sequences"]), self._known_seqs)
            self.total_steps = self._total_positions(self._m) // self.global_batch
            self._changes.append(0)  # whatever was prepared before is void

    def _same_chunks(self, d: dict, known: int):
        """The sizes of the state's first `known` chunks and the digest of their checksums, once the cache is
        checked to hold those very chunks."""
        if len(self.cache.chunks) < known:
            self.cache.refresh()
        if len(self.cache.chunks) < known:
            raise ValueError(f"the cache {self.cache.dir} lists {len(self.cache.chunks)} chunks, fewer than the "
                             f"{known} of the data state: is it the same cache?")
        sizes = np.fromiter((c.sequences for c in self.cache.chunks[:known]), dtype=np.int64, count=known)
        if int(sizes.sum()) != d["known_sequences"]:
            raise ValueError(f"the first {known} chunks of {self.cache.dir} hold {int(sizes.sum())} sequences, "
                             f"the data state says {d['known_sequences']}: the cache was rebuilt")
        mine, self._digest = self._digest, xxhash.xxh64()
        try:
            self._digest_chunks(0, known)
        finally:
            mine, self._digest = self._digest, mine
        if "chunks_digest" in d and d["chunks_digest"] != mine.hexdigest():  # absent: older checkpoints
            raise ValueError(f"the first {known} chunks of {self.cache.dir} are not the ones this run trained on "
                             f"(their checksums differ): the cache was rebuilt from other data")
        return sizes, mine


def _epoch0_from_state(d: dict, known: int, takes: np.ndarray, window: int) -> tuple[list, int, dict | None]:
    """Epoch 0's live blocks, the index of the first, and a format-1 state's order (None in format 2)."""
    if d.get("format") == 1:  # the whole order of epoch 0 with its seal points: one block, cut as it was then
        order0 = np.asarray(d["order0"], dtype=np.int64)
        if order0.size != known or not np.array_equal(np.sort(order0), np.arange(known)):
            raise ValueError("the data state's chunk order is not a permutation of its chunks")
        bounds = _legacy_cut([int(x) for x in d["seals0"]], known, window)
        return [[0, known, 0, 1]], 0, {"key": (0, known), "order": order0, "bounds": bounds}
    blocks = [[int(x) for x in blk] for blk in d["blocks"]]
    ends = np.concatenate([[0], np.cumsum(takes)])
    if (not blocks or blocks[-1][1] != known or any(x[1] != y[0] for x, y in zip(blocks, blocks[1:]))
            or any(not 0 <= a <= b or base != ends[a] for a, b, base, _ in blocks)):
        raise ValueError("the data state's blocks do not cover its chunks: is it the same cache?")
    legacy = None
    if "legacy_order" in d:
        a, b = blocks[0][:2]
        legacy = {"key": (a, b), "order": np.asarray(d["legacy_order"], dtype=np.int64),
                  "bounds": [int(x) for x in d["legacy_bounds"]]}
    return blocks, int(d["first_block"]), legacy


class Prefetcher:
    """A background thread that builds the next `depth` batches of a plan; never touches global RNG.

    It builds nothing before it knows where the consumer is: `start` (the step the loop runs first, e.g.
    the resumed step) or else the first get(). Starting from step 0 would decode and assemble batches a
    resumed run never asks for, and its first get() would wait behind them.
    """

    def __init__(self, plan: DataPlan, depth: int = 4, pin_memory: bool = False, start: int | None = None):
        self.plan = plan
        self.depth = max(1, int(depth))
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.waited_seconds = 0.0
        self.batches_built = 0             # batches assembled by the thread (those voided by a grow included)
        self.first_step_built: int | None = None
        self._cv = threading.Condition()
        self._ready: dict[int, tuple[Batch, int]] = {}
        self._next: int | None = start  # the first step the consumer may still ask for (None: not known yet)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="trainerd-prefetch", daemon=True)
        self._thread.start()

    def _wanted(self) -> int | None:
        if self._next is None:
            return None
        for s in range(self._next, self._next + self.depth):
            item = self._ready.get(s)
            if item is not None and not self.plan.unchanged_since(s, item[1]):
                del self._ready[s]  # planned before the plan grew: build it again
                item = None
            if item is None and self.plan.ready(s):
                return s
        return None

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (step := self._wanted()) is None:
                    self._cv.wait(0.05)  # the plan has no callback: look again shortly, or when get() wakes us
                if self._closed:
                    return
            try:
                batch, version = self.plan.build(step)
                if self.pin_memory:
                    batch = batch.pin_memory()
            except NotReady:  # the plan changed since _wanted found the step ready: wait for it again
                continue
            except BaseException as e:  # handed to the consumer in get()
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self.batches_built += 1
                if self.first_step_built is None:
                    self.first_step_built = step
                if step >= self._next:
                    self._ready[step] = (batch, version)
                self._cv.notify_all()

    def get(self, step: int) -> Batch:
        """Exactly plan.get_batch(step); blocks until it is built and adds the time to waited_seconds."""
        t0 = time.perf_counter()
        with self._cv:
            if self._closed:
                raise RuntimeError("the prefetcher is closed")
            self._next = step
            for s in [s for s in self._ready if s < step]:
                del self._ready[s]
            self._cv.notify_all()
            while True:
                if self._error is not None:
                    raise self._error
                item = self._ready.get(step)
                if item is not None and self.plan.unchanged_since(step, item[1]):
                    break
                if not self.plan.ready(step):
                    raise NotReady(f"step {step} is not in the plan yet: grow the plan before asking for it")
                self._cv.wait(0.1)
            del self._ready[step]
            self._next = step + 1
            self._cv.notify_all()
        self.waited_seconds += time.perf_counter() - t0
        return item[0]

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._ready.clear()
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
