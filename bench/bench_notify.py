"""Notification latency with several packers announcing at once (`packerd run --shard I/N`, N packers).

    python bench/bench_notify.py [--packers 4] [--rounds 3] [--max-tokens-per-s 10000] [--work-dir DIR] [--busy K]

Starts N real packer processes on the shards 0/N .. N-1/N of one source (default builtin:pydoc with the
builtin:bpe tokenizer, small chunks of 4 x 64 tokens, so each packer commits a chunk every few tens of ms),
each announcing on its own TCP port, and one real ZeroMQ subscriber per endpoint (shared.protocol.Subscriber,
as trainerd's CacheFollower uses), all polled by one thread of this process. The latency of a chunk is the
time it is received here minus its `committed_at` (the time the packer took for the commit, before the
manifest is written and fsynced): what the trainer logs as `latency_ms`. Packers and subscriber run on this
machine, so both clocks are the same one. Prints p50, p90, p99 and max over every chunk message of every
round, and how many of the committed chunks were heard (a subscriber connects while its packer starts, so
the first chunks may commit before it listens).

The latency is split by the message's `sent_at` (the publisher's clock when it sent it): the packer's share
(committed_at to sent_at: the durable manifest write, then the hand-over to the socket, each of which waits
for a core and for the packer's interpreter lock while its tokenizer threads run) and the rest (sent_at to
received: ZeroMQ's I/O threads, TCP on loopback, this process waking). Beside them, in the same folder and
run, the manifest commit alone: ManifestWriter.commit of one more chunk (a commit-log record appended and
fdatasynced, now and then a snapshot rewrite), timed on an idle machine before the packers start.
`--work-dir /dev/shm` puts the caches on tmpfs, where fsync costs nothing, to show the rest on its own.
`--busy K` runs every round twice, alternating: as it is, and with K more processes spinning on the CPU
(nice 0, like another job's), so that a loaded machine is measured beside an unloaded one in the same run.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _stats import percentile  # noqa: E402
from shared.manifest import ChunkEntry, Manifest, ManifestWriter, load_manifest  # noqa: E402
from shared.protocol import Subscriber  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_round(args, work: Path) -> tuple[list[tuple[float, float]], int]:
    """((commit to sent, sent to received) in ms of each chunk message heard, chunks committed) of N packers
    started together."""
    n = args.packers
    ports = [free_port() for _ in range(n)]
    subs = [Subscriber(f"tcp://127.0.0.1:{p}") for p in ports]  # subscribed first: it connects once they bind
    poller = zmq.Poller()
    for s in subs:
        poller.register(s.sock, zmq.POLLIN)
    procs = [subprocess.Popen([sys.executable, "-m", "packerd", "run", "--cache-dir", str(work / f"cache-{i}"),
                               "--source", args.source, "--tokenizer", args.tokenizer, "--seq-len", "64",
                               "--chunk-sequences", "4", "--workers", "1", "--shard", f"{i}/{n}",
                               "--max-tokens-per-s", str(args.max_tokens_per_s), "--endpoint", f"tcp://127.0.0.1:{ports[i]}"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    latencies = []
    while any(p.poll() is None for p in procs) or poller.poll(200):
        for sock, _ in poller.poll(100):
            sub = next(s for s in subs if s.sock is sock)
            for msg in sub.poll(0):
                now = time.time()
                if msg["type"] == "chunk":
                    sent = msg.get("sent_at", msg["committed_at"])
                    latencies.append(((sent - msg["committed_at"]) * 1000, (now - sent) * 1000))
    for i, p in enumerate(procs):
        err = p.stderr.read()
        if p.wait() != 0:
            sys.exit(f"packer {i}/{n} exited {p.returncode}:\n{err}")
    for s in subs:
        s.close()
    committed = sum(len(load_manifest(work / f"cache-{i}").chunks) for i in range(n))
    return latencies, committed


def manifest_commit_ms(folder: str | None) -> list[float]:
    """Milliseconds of each of 200 manifest commits of one more chunk, as a packer makes them."""
    m = Manifest(seq_len=64, chunk_sequences=4, dtype="uint16", sources=["bench"],
                 tokenizer={"name": "bench", "vocab_hash": "0" * 16, "vocab_size": 512, "eos_id": 0, "pad_id": 0})
    out = []
    with tempfile.TemporaryDirectory(prefix="bench_notify_", dir=folder) as tmp:
        w = ManifestWriter(tmp)
        for i in range(200):
            m.chunks.append(ChunkEntry(id=i, sequences=4, tokens=256, bytes=600, checksum=f"{i:016x}", start=[i, 0],
                                       end=[i + 1, 0], documents=1, committed_at=time.time()))
            t0 = time.perf_counter()
            w.commit(m)
            out.append((time.perf_counter() - t0) * 1000)
        w.close()
    return out


def summary(ms: list[float]) -> str:
    return (f"p50 {percentile(ms, 50):.2f}  p90 {percentile(ms, 90):.2f}  p99 {percentile(ms, 99):.2f}  "
            f"max {max(ms):.2f}  mean {statistics.fmean(ms):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--source", default="builtin:pydoc")
    ap.add_argument("--tokenizer", default="builtin:bpe")
    ap.add_argument("--max-tokens-per-s", type=int, default=10000,
                    help="per packer: spreads the commits over a few seconds, as a streamed source does")
    ap.add_argument("--work-dir", default=None, help="folder for the caches (default: the system's temporary folder)")
    ap.add_argument("--busy", type=int, default=0,
                    help="also run every round with this many processes spinning on the CPU (a loaded machine)")
    args = ap.parse_args()
    # the figures depend on what else runs: say how busy the machine was
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; caches in "
          f"{args.work_dir or tempfile.gettempdir()}")
    print(f"manifest commit of one chunk alone (ms): {summary(manifest_commit_ms(args.work_dir))}")
    cases = [0] if not args.busy else [0, args.busy]
    pairs = {k: [] for k in cases}
    heard, committed, loads = dict.fromkeys(cases, 0), dict.fromkeys(cases, 0), {k: [] for k in cases}
    for r in range(args.rounds):
        for k in cases:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
            try:
                time.sleep(1.0 if k else 0.0)  # the spinners running before the packers start
                with tempfile.TemporaryDirectory(prefix="bench_notify_", dir=args.work_dir) as tmp:
                    got, c = one_round(args, Path(tmp))
                loads[k].append(os.getloadavg()[0])
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
            pairs[k] += got
            heard[k] += len(got)
            committed[k] += c
            print(f"round {r + 1}, {k} spinning: {len(got)} of {c} chunk messages heard, "
                  f"p99 {percentile([a + b for a, b in got], 99):.2f} ms, load average {loads[k][-1]:.1f}")
    for k in cases:
        print(f"{args.packers} packers at once, {k} processes spinning, {args.rounds} rounds: {heard[k]} of "
              f"{committed[k]} chunk messages heard; load average at the rounds' ends "
              f"{min(loads[k]):.1f} to {max(loads[k]):.1f}")
        print(f"  packer: commit -> sent (ms):   {summary([a for a, _ in pairs[k]])}")
        print(f"  sent -> received (ms):         {summary([b for _, b in pairs[k]])}")
        print(f"latency commit -> received (ms): {summary([a + b for a, b in pairs[k]])}")


if __name__ == "__main__":
    main()
