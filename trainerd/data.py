"""The step plan over a growing chunk cache: which sequences each rank trains on at each step.

Order
    Global step s trains on the positions [s*G, (s+1)*G) of one stream of sequences (G = global_batch);
    rank r of W takes the positions s*G + r, s*G + r + W, ... The stream is epoch 0, epoch 1, ... back to
    back; each epoch contributes M = floor(epoch_fraction * N) positions, the first M of that epoch's order
    (N = sequences in the cache). An epoch's order is a permutation of its chunks cut into windows of
    `window_chunks` chunks (default 4); the sequences of one window are permuted among themselves (local
    shuffle). A rank reads from at most two windows at a time; a window is decoded once into one array
    (tokens, positions with document restarts, real lengths) and kept while in use (an LRU of 3 windows),
    so every chunk is decompressed once per epoch, not once per sample, and a batch is a few gathers.
    Every permutation comes from a numpy Generator seeded by (seed, epoch, kind, index); the global
    torch/numpy/random generators are never touched.

Growth (epoch 0 only: later epochs start over the finished cache and never change)
    grow(known_chunks, finished, step) is called on every rank at the same step with the same values.
    Positions before step*G are trained on; the window holding position step*G is sealed (kept as it is);
    the not-yet-visited rest of the order plus the new chunks is shuffled again by a generator seeded by
    (seed, epoch 0, arrival index = the known chunk count after the arrival). Hence every sequence of
    epoch 0 exactly once, including sequences that arrive mid-epoch, and a plan grown at step 0 equals a
    plan constructed with that many chunks: ranks that opened the cache at different moments agree once
    they all grow to rank 0's broadcast count before their first batch.
    While the cache is not finished, epoch 0 waits for fresh data: ready(step) is False for a step that
    needs positions beyond the sequences known now. Epoch 1 starts only once the cache is finished.

Totals and the last partial batch
    T = floor(target_epochs * M) positions and total_steps = T // G: the last partial global batch
    (T mod G < G sequences) is DROPPED, so that every step has the same rows on every rank. With
    target_epochs = 1 those few sequences (a random handful of the shuffled order) are never seen.
    total_steps grows with the cache and never shrinks within a run; estimated_total_steps is the same
    formula over the manifest's full-dataset estimate (for warmup and cosine).

Corrupt chunks
    Never trained on: a chunk that raises shared.cache.CorruptChunk is logged (logging.warning), moved to
    the cache's quarantine folder (`packerd run --mode inverse` regenerates it) and recorded as an event
    that the loop drains with take_events(). Each of its rows (c, i) is replaced by (c', i mod n_c'),
    c' the previous readable chunk id (c-1, c-2, ...; the next one when none below is readable). The
    batch keeps its shape, so every rank stays in step, and the replacement depends only on which chunks
    are bad, not on timing or on how far the cache has grown.

Batches
    int64 input_ids, position_ids (0 at each sequence start and at each document start recorded in the
    chunk) and labels (input_ids with -100 past a sequence's real length; never masked by token id).
    Batch arrays come from a small pool and are reused once no tensor or view of an earlier batch refers
    to them (fresh memory costs a page fault per 4 KB). Every rank decodes all chunks of the windows it
    reads, since ranks interleave within each global batch: W times the decompression of the tokens a
    rank trains on, which at LZ4 speed is a small share of a core.

State
    state_dict(): seed, global batch, world size, window, the known chunk count and sequences, finished,
    the full-dataset estimate, epoch 0's chunk order (one int per chunk) with its seal points, and the
    growth events. Later epochs' orders are recomputed from (seed, epoch); the position is the trainer's
    step (get_batch is random access), so load_state_dict reads no chunk and replays nothing.
"""
from __future__ import annotations

import bisect
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from shared.cache import Cache, CacheError, CorruptChunk

log = logging.getLogger("trainerd.data")

STATE_FORMAT = 1
WINDOW_CHUNKS = 4
IGNORE_INDEX = -100
MANIFEST_WAIT_SECONDS = 10.0   # a rank whose manifest lags the broadcast count waits this long for it
_ORDER, _WINDOW = 1, 2          # generator kinds: chunk order of an epoch, sequence order inside a window
_NEVER = 1 << 62


def _rng(seed: int, epoch: int, kind: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, kind, index])))


def _floor(x: float) -> int:
    # round away float noise first (2.9999999999 -> 3) so that every rank and every resume agrees
    return math.floor(round(x, 6))


@dataclass
class Batch:
    input_ids: torch.Tensor        # [n, seq_len] int64, this rank's sequences for one optimizer step
    position_ids: torch.Tensor     # [n, seq_len] int64, restart at 0 at every document start
    labels: torch.Tensor           # [n, seq_len] int64, = input_ids with -100 on padding positions only
    num_tokens: int                # real (non-padding) tokens in this rank's batch
    seq_ids: list[tuple[int, int]]  # (chunk_id, index in chunk) of each row

    def pin_memory(self) -> "Batch":
        return Batch(self.input_ids.pin_memory(), self.position_ids.pin_memory(), self.labels.pin_memory(),
                     self.num_tokens, self.seq_ids)


def _positions(out: np.ndarray, rows: np.ndarray, starts: np.ndarray) -> None:
    """Fill out [n, L]: positions 0.. from each sequence start, restarting at each (row, start) document start."""
    n, L = out.shape
    ar = np.arange(L, dtype=out.dtype)
    out[:] = ar
    keep = starts > 0
    rows, starts = rows[keep], starts[keep]
    if not starts.size:
        return
    if starts.size * 256 <= out.size:
        # few documents (the usual case): rewrite each document's stretch of the flat array
        flat = out.reshape(-1)
        b = rows * L + starts
        b.sort()
        e = np.minimum(np.append(b[1:], n * L), (b // L + 1) * L)  # the next start, or the end of the row
        for lo, hi in zip(b.tolist(), e.tolist()):
            flat[lo:hi] = ar[:hi - lo]
    else:
        # many short documents: the last document start at or before each position, by a running max
        u = np.unique(rows)
        last = np.zeros((u.size, L), dtype=np.int64)
        last[np.searchsorted(u, rows), starts] = starts
        np.maximum.accumulate(last, axis=1, out=last)
        out[u] = ar - last


class _Decoded:
    """A decoded chunk: [n, seq_len] tokens (padded), real lengths, and its document starts (row, position)."""
    __slots__ = ("tokens", "lengths", "doc_rows", "doc_starts", "n")

    def __init__(self, chunk, pad_id: int):
        n, L = chunk.num_sequences, chunk.seq_len
        full = chunk.num_tokens == n * L
        self.tokens = chunk.tokens.reshape(n, L) if full else chunk.padded(pad_id)  # reshape is a view
        self.lengths = chunk.lengths.astype(np.int64)
        self.doc_rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(chunk.doc_ptr.astype(np.int64)))
        self.doc_starts = chunk.doc_starts.astype(np.int64)
        self.n = n


class _Window:
    """The chunks of one window decoded into one array, with positions and the source (chunk, index) of each row."""
    __slots__ = ("tokens", "positions", "lengths", "chunk", "index", "short")

    def __init__(self, parts: list[tuple[int, _Decoded, np.ndarray | None]], seq_len: int):
        # parts: (source chunk id, decoded chunk, its rows to take or None for all) in window order
        def cat(arrays):
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        self.tokens = cat([d.tokens if r is None else d.tokens[r] for _, d, r in parts])
        self.lengths = cat([d.lengths if r is None else d.lengths[r] for _, d, r in parts])
        self.chunk = cat([np.full(d.n if r is None else len(r), c, dtype=np.int64) for c, d, r in parts])
        self.index = cat([np.arange(d.n, dtype=np.int64) if r is None else r for _, d, r in parts])
        self.short = bool((self.lengths < seq_len).any())  # only the window of a finished cache's last chunk
        rows, starts, base = [], [], 0
        for _, d, r in parts:
            if r is None:
                rows.append(d.doc_rows + base)
                starts.append(d.doc_starts)
            else:  # rows borrowed from another chunk (a corrupt one's replacement): their starts, renumbered
                for k, i in enumerate(r.tolist()):
                    sel = d.doc_rows == i
                    rows.append(np.full(int(sel.sum()), base + k, dtype=np.int64))
                    starts.append(d.doc_starts[sel])
            base += d.n if r is None else len(r)
        self.positions = np.empty((base, seq_len), dtype=np.uint16 if seq_len <= 1 << 16 else np.uint32)
        _positions(self.positions, cat(rows) if rows else np.zeros(0, np.int64),
                   cat(starts) if starts else np.zeros(0, np.int64))


class _Layout:
    """One epoch's order: chunk ids cut into windows; maps offsets in the epoch to (window, row in window)."""

    def __init__(self, seed: int, epoch: int, order: np.ndarray, seals: list[int], sizes: np.ndarray, window: int):
        self.seed, self.epoch, self.order = seed, epoch, order
        bounds: list[int] = []
        for a, b in zip(seals, list(seals[1:]) + [len(order)]):
            bounds.extend(range(a, b, window))
        bounds.append(len(order))
        self.bounds = bounds
        self.chunk_pos = np.zeros(len(order) + 1, dtype=np.int64)   # epoch offset where each order slot starts
        np.cumsum(sizes[order], out=self.chunk_pos[1:])
        self.win_pos = self.chunk_pos[bounds].tolist()              # epoch offset where each window starts
        self.total = int(self.chunk_pos[-1])
        self._perms: dict[int, np.ndarray] = {}

    def seal_index(self, offset: int) -> int:
        """Order index that ends the window holding `offset` (or starts it, when offset is its first)."""
        if offset >= self.total:
            return len(self.order)
        w = bisect.bisect_right(self.win_pos, offset) - 1
        return self.bounds[w] if offset == self.win_pos[w] else self.bounds[w + 1]

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

    def segments(self, start: int, stride: int, count: int, end: int) -> list[tuple[int, np.ndarray]]:
        """(window, its rows) of the epoch offsets start, start+stride, ... (count of them, all < end)."""
        out = []
        while count:
            w = bisect.bisect_right(self.win_pos, start) - 1
            lo, hi = self.win_pos[w], min(self.win_pos[w + 1], end)
            k = min(count, (hi - start + stride - 1) // stride)
            out.append((w, self.perm(w)[start - lo:start - lo + stride * (k - 1) + 1:stride]))
            count -= k
            start += stride * k
        return out


class _BufferPool:
    """Recycled [3, rows, seq_len] int64 arrays for batches: a buffer is reused only once nothing refers to it.

    Fresh memory costs a page fault per 4 KB on first touch (several microseconds each on some VMs, more
    than building the batch); a batch's tensors come from torch.from_numpy views of the buffer, so the
    buffer's reference count shows whether any tensor, view or slice of that batch is still alive.
    """

    def __init__(self, shape: tuple[int, int, int], keep: int = 16):
        self.shape, self.keep = shape, keep
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self) -> np.ndarray:
        with self._lock:
            for i in range(len(self._bufs)):
                if sys.getrefcount(self._bufs[i]) == 2:  # held by this list (and the call's argument) only
                    return self._bufs[i]
            buf = np.empty(self.shape, dtype=np.int64)
            if len(self._bufs) < self.keep:
                self._bufs.append(buf)
            return buf


class DataPlan:
    """Which sequences rank `rank` trains on at each global step, over a cache that may still grow.

    Extra keyword arguments beyond the contract: `window_chunks` (local shuffle window), `known_chunks`
    and `finished` (start from this chunk count instead of what the cache lists now), `cache_windows`
    (decoded windows kept: the one being read, the next, one spare for a prefetcher).
    """

    def __init__(self, cache: Cache, *, seed: int, global_batch: int, rank: int, world_size: int,
                 target_epochs: float = 1.0, epoch_fraction: float = 1.0, window_chunks: int = WINDOW_CHUNKS,
                 known_chunks: int | None = None, finished: bool | None = None, cache_windows: int = 3):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not a positive multiple of world_size {world_size}")
        if not target_epochs > 0:
            raise ValueError(f"target_epochs must be positive (got {target_epochs})")
        if not 0 < epoch_fraction <= 1:
            raise ValueError(f"epoch_fraction must be in (0, 1] (got {epoch_fraction})")
        if window_chunks < 1:
            raise ValueError(f"window_chunks must be at least 1 (got {window_chunks})")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer (got {seed})")
        self.cache = cache
        self.seed, self.global_batch, self.rank, self.world_size = int(seed), global_batch, rank, world_size
        self.target_epochs, self.epoch_fraction = float(target_epochs), float(epoch_fraction)
        self.window_chunks = window_chunks
        self.rows = global_batch // world_size       # this rank's rows per step
        self.seq_len, self.pad_id = cache.seq_len, cache.pad_id
        self._lock = threading.RLock()
        self._wlock = threading.Lock()
        self._windows: OrderedDict[tuple, _Window] = OrderedDict()   # decoded windows in use
        self._cache_windows = self._keep_windows = cache_windows
        self._decoded = 0
        self._buffers = _BufferPool((3, self.rows, self.seq_len))
        self._events: list[dict] = []                 # data problems for the loop to log (take_events)
        self._changes: list[int] = []                 # first step each plan change may alter (index = version)
        self.corrupt: dict[int, str] = {}             # chunk id -> reason
        self.events: list[dict] = []                  # growth events (part of the state)
        self.step = 0                                 # step of the last grow
        self.known_chunks, self.finished, self.total_steps = 0, False, 0
        self._known_seqs, self._m = 0, 0
        self._sizes = np.zeros(0, dtype=np.int64)
        self._order0 = np.zeros(0, dtype=np.int64)
        self._seals0 = [0]
        self._later: dict[int, _Layout] = {}
        self._est_seqs = 0
        known = len(cache.chunks) if known_chunks is None else int(known_chunks)
        if finished is None:
            finished = cache.manifest.finished and known == len(cache.chunks)
        with self._lock:
            self._apply(known, bool(finished), 0, cache.manifest.estimated_total_sequences())
            self._layout0 = self._make_layout0()
            self._changes.clear()

    # -- growth ----------------------------------------------------------------------------------
    def grow(self, known_chunks: int, finished: bool, step: int, est_total_sequences: int | None = None) -> bool:
        """Take in chunks up to `known_chunks` (and `finished`) from global step `step` on; True when the
        plan, its totals or its estimate changed. Call it on every rank at the same step with the same
        values (rank 0's, broadcast); pass rank 0's est_total_sequences too, else each rank's manifest is used."""
        with self._lock:
            before = (self.known_chunks, self.finished, self.total_steps, self._est_seqs)
            self.step = step
            if self._apply(int(known_chunks), bool(finished), step, est_total_sequences):
                self.events.append({"step": step, "known_chunks": self.known_chunks, "finished": self.finished})
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
            # the window holding position step*G is sealed; the rest of epoch 0 is shuffled again with the new chunks
            seal = self._order0.size
            if self.known_chunks:
                layout = self._layout0
                seal = max(layout.seal_index(step * self.global_batch), self._seals0[-1])
                first_changed = int(layout.chunk_pos[seal]) // self.global_batch
            tail = np.sort(np.concatenate([self._order0[seal:], np.arange(self.known_chunks, known, dtype=np.int64)]))
            tail = _rng(self.seed, 0, _ORDER, known).permutation(tail)
            self._order0 = np.concatenate([self._order0[:seal], tail])
            if seal > self._seals0[-1]:
                self._seals0.append(seal)
            self._sizes = np.concatenate([self._sizes, new_sizes])
            self.known_chunks = known
            self._known_seqs = int(self._sizes.sum())
            self._layout0 = self._make_layout0()
            self._later.clear()
        self.finished = finished
        if est is None and changed:
            est = self.cache.manifest.estimated_total_sequences()  # this rank's manifest: pass rank 0's instead
        if est is not None:
            self._est_seqs = int(est)
        self._est_seqs = max(self._est_seqs, self._known_seqs)
        self._m = _floor(self.epoch_fraction * self._known_seqs)
        self.total_steps = max(self.total_steps, _floor(self.target_epochs * self._m) // self.global_batch)
        if changed:
            self._changes.append(first_changed)
        return changed

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

    def _make_layout0(self) -> _Layout:
        return _Layout(self.seed, 0, self._order0, self._seals0, self._sizes, self.window_chunks)

    def _layout(self, epoch: int) -> _Layout:
        if epoch == 0:
            return self._layout0
        lay = self._later.get(epoch)
        if lay is None:
            if len(self._later) >= 2:
                self._later.pop(min(self._later))
            order = _rng(self.seed, epoch, _ORDER, 0).permutation(self.known_chunks)
            lay = self._later[epoch] = _Layout(self.seed, epoch, order, [0], self._sizes, self.window_chunks)
        return lay

    # -- totals ----------------------------------------------------------------------------------
    @property
    def estimated_total_steps(self) -> int:
        """Steps over the full-dataset estimate (the manifest's, as of the last grow); final once finished."""
        with self._lock:
            if self.finished:
                return self.total_steps
            m = _floor(self.epoch_fraction * self._est_seqs)
            return max(self.total_steps, _floor(self.target_epochs * m) // self.global_batch)

    @property
    def known_sequences(self) -> int:
        return self._known_seqs

    @property
    def version(self) -> int:
        return len(self._changes)

    def epoch_of(self, step: int) -> int:
        return (step * self.global_batch) // self._m if self._m else 0

    def ready(self, step: int) -> bool:
        """The data of global step `step` is known (epoch 0 of an unfinished cache: all its sequences exist)."""
        with self._lock:
            if step < 0 or step >= self.total_steps:
                return False
            return self.finished or (step + 1) * self.global_batch <= self._m

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
                raise ValueError(f"step {step} is not in the plan yet ({self.total_steps} steps planned, "
                                 f"{self._known_seqs} sequences known, finished={self.finished})")
            version = len(self._changes)
            segments = self._segments(step)
        # keep at least the windows of two batches (small chunks make a batch span many windows)
        self._keep_windows = max(self._cache_windows, 2 * len(segments) + 1)
        return self._assemble([(self._window(lay, w), rows) for lay, w, rows in segments]), version

    def _segments(self, step: int) -> list[tuple[_Layout, int, np.ndarray]]:
        """(epoch layout, window, rows of the window) for this rank's positions step*G + rank + W*j, j < rows."""
        pos, count, m, W = step * self.global_batch + self.rank, self.rows, self._m, self.world_size
        out = []
        while count:
            epoch, offset = divmod(pos, m)
            k = min(count, (m - offset + W - 1) // W)  # rows left in this epoch
            lay = self._layout(epoch)
            out += [(lay, w, rows) for w, rows in lay.segments(offset, W, k, m)]
            count -= k
            pos += W * k
        return out

    def _assemble(self, parts: list[tuple[_Window, np.ndarray]]) -> Batch:
        n, L = self.rows, self.seq_len
        buf = self._buffers.take()                    # [3, n, L] int64: ids, positions, labels
        ids, pos, labels = buf[0], buf[1], buf[2]
        r0, chunk, index, num_tokens = 0, [], [], n * L
        for win, rows in parts:
            r1 = r0 + len(rows)
            tokens = win.tokens[rows]                 # the small dtype, once: ids and labels are cast from it
            ids[r0:r1] = tokens
            labels[r0:r1] = tokens
            pos[r0:r1] = win.positions[rows]
            if win.short:
                lengths = win.lengths[rows]
                for r in np.flatnonzero(lengths < L).tolist():
                    # padding by real length, never by token id (EOS may equal pad)
                    labels[r0 + r, lengths[r]:] = IGNORE_INDEX
                    num_tokens -= L - int(lengths[r])
            chunk.append(win.chunk[rows])
            index.append(win.index[rows])
            r0 = r1
        if len(parts) > 1:
            chunk, index = [np.concatenate(chunk)], [np.concatenate(index)]
        return Batch(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(labels), num_tokens,
                     list(zip(chunk[0].tolist(), index[0].tolist())))

    def _window(self, lay: _Layout, w: int) -> _Window:
        """Window w of an epoch, decoded (each window is built once while it is in use: a small LRU)."""
        key = (lay.epoch, lay.chunks_of(w))
        with self._wlock:
            win = self._windows.get(key)
            if win is not None:
                self._windows.move_to_end(key)
                return win
        parts = []
        for c in key[1]:
            d = self._decode(c)
            if d is None:  # corrupt: its rows come from the next readable chunk
                c2, d2 = self._replacement(c)
                parts.append((c2, d2, np.arange(int(self._sizes[c]), dtype=np.int64) % d2.n))
            else:
                parts.append((c, d, None))
        win = _Window(parts, self.seq_len)
        with self._wlock:
            self._windows[key] = win
            while len(self._windows) > self._keep_windows:
                self._windows.popitem(last=False)
        return win

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

    def _replacement(self, c: int) -> tuple[int, _Decoded]:
        """The previous readable chunk (c-1, c-2, ...; those exist whatever the cache grows to), else the next."""
        for c2 in [*range(c - 1, -1, -1), *range(c + 1, self.known_chunks)]:
            d = self._decode(c2)
            if d is not None:
                return c2, d
        raise CacheError(f"every chunk of {self.cache.dir} is corrupt; nothing to train on")

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
        log.warning("chunk %d is corrupt (%s): not trained on, moved to %s; its sequences are replaced by "
                    "those of the next readable chunk (packerd run --mode inverse regenerates it)", c, reason, where)
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
                    "target_epochs": self.target_epochs, "epoch_fraction": self.epoch_fraction,
                    "known_chunks": self.known_chunks, "known_sequences": self._known_seqs,
                    "finished": self.finished, "est_total_sequences": self._est_seqs,
                    "total_steps": self.total_steps, "step": self.step,
                    "order0": self._order0.tolist(), "seals0": list(self._seals0),
                    "events": [dict(e) for e in self.events]}

    def load_state_dict(self, d: dict) -> None:
        """Restore a state_dict; world size, global batch, seed, window and epoch fraction must match.
        target_epochs may differ (the totals follow this plan's value). Reads the manifest, no chunk."""
        if d.get("format") != STATE_FORMAT:
            raise ValueError(f"data state format {d.get('format')!r} is not {STATE_FORMAT}")
        if (d["world_size"], d["global_batch"]) != (self.world_size, self.global_batch):
            raise ValueError(f"the data state was saved with world_size {d['world_size']} and global batch "
                             f"{d['global_batch']}, this run has world_size {self.world_size} and global batch "
                             f"{self.global_batch}: resume with the same layout or start a new run")
        for key, mine in (("seed", self.seed), ("window_chunks", self.window_chunks),
                          ("epoch_fraction", self.epoch_fraction)):
            if d[key] != mine:
                raise ValueError(f"the data state was saved with {key} {d[key]!r}, this run has {mine!r}")
        known = int(d["known_chunks"])
        order0 = np.asarray(d["order0"], dtype=np.int64)
        if order0.size != known or not np.array_equal(np.sort(order0), np.arange(known)):
            raise ValueError("the data state's chunk order is not a permutation of its chunks")
        if len(self.cache.chunks) < known:
            self.cache.refresh()
        if len(self.cache.chunks) < known:
            raise ValueError(f"the cache {self.cache.dir} lists {len(self.cache.chunks)} chunks, fewer than the "
                             f"{known} of the data state: is it the same cache?")
        sizes = np.fromiter((c.sequences for c in self.cache.chunks[:known]), dtype=np.int64, count=known)
        if int(sizes.sum()) != d["known_sequences"]:
            raise ValueError(f"the first {known} chunks of {self.cache.dir} hold {int(sizes.sum())} sequences, "
                             f"the data state says {d['known_sequences']}: the cache was rebuilt")
        with self._lock:
            self.known_chunks, self.finished, self.step = known, bool(d["finished"]), int(d["step"])
            self._sizes, self._known_seqs = sizes, int(sizes.sum())
            self._order0, self._seals0 = order0, [int(x) for x in d["seals0"]]
            self._layout0 = self._make_layout0()
            self._later.clear()
            self.events = [dict(e) for e in d["events"]]
            self._est_seqs = max(int(d["est_total_sequences"]), self._known_seqs)
            self._m = _floor(self.epoch_fraction * self._known_seqs)
            self.total_steps = _floor(self.target_epochs * self._m) // self.global_batch
            self._changes.append(0)  # whatever was prepared before is void


class Prefetcher:
    """A background thread that builds the next `depth` batches of a plan; never touches global RNG."""

    def __init__(self, plan: DataPlan, depth: int = 4, pin_memory: bool = False):
        self.plan = plan
        self.depth = max(1, int(depth))
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.waited_seconds = 0.0
        self._cv = threading.Condition()
        self._ready: dict[int, tuple[Batch, int]] = {}
        self._next = 0             # the first step the consumer may still ask for
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="trainerd-prefetch", daemon=True)
        self._thread.start()

    def _wanted(self) -> int | None:
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
            except BaseException as e:  # handed to the consumer in get()
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
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
                    raise ValueError(f"step {step} is not in the plan yet: grow the plan before asking for it")
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
