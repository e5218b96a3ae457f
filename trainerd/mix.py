"""Several caches in one run: a weighted, deterministic interleave of their streams (data.cache_dir lists them).

Interleave
    Position n of the run's stream (step s trains on positions [s*G, (s+1)*G); rank r of W takes s*G + r,
    s*G + r + W, ... as with one cache) belongs to one source. The weights are quantized to integer units
    u_i out of P = 2^16 (largest remainders; shares exact to 1/65536) and reduced by their common divisor; one
    period of P positions holds u_i of source i, placed at the ideal times (2c + 1) / (2 u_i) of its c-th
    draw, sorted (ties to the lower source index). So after n positions of a period source i has
    n * w_i +- (number of sources) draws: over any 1,000 consecutive positions its share is within a few
    sequences of its weight (tests/test_mix.py checks 1%). Source i's k-th draw is position k of its own
    stream, a DataPlan of one rank over its cache (its own epoch orders and shuffle windows): a source drawn
    more often than its size allows starts its next epoch, one drawn less is subsampled, and no source
    depends on another. Nothing is random here: the allocation is a function of the weights and n.

Weights
    data.weights, or each cache's size: its epoch's sequences over the full-dataset estimate (its known
    sequences once finished), so several caches act as one dataset. Size weights change as the estimates
    do, once some cache's share has moved by more than SHARE_TOLERANCE of itself; a change takes effect at
    the step every rank grows at (a new segment: from there on, the periodic pattern of the new units,
    counted from the draws made so far), so the allocation stays a function of (segments, n), and the
    segments are the state. A segment enters its pattern at the place whose progress best matches each
    source's credit (its draws due at the shares so far minus its draws made): entered at its start, a
    segment shorter than 1 / (2 share) never drew a source, so frequent small moves starved small caches.

Ranks
    With several ranks, each rank's windows of a source hold only the rows it draws under the segments so
    far (the last one taken to go on); a new segment moves rows between ranks, so each rank drops its
    windows and decodes them again. The tolerance keeps that rare.

Growth and waiting
    grow(step, views) takes rank 0's (known chunks, finished, estimate) of each cache, agreed at a step
    boundary; each source plan grows at its own position at that step (its block in use stays as it is). A
    step is ready when every source holds the positions it draws there (DataPlan.holds): a source whose packer is behind makes the run wait
    (never shifting its share to others, which would make the mix depend on packing speed).

Totals
    T = floor(target_epochs * sum of the sources' epoch sizes) positions, total_steps = T // G (the last
    partial batch dropped), growing with the caches and never shrinking; estimated_total_steps the same over
    their estimates (warmup, cosine).

State
    state_dict(): the layout (seed, global batch, weights), the segments from the one in use at the last
    grow on, and each source plan's state (each a few hundred bytes); the position is the trainer's step.
"""
from __future__ import annotations

import bisect
import math
import threading
from functools import partial

import numpy as np
import torch

from shared.cache import Cache
from shared.protocol import DEFAULT_ENDPOINT

from .data import FEW_DOCUMENTS, Batch, DataPlan, NotReady, _batch, _BufferPool, _floor, _positions, restart

MIX_FORMAT = 1
BLOCK_POSITIONS = 8192  # run positions planned together (the interleave and the sources' windows looked up
                        # once for them): 256 steps of 32 sequences, fewer of larger batches; a block lets go
                        # of each window once its steps took the window's rows
PERIOD = 1 << 16  # weights are quantized to 1/PERIOD
SHARE_TOLERANCE = 0.01  # size weights move the interleave only when a cache's share moves by more than 1% of
                        # itself: each move makes every rank decode its windows again (its rows change)


def source_seed(seed: int, i: int) -> int:
    """Source 0 keeps the run's seed (one cache: today's order); the others get independent streams."""
    if i == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), i]).generate_state(1, dtype=np.uint32)[0])


def quantize(weights: list[float], period: int = PERIOD) -> tuple[int, ...]:
    """Integer units summing to `period` in proportion to `weights` (largest remainders, ties to the lower
    index), reduced by their greatest common divisor."""
    total = math.fsum(weights)
    if not total > 0:
        raise ValueError("the weights sum to zero")
    exact = [period * w / total for w in weights]
    units = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - units[i]), i))
    for i in by_remainder[:period - sum(units)]:
        units[i] += 1
    g = math.gcd(*units)
    return tuple(u // g for u in units)


class Pattern:
    """One period of the interleave for integer units: which source each position takes, and how many
    draws each source has had before each position of the period."""

    def __init__(self, units: tuple[int, ...]):
        self.units = np.asarray(units, dtype=np.int64)
        self.period = int(self.units.sum())
        times = np.concatenate([(2 * np.arange(u) + 1) / (2 * u) for u in units if u])
        owner = np.concatenate([np.full(u, i, dtype=np.int64) for i, u in enumerate(units) if u])
        self.source = owner[np.lexsort((owner, times))]        # by ideal time, ties to the lower source
        self.at = [np.flatnonzero(self.source == i) for i in range(len(units))]  # each source's places in a period
        self.before = np.zeros((len(units), self.period + 1), dtype=np.int64)
        for i in range(len(units)):
            np.cumsum(self.source == i, out=self.before[i, 1:])

    def counts(self, t: int) -> np.ndarray:
        """Draws of each source among the first t positions."""
        q, r = divmod(int(t), self.period)
        return q * self.units + self.before[:, r]


def _close(units: tuple[int, ...], new: tuple[int, ...]) -> bool:
    """Whether the shares of `new` are those of `units` within SHARE_TOLERANCE of each (a share of zero only
    by another zero)."""
    a, b = sum(units), sum(new)
    return all(abs(y / b - x / a) <= SHARE_TOLERANCE * (x / a) for x, y in zip(units, new))


def _entry(pattern: Pattern, credit: list[float]) -> int:
    """The place in `pattern` to start a segment at: where each drawn source's progress (its draws due at the
    pattern's shares minus those made, up to that place) is closest to its credit, the largest difference
    smallest (the first such place)."""
    live = np.flatnonzero(pattern.units)
    due = np.arange(pattern.period) * (pattern.units[live, None] / pattern.period)
    gap = np.abs(due - pattern.before[live, :pattern.period] - np.asarray(credit)[live, None]).max(axis=0)
    return int(np.argmin(gap))


def allocate(weights: list[float], n: int) -> np.ndarray:
    """The source of each of the first n positions for fixed weights (for tests and tools)."""
    p = Pattern(quantize(weights))
    return np.resize(p.source, n)


class _Block:
    """Consecutive steps of one plan version, planned together: for each source, its windows and the rows each
    step takes of them (looked up with whole-array operations for all the steps at once, which costs about
    what one step did), the steps' document restarts, short rows, sources and seq_ids. A step's batch is then
    one copy per source window (batch)."""
    __slots__ = ("first", "low", "k", "version", "pieces", "flat", "few", "cut", "short", "sources", "seq_ids")

    def __init__(self, plan: "MixPlan", first: int, version: int, src: np.ndarray, spos: np.ndarray):
        """Rows with sources `src` at source positions `spos`: this rank's rows of the steps from `first`."""
        R, L = plan.rows, plan.seq_len
        self.first, self.version, self.k = first, version, len(src) // R
        self.low = 0  # the first of its steps (counted from first) it still holds every window of
        k = self.k
        # per source window: (first step and end of the steps that take its rows; the window; its first row
        # when its rows are consecutive, else its rows; the rows of the step they fill; where each of those
        # steps' rows begin among them), by first step
        self.pieces: list[tuple] = []
        seq_ids = np.empty(len(src), dtype=object)  # (source, chunk, index) of each row: the windows' own tuples
        starts, shorts = [], []  # (block row, position in row, stretch) of document starts; (block row, length)
        step_starts = np.arange(k + 1) * R
        for i in np.unique(src).tolist():
            idx = np.flatnonzero(src == i)
            for win, q, sel in plan.plans[i].gather(spos[idx]):
                rows = idx[sel]
                which, at, n = win.starts_in(q)
                starts.append((rows[which], at, n))
                if (s := win.short_in(q)) is not None:
                    shorts.append((rows[s[0]], s[1]))
                q0 = int(q[0])
                run = int(q[-1]) - q0 == len(q) - 1  # consecutive rows: slices
                seq_ids[rows] = win.seq_ids[q0:q0 + len(q)] if run else win.seq_ids[q]
                j0, j1 = int(rows[0]) // R, int(rows[-1]) // R + 1
                cuts = np.searchsorted(rows, step_starts[j0:j1 + 1]).tolist()
                self.pieces.append((j0, j1, win, q0 if run else q, rows % R, cuts))
        self.pieces.sort(key=lambda piece: piece[0])
        flat = np.concatenate([r * L + a for r, a, _ in starts])  # in the block's rows
        order = np.argsort(flat, kind="stable")
        flat, n = flat[order], np.concatenate([n for _, _, n in starts])[order]
        self.cut = np.searchsorted(flat, step_starts * L).tolist()
        flat %= R * L                                             # in its step's rows
        self.flat, self.few = flat, (flat.tolist(), n.tolist())
        self.short: list[list] = [[] for _ in range(k)]
        for rows, lengths in shorts:  # rare: a chunk's short final sequence
            for r, length in zip(rows.tolist(), lengths.tolist()):
                self.short[r // R].append((r % R, length))
        self.sources, self.seq_ids = src.reshape(k, R).tolist(), seq_ids.tolist()

    def holds(self, step: int, version: int) -> bool:
        return version == self.version and self.first + self.low <= step < self.first + self.k

    def batch(self, j: int, buf: np.ndarray, arange: np.ndarray) -> Batch:
        """The batch of the block's step j, in buf ([2, rows, L] int32: ids, positions, from a pool)."""
        ids, pos = buf[0], buf[1]
        done, started = False, 0
        for j0, j1, win, q, dest, cuts in self.pieces:
            if j < j0:
                break  # this window's steps and those of the windows after it are still to come
            started += 1
            if j < j1:
                c0, c1 = cuts[j - j0], cuts[j - j0 + 1]
                if c1 > c0:
                    ids[dest[c0:c1]] = win.tokens[q + c0:q + c1] if isinstance(q, int) else win.tokens[q[c0:c1]]
            done |= j + 1 >= j1
        if done:  # a window the next steps take nothing of need not stay alive; the steps up to j (relative
            # to first) are then planned again if asked for
            self.pieces[:started] = [p for p in self.pieces[:started] if p[1] > j + 1]
            self.low = j + 1
        lo, hi = self.cut[j], self.cut[j + 1]
        if hi - lo > FEW_DOCUMENTS:
            L = pos.shape[1]
            _positions(pos, self.flat[lo:hi] // L, self.flat[lo:hi] % L)
        else:
            restart(pos, self.few[0][lo:hi], self.few[1][lo:hi], arange)
        short = self.short[j]
        R = len(ids)
        batch = _batch(ids, pos, short, sum(length == 0 for _, length in short), self.seq_ids[j * R:(j + 1) * R])
        batch.sources = self.sources[j]
        return batch


class MixPlan:
    """The step plan over several caches: DataPlan's interface (grow through grow_sources)."""

    def __init__(self, caches: list[Cache], *, seed: int, global_batch: int, rank: int, world_size: int,
                 weights: list[float] | None = None, target_epochs: float = 1.0, epoch_fraction: float = 1.0,
                 shuffle_window: int | None = None, cache_windows: int = 3):
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not a positive multiple of world_size {world_size}")
        if weights is not None and (len(weights) != len(caches) or any(not w >= 0 for w in weights)
                                    or not math.fsum(weights) > 0):
            raise ValueError(f"weights {weights} do not fit {len(caches)} caches")
        if not target_epochs > 0:
            raise ValueError(f"target_epochs must be positive (got {target_epochs})")
        self.caches = caches
        self.cache = caches[0]   # the first cache: the model's tokenizer and seq_len, the held-out default
        self.seq_len, self.pad_id = caches[0].seq_len, caches[0].pad_id
        self.seed, self.global_batch, self.rank, self.world_size = int(seed), global_batch, rank, world_size
        self.weights = None if weights is None else [float(w) for w in weights]
        self.target_epochs = float(target_epochs)
        self.rows = global_batch // world_size
        kw = {} if shuffle_window is None else {"shuffle_window": shuffle_window}
        # every source plan reads its positions at random (gather): one rank's plan, target_epochs 1 (the
        # run's length is the mixture's; a source only needs its epochs' orders)
        self.plans = [DataPlan(c, seed=source_seed(seed, i), global_batch=1, rank=0, world_size=1,
                               epoch_fraction=epoch_fraction, known_chunks=0, finished=False,
                               cache_windows=cache_windows, **kw) for i, c in enumerate(caches)]
        for i, p in enumerate(self.plans):
            p.source = i
        self._lock = threading.RLock()
        self._buffers = _BufferPool((2, self.rows, self.seq_len), np.int32)
        self._arange = np.arange(self.seq_len, dtype=np.int32)
        self._patterns: dict[tuple[int, ...], Pattern] = {}
        # (first step, units, draws before it, place in the pattern it starts at, each source's credit there)
        self.segments: list[tuple[int, tuple[int, ...], list[int], int, list[float]]] = []
        self._starts: list[int] = []
        self._changes: list[int] = []
        self._block: _Block | None = None  # the next steps, planned together (build)
        self._ready_upto = -1  # a step found ready since the last grow: so are those before it
        self.total_steps, self.step = 0, 0

    # -- the interleave ----------------------------------------------------------------------------
    def _pattern(self, units: tuple[int, ...]) -> Pattern:
        p = self._patterns.get(units)
        if p is None:
            p = self._patterns[units] = Pattern(units)
        return p

    def _segment_of(self, n: int) -> tuple:
        """The segment that holds run position n."""
        if len(self._starts) != len(self.segments):  # the segments' first positions, kept beside them
            self._starts = [s[0] * self.global_batch for s in self.segments]
        return self.segments[bisect.bisect_right(self._starts, n) - 1]

    def _segment(self, n: int) -> tuple[int, Pattern, np.ndarray, int]:
        """(first position, pattern, draws before it, place in the pattern it starts at) of the segment of n."""
        first, units, base, offset, _ = self._segment_of(n)
        return first * self.global_batch, self._pattern(units), np.asarray(base, dtype=np.int64), offset

    def draws(self, n: int) -> np.ndarray:
        """Draws of each source among the run's first n positions."""
        start, pattern, base, offset = self._segment(n)
        return base + pattern.counts(offset + n - start) - pattern.counts(offset)

    def _credit(self, n: int) -> list[float]:
        """Each source's draws due among the run's first n positions (each segment's shares over its length,
        from the credit it started with) minus its draws made: where a new segment has to pick up."""
        if not self.segments:
            return [0.0] * len(self.plans)
        first, units, _, offset, credit = self._segment_of(n)
        pattern, t = self._pattern(units), n - first * self.global_batch
        made = pattern.counts(offset + t) - pattern.counts(offset)
        return [float(c + t * u / pattern.period - m) for c, u, m in zip(credit, units, made.tolist())]

    def _places(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The source of each run position of n (ascending) and the position in that source's stream."""
        src, spos = np.empty_like(n), np.empty_like(n)
        i = 0
        while i < len(n):
            start, pattern, base, offset = self._segment(int(n[i]))
            j = bisect.bisect_left(self._starts, int(n[i]) + 1)  # the next segment's index
            end = len(n) if j >= len(self._starts) else int(np.searchsorted(n, self._starts[j]))
            q, r = np.divmod(n[i:end] - start + offset, pattern.period)
            s = src[i:end] = pattern.source[r]
            spos[i:end] = (base - pattern.counts(offset))[s] + q * pattern.units[s] + pattern.before[s, r]
            i = end
        return src, spos

    def _mine(self, i: int, p: np.ndarray) -> np.ndarray:
        """Which of source i's draws p this rank reads: the run position of each, modulo the ranks (draws
        before the first segment kept, those of a resumed run's past, are nobody's)."""
        n = np.full(len(p), -1, dtype=np.int64)
        seg = np.searchsorted([sg[2][i] for sg in self.segments], p, side="right") - 1
        for j in np.unique(seg[seg >= 0]).tolist():
            first, units, base, offset, _ = self.segments[j]
            if units[i]:
                sel, pattern = seg == j, self._pattern(units)
                q, k = np.divmod(p[sel] - base[i] + int(pattern.counts(offset)[i]), units[i])
                n[sel] = first * self.global_batch + q * pattern.period + pattern.at[i][k] - offset
        return (n >= 0) & (n % self.world_size == self.rank)

    def step_sources(self, step: int) -> list[int]:
        """Sequences of each source in global step `step` (every rank's rows)."""
        G = self.global_batch
        with self._lock:
            return (self.draws((step + 1) * G) - self.draws(step * G)).tolist()

    # -- growth --------------------------------------------------------------------------------------
    def grow_sources(self, step: int, views: list[tuple[int, bool, int]]) -> bool:
        """Take in rank 0's (known chunks, finished, estimate) of every cache from global step `step` on
        (every rank, the same step and values); True when the plan or its totals changed."""
        with self._lock:
            self._ready_upto = -1  # an estimate alone can make a source's newest block wait for more chunks
            before = self._view()
            at = self.draws(step * self.global_batch) if self.segments else np.zeros(len(self.plans), np.int64)
            for i, (p, (known, finished, est), pos) in enumerate(zip(self.plans, views, at.tolist())):
                p.grow(known, finished, pos, est_total_sequences=est)
                if p.finished and not p._m and (self.weights is None or self.weights[i] > 0):
                    raise ValueError(f"the cache {p.cache.dir} is finished without a sequence: it cannot be drawn")
            if self._reweigh(step, at) and self.world_size > 1:
                for i, p in enumerate(self.plans):  # windows of the rows this rank draws under these segments
                    p.set_row_filter(partial(self._mine, i))
            self.step = step
            self.total_steps = max(self.total_steps, self._total(self._sizes(estimate=False)))
            # a new segment (size weights moved with an estimate) changes the batches from `step` on even when
            # no total rounds to another step
            changed = before != self._view()
            if changed:
                self._changes.append(step)  # batches prepared for this step or later are planned again
            return changed

    def _view(self) -> tuple:
        """What the batches from the current step on depend on: the totals, each source's chunks, the units."""
        return (self.total_steps, self.estimated_total_steps, self.finished, [p.known_chunks for p in self.plans],
                self.segments[-1][1] if self.segments else None)

    def _sizes(self, estimate: bool) -> list[int]:
        """Each source's epoch in positions: of what it holds, or of its full-dataset estimate."""
        return [_floor(p._frac * p._est_seqs) if estimate and not p.finished else p._m for p in self.plans]

    def _total(self, sizes: list[int]) -> int:
        return _floor(self.target_epochs * sum(sizes)) // self.global_batch

    def _reweigh(self, step: int, at: np.ndarray) -> bool:
        """Start a segment at `step` when there is none yet, or when the units change: fixed weights never,
        size weights once some cache's share moved by more than SHARE_TOLERANCE of itself. True when the
        segments changed."""
        weights = self.weights if self.weights is not None else self._sizes(estimate=True)
        if not math.fsum(weights) > 0:
            return False  # no sequence known anywhere yet: nothing to interleave
        units = quantize(weights)
        if self.segments and _close(self.segments[-1][1], units):
            return False
        if self.segments and self.segments[-1][0] == step:
            self.segments.pop()  # replaced before any position of it was planned
        credit = self._credit(step * self.global_batch)
        offset = _entry(self._pattern(units), credit) if self.segments else 0
        self.segments.append((step, units, [int(x) for x in at], offset, credit))
        self._starts = []
        return True

    # -- the trainer's interface (as DataPlan's) ---------------------------------------------------------
    @property
    def finished(self) -> bool:
        return all(p.finished for p in self.plans)

    @property
    def estimated_total_steps(self) -> int:
        with self._lock:
            return max(self.total_steps, self._total(self._sizes(estimate=True)))

    @property
    def known_sequences(self) -> int:
        return sum(p.known_sequences for p in self.plans)

    @property
    def known_chunks(self) -> int:
        return sum(p.known_chunks for p in self.plans)

    @property
    def version(self) -> int:
        return len(self._changes)

    def unchanged_since(self, step: int, version: int) -> bool:
        with self._lock:
            return min(self._changes[version:], default=1 << 62) > step

    def waiting_for(self, step: int) -> list[int]:
        """The sources whose packers step `step` waits for (it draws positions they do not hold yet)."""
        with self._lock:
            if not self.segments:
                return [i for i, p in enumerate(self.plans) if not p.finished]
            need = self.draws((step + 1) * self.global_batch)
            return [i for i, (p, k) in enumerate(zip(self.plans, need.tolist())) if not p.holds(k)]

    def ready(self, step: int) -> bool:
        with self._lock:
            if not (0 <= step < self.total_steps and self.segments):
                return False
            if step <= self._ready_upto:
                return True
            if self.waiting_for(step):
                return False
            self._ready_upto = step  # the steps before it are ready too: sources hold prefixes
            return True

    def take_events(self) -> list[dict]:
        return [dict(ev, source=i) for i, p in enumerate(self.plans) for ev in p.take_events()]

    @property
    def chunks_decoded(self) -> int:
        return sum(p.chunks_decoded for p in self.plans)

    def get_batch(self, step: int):
        return self.build(step)[0]

    def build(self, step: int):
        """This rank's rows of global step `step` and the plan version it was planned at."""
        with self._lock:  # a block lets go of windows as its steps are built: the check and the build go together
            if not self.ready(step):
                raise NotReady(f"step {step} is not in the plan yet ({self.total_steps} steps planned)")
            version = len(self._changes)
            if self._block is not None and self._block.holds(step, version):
                return self._block.batch(step - self._block.first, self._buffers.take(), self._arange), version
            last = min(step + max(1, BLOCK_POSITIONS // self.global_batch), self.total_steps)
            while not self.ready(last - 1):  # the steps ready are those up to some step (one test, usually)
                last = (step + 1 + last) // 2
            G = self.global_batch
            places = self._places(np.arange(step * G + self.rank, last * G, self.world_size, dtype=np.int64))
        try:
            block = _Block(self, step, version, *places)  # windows are decoded outside the lock
        except RuntimeError:
            with self._lock:
                if len(self._changes) == version:
                    raise
            # a grow meanwhile started a segment: the windows now hold the rows of the new one; plan again
            raise NotReady(f"step {step} was planned again while its windows were read") from None
        with self._lock:
            self._block = block
            return block.batch(step - block.first, self._buffers.take(), self._arange), version

    # -- state -----------------------------------------------------------------------------------------
    def _live_segment(self) -> int:
        return max(0, bisect.bisect_right([sg[0] for sg in self.segments], self.step) - 1)

    def state_dict(self) -> dict:
        with self._lock:
            return {"format": MIX_FORMAT, "kind": "mixture", "seed": self.seed, "global_batch": self.global_batch,
                    "world_size": self.world_size, "weights": self.weights, "target_epochs": self.target_epochs,
                    "caches": [str(c.dir) for c in self.caches], "total_steps": self.total_steps, "step": self.step,
                    # the segments from the one in use at the last grow on (those before are trained on)
                    "segments": [[s, list(u), list(b), o, list(c)]
                                 for s, u, b, o, c in self.segments[self._live_segment():]],
                    "sources": [p.state_dict() for p in self.plans]}

    def load_state_dict(self, d: dict) -> None:
        """Restore a state_dict: the same caches in the same order, weights, seed and global batch."""
        if d.get("kind") != "mixture":
            raise ValueError(f"the data state was saved by a run on one cache; this run has {len(self.caches)}: "
                             f"the caches of a run cannot change")
        if d.get("format") != MIX_FORMAT:
            raise ValueError(f"mixture state format {d.get('format')!r} is not {MIX_FORMAT}")
        if len(d["sources"]) != len(self.plans):
            raise ValueError(f"the data state was saved with {len(d['sources'])} caches, this run has "
                             f"{len(self.plans)}: the caches of a run cannot change")
        for key, mine in (("seed", self.seed), ("global_batch", self.global_batch), ("weights", self.weights)):
            if d[key] != mine:
                raise ValueError(f"the data state was saved with {key} {d[key]!r}, this run has {mine!r}")
        with self._lock:
            for p, s in zip(self.plans, d["sources"]):
                p.load_state_dict(s)
            # a segment saved before segments carried their entry place starts at its pattern's beginning
            self.segments = [(int(g[0]), tuple(int(x) for x in g[1]), [int(x) for x in g[2]],
                              int(g[3]) if len(g) > 3 else 0,
                              [float(x) for x in g[4]] if len(g) > 3 else [0.0] * len(g[1]))
                             for g in d["segments"]]
            self._starts, self._ready_upto = [], -1
            if self.world_size > 1 and self.segments:
                for i, p in enumerate(self.plans):
                    p.set_row_filter(partial(self._mine, i))
            self.total_steps, self.step = int(d["total_steps"]), int(d["step"])
            if float(d.get("target_epochs", self.target_epochs)) != self.target_epochs:
                # resumed with another target: the length follows this run's, as one cache's plan does
                self.total_steps = max(self.step, self._total(self._sizes(estimate=False)))
            self._changes.append(0)


def make_plan(caches: list[Cache], cfg, *, global_batch: int, rank: int, world_size: int):
    """The run's plan: one cache's DataPlan (exactly as without mixtures), or a MixPlan over several. Every
    rank starts from no chunks and grows to rank 0's count at the first step boundary, so ranks that opened
    the caches at different moments agree."""
    d = cfg.data
    kw = {"seed": cfg.train.seed, "global_batch": global_batch, "rank": rank, "world_size": world_size,
          "target_epochs": d.target_epochs, "epoch_fraction": d.epoch_fraction, "shuffle_window": d.shuffle_window}
    if len(caches) == 1:
        return DataPlan(caches[0], known_chunks=0, finished=False, **kw)
    return MixPlan(caches, weights=d.weights or None, **kw)


class SourceLosses:
    """Several caches: each one's sequences and mean train loss in every step, for the step records."""

    def __init__(self, plan: MixPlan, device):
        self.plan, self.device, self.k = plan, device, len(plan.plans)

    def begin(self, batch) -> None:
        """A new step's batch: its rows' sources and target counts; the sums start at zero."""
        src = torch.tensor(batch.sources, dtype=torch.int64)
        labels, L = batch.labels, batch.labels.shape[1]
        targets = ((labels[:, 1:] != -100).sum(1) if labels is not batch.input_ids
                   else torch.full((len(src),), L - 1, dtype=torch.int64))
        self.src = src.to(self.device)
        self.sums = torch.zeros(2, self.k, dtype=torch.float64, device=self.device)  # losses, targets
        self.sums[1].index_add_(0, self.src, targets.to(self.device, torch.float64))

    def add(self, rows: slice, total: torch.Tensor, row_losses: torch.Tensor) -> torch.Tensor:
        """Take in one micro-batch's summed loss and its per-row summed losses (rows of the step's batch);
        the summed loss, for the backward pass."""
        self.sums[0].index_add_(0, self.src[rows], row_losses.detach().double())
        return total

    def record(self, step: int, world: int, loss_sum: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The step's summed loss over every rank, and the step record's fields: sequences of each cache
        (every rank's) and each one's mean loss. One all_reduce carries both."""
        flat = torch.cat([self.sums.flatten(), loss_sum.detach().double().reshape(1)])
        if world > 1:
            torch.distributed.all_reduce(flat)
        loss, targets = flat[:-1].view(2, self.k).tolist()
        return flat[-1].to(loss_sum.dtype), {"source_sequences": self.plan.step_sources(step),
                                             "source_loss": [lo / t if t else None for lo, t in zip(loss, targets)]}


def reduce_step(loss_sum: torch.Tensor, world: int, mix: SourceLosses | None, step: int) -> tuple[torch.Tensor, dict]:
    """The step's summed loss over every rank, with several caches each one's step record fields too."""
    if mix is not None:
        return mix.record(step, world, loss_sum)
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
    return loss_sum, {}


def resolve_endpoints(cfg_data, caches: list[Cache]) -> list[tuple[str, str]]:
    """(folder, endpoint) of each cache: data.endpoint's entry when given, else the endpoint its manifest
    records (its packer wrote it), else packerd's default."""
    given = cfg_data.endpoint or [""] * len(caches)
    return [(str(c.dir), e or c.manifest.endpoint or DEFAULT_ENDPOINT) for c, e in zip(caches, given)]
