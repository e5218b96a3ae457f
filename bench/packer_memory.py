"""Resident memory of this packer against an older one, side by side, packing the same growing source.

    python bench/packer_memory.py --old /work/wt-old [--minutes 20] [--feed-seconds 8] [--sample-seconds 10]

Both packers run at once in --follow mode (GPT-2 tokenizer, seq_len 1024, --tokenizer-engine left to each
version's default), each on its own copy of one source folder, to which a feeder adds a jsonl file of
wikitext-2 valid (one copy, every copy prefixed so no text repeats: about 250 K tokens) every
--feed-seconds. --old is a checkout of the earlier code (for example `git worktree add /work/wt-old
4e984fc`), run with the same interpreter. Every --sample-seconds the RSS of each packer process (its
tokenizer threads are inside it) is printed with its committed chunks; at the end, per packer: the peak, the
growth from the first sample after --warmup-minutes to the last, and the least-squares trend over the second
half, in MB and MB per hour. Measured side by side because the box's other jobs move both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from bench.soak import slope_per_hour, tree_rss  # noqa: E402
from shared.manifest import load_manifest  # noqa: E402


def feed(folders: list[Path], texts: list[str], k: int) -> None:
    """The k-th source file, the same bytes in every folder (written aside, then renamed in)."""
    body = "".join(json.dumps({"text": f"copy {k}: {t}"}) + "\n" for t in texts)
    for src in folders:
        tmp = src.parent / f".{src.name}-{k:05d}.jsonl"
        tmp.write_text(body)
        os.replace(tmp, src / f"part-{k:05d}.jsonl")


def chunks(cache: Path) -> int:
    """Chunks committed (snapshot and commit log, or an old manifest.json alone); 0 before the first."""
    try:
        return len(load_manifest(cache).chunks)
    except Exception:  # not written yet, or replaced while read: the count is for the eye only
        return 0


def start(code: Path, work: Path, name: str, tok: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "packerd", "run", "--cache-dir", str(work / f"{name}-cache"), "--source",
           str(work / name), "--tokenizer", str(tok), "--seq-len", "1024", "--follow",
           "--endpoint", f"ipc://{work}/{name}.sock"]
    env = dict(os.environ, PYTHONPATH=str(code))
    return subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(work / f"{name}.log", "w"))


def summary(label: str, ts: list[float], ys: list[float], warm: float) -> str:
    after = [(t, y) for t, y in zip(ts, ys) if t >= warm] or list(zip(ts, ys))
    half = [(t, y) for t, y in zip(ts, ys) if t >= ts[-1] / 2]
    trend = slope_per_hour([t for t, _ in half], [y for _, y in half])
    return (f"{label}: peak {max(ys):.1f} MB, after warm-up {after[0][1]:.1f} -> {after[-1][1]:.1f} MB "
            f"({after[-1][1] - after[0][1]:+.1f} MB), trend over the second half {trend:+.1f} MB/hour")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="checkout of the earlier packer")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--feed-seconds", type=float, default=8.0)
    ap.add_argument("--sample-seconds", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=2.0)
    a = ap.parse_args()
    texts = [json.loads(line)["text"] for line in open(DATA / "corpora" / "wikitext-2" / "valid.jsonl")]
    tok = DATA / "tokenizers" / "gpt2"
    work = Path(tempfile.mkdtemp(prefix="packer-memory-"))
    names = {"old": a.old.resolve(), "new": ROOT}
    for name in names:
        (work / name).mkdir()
    feed([work / n for n in names], texts, 0)  # a packer refuses a source folder without files
    procs = {name: start(code, work, name, tok) for name, code in names.items()}
    ts, rss = [], {n: [] for n in names}
    t0 = next_feed = time.monotonic()
    k = 1
    print(f"{'t_s':>6} {'old_MB':>8} {'new_MB':>8} {'old_chunks':>11} {'new_chunks':>11}", flush=True)
    try:
        while (now := time.monotonic()) - t0 < a.minutes * 60:
            if now >= next_feed:
                feed([work / n for n in names], texts, k)
                k += 1
                next_feed += a.feed_seconds
            for n, p in procs.items():
                if p.poll() is not None:
                    sys.exit(f"the {n} packer exited with {p.returncode}; see {work / (n + '.log')}")
            if not ts or now - t0 - ts[-1] >= a.sample_seconds:
                ts.append(now - t0)
                for n, p in procs.items():
                    rss[n].append(tree_rss(p.pid))
                print(f"{ts[-1]:6.0f} {rss['old'][-1]:8.1f} {rss['new'][-1]:8.1f} "
                      f"{chunks(work / 'old-cache'):11d} {chunks(work / 'new-cache'):11d}", flush=True)
            time.sleep(0.5)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=60)
    print(f"\n{k} source files of {len(texts)} documents fed, one every {a.feed_seconds:g} s, for {a.minutes:g} min")
    for n in names:
        print(summary(f"{n} ({names[n]})", ts, rss[n], a.warmup_minutes * 60))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
