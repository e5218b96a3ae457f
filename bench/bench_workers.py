"""Tokenizer threads against tokenizer processes, on the same batches: why packerd tokenizes in threads.

    python bench/bench_workers.py [--copies 16] [--rounds 5] [--workers N]

Both sides encode the same batches of about 256 KB of text (packerd's batch size) with packerd's encoder
(`BatchEncoder` with the hf engine: encode_batch_fast, EOS appended, ids into one numpy array), `--workers` at a time:
  - threads: one tokenizer shared by a thread pool in this process (what packerd does; `tokenizers`
    releases the GIL while it encodes),
  - processes: a spawn pool of worker processes, each with its own copy of the tokenizer (packerd's first
    design), batches sent and token arrays returned through pipes.
The two alternate for --rounds rounds because the host's speed drifts; the table gives medians and the
median of the per-round ratios. Corpus: wikitext-2 valid x --copies with GPT-2, else builtin:pydoc +
builtin:bpe.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

_proc_encoder = None


def _init_process(tok_spec: str, dtype: str) -> None:
    global _proc_encoder
    from packerd.tokenizer import BatchEncoder, Engine
    from shared.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_spec)
    _proc_encoder = BatchEncoder(Engine("hf", tok), tok.eos_id, dtype)


def _encode_in_process(texts: list[str]):
    return _proc_encoder(texts)


def batches_of(texts: list[str], chars: int) -> list[list[str]]:
    out, cur, n = [], [], 0
    for t in texts:
        cur.append(t)
        n += len(t)
        if n >= chars:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    from bench_packerd import corpus
    from packerd.pack import BATCH_CHARS
    from packerd.tokenizer import BatchEncoder, Engine
    from shared.tokenizer import load_tokenizer
    texts, tok_spec, label = corpus()
    texts = [f"[{c}] {t}" for c in range(args.copies) for t in texts]
    batches = batches_of(texts, BATCH_CHARS)
    tok = load_tokenizer(tok_spec)
    dtype = "<u2" if tok.vocab_size <= 65536 else "<u4"
    encoder = BatchEncoder(Engine("hf", tok), tok.eos_id, dtype)
    threads = ThreadPoolExecutor(args.workers)
    procs = mp.get_context("spawn").Pool(args.workers, _init_process, (tok_spec, dtype))
    procs.map(abs, range(args.workers))  # started and initialised before timing
    tokens = sum(len(encoder(b)[0]) for b in batches[:2])  # warm the word cache like the workers'

    rates: dict[str, list[float]] = {"threads": [], "processes": []}
    for r in range(args.rounds):
        t0 = time.perf_counter()
        tokens = sum(len(f.result()[0]) for f in [threads.submit(encoder, b) for b in batches])
        rates["threads"].append(tokens / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        n = sum(len(a.get()[0]) for a in [procs.apply_async(_encode_in_process, (b,)) for b in batches])
        assert n == tokens
        rates["processes"].append(tokens / (time.perf_counter() - t0))
        print(f"round {r + 1}: threads {rates['threads'][-1]:,.0f} tok/s, processes {rates['processes'][-1]:,.0f} tok/s "
              f"({rates['threads'][-1] / rates['processes'][-1]:.2f}x)", flush=True)
    procs.close()
    ratio = statistics.median(t / p for t, p in zip(rates["threads"], rates["processes"]))
    print(f"\ncorpus: {label} x {args.copies} copies, {len(batches)} batches, {tokens:,} tokens; "
          f"{args.workers} workers on {os.cpu_count()} cores; medians of {args.rounds} alternating rounds")
    print(f"{'tokenizer workers':<40}{'tokens/s':>12}{'vs processes':>14}")
    print(f"{'threads sharing one tokenizer':<40}{statistics.median(rates['threads']):>12,.0f}{ratio:>14.2f}")
    print(f"{'spawned processes':<40}{statistics.median(rates['processes']):>12,.0f}{1.0:>14.2f}")
    print(f"\ncommand: python bench/bench_workers.py --copies {args.copies} --rounds {args.rounds} --workers {args.workers}")


if __name__ == "__main__":
    main()
