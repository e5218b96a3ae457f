"""trainerd's data side: loader tokens/s per core against LZ4 alone, and commit-to-trainer notification latency.

    python bench/bench_loader.py [--copies 32] [--seq-len 1024] [--chunk-sequences 1024] [--global-batch 32] [--epochs 10]
                                 [--world-size 1] [--rounds 5] [--skip-latency] [--breakdown]
                                 [--mix-only | --skip-mix] [--mix-rounds 5] [--mix-seconds 2] [--mix-steps 0]
                                 [--mix-slice 64]

Prints one table, all on one thread (torch.set_num_threads(1); numpy is single-threaded here), so that
"tokens/s" is per core:
  1. raw LZ4 block decompression of the cache's chunk payloads (already in memory): the baseline,
  2. cache.read_chunk: file read + xxh64 check + LZ4 + index arrays,
  3. the loader: DataPlan.get_batch over every step of --epochs epochs for rank 0 of --world-size (tokens,
     positions with document restarts, labels as int32 tensors); each chunk is decompressed once per epoch
     by design (the whole cache is never held decoded), and the rate counts the tokens of rank 0's batches
     only, although every rank decompresses every chunk,
  4. notification latency while `packerd run --follow` packs files added one at a time: the packer's commit
     time (manifest entry) to the CacheFollower's FollowState, and to DataPlan.grow having expanded the plan.
  5. batches built per second (issue 14): plan.get_batch(step) over consecutive steps, as the trainer's
     Prefetcher calls it, by one cache's DataPlan and by a MixPlan over 4 caches holding the same data (the
     same documents split in 4 contiguous shards, each packed alone with the same seq_len and chunk size),
     once with size weights (the 4 act as one dataset) and once with weights 0.4,0.3,0.2,0.1; same global
     batch, window and --epochs. The three take turns every --mix-slice steps (each keeps its plan from turn to
     turn, so its windows' decoding is timed in proportion) for --mix-rounds rounds of at least --mix-seconds
     each; the medians, the median of the per-round ratios against one cache (target >= 0.9) and each one's
     median get_batch time are printed.
     --mix-only packs the caches and runs this part alone (about a minute); --skip-mix leaves it out.
With --breakdown, one more run of the loader prints the wall time spent inside each of its parts, in ns per
token (file read, checksum + LZ4, rows copied into a window, the int32 batch and its positions), and apart
from the loader the cost of widening a batch to int64 on the host (Batch.to; on a GPU it runs on the device).
Rates 1 to 3 are measured in --rounds interleaved rounds (1, 2, 3, 1, 2, 3, ...) and the median of each
is printed, so that the baseline and the loader see the same load on a shared machine.
Corpus: ../shared/data/corpora/wikitext-2/valid.jsonl with the GPT-2 tokenizer, repeated --copies times;
falls back to builtin:pydoc + builtin:bpe when absent. Targets (issue 3): loader >= 200 M tokens/s per
core, latency p99 < 20 ms; issue 14: 4 caches >= 0.9 x the batches/s of one.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
from _stats import percentile
from shared.chunk import FORMAT_VERSION


def corpus() -> tuple[list[str], str, str]:
    wt = DATA / "corpora" / "wikitext-2" / "valid.jsonl"
    tok = DATA / "tokenizers" / "gpt2"
    if wt.exists() and tok.exists():
        return [json.loads(line)["text"] for line in open(wt)], str(tok), "wikitext-2 valid + GPT-2"
    from shared.builtin import builtin_tokenizer_dir, pydoc_documents
    print("note: ../shared/data is absent; using builtin:pydoc with builtin:bpe")
    return pydoc_documents(), str(builtin_tokenizer_dir()), "pydoc topics + builtin BPE"


def write_jsonl(path: Path, texts, first_id: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": first_id + i, "text": t}) + "\n")
    return path


def packerd(*args) -> list[str]:
    return [sys.executable, "-m", "packerd", "run", *map(str, args)]


def timed_loop(fn, min_seconds: float = 1.0) -> tuple[float, float]:
    """Run fn() (which returns a token count) until min_seconds passed: (tokens/s of wall time, cpu/wall)."""
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < min_seconds:
        n += fn()
    wall = time.perf_counter() - t0
    return n / wall, (time.process_time() - c0) / wall


def bench_loader(cache_dir: Path, args) -> tuple[list[tuple[str, float, str]], list[float]]:
    import lz4.block
    import torch

    from shared.cache import open_cache
    from shared.chunk import HEADER_SIZE, read_header
    from trainerd.data import DataPlan

    torch.set_num_threads(1)  # the loader is numpy and torch copies on one thread: a per-core figure
    cache = open_cache(cache_dir)
    files = [(cache.dir / e.file).read_bytes() for e in cache.chunks]
    payloads = []
    for data in files:
        h = read_header(data)
        # the token payload's LZ4 block follows the index (v2, v3: its own LZ4 block of varints; v1: uint32
        # arrays); v3's block holds varint codes, whose size the header gives
        payloads.append((memoryview(data)[HEADER_SIZE + h["index_bytes"]:],
                         h.get("payload_raw_bytes", h["num_tokens"] * h["itemsize"]), h["num_tokens"]))

    def raw_lz4() -> int:
        for p, size, _ in payloads:
            lz4.block.decompress(p, uncompressed_size=size)
        return sum(n for _, _, n in payloads)

    def read_chunks() -> int:
        return sum(cache.read_chunk(e.id).num_tokens for e in cache.chunks)

    W = args.world_size
    G = args.global_batch * W
    plans = [None]

    def loader() -> int:
        # a new plan each time (another seed: other windows and order), so every chunk is read again
        plan = DataPlan(cache, seed=len(plans), global_batch=G, rank=0, world_size=W, target_epochs=args.epochs)
        plans[0] = plan
        plans.append(None)
        return sum(plan.get_batch(s).num_tokens for s in range(plan.total_steps))

    cases = [("raw LZ4 decompression (payloads in memory)", raw_lz4, 1.0),
             ("cache.read_chunk (read + xxh64 + LZ4)", read_chunks, 1.0),
             (f"DataPlan.get_batch ({args.global_batch} x {cache.seq_len} per step, rank 0 of {W})", loader, 2.0)]
    for _, fn, _ in cases:
        fn()  # warm up: page cache, allocator
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    for _ in range(args.rounds):
        for name, fn, seconds in cases:
            rates[name].append(timed_loop(fn, seconds))
    rows = []
    for name, _, _ in cases:
        r = sorted(rates[name])
        rate, cpu = r[len(r) // 2]
        note = f"cpu/wall {cpu:.2f}; min {r[0][0] / 1e6:.0f}, max {r[-1][0] / 1e6:.0f} over {len(r)} rounds"
        if name.startswith("DataPlan"):
            p = plans[0]
            note += (f"; {p.chunks_decoded} chunk decodes for {args.epochs} epochs of {len(cache.chunks)} chunks"
                     f"{' (every rank reads every chunk)' if W > 1 else ''}")
        rows.append((name, rate, note))
    # the same round's rates side by side: on a shared machine the load moves between rounds
    ratios = [lo[0] / lz[0] for lz, lo in zip(rates[cases[0][0]], rates[cases[2][0]])]
    return rows, ratios


def pack_quarters(work: Path, texts: list[str], tok_dir: str, args, parts: int = 4) -> list[Path]:
    """The loader cache's corpus (texts x --copies, in the same order) split in `parts` contiguous shards,
    each packed into its own cache with the same seq_len and chunk size: together the same data."""
    docs = [t for _ in range(args.copies) for t in texts]
    cut = np.linspace(0, len(docs), parts + 1).astype(int)
    return [pack_cache(work, f"quarter-{i}", docs[cut[i]:cut[i + 1]], tok_dir, args, int(cut[i]))
            for i in range(parts)]


def pack_cache(work: Path, name: str, docs: list[str], tok_dir: str, args, first_id: int = 0) -> Path:
    """docs packed by packerd into the cache work/name (seq_len and chunk size from args)."""
    src = write_jsonl(work / f"{name}.jsonl", docs, first_id)
    cache = work / name
    proc = subprocess.run(packerd("--cache-dir", cache, "--source", src, "--tokenizer", tok_dir, "--seq-len",
                                  args.seq_len, "--chunk-sequences", args.chunk_sequences, "--chunk-format",
                                  args.chunk_format, "--endpoint", f"ipc://{work}/{name}.sock"),
                          cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"packerd failed:\n{proc.stderr[-2000:]}")
    return cache


MIX_WEIGHTS = [0.4, 0.3, 0.2, 0.1]


def bench_mix(cache_dir: Path, quarters: list[Path], args) -> dict:
    """Batches built per second, plan.get_batch(step) over consecutive steps as the Prefetcher calls it, by
    one cache's DataPlan and by a MixPlan over the same data in len(quarters) caches (size weights: one
    dataset; and MIX_WEIGHTS), same global batch, seq_len, window and epochs, on one thread. Each plan is
    made anew (another seed: other orders, every chunk read again) outside the timing; the cases alternate
    round by round. Returns {case: [(batches/s, tokens/s, cpu/wall, median get_batch seconds), ...]} and the
    plans' sizes."""
    import torch

    from shared.cache import open_cache
    from trainerd.data import DataPlan
    from trainerd.mix import MixPlan

    torch.set_num_threads(1)
    W, G = args.world_size, args.global_batch * args.world_size
    one = open_cache(cache_dir)
    qs = [open_cache(q) for q in quarters]
    seeds = iter(range(1, 1 << 30))

    def data_plan():
        return DataPlan(one, seed=next(seeds), global_batch=G, rank=0, world_size=W, target_epochs=args.epochs)

    def mix_plan(weights):
        def make():
            plan = MixPlan(qs, seed=next(seeds), global_batch=G, rank=0, world_size=W, weights=weights,
                           target_epochs=args.epochs)
            plan.grow_sources(0, [(len(c.chunks), c.manifest.finished, c.manifest.estimated_total_sequences())
                                  for c in qs])
            return plan
        return make

    k = len(quarters)
    cases = [("1 cache: DataPlan", data_plan),
             (f"{k} caches: MixPlan, size weights (one dataset)", mix_plan(None)),
             (f"{k} caches: MixPlan, weights {','.join(map(str, MIX_WEIGHTS))}", mix_plan(MIX_WEIGHTS))]

    # The cases take turns every --mix-slice steps, so that the box's drift (other jobs, clock phases) falls
    # on all of them alike; each keeps its plan across turns and rounds, and a plan that ran out of steps is
    # made anew (another seed) outside the timing.
    live = {name: [None, 0, 0] for name, _ in cases}  # plan, next step, steps to run

    def turn(name: str, make, acc: list) -> None:
        cur = live[name]
        if cur[0] is None or cur[1] >= cur[2]:
            plan = make()
            cur[:] = [plan, 0, plan.total_steps if args.mix_steps <= 0 else min(args.mix_steps, plan.total_steps)]
        plan, s0 = cur[0], cur[1]
        s1 = min(s0 + args.mix_slice, cur[2])
        clock = time.perf_counter
        t0, c0 = clock(), time.process_time()
        for s in range(s0, s1):
            t = clock()
            acc[1] += plan.get_batch(s).num_tokens
            acc[4].append(clock() - t)  # the median is a step that builds no window (decodes nothing)
        acc[2] += clock() - t0
        acc[3] += time.process_time() - c0
        acc[0] += s1 - s0
        cur[1] = s1

    def measure_round(seconds: float) -> dict:
        acc = {name: [0, 0, 0.0, 0.0, []] for name, _ in cases}  # steps, tokens, wall, cpu, each step's time
        while True:
            for name, make in cases:
                turn(name, make, acc[name])
            if min(a[2] for a in acc.values()) >= seconds:
                break
        return {name: (a[0] / a[2], a[1] / a[2], a[3] / a[2], float(np.median(a[4]))) for name, a in acc.items()}

    measure_round(0.5)  # warm up: page cache, allocator, buffer pools
    out: dict = {name: [] for name, _ in cases}
    for _ in range(args.mix_rounds):
        for name, r in measure_round(args.mix_seconds).items():
            out[name].append(r)
    sizes = {"one": (len(one.chunks), one.manifest.total_tokens, data_plan().total_steps),
             "quarters": [(len(c.chunks), c.manifest.total_tokens) for c in qs],
             "mix_steps": mix_plan(None)().total_steps}
    return {"rates": out, "sizes": sizes}


def print_mix(res: dict, args) -> None:
    rates, sz = res["rates"], res["sizes"]
    names = list(rates)
    base = names[0]
    W = args.world_size
    print(f"\nbatches built per second, plan.get_batch(step) over consecutive steps (as the Prefetcher), one "
          f"thread, {args.global_batch} x {args.seq_len} per step (rank 0 of {W}), {args.epochs} epochs, "
          f"{args.mix_rounds} rounds of >= {args.mix_seconds} s each, the plans taking turns every {args.mix_slice} steps:")
    print(f"  1 cache: {sz['one'][0]} chunks, {sz['one'][1]:,} tokens, {sz['one'][2]} steps; {len(sz['quarters'])} "
          f"caches: " + " + ".join(f"{c} chunks/{t:,}" for c, t in sz["quarters"])
          + f" tokens, {sz['mix_steps']} steps")
    print(f"  {'plan':52s} {'batches/s':>10s} {'M tok/s':>8s} {'cpu/wall':>8s} {'p50 step':>9s}  {'vs 1 cache':>10s}")
    verdicts = []
    for name in names:
        r = rates[name]
        med = sorted(r)[len(r) // 2]
        p50 = sorted(x[3] for x in r)[len(r) // 2]
        ratios = sorted(a[0] / b[0] for a, b in zip(r, rates[base]))
        ratio = ratios[len(ratios) // 2]
        print(f"  {name:52s} {med[0]:10.1f} {med[1] / 1e6:8.1f} {med[2]:8.2f} {p50 * 1e6:6.1f} us  "
              + ("" if name == base else f"{ratio:10.3f}  (per round {', '.join(f'{a[0] / b[0]:.3f}' for a, b in zip(r, rates[base]))})"))
        if name != base:
            verdicts.append(f"{name}: {ratio:.3f} {'>=' if ratio >= 0.9 else '<'} 0.9, "
                            f"{'met' if ratio >= 0.9 else 'NOT met'}")
    print("  batches/s: median over the rounds; p50 step: median time of one get_batch (a step that decodes no "
          "chunk); vs 1 cache: median of the per-round ratios of batches/s to the 1-cache plan's in the same round")
    print("  issue 14's target, >= 0.9 x the batches/s of one cache: " + "; ".join(verdicts))


def breakdown(cache_dir: Path, args) -> list[tuple[str, float]]:
    """Where the loader's time goes: wall time inside its parts over --epochs epochs, per token of rank 0's
    batches (the parts nest: a window build holds the decodes and row copies of its chunks)."""
    import collections

    import torch

    import shared.cache as cache_mod
    import trainerd.data as data_mod
    from shared.cache import open_cache

    torch.set_num_threads(1)
    spent: collections.Counter = collections.Counter()
    patched = []

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)
        patched.append((owner, name, fn))

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0
        setattr(owner, name, wrapper)

    order = [(data_mod.DataPlan, "_window", "window build or lookup (all below it)"),
             (cache_mod, "_read_file", "  chunk file read"),
             (cache_mod, "decode_chunk", "  checksum + LZ4 decompression"),
             (data_mod._Window, "add", "  rows copied into the window"),
             (data_mod._Window, "finish", "  window index (document starts, seq ids)"),
             (data_mod.DataPlan, "_assemble", "batch: int32 ids + positions (+ labels if padded)"),
             (data_mod._Window, "positions", "  positions")]
    for owner, name, label in order:
        timed(owner, name, label)
    try:
        cache = open_cache(cache_dir)
        W = args.world_size
        plan = data_mod.DataPlan(cache, seed=99, global_batch=args.global_batch * W, rank=0, world_size=W,
                                        target_epochs=args.epochs)
        tokens = total = widen = 0.0
        for s in range(plan.total_steps):
            t0 = time.perf_counter()
            b = plan.get_batch(s)
            t1 = time.perf_counter()
            b.to("cpu")
            total += t1 - t0
            widen += time.perf_counter() - t1
            tokens += b.num_tokens
    finally:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
    rows = [("all of DataPlan.get_batch", total / tokens * 1e9)]
    rows += [(label, spent[label] / tokens * 1e9) for _, _, label in order]
    rows += [("not in the loader: Batch.to('cpu'), int32 -> int64", widen / tokens * 1e9)]
    return rows


def bench_latency(work: Path, texts: list[str], tok_dir: str, files: int, tag: str) -> dict:
    """packerd --follow packs `files` files added one at a time; a CacheFollower polls in a tight loop (as
    a trainer between steps would, at most) and a DataPlan grows on every change. A raw Subscriber in a
    thread times the packer's share: commit to message received, without the manifest read."""
    import threading

    from shared.cache import open_cache
    from shared.manifest import load_manifest
    from shared.protocol import Subscriber
    from trainerd.data import DataPlan
    from trainerd.follow import CacheFollower

    src, cache = work / f"follow-src-{tag}", work / f"follow-cache-{tag}"
    src.mkdir()
    parts = np.array_split(np.arange(len(texts)), files)
    write_jsonl(src / "part-000.jsonl", [texts[i] for i in parts[0]])
    endpoint = f"ipc://{work}/follow-{tag}.sock"
    (work / "follow.toml").write_text("poll_seconds = 0.1\n")
    raw, stop = [], threading.Event()

    def listen():
        sub = Subscriber(endpoint)
        while not stop.is_set():
            for msg in sub.poll(100):
                if msg["type"] == "chunk":
                    raw.append((time.time() - msg["committed_at"]) * 1000)
        sub.close()
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    follower = CacheFollower(cache, endpoint, reconcile_seconds=2.0)
    proc = subprocess.Popen(packerd("--config", work / "follow.toml", "--cache-dir", cache, "--source", src,
                                    "--tokenizer", tok_dir, "--seq-len", 128, "--chunk-sequences", 8,
                                    "--workers", 1, "--follow", "--endpoint", endpoint),
                            cwd=ROOT, stderr=subprocess.DEVNULL)
    to_state, to_plan, plan = [], [], None
    try:
        added, next_add = 1, None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            st = follower.poll(100)
            notified = [e for e in st.events if e["event"] == "notified"]
            to_state += [e["latency_ms"] for e in notified]
            if st.known_chunks and plan is None:
                plan = DataPlan(open_cache(cache), seed=0, global_batch=8, rank=0, world_size=1, known_chunks=0)
            if plan is not None and plan.grow(st.known_chunks, st.finished, 0, st.est_total_sequences):
                now = time.time()
                chunks = plan.cache.chunks
                to_plan += [(now - chunks[e["chunk_id"]].committed_at) * 1000 for e in notified
                            if e["chunk_id"] < plan.known_chunks]
            if st.known_chunks and next_add is None:
                next_add = time.monotonic() + 0.5
            if next_add and time.monotonic() >= next_add:
                m = load_manifest(cache)
                if added == files and m.documents >= len(texts) - 1:
                    break
                if added < files and m.documents >= parts[added - 1][-1]:
                    tmp = write_jsonl(work / ".part.tmp", [texts[i] for i in parts[added]], int(parts[added][0]))
                    os.replace(tmp, src / f"part-{added:03d}.jsonl")
                    added += 1
                next_add = time.monotonic() + 0.3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stop.set()
        listener.join()
        follower.close()
    return {"raw": raw, "to_state": to_state, "to_plan": to_plan, "chunks": len(load_manifest(cache).chunks)}


def fsync_cost(work: Path, size: int) -> list[float]:
    """What the packer pays between a chunk's committed_at and its notification: the durable manifest write."""
    from shared.fsutil import atomic_write_bytes
    out = []
    for _ in range(40):
        t0 = time.perf_counter()
        atomic_write_bytes(work / "fsync-probe.json", b"x" * size)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(xs) -> str:
    if not len(xs):
        return f"{0:5d} {'-':>8s} {'-':>8s} {'-':>8s}"
    return f"{len(xs):5d} {percentile(xs, 50):8.2f} {percentile(xs, 99):8.2f} {max(xs):8.2f}"


def latencies(work: Path, texts, tok_dir: str, args) -> dict:
    import gc
    lat = {"default gc": bench_latency(work, texts, tok_dir, args.follow_files, "gc")}
    gc.collect()
    gc.freeze()  # what a trainer does after setup: full collections no longer walk torch's objects
    lat["gc.freeze()"] = bench_latency(work, texts, tok_dir, args.follow_files, "frozen")
    gc.unfreeze()
    lat["fsync"] = fsync_cost(work, (Path(work) / "follow-cache-gc" / "manifest.json").stat().st_size)
    return lat


def print_latencies(lat: dict, args) -> None:
    fs = lat.pop("fsync")
    any_lat = next(iter(lat.values()))
    print(f"\nnotification latency, packerd --follow ({any_lat['chunks']} chunks of 8 x 128 tokens, "
          f"{args.follow_files} files added one by one), ms:")
    print(f"{'from the commit (committed_at) to':52s} {'n':>5s} {'p50':>8s} {'p99':>8s} {'max':>8s}")
    for mode, r in lat.items():
        print(f"{'  message received (raw SUB thread), ' + mode:52s} {pct(r['raw'])}")
        print(f"{'  CacheFollower FollowState, ' + mode:52s} {pct(r['to_state'])}")
        print(f"{'  DataPlan.grow done (plan expanded), ' + mode:52s} {pct(r['to_plan'])}")
    print(f"{'  (packer side: one durable manifest write)':52s} {pct(fs)}")
    print("(target: p99 < 20 ms)")


def print_command(args) -> None:
    print("\ncommand: python bench/bench_loader.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if v is not None and v is not False and k != "work"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=32, help="corpus repeats for the loader cache")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk-sequences", type=int, default=1024, help="sequences per chunk (packerd's default)")
    ap.add_argument("--chunk-format", type=int, default=FORMAT_VERSION,
                    help=f"packerd --chunk-format of the caches (2 or 3; default {FORMAT_VERSION}, what packerd writes)")
    ap.add_argument("--global-batch", type=int, default=32, help="rows per step (one rank)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs the loader runs over the cache")
    ap.add_argument("--world-size", type=int, default=1, help="the loader is rank 0 of this many ranks")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds (the median is printed)")
    ap.add_argument("--skip-latency", action="store_true", help="measure the loader only")
    ap.add_argument("--breakdown", action="store_true", help="also print where the loader's time goes (ns per token)")
    ap.add_argument("--follow-files", type=int, default=12, help="files added one by one while packerd follows")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--mix-only", action="store_true",
                      help="measure only batches/s of one cache's DataPlan against a MixPlan over the same data in 4 caches")
    only.add_argument("--skip-mix", action="store_true", help="leave out the 1-cache vs 4-cache batches/s part")
    ap.add_argument("--mix-rounds", type=int, default=5, help="rounds of the batches/s part")
    ap.add_argument("--mix-seconds", type=float, default=2.0, help="seconds of get_batch per case and round (at least)")
    ap.add_argument("--mix-steps", type=int, default=0, help="steps timed per plan (0: all of its --epochs epochs)")
    ap.add_argument("--mix-slice", type=int, default=64, help="steps each case runs before the next one's turn")
    ap.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    args = ap.parse_args()

    texts, tok_dir, name = corpus()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-loader-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cache = pack_cache(work, "cache", [t for _ in range(args.copies) for t in texts], tok_dir, args)
    mix = None if args.skip_mix else bench_mix(cache, pack_quarters(work, texts, tok_dir, args), args)
    if args.mix_only:
        print(f"\ncorpus: {name} x {args.copies}; {os.cpu_count()} cores")
        print_mix(mix, args)
        print_command(args)
        if tmp:
            tmp.cleanup()
        return
    rows, ratios = bench_loader(cache, args)
    parts = breakdown(cache, args) if args.breakdown else []
    lat = {} if args.skip_latency else latencies(work, texts, tok_dir, args)

    from shared.manifest import load_manifest
    m = load_manifest(cache)
    print(f"\ncorpus: {name} x {args.copies}; cache: {len(m.chunks)} chunks of {args.chunk_sequences} x {args.seq_len} "
          f"tokens ({m.dtype}), {m.total_tokens:,} tokens, {m.total_bytes / m.total_tokens:.2f} bytes/token; "
          f"{os.cpu_count()} cores")
    print(f"{'one thread (median of rounds)':60s} {'M tokens/s':>11s}  notes")
    for what, rate, note in rows:
        print(f"{what:60s} {rate / 1e6:11.1f}  {note}")
    ratios.sort()
    print(f"loader / raw LZ4: {ratios[len(ratios) // 2]:.3f} (median of the per-round ratios; min "
          f"{ratios[0]:.3f}, max {ratios[-1]:.3f}); target: loader >= 200 M tokens/s per core, where issue 3 "
          f"quotes LZ4 alone at about 800 M (a ratio of 0.25)")
    if parts:
        print(f"\nwhere the loader's time goes (one run of {args.epochs} epochs, wall time inside each part):")
        for label, ns in parts:
            print(f"  {label:58s} {ns:6.2f} ns/token")
    if mix:
        print_mix(mix, args)
    if lat:
        print_latencies(lat, args)
    print_command(args)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
