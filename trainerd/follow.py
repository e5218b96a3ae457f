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
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from shared.cache import CacheError, check_same_cache
from shared.manifest import Manifest, ManifestError, load_manifest
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
        self.manifest: Manifest | None = None
        self._last_read = 0.0
        self._pending: list[dict] = []
        try:
            self._read("start", self._pending)
        except CacheError:
            self.sub.close()
            raise

    # -- what the manifest says --------------------------------------------------------------------
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
        try:
            m = load_manifest(self.cache_dir)
        except ManifestError as e:
            raise CacheError(str(e)) from None
        self._last_read = time.monotonic()
        if m is not None:  # None: not written yet, or deleted by a rebuild (the old one stays until then)
            if self.manifest is not None:
                check_same_cache(self.cache_dir, self.manifest, m)
            self.manifest = m
        after = (self.known_chunks, self.finished)
        if reason in ("start", "gap") or (reason == "timer" and after != before):
            events.append({"event": "reconciled", "reason": reason, "known_chunks": after[0], "finished": after[1]})
        if after[1] and not before[1]:
            events.append({"event": "finished", "known_chunks": after[0]})

    # -- polling -----------------------------------------------------------------------------------
    def poll(self, timeout_ms: int = 0) -> FollowState:
        """Messages waiting now (up to timeout_ms for the first), manifest re-read as needed, the state."""
        events, self._pending = self._pending, []
        msgs = self.sub.poll(timeout_ms)
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
