"""What one more chunk costs in a cache of 10^3 to 10^6 chunks: the commit, a follower's refresh, the
trainer's plan growth, and the checkpoint's data state. Old full-rewrite figures beside, in the same run.

    python bench/bench_scale.py [--sizes 1000,10000,100000,1000000] [--commits 30] [--folder /tmp]

The caches are synthetic: manifests of N entries with no chunk files (nothing here reads a chunk).
All sizes are built first, then take turns commit by commit (so the drift of the disk's fsync time falls on
all alike); per size it prints medians over --commits commits, then the old figures (fewer repetitions at 10^5
and up, where each takes seconds):

  commit ms       new: ManifestWriter.commit of one chunk (one log record appended, fdatasync), wall and
                  the CPU time of this process (fsync waits excluded);
                  old: Manifest.save, the whole manifest.json rewritten (temporary, fsync, rename), as every
                  commit did before the commit log
  snapshot ms     one snapshot rewrite, and that cost spread over the commits between two rewrites
  refresh ms      new: Cache.refresh() after one commit (the log records since its last read);
                  old: load_manifest of the whole manifest.json plus the replaced-cache check, as
                  Cache.refresh did before
  grow ms         trainerd.data.DataPlan.grow by one chunk at a step in the middle of epoch 0 (the plan was
                  built over the N chunks, so the new ones go into epoch 0's next block), and the first
                  ready() after it
  state bytes     len of the DataPlan.state_dict() as the checkpoint stores it (torch.save), after the
                  commits (the plan grown --commits times)
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.cache import open_cache, replaced_reason
from shared.manifest import (
    SNAPSHOT_MIN_BYTES,
    ChunkEntry,
    Manifest,
    ManifestWriter,
    load_manifest,
)

SEQS = 64  # sequences a chunk


def entry(i: int) -> ChunkEntry:
    return ChunkEntry(id=i, sequences=SEQS, tokens=SEQS * 1024, bytes=80_000 + i % 997, checksum=f"{i * 2654435761 % (1 << 64):016x}",
                      start=[i * 50, 0], end=[i * 50 + 50, 0], documents=50, committed_at=1.7e9 + i)


def synthetic(n: int) -> Manifest:
    m = Manifest(seq_len=1024, chunk_sequences=SEQS, dtype="uint16", sources=["synthetic"],
                 tokenizer={"name": "gpt2", "vocab_hash": "0" * 16, "vocab_size": 50257, "eos_id": 50256, "pad_id": 50256})
    m.chunks = [entry(i) for i in range(n)]
    m.documents = 50 * n
    m.estimate = {"tokens": 4 * n * SEQS * 1024, "sequences": 4 * n * SEQS, "method": "synthetic"}
    return m


def ms(f) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


def state_bytes(plan) -> int:
    import torch
    buf = io.BytesIO()
    torch.save(plan.state_dict(), buf)
    return len(buf.getbuffer())


class Size:
    """One synthetic cache of n chunks: its writer, a follower's Cache on it, and a DataPlan over that."""

    def __init__(self, n: int, folder: Path):
        self.n, self.new, self.old = n, folder / f"new-{n}", folder / f"old-{n}"
        self.new.mkdir()
        self.old.mkdir()
        self.m = synthetic(n)
        self.w = ManifestWriter(self.new)
        self.w.commit(self.m)                        # the log and its first snapshot: O(n), once
        self.snap_ms = ms(lambda: self.w._snapshot(self.m))
        self.snap_bytes = (self.new / "manifest.json").stat().st_size
        self.cache = open_cache(self.new)
        from trainerd.data import DataPlan
        self.plan = DataPlan(self.cache, seed=0, global_batch=64, rank=0, world_size=1)
        self.step = self.plan.total_steps // 2
        self.commit_ms, self.commit_cpu, self.refresh_ms, self.grow_ms = [], [], [], []

    def one_commit(self) -> None:
        self.m.chunks.append(entry(len(self.m.chunks)))
        cpu = time.process_time()
        self.commit_ms.append(ms(lambda: self.w.commit(self.m)))
        self.commit_cpu.append((time.process_time() - cpu) * 1000)
        self.refresh_ms.append(ms(self.cache.refresh))
        assert len(self.cache.chunks) == len(self.m.chunks)
        self.grow_ms.append(ms(lambda: (self.plan.grow(len(self.cache.chunks), False, self.step),
                                        self.plan.ready(self.step))))

    def old_figures(self, reps: int) -> tuple[float, float]:
        """The whole manifest.json rewritten per commit, and read whole and compared per refresh."""
        self.m.save(self.old)
        prev = load_manifest(self.old)
        commit, refresh = [], []
        for _ in range(reps):
            self.m.chunks.append(entry(len(self.m.chunks)))
            commit.append(ms(lambda: self.m.save(self.old)))
            refresh.append(ms(lambda: replaced_reason(prev, load_manifest(self.old))))
        return statistics.median(commit), statistics.median(refresh)

    def release(self) -> None:
        self.w.close()
        self.m = self.cache = self.plan = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--commits", type=int, default=30)
    ap.add_argument("--folder", default=None, help="where the synthetic caches go (default: a temporary folder)")
    a = ap.parse_args()
    med = statistics.median
    with tempfile.TemporaryDirectory(dir=a.folder) as tmp:
        sizes = [Size(int(x), Path(tmp)) for x in a.sizes.split(",")]
        # the sizes take turns commit by commit: the disk's fsync time drifts, and so it drifts for all alike
        for _ in range(a.commits):
            for z in sizes:
                z.one_commit()
        print("chunks     | commit ms: new (max) CPU   old | snapshot ms (per commit) | refresh ms: new    old | "
              "grow ms | state bytes")
        for z in sizes:
            record = (z.new / "manifest.log").stat().st_size / (a.commits + 1)
            per = max(SNAPSHOT_MIN_BYTES, z.snap_bytes) / record  # commits between two snapshot rewrites
            old_commit, old_refresh = z.old_figures(a.commits if z.n <= 10_000 else (5 if z.n <= 100_000 else 2))
            print(f"{z.n:>10,} | {med(z.commit_ms):8.3f} ({max(z.commit_ms):6.3f}) {med(z.commit_cpu):5.2f} "
                  f"{old_commit:9.1f} | {z.snap_ms:9.1f} ({z.snap_ms / per:7.4f})    | {med(z.refresh_ms):8.3f} "
                  f"{old_refresh:9.1f} | {med(z.grow_ms):7.3f} | {state_bytes(z.plan):,}", flush=True)
            z.release()


if __name__ == "__main__":
    main()
