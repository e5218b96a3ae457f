"""Soak: packerd and trainerd together for N minutes on the CPU; memory of both stays flat, no data lost, the plan keeps up.

    python bench/soak.py                     # 20 minutes (the issue's load run)
    python bench/soak.py --minutes 3         # a short check
    python bench/soak.py --ranks 2           # the trainer as `accelerate launch` with 2 CPU ranks

What runs:
  - packerd in --follow mode on a source folder that a feeder thread keeps adding files to (every --feed-seconds
    a new jsonl of --docs-per-part documents: CPython's documentation, each copy prefixed so no text repeats),
    with the builtin BPE tokenizer, sequences of 64 tokens, chunks of 16 sequences;
  - trainerd (tiny model, hidden 64, 2 layers, 1 thread per rank) following the cache while it grows, with a
    checkpoint every --checkpoint-every steps (keep 2) and the per-rank data trace on.
Every --sample-seconds the resident memory (RSS) of each process tree (the packer, whose tokenizer threads are inside it;
the trainer, its launcher and ranks) is sampled with psutil, together with the manifest's chunk count and the
trainer's step and plan. After --minutes the feeder stops, the packer is stopped and run once more without
--follow to finish the cache, and the trainer runs to the end of its plan.

Checks (exit 1 when one fails):
  - data: `packerd verify` passes; the cache holds every fed document exactly once, in order (all re-tokenized
    and compared); the trainer trained every sequence of the epoch exactly once (data trace), except the last
    partial global batch, which the plan drops by design (fewer than one global batch);
  - the plan kept up: the trainer's plan ends equal to the manifest, and the worst delay from a chunk's commit
    to the plan growing over it (plan_expanded latency) is printed (the follower re-reads the manifest at least
    every reconcile interval, 2 s here);
  - memory: growth from the first sample after warm-up (--warmup-minutes) to the end, and the trend (least
    squares) over the second half; fails when the trend of either tree exceeds --max-growth-mb-per-hour.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.manifest import load_manifest  # noqa: E402

G = 8   # global batch: micro batch 4 x grad accum 2 (1 rank), or 2 x 2 x 2 ranks


def tree_rss(pid: int) -> float:
    """MB resident in a process and all its descendants (0 when it is gone)."""
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 3:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if var == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 3600


class LogTail:
    """New complete lines of a growing JSON-lines file."""

    def __init__(self, path: Path):
        self.path, self.pos, self.buf = path, 0, ""

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.pos)
            data = f.read()
            self.pos = f.tell()
        self.buf += data
        *lines, self.buf = self.buf.split("\n")
        return [json.loads(l) for l in lines if l.strip()]


class Feeder(threading.Thread):
    """Adds a new source file every `every` seconds (written aside, then renamed in)."""

    def __init__(self, src: Path, texts: list[str], per_part: int, every: float):
        super().__init__(daemon=True)
        self.src, self.texts, self.per_part, self.every = src, texts, per_part, every
        self.stop = threading.Event()
        self.parts = 0
        self.fed: list[str] = []

    def add(self) -> None:
        k = self.parts
        docs = []
        for j in range(self.per_part):
            i = k * self.per_part + j
            docs.append(f"copy {i // len(self.texts)}: {self.texts[i % len(self.texts)]}")
        tmp = self.src.parent / f".part-{k:05d}.jsonl"
        with open(tmp, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        os.replace(tmp, self.src / f"part-{k:05d}.jsonl")
        self.fed += docs
        self.parts += 1

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.add()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="how long packer and trainer run together")
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--feed-seconds", type=float, default=6.0, help="a new source file this often")
    ap.add_argument("--docs-per-part", type=int, default=6)
    ap.add_argument("--ranks", type=int, default=1, choices=(1, 2))
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--warmup-minutes", type=float, default=None, help="default: 15%% of --minutes, at most 2")
    ap.add_argument("--max-growth-mb-per-hour", type=float, default=200.0)
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder, removed)")
    a = ap.parse_args()

    work = a.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    src, cache, runs = work / "src", work / "cache", work / "runs"
    src.mkdir(exist_ok=True)
    endpoint = f"ipc://{tempfile.mkdtemp(prefix='soak', dir='/tmp')}/p.sock"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(work / "hf")}
    env.pop("TRAINERD_FAULT", None)

    from shared.builtin import builtin_tokenizer_dir, pydoc_documents
    texts = [t for t in pydoc_documents() if t]
    tok_dir = builtin_tokenizer_dir()
    feeder = Feeder(src, texts, a.docs_per_part, a.feed_seconds)
    feeder.add()
    (work / "pack.toml").write_text("poll_seconds = 0.5\n")
    pack_cmd = [sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src),
                "--tokenizer", str(tok_dir), "--seq-len", "64", "--chunk-sequences", "16", "--workers", "1",
                "--endpoint", endpoint]
    model = ["--model", "tiny", "--hidden-size", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
             "--threads", "1", "--checkpoint-every", str(a.checkpoint_every), "--keep", "2", "--log-every", "100000",
             "--set", "log.data_trace=true", "--set", "data.reconcile_seconds=2"]
    batch = ["--micro-batch-size", "4", "--grad-accum", "2"] if a.ranks == 1 else ["--micro-batch-size", "2", "--grad-accum", "2"]
    targs = ["-m", "trainerd", "--cache-dir", str(cache), "--run-dir", str(runs), "--new", "soak", "--endpoint", endpoint,
             *model, *batch]
    if a.ranks == 1:
        train_cmd = [sys.executable, *targs]
    else:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        train_cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", str(port), *targs]

    print(f"soak: {a.minutes:g} min in {work}; a file of {a.docs_per_part} documents every {a.feed_seconds:g} s; "
          f"trainer {a.ranks} rank(s)", flush=True)
    print("$ " + " ".join(pack_cmd + ["--follow", "--config", str(work / "pack.toml")]), flush=True)
    print("$ " + " ".join(train_cmd), flush=True)
    plog, tlog = open(work / "packer.log", "w"), open(work / "trainer.log", "w")
    packer = subprocess.Popen(pack_cmd + ["--follow", "--config", str(work / "pack.toml")], cwd=ROOT, env=env,
                              stdout=plog, stderr=subprocess.STDOUT)
    trainer = subprocess.Popen(train_cmd, cwd=ROOT, env=env, stdout=tlog, stderr=subprocess.STDOUT)
    feeder.start()
    tail = LogTail(runs / "training_logs" / "soak_run_1.jsonl")
    samples = []       # (t, packer MB, trainer MB, manifest chunks, plan chunks, step, plan total)
    plan_chunks, step, plan_total = 0, 0, 0
    t0 = time.monotonic()
    failed = None
    try:
        next_print = 0.0
        while time.monotonic() - t0 < a.minutes * 60:
            time.sleep(a.sample_seconds)
            for p, name in ((packer, "packer"), (trainer, "trainer")):
                if p.poll() is not None:
                    failed = f"the {name} exited {p.returncode} during the soak (see {work}/{name}.log)"
            if failed:
                break
            for r in tail.read():
                if r.get("event") in ("plan", "plan_expanded"):
                    plan_chunks, plan_total = r["chunks"], r["total_steps"]
                elif "event" not in r:
                    step = r["step"]
            try:
                m = load_manifest(cache)
                chunks = len(m.chunks) if m else 0
            except Exception:  # noqa: BLE001 - a manifest read racing the packer's replace: skip this sample
                continue
            t = time.monotonic() - t0
            samples.append((t, tree_rss(packer.pid), tree_rss(trainer.pid), chunks, plan_chunks, step, plan_total))
            if t >= next_print:
                s = samples[-1]
                print(f"t={t / 60:5.1f} min  RSS packer {s[1]:6.1f} MB  trainer {s[2]:6.1f} MB  |  manifest {s[3]} chunks, "
                      f"plan {s[4]} chunks, step {s[5]}/{s[6]}", flush=True)
                next_print = t + 30
    finally:
        feeder.stop.set()
    if failed is None:
        # the end: no more files; the packer stops (SIGTERM commits nothing half-written) and finishes the cache
        feeder.join(timeout=5)
        packer.send_signal(signal.SIGTERM)
        try:
            packer.wait(timeout=120)
        except subprocess.TimeoutExpired:
            failed = "the packer did not stop on SIGTERM"
        if failed is None and packer.returncode != 0:
            failed = f"the packer exited {packer.returncode} on SIGTERM"
    if failed is None:
        fin = subprocess.run(pack_cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if fin.returncode != 0:
            failed = f"finishing the cache failed: {fin.stderr.strip().splitlines()[-1:]}"
    if failed is None:
        try:
            trainer.wait(timeout=max(600, a.minutes * 60))
        except subprocess.TimeoutExpired:
            failed = "the trainer did not finish its plan"
        if failed is None and trainer.returncode != 0:
            failed = f"the trainer exited {trainer.returncode} (see {work}/trainer.log)"
    for p in (packer, trainer):
        if p.poll() is None:
            p.kill()
            p.wait()
    plog.close()
    tlog.close()
    if failed:
        print(f"FAILED: {failed}")
        return 1
    return report(a, work, cache, runs, feeder, samples, tok_dir, env)


def report(a, work: Path, cache: Path, runs: Path, feeder: Feeder, samples, tok_dir, env) -> int:
    import numpy as np
    from tokenizers import Tokenizer

    from shared.cache import open_cache
    problems = []
    # -- data: the cache ---------------------------------------------------------------------------------------
    v = subprocess.run([sys.executable, "-m", "packerd", "verify", "--cache-dir", str(cache)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if v.returncode != 0:
        problems.append(f"packerd verify: {v.stdout.strip().splitlines()[-1:]}")
    m = load_manifest(cache)
    tok = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    eos = int(m.tokenizer["eos_id"])
    ref = [np.array(e.ids + [eos]) for e in tok.encode_batch(feeder.fed, add_special_tokens=False)]
    docs = list(open_cache(cache).iter_documents())
    docs_lost = abs(len(docs) - len(ref)) + sum(1 for x, y in zip(docs, ref) if not np.array_equal(x, y))
    if docs_lost:
        problems.append(f"{docs_lost} documents differ between the source and the cache ({len(docs)} vs {len(ref)})")
    # -- data: what the trainer trained on ----------------------------------------------------------------------
    recs = [json.loads(l) for l in open(runs / "training_logs" / "soak_run_1.jsonl") if l.endswith("\n")]
    steps = [r["step"] for r in recs if "event" not in r]
    total = m.total_sequences // G
    if steps != list(range(1, total + 1)):
        problems.append(f"trainer steps {steps[:1]}..{steps[-1:]} are not 1..{total}")
    seen = []
    for rank in range(a.ranks):
        with open(runs / "training_logs" / f"soak_run_1.rank{rank}.data.jsonl") as f:
            for line in f:
                seen += [tuple(x) for x in json.loads(line)["seq_ids"]]
    twice = len(seen) - len(set(seen))
    never = m.total_sequences - len(set(seen))
    if twice or never >= G:
        problems.append(f"trainer: {twice} sequences trained twice, {never} never (the plan drops fewer than {G})")
    plans = [r for r in recs if r.get("event") in ("plan", "plan_expanded")]
    if not (plans and plans[-1]["finished"] and plans[-1]["chunks"] == len(m.chunks)):
        problems.append("the trainer's final plan differs from the manifest")
    lags = [r["latency_ms"] / 1000 for r in plans if r.get("latency_ms") is not None]
    waited = sum(r.get("seconds", 0) for r in recs if r.get("event") == "waited")
    saves = [r for r in recs if r.get("event") == "checkpoint_saved"]
    corrupt = [r for r in recs if r.get("event") == "corrupt_chunk"]
    if corrupt:
        problems.append(f"{len(corrupt)} corrupt chunks met by the trainer")
    # -- memory -------------------------------------------------------------------------------------------------
    warm = a.warmup_minutes if a.warmup_minutes is not None else min(2.0, 0.15 * a.minutes)
    after = [s for s in samples if s[0] >= warm * 60] or samples
    half = [s for s in after if s[0] >= (after[0][0] + after[-1][0]) / 2] or after
    rows = []
    for i, name in ((1, "packer tree"), (2, "trainer tree")):
        first, last, peak = after[0][i], after[-1][i], max(s[i] for s in after)
        trend = slope_per_hour([s[0] for s in half], [s[i] for s in half])
        rows.append((name, after[0][i], first, peak, last, last - first, trend))
        if trend > a.max_growth_mb_per_hour:
            problems.append(f"{name}: RSS trend {trend:+.1f} MB/hour over the second half (limit {a.max_growth_mb_per_hour:g})")
    started = [s for s in samples if s[4] > 0]      # samples after the trainer made its first plan
    behind = [s[3] - s[4] for s in started]
    backlog = [s[6] - s[5] for s in started]
    dur = samples[-1][0] / 60 if samples else 0.0

    print()
    print(f"Soak: {dur:.1f} min of packer and trainer together ({a.ranks} trainer rank(s)), then the cache finished")
    print(f"  fed {len(feeder.fed):,} documents in {feeder.parts} files; cache {len(m.chunks):,} chunks, "
          f"{m.total_sequences:,} sequences, {m.total_tokens:,} tokens; trainer {steps[-1] if steps else 0:,} steps, "
          f"{len(saves)} checkpoints, {waited:.0f} s waiting for data")
    print()
    print(f"| Memory (RSS, MB; samples every {a.sample_seconds:g} s after {warm:g} min warm-up) | after warm-up | peak | end | growth | trend over the 2nd half |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, first, peak, last, growth, trend in rows:
        print(f"| {name} | {first:.1f} | {peak:.1f} | {last:.1f} | {growth:+.1f} | {trend:+.1f} MB/hour |")
    print()
    print(f"| Data | |\n|---|---|\n| documents lost or doubled in the cache | {docs_lost} |\n"
          f"| sequences trained twice | {twice} |\n| sequences never trained | {never} (the dropped last partial batch: < {G}) |\n"
          f"| packerd verify | {'ok' if v.returncode == 0 else 'FAILED'} |")
    print()
    print(f"| Plan keeping up | |\n|---|---|\n"
          f"| commit-to-plan delay (plan_expanded latency) | median {statistics.median(lags) if lags else 0:.2f} s, "
          f"max {max(lags) if lags else 0:.2f} s (reconcile interval 2 s) |\n"
          f"| manifest chunks not yet in the plan, at a sample | median {statistics.median(behind) if behind else 0:g}, max {max(behind, default=0)} |\n"
          f"| planned steps not yet trained, at a sample | median {statistics.median(backlog) if backlog else 0:g}, max {max(backlog, default=0)} |")
    print()
    if problems:
        print("FAILED:")
        for p in problems:
            print(f"  - {p}")
    else:
        print("OK: no data lost, the plan matched the manifest, memory within the limit")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
