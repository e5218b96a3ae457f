"""What one more chunk costs in a cache of 10^3 to 10^6 chunks: the commit, a follower's refresh, the
trainer's plan growth, and the checkpoint's data state. Old full-rewrite figures beside, in the same run.

    python bench/bench_scale.py [--sizes 1000,10000,100000,1000000] [--commits 30] [--folder /tmp]

The caches are synthetic: manifests of N entries with no chunk files (nothing here reads a chunk).
Per size it prints medians over --commits commits (the old figures over fewer repetitions at 10^5 and up,
where each takes seconds):

  commit ms       new: ManifestWriter.commit of one chunk (one log record appended, fdatasync);
                  old: Manifest.save, the whole manifest.json rewritten (temporary, fsync, rename), as every
                  commit did before the commit log
  snapshot ms     one snapshot rewrite, and that cost spread over the commits between two rewrites
  refresh ms      new: Cache.refresh() after one commit (the log records since its last read);
                  old: load_manifest of the whole manifest.json plus the replaced-cache check, as
                  Cache.refresh did before
  grow ms         trainerd.data.DataPlan.grow by one chunk at a step in the middle of epoch 0 (unchanged
                  code: its cost grows with the cache, see the README)
  state bytes     len of the DataPlan.state_dict() as the checkpoint stores it (torch.save)
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


def grow_figures(cache) -> tuple:
    import torch

    from trainerd.data import DataPlan
    plan = DataPlan(cache, seed=0, global_batch=64, rank=0, world_size=1)
    buf = io.BytesIO()
    torch.save(plan.state_dict(), buf)
    return plan, len(buf.getbuffer())


def one_size(n: int, commits: int, folder: Path) -> dict:
    new, old = folder / f"new-{n}", folder / f"old-{n}"
    new.mkdir()
    old.mkdir()
    m = synthetic(n)
    w = ManifestWriter(new)
    w.commit(m)                                      # the log and its first snapshot: O(n), once
    snap_ms = ms(lambda: w._snapshot(m))
    snap_bytes = (new / "manifest.json").stat().st_size
    cache = open_cache(new)
    plan, state_bytes = grow_figures(cache)
    step = plan.total_steps // 2
    commit_ms, refresh_ms, grow_ms = [], [], []
    for _ in range(commits):
        m.chunks.append(entry(len(m.chunks)))
        commit_ms.append(ms(lambda: w.commit(m)))
        refresh_ms.append(ms(cache.refresh))
        assert len(cache.chunks) == len(m.chunks)
        grow_ms.append(ms(lambda: plan.grow(len(cache.chunks), False, step)))
    w.close()
    record = len((new / "manifest.log").read_bytes()) / (commits + 1)  # about: the log holds the commits above
    per = max(SNAPSHOT_MIN_BYTES, snap_bytes) / record  # commits between two snapshot rewrites
    reps = commits if n <= 10_000 else (5 if n <= 100_000 else 2)
    old_commit, old_refresh = [], []
    m.save(old)
    prev = load_manifest(old)
    for _ in range(reps):
        m.chunks.append(entry(len(m.chunks)))
        old_commit.append(ms(lambda: m.save(old)))
        old_refresh.append(ms(lambda: replaced_reason(prev, load_manifest(old))))
    med = statistics.median
    return {"n": n, "commit": med(commit_ms), "commit_max": max(commit_ms), "old_commit": med(old_commit),
            "snapshot": snap_ms, "snapshot_per_commit": snap_ms / per, "refresh": med(refresh_ms),
            "old_refresh": med(old_refresh), "grow": med(grow_ms), "state_bytes": state_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--commits", type=int, default=30)
    ap.add_argument("--folder", default=None, help="where the synthetic caches go (default: a temporary folder)")
    a = ap.parse_args()
    print("chunks     | commit ms: new (max)   old | snapshot ms (per commit) | refresh ms: new    old | "
          "grow ms | state bytes")
    with tempfile.TemporaryDirectory(dir=a.folder) as tmp:
        for n in (int(x) for x in a.sizes.split(",")):
            r = one_size(n, a.commits, Path(tmp))
            print(f"{r['n']:>10,} | {r['commit']:8.3f} ({r['commit_max']:6.3f}) {r['old_commit']:9.1f} | "
                  f"{r['snapshot']:9.1f} ({r['snapshot_per_commit']:7.4f})    | {r['refresh']:8.3f} {r['old_refresh']:9.1f} | "
                  f"{r['grow']:7.2f} | {r['state_bytes']:,}", flush=True)


if __name__ == "__main__":
    main()
