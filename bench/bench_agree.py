"""The training thread's per-step cost of following a growing cache, at 10^3 and 10^6 chunks.

    python bench/bench_agree.py [--sizes 1000,1000000] [--steps 3000] [--commit-every 10] [--folder DIR]

Per size: a synthetic cache of N chunk entries (no chunk files; bench_scale.py's), committed to by the packer's
ManifestWriter and announced by a real Publisher on an ipc:// endpoint, one chunk every --commit-every steps.
A step is 2 ms of sleep (a GPU step the host waits for, the interpreter lock free) and then the follow call,
timed alone; the garbage collector's view is frozen first, as in trainerd's loop:

  new    PlanSync.agree on rank 0 of one rank: takes the FollowThread's latest state (the socket polled and
         the manifest read in that thread), grows the DataPlan when the state changed
  old    CacheFollower.poll(0) in the training thread, as agree did before: the socket polled and, after a
         notification, the manifest's new commit-log records read there

Printed per size and way: microseconds per step at p50, p99 and max over the steps that did not grow the plan,
and the median of the steps that found a new chunk (new: DataPlan.grow's cost, which grows with the cache, see
bench_scale.py's grow column; old: the manifest read), and how many commits were heard as notifications.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _stats import percentile  # noqa: E402
from bench_scale import entry, synthetic  # noqa: E402

from shared.cache import open_cache  # noqa: E402
from shared.manifest import ManifestWriter  # noqa: E402
from shared.protocol import Publisher  # noqa: E402
from trainerd.follow import CacheFollower, PlanSync  # noqa: E402

STEP_SECONDS = 0.002


def run(n: int, folder: Path, steps: int, every: int, way: str) -> tuple[list[float], list[float], int]:
    """(us of the steps that found no new chunk, us of those that did, notifications heard) for one way."""
    from trainerd.config import DataConfig
    from trainerd.data import DataPlan
    from trainerd.output import JsonlLog
    cache = folder / f"{way}-{n}"
    cache.mkdir()
    m = synthetic(n)
    writer = ManifestWriter(cache)
    writer.commit(m)
    endpoint = f"ipc://{folder}/{way}-{n}.sock"
    pub = Publisher(endpoint, f"bench-{way}")
    log = folder / f"{way}-{n}.jsonl"
    if way == "new":
        plan = DataPlan(open_cache(cache), seed=0, global_batch=64, rank=0, world_size=1)
        sync = PlanSync(plan, DataConfig(reconcile_seconds=2.0), [(str(cache), endpoint)], rank=0, world=1,
                        device="cpu", log=JsonlLog(log), fail=lambda msg, alone=False: sys.exit(msg))
        call, close = (lambda step: sync.agree(step, False, waiting=False)), sync.close
    else:
        follower = CacheFollower(cache, endpoint, reconcile_seconds=2.0)
        call, close = (lambda step: follower.poll(0)), follower.close
    gc.freeze()  # as trainerd's loop does: the cache's million entries out of the collector's full passes
    time.sleep(0.5)  # the subscriber connects (a PUB socket drops what it sends before)
    flat, grew, heard, known = [], [], 0, -1
    for step in range(steps):
        if step % every == every - 1:
            m.chunks.append(entry(len(m.chunks)))
            writer.commit(m)
            pub.chunk(chunk_id=m.chunks[-1].id, sequences=64, tokens=65536, total_sequences=0, total_tokens=0,
                      est_total_sequences=0, committed_at=m.chunks[-1].committed_at)
        time.sleep(STEP_SECONDS)
        t0 = time.perf_counter()
        out = call(step)
        us = (time.perf_counter() - t0) * 1e6
        now = sync.known if way == "new" else out.known_chunks
        (grew if now != known else flat).append(us)
        known = now
        if way == "old":
            heard += sum(e["event"] == "notified" for e in out.events)
    close()
    pub.close()
    writer.close()
    if way == "new":
        heard = sum(json.loads(line)["event"] == "notified" for line in log.read_text().splitlines())
    return flat, grew, heard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,1000000")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--commit-every", type=int, default=10)
    ap.add_argument("--folder", default=None, help="where the synthetic caches go (default: a temporary folder)")
    a = ap.parse_args()
    commits = a.steps // a.commit_every
    print(f"{a.steps} steps of {STEP_SECONDS * 1000:.0f} ms, a chunk committed and announced every {a.commit_every}")
    print("chunks     | way | us per step, no new chunk: p50     p99     max | new chunk: ms p50 | heard")
    with tempfile.TemporaryDirectory(dir=a.folder) as tmp:
        for n in (int(x) for x in a.sizes.split(",")):
            for way in ("new", "old"):
                flat, grew, heard = run(n, Path(tmp), a.steps, a.commit_every, way)
                g = f"{statistics.median(grew) / 1000:.2f}" if grew else "-"
                print(f"{n:>10,} | {way} | {percentile(flat, 50):33.1f} {percentile(flat, 99):7.1f} {max(flat):7.1f} | "
                      f"{g:>17} | {heard} of {commits}", flush=True)


if __name__ == "__main__":
    main()
