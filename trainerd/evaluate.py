"""Held-out loss: the first K sequences of a validation cache, in cache order.

The validation cache is `eval.cache_dir` (`--val-cache`), or CACHE/holdout (`packerd run --holdout`) when
it exists. Its manifest is read again at every evaluation: while it holds fewer than K sequences, the
evaluation takes what there is and says how many. Every rank takes rank 0's count (one collective), then
its share of the sequences (i % world == rank), in micro-batches of train.micro_batch_size; every rank runs
the same number of forward passes, as a sharded model gathers its weights in each. The loss is computed as
in training: positions restart at each document start, the target of position t is token t + 1, padding is
ignored; no gradients, the training precision (the model has no dropout, so train mode changes nothing).
The result is the mean over every rank's targets.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from shared.cache import Cache, CacheError, CorruptChunk, open_cache, unlike
from shared.manifest import HOLDOUT_DIR, Manifest, ManifestError, load_manifest

from .model import summed_loss
from .rundir import TrainError

def validation_dir(cache_dir: str, val_cache: str) -> Path:
    """--val-cache, else the held-out cache of the (first) training cache."""
    return Path(val_cache) if val_cache else Path(cache_dir) / HOLDOUT_DIR


def check_validation_cache(cfg, train: Manifest) -> None:
    """A validation cache that cannot serve this run is one error at start: the training cache itself, one of
    another seq_len or tokenizer, or (without data.wait) a --val-cache with no manifest."""
    vdir = validation_dir(cfg.data.cache_dir[0], cfg.eval.cache_dir)
    if any(vdir.resolve() == Path(d).resolve() for d in cfg.data.cache_dir):
        raise TrainError(f"the validation cache {vdir} is the training cache itself: give --val-cache another "
                         f"packerd cache (or pack with --holdout)")
    try:
        m = load_manifest(vdir)
    except ManifestError as e:
        raise TrainError(f"validation cache: {e}") from None
    if m is None:
        if cfg.eval.cache_dir and not cfg.data.wait:
            what = "does not exist" if not vdir.is_dir() else "has no manifest.json"
            raise TrainError(f"validation cache {vdir} {what} (without --no-wait the trainer evaluates once it appears)")
        return
    if problem := incompatible(m, train, vdir):
        raise TrainError(problem)


def incompatible(val: Manifest, train: Manifest, vdir: Path) -> str | None:
    return unlike(val, train, f"the validation cache {vdir}", "the training cache")


class Evaluator:
    """One rank's side of the held-out evaluation. Its rows are read once per count of sequences and kept."""

    def __init__(self, cfg, train: Cache, *, rank: int, world: int, device, mixed: str, attention: str, fail):
        self.dir = validation_dir(cfg.data.cache_dir[0], cfg.eval.cache_dir)  # several caches: the first's holdout
        self.k, self.mb = cfg.eval.sequences, cfg.train.micro_batch_size
        self.train, self.rank, self.world, self.device, self.fail = train, rank, world, device, fail
        self.mixed, self.attention = mixed, attention
        self.cache: Cache | None = None
        self.corrupt: list[int] = []   # validation chunks found corrupt in the last read: their rows count nothing
        self._rows: tuple[int, list, int] | None = None   # (count of sequences, micro-batches, their targets)

    def evaluate(self, model) -> dict:
        """{"val_loss", "val_sequences", "val_tokens"}: the loss over rank 0's count of the first K sequences
        (None when there is none yet), the count, and the targets the loss averages over; with
        "val_corrupt_chunks" when some of them could not be read."""
        import torch
        n, problem = (self._available() if self.rank == 0 else (0, None))
        n, failed = self._agree(n, problem is not None)
        if failed:  # rank 0's error, said by rank 0, after every rank knows (none waits in a collective)
            self.fail(f"validation cache: {problem}")
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        targets = 0
        if n:
            self._wait_for(n)
            batches, targets = self._batches(n)
            with torch.no_grad():
                for ids, pos, labels in batches:
                    loss += summed_loss(model, ids, pos, labels, attention=self.attention, mixed=self.mixed)
        sums = torch.stack([loss, torch.tensor(float(targets), dtype=torch.float64, device=self.device)])
        if self.world > 1:
            torch.distributed.all_reduce(sums)
        loss, targets = sums.tolist()
        out = {"val_loss": loss / targets if targets else None, "val_sequences": n, "val_tokens": int(targets)}
        return {**out, "val_corrupt_chunks": self.corrupt} if self.corrupt else out

    # -- which sequences ----------------------------------------------------------------------------------
    def _open(self) -> Cache | None:
        """The validation cache as its manifest is now (None while it has none); CacheError when it names
        another cache, or one this run cannot evaluate on."""
        try:
            if self.cache is None:
                self.cache = open_cache(self.dir)
            else:
                self.cache.refresh()
        except CacheError:
            if self.cache is not None:
                raise
            return None
        if problem := incompatible(self.cache.manifest, self.train.manifest, self.dir):
            raise CacheError(problem)
        return self.cache

    def _available(self) -> tuple[int, str | None]:
        try:
            cache = self._open()
        except CacheError as e:
            return 0, str(e)
        return (min(self.k, cache.manifest.total_sequences) if cache is not None else 0), None

    def _agree(self, n: int, failed: bool) -> tuple[int, bool]:
        """Rank 0's count, and whether rank 0 failed, on every rank."""
        if self.world == 1:
            return n, failed
        import torch
        t = torch.tensor([n, int(failed)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t[0]), bool(t[1])

    def _wait_for(self, n: int) -> None:
        """This rank's manifest holds rank 0's n sequences: it was read later, and manifests only grow."""
        deadline = time.monotonic() + 30
        try:
            while (self._open() is None or self.cache.manifest.total_sequences < n) and time.monotonic() < deadline:
                time.sleep(0.05)
        except CacheError as e:
            self.fail(f"validation cache: {e}", alone=True)
        if self.cache is None or self.cache.manifest.total_sequences < n:
            self.fail(f"validation cache {self.dir}: this rank's manifest lacks the {n} sequences rank 0 saw",
                      alone=True)

    def _batches(self, n: int) -> tuple[list, int]:
        """(this rank's micro-batches of the first n sequences, their targets). Every rank gets the same
        number of micro-batches: a rank without a row in the last one gets one padding row (no target).
        Kept for the next evaluation of the same n, unless a chunk was corrupt (`packerd run --mode inverse`
        may regenerate it by then)."""
        if self._rows is not None and self._rows[0] == n:
            return self._rows[1], self._rows[2]
        mine = np.arange(self.rank, n, self.world)
        steps = math.ceil(math.ceil(n / self.world) / self.mb)
        tokens, positions, labels = self._read(mine)
        batches = []
        for s in range(steps):
            rows = slice(s * self.mb, (s + 1) * self.mb)
            part = [a[rows] for a in (tokens, positions, labels)]
            if not len(part[0]):
                part = [np.zeros((1, tokens.shape[1]), np.int64)] * 2 + [np.full((1, tokens.shape[1]), -100)]
            batches.append(tuple(self._tensor(a) for a in part))
        targets = int((labels[:, 1:] != -100).sum())
        self._rows = None if self.corrupt else (n, batches, targets)
        return batches, targets

    def _tensor(self, a: np.ndarray):
        import torch
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)

    def _read(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens, positions and labels [len(seqs), seq_len] of the cache's sequences `seqs` (cache order)."""
        from .data import _positions
        L, pad = self.train.seq_len, self.train.pad_id
        self.corrupt = []
        tokens = np.full((len(seqs), L), pad, dtype=np.int64)
        lengths = np.zeros(len(seqs), dtype=np.int64)
        rows_of, starts_of = [], []
        first = np.cumsum([0] + [c.sequences for c in self.cache.chunks])
        for cid in np.unique(np.searchsorted(first, seqs, side="right") - 1):
            take = np.nonzero((seqs >= first[cid]) & (seqs < first[cid + 1]))[0]
            try:
                chunk = self.cache.read_chunk(int(cid))
            except CorruptChunk:
                self.corrupt.append(int(cid))
                continue  # its rows stay padding: no target
            except CacheError as e:  # the validation cache was rebuilt or removed under the run
                self.fail(f"validation cache: {e}", alone=True)
            for row in take:
                i = int(seqs[row] - first[cid])
                seq = chunk.sequence(i)
                tokens[row, :len(seq)], lengths[row] = seq, len(seq)
                starts = chunk.doc_starts_of(i).astype(np.int64)
                rows_of.append(np.full(len(starts), row, dtype=np.int64))
                starts_of.append(starts)
        positions = np.empty_like(tokens)
        _positions(positions, np.concatenate([np.zeros(0, np.int64)] + rows_of),
                   np.concatenate([np.zeros(0, np.int64)] + starts_of))
        labels = np.where(np.arange(L) < lengths[:, None], tokens, -100)
        return tokens, positions, labels
