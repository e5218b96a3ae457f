"""Following a growing cache on rank 0: packerd's notifications plus manifest reconciliation.

The manifest is the truth: packerd makes it durable before it announces a chunk, so a notification only
says "read the manifest now". The follower re-reads it at start, on a notification of a chunk it does not
know yet (or a finished message), when the subscriber saw a gap in `seq` (a lost message or a new packer
run), and every `reconcile_seconds` in any case: a lost message delays a chunk by at most that long and
never loses it. Messages that are not valid protocol messages are ignored by shared.protocol.Subscriber.

A manifest that is missing for a while keeps the last one read (`packerd run --force-rebuild` deletes it
before the chunks); one that comes back describing another cache (other seq_len, chunk_sequences, dtype or
tokenizer, fewer chunks, or a known chunk with another checksum) raises shared.cache.CacheReplaced.
With `curve_dir` (a folder holding server.key, client.key and client.key_secret from `packerd keys`) the
subscriber speaks CURVE to a `packerd run --curve-dir` endpoint; without the keys it hears nothing there
and follows by reconciliation alone.

On rank 0 of a run, one FollowThread owns the followers of every cache: it polls their sockets and reads the
manifests in a background thread and keeps the latest state under a lock, so the training thread's per-step
agreement (PlanSync.agree) only copies that state and never waits for a file, whatever the cache's size.

poll() returns a FollowState; its events are dicts the trainer logs as they are:
    {"event": "notified", "chunk_id", "latency_ms"}   latency from the packer's commit time (manifest
                                                       entry `committed_at`) to this FollowState, in ms
    {"event": "reconciled", "reason": "start" | "gap" | "timer", "known_chunks", "finished"}
                                                       a manifest re-read (timer ones only when they found
                                                       something the notifications had not announced)
    {"event": "finished", "known_chunks"}              the packer finished the cache
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from shared.cache import Cache, CacheError, ManifestGone
from shared.manifest import Manifest, ManifestError, read_manifest
from shared.protocol import Subscriber

CURVE_FILES = ("server.key", "client.key", "client.key_secret")


def curve_problem(curve_dir) -> str | None:
    """What is wrong with a subscriber's CURVE key folder (None when nothing is)."""
    missing = [n for n in CURVE_FILES if not (Path(curve_dir) / n).is_file()]
    if missing:
        return (f"the CURVE key folder {curve_dir} has no {', '.join(missing)} (create keys with `packerd keys DIR` "
                f"and copy {', '.join(CURVE_FILES)} from it)")
    return None


@dataclass
class FollowState:
    known_chunks: int           # chunks the manifest lists (ids 0..known_chunks-1)
    finished: bool              # the packer finished the cache: no chunk will follow
    est_total_sequences: int    # the manifest's full-dataset estimate, in sequences
    events: list[dict] = field(default_factory=list)


class CacheFollower:
    """Rank 0's view of the cache: a ZeroMQ subscriber that wakes it, the manifest that tells it."""

    def __init__(self, cache_dir: str | os.PathLike, endpoint: str, reconcile_seconds: float = 2.0,
                 curve_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir)
        self.endpoint = endpoint
        self.reconcile_seconds = float(reconcile_seconds)
        problem = curve_problem(curve_dir) if curve_dir else None
        if problem:
            raise CacheError(problem)
        # subscribe before the first read: a chunk committed in between is announced to us, or is in it
        try:
            self.sub = Subscriber(endpoint, curve_dir=curve_dir or None)
        except (OSError, ValueError, zmq.ZMQError) as e:  # a malformed key file, or a bad endpoint
            raise CacheError(f"cannot subscribe to {endpoint}" + (f" with the keys in {curve_dir}" if curve_dir else "")
                             + f": {e}") from None
        self.cache: Cache | None = None  # set once a manifest exists; refreshed in place from then on
        self._last_read = 0.0
        self._pending: list[dict] = []
        try:
            self._read("start", self._pending)
        except CacheError:
            self.sub.close()
            raise

    # -- what the manifest says --------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest | None:
        return self.cache.manifest if self.cache else None

    @property
    def known_chunks(self) -> int:
        return len(self.manifest.chunks) if self.manifest else 0

    @property
    def finished(self) -> bool:
        return bool(self.manifest and self.manifest.finished)

    @property
    def est_total_sequences(self) -> int:
        return self.manifest.estimated_total_sequences() if self.manifest else 0

    def _read(self, reason: str, events: list[dict]) -> None:
        before = (self.known_chunks, self.finished)
        # a refresh reads only the commit-log records appended since the last read, so its cost does not grow
        # with the cache; it raises CacheReplaced when the folder holds another cache now
        try:
            if self.cache is None:
                m, log = read_manifest(self.cache_dir)
                self.cache = Cache(self.cache_dir, m, log) if m is not None else None  # None: not written yet
            else:
                self.cache.refresh()
        except ManifestGone:
            pass  # deleted by a rebuild: the last one read stays until a manifest is there again
        except ManifestError as e:
            raise CacheError(str(e)) from None
        self._last_read = time.monotonic()
        after = (self.known_chunks, self.finished)
        if reason in ("start", "gap") or (reason == "timer" and after != before):
            events.append({"event": "reconciled", "reason": reason, "known_chunks": after[0], "finished": after[1]})
        if after[1] and not before[1]:
            events.append({"event": "finished", "known_chunks": after[0]})

    # -- polling -----------------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0) -> FollowState:
        """Messages waiting now (up to timeout_ms for the first), manifest re-read as needed, the state."""
        events, self._pending = self._pending, []
        # messages naming another cache (the held-out one: "cache": "holdout") are not this cache's chunks
        msgs = [m for m in self.sub.poll(timeout_ms) if m.get("cache") is None]
        reason = None
        chunk_msgs = []
        for msg in msgs:
            if msg["type"] == "chunk":
                chunk_msgs.append(msg)
                if msg["chunk_id"] >= self.known_chunks:
                    reason = "notified"
            elif msg["type"] == "finished" and not self.finished:
                reason = "notified"
        if self.sub.gap:
            reason = "gap"
            self.sub.clear_gap()
        elif reason is None and time.monotonic() - self._last_read >= self.reconcile_seconds:
            reason = "timer"
        if reason is not None:
            self._read(reason, events)
        now = time.time()
        for msg in chunk_msgs:
            events.append({"event": "notified", "chunk_id": msg["chunk_id"],
                           "latency_ms": round((now - msg["committed_at"]) * 1000.0, 3)})
        return FollowState(self.known_chunks, self.finished, self.est_total_sequences, events)

    def close(self) -> None:
        self.sub.close()

    def __enter__(self) -> "CacheFollower":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FollowThread:
    """Rank 0's CacheFollowers of every cache, polled in a background thread that keeps their latest state.

    The followers are created, polled and closed in the thread alone (ZeroMQ sockets are not thread-safe). A
    message wakes the thread at once; without one it polls again every POLL_SECONDS, which bounds how late a
    reconcile timer fires and how long close() waits. An error there (CacheReplaced, an unreadable manifest,
    anything unexpected) ends the thread and is raised by the next take(), as a CacheError."""

    POLL_SECONDS = 0.1

    def __init__(self, sources: list[tuple[str, str]], reconcile_seconds: float, curve_dir=None):
        self._sources, self._reconcile, self._curve_dir = list(sources), reconcile_seconds, curve_dir
        self._cond = threading.Condition()
        self._states: list[FollowState | None] = [None] * len(self._sources)  # the latest; events not taken yet
        self._error: CacheError | None = None
        self._version = self._taken = 0     # bumped when a state changes or has events; the version last taken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow", daemon=True)
        self._thread.start()
        with self._cond:  # the start reads: the first take() knows what the manifests list now
            self._cond.wait_for(lambda: self._error is not None or None not in self._states)

    def take(self, wait: float = 0.0) -> list[FollowState]:
        """Each cache's latest state with the events since the last take; with wait, first up to that many
        seconds for something new. Raises the thread's error."""
        with self._cond:
            if wait > 0:
                self._cond.wait_for(lambda: self._version != self._taken or self._error is not None, timeout=wait)
            if self._error is not None:
                raise self._error
            self._taken = self._version
            out, self._states = self._states, [FollowState(s.known_chunks, s.finished, s.est_total_sequences)
                                               for s in self._states]
        return out

    def _run(self) -> None:
        followers: list[CacheFollower] = []
        try:
            for cache_dir, endpoint in self._sources:
                followers.append(CacheFollower(cache_dir, endpoint, self._reconcile, curve_dir=self._curve_dir))
            poller = zmq.Poller()
            for f in followers:
                poller.register(f.sub.sock, zmq.POLLIN)
            while True:
                self._publish([f.poll(0) for f in followers])
                if self._stop.is_set():
                    break
                poller.poll(int(self.POLL_SECONDS * 1000))
        except Exception as e:  # the training thread says it, as the one-line failure it makes of a CacheError
            err = e if isinstance(e, CacheError) else CacheError(f"the follower thread stopped: {type(e).__name__}: {e}")
            with self._cond:
                self._error = err
                self._cond.notify_all()
        finally:
            for f in followers:
                f.close()

    def _publish(self, states: list[FollowState]) -> None:
        with self._cond:
            changed = False
            for i, new in enumerate(states):
                old = self._states[i]
                if old is not None:
                    new.events[:0] = old.events
                    changed |= (new.known_chunks, new.finished, new.est_total_sequences) != (
                        old.known_chunks, old.finished, old.est_total_sequences)
                changed |= bool(new.events) or old is None
                self._states[i] = new
            if changed:
                self._version += 1
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread; it closes its sockets. A thread stuck in a file read is left (a daemon) after 5 s."""
        self._stop.set()
        self._thread.join(timeout=5)


class PlanSync:
    """Every rank's data plan grown to rank 0's view of the caches at the same step boundary.

    Rank 0 follows each cache (`sources`: its folder and endpoint, in data.cache_dir order); at each boundary
    one small collective (a MAX all-reduce) carries whether some rank was asked to stop, whether following
    failed, whether some rank met corrupt chunks, and per cache its chunk count, whether it is finished and
    its estimate. Rank 0 logs what changed (with "source": i when there are several caches)."""

    def __init__(self, plan, cfg_data, sources: list[tuple[str, str]], *, rank: int, world: int, device, log, fail):
        self.plan, self.rank, self.world, self.device = plan, rank, world, device
        self.log, self.fail = log, fail             # log: rank 0's JsonlLog; fail(msg, alone=False) raises
        self.main = rank == 0
        k = len(sources)
        self.views = [(-1, False, -1)] * k           # (known, finished, estimate) the plan was last grown with
        self.notify_ms = None                        # the slowest notification since the last growth
        self.corrupt_logged: set[tuple] = set()      # (source, chunk id) whose corrupt_chunk event is in the log
        self.error = None                            # rank 0's following error: every rank stops at the next boundary
        self.follow = (FollowThread(sources, cfg_data.reconcile_seconds, curve_dir=cfg_data.curve_dir or None)
                       if self.main else None)

    @property
    def known(self) -> int:
        """Chunks the plan knows, all caches together."""
        return sum(max(v[0], 0) for v in self.views)

    def agree(self, step: int, stop: bool, waiting: bool) -> bool:
        """Grow the plan to the agreed view before optimizer step `step`; returns whether some rank stops."""
        import torch
        # corrupt chunks this rank met since the last step (found by its prefetch thread)
        events = [dict(ev, rank=self.rank) for ev in self.plan.take_events()]
        # stop, rank 0 failed, some rank has data events; then per cache: chunks, finished, estimate
        view = [int(stop), 0, int(bool(events))] + [0, 0, 0] * len(self.views)
        if self.main and self.error is None:
            try:
                # the follow thread's latest state: no file is read here (waiting: up to 0.2 s for news)
                for i, fs in enumerate(self.follow.take(0.2 if waiting else 0.0)):
                    view[3 + 3 * i:6 + 3 * i] = [fs.known_chunks, int(fs.finished), fs.est_total_sequences]
                    self._log_follow_events(step, fs.events, i)
            except CacheError as e:  # e.g. the cache was rebuilt under the run: every rank stops below
                self.error = str(e)
        view[1] = int(self.error is not None)
        if self.world > 1:
            t = torch.tensor(view, dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            view = t.tolist()  # note: a host sync point, once per optimizer step
        if view[1]:
            self.fail(f"cannot follow the cache: {self.error}")
        self._grow(step, [(view[3 + 3 * i], bool(view[4 + 3 * i]), view[5 + 3 * i]) for i in range(len(self.views))])
        if view[2]:
            self._log_corrupt_chunks(step, events)
        return bool(view[0])

    def _source(self, i: int) -> dict:
        return {"source": i} if len(self.views) > 1 else {}

    def _log_follow_events(self, step: int, events: list[dict], i: int) -> None:
        for ev in events:
            if ev.get("latency_ms") is not None:
                self.notify_ms = max(self.notify_ms or 0.0, ev["latency_ms"])
            kind = ev.pop("event")
            self.log.event("cache_finished" if kind == "finished" else kind, step=step, **ev, **self._source(i))

    def _grow(self, step: int, views: list[tuple[int, bool, int]]) -> None:
        if views == self.views:
            return
        before = self.plan.total_steps
        try:
            if len(views) == 1:
                known, finished, est = views[0]
                self.plan.grow(known, finished, step, est_total_sequences=est)
            else:
                self.plan.grow_sources(step, views)
        except (ValueError, CacheError) as e:
            self.fail(f"cannot follow the cache: {e}", alone=True)
        for i, ((known, finished, _), (was, was_finished, _)) in enumerate(zip(views, self.views)):
            if self.main and (known, finished) != (was, was_finished):
                self.log.event("plan_expanded" if was >= 0 else "plan", step=step, chunks=known,
                               previous_chunks=max(was, 0), finished=finished, total_steps=self.plan.total_steps,
                               previous_total_steps=before, estimated_total_steps=self.plan.estimated_total_steps,
                               latency_ms=self._commit_latency_ms(i, known) if was >= 0 else None,
                               notify_latency_ms=self.notify_ms, **self._source(i))
        self.notify_ms = None
        self.views = list(views)

    def _commit_latency_ms(self, i: int, known: int) -> float | None:
        """From the commit of the newest known chunk of cache i (manifest time) to now, when the plan has grown."""
        try:
            entry = getattr(self.plan, "caches", [self.plan.cache])[i].chunks[known - 1]
        except (IndexError, AttributeError, TypeError):
            return None
        return round((time.time() - entry.committed_at) * 1000, 2)

    def _log_corrupt_chunks(self, step: int, events: list[dict]) -> None:
        """Corrupt chunks are skipped loudly, quarantined, never trained on; rank 0 logs every rank's, once."""
        import torch
        if self.world > 1:
            every: list = [None] * self.world
            torch.distributed.all_gather_object(every, events)
            # the rank that quarantined a chunk first: another one may only have found its file gone
            events = sorted((ev for evs in every for ev in evs), key=lambda ev: ev.get("quarantined") is None)
        for ev in events:
            key = (ev.get("source", 0), ev["chunk_id"])
            if self.main and key not in self.corrupt_logged:
                self.corrupt_logged.add(key)
                self.log.event(ev.pop("event"), step=step, **ev)

    def close(self) -> None:
        if self.follow is not None:
            self.follow.close()
