"""packerd throughput against the raw tokenizer and the usual datasets pipeline, on the same documents.

    python bench/bench_packerd.py [--copies 64] [--rounds 3] [--workers N] [--lz4-level L]

Prints one table: tokens/s and bytes per token on disk for
  1. the raw tokenizer: tokenizers' encode_batch over all documents (Rust threads on every core),
  2. packerd end to end: the real CLI, from process start to a finished manifest (all chunks committed);
     also its steady rate, first to last chunk commit (start-up excluded),
  3. what users write instead: datasets `map(tokenize)` + `group_texts` (transformers' run_clm.py), saved to disk.
Corpus: ../shared/data/corpora/wikitext-2/valid.jsonl with the GPT-2 tokenizer, repeated --copies times
(each copy numbered, so nothing is deduplicated), written as jsonl shards of 8 copies (about 2 MB each, as
datasets ship shards); falls back to builtin:pydoc + builtin:bpe when absent.
The machine's speed drifts by 10-20% from minute to minute on shared hosts, so raw and packerd alternate for
--rounds rounds (raw first in odd rounds, packerd first in even ones, after an untimed warm-up) and the table
gives each one's median; the ratio column is the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def corpus() -> tuple[list[str], str, str]:
    wt = DATA / "corpora" / "wikitext-2" / "valid.jsonl"
    tok = DATA / "tokenizers" / "gpt2"
    if wt.exists() and tok.exists():
        return [json.loads(l)["text"] for l in open(wt)], str(tok), "wikitext-2 valid + GPT-2"
    sys.path.insert(0, str(ROOT))
    from shared.builtin import builtin_tokenizer_dir, pydoc_documents
    print("note: ../shared/data is absent; using builtin:pydoc with builtin:bpe")
    return pydoc_documents(), str(builtin_tokenizer_dir()), "pydoc topics + builtin BPE"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_raw(texts: list[str], tok_dir: str) -> tuple[float, int]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 256):
        n += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(texts[i:i + 256], add_special_tokens=False))
    return n / (time.perf_counter() - t0), n


def bench_packerd(src: Path, tok_dir: str, work: Path, workers: int, level: int | None) -> tuple[float, float, int, float]:
    """(end-to-end tokens/s, steady tokens/s, tokens, bytes per token) of one packerd run into a new cache."""
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src), "--tokenizer",
           tok_dir, "--seq-len", "1024", "--endpoint", f"ipc://{work}/bench.sock"]
    if workers:
        cmd += ["--workers", str(workers)]
    if level is not None:
        cmd += ["--lz4-level", str(level)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    m = json.loads((cache / "manifest.json").read_text())
    c = m["chunks"]
    tokens = m["totals"]["tokens"]
    steady = (tokens - c["tokens"][0]) / (c["committed_at"][-1] - c["committed_at"][0]) if len(c["id"]) > 2 else float("nan")
    return tokens / dt, steady, tokens, dir_bytes(cache) / tokens


def bench_datasets(src: Path, tok_dir: str, work: Path, nproc: int) -> tuple[float, int, float]:
    import datasets
    from transformers import AutoTokenizer
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    block = 1024
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = datasets.load_dataset("json", data_files=sorted(str(p) for p in src.glob("*.jsonl")), split="train",
                               cache_dir=str(work / "hfcache"))

    def tokenize(batch):
        return tok([t + tok.eos_token for t in batch["text"]])

    def group_texts(examples):  # as in transformers' examples/pytorch/language-modeling/run_clm.py
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total = len(concatenated["input_ids"]) // block * block
        return {k: [t[i:i + block] for i in range(0, total, block)] for k, t in concatenated.items()}

    ds = ds.map(tokenize, batched=True, num_proc=nproc, remove_columns=ds.column_names)
    ds = ds.map(group_texts, batched=True, num_proc=nproc)
    ds.save_to_disk(str(work / "grouped"))
    dt = time.perf_counter() - t0
    n = len(ds) * block
    return n / dt, n, dir_bytes(work / "grouped") / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="packerd --workers (0: one per core)")
    ap.add_argument("--lz4-level", type=int, help="packerd --lz4-level (default: packerd's)")
    args = ap.parse_args()
    base, tok_dir, name = corpus()
    texts = [f"{k} {t}" for k in range(args.copies) for t in base]
    cores = os.cpu_count()
    per_file = 8 * len(base)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        for k in range(0, len(texts), per_file):
            with open(src / f"part{k // per_file:03d}.jsonl", "w") as f:
                for t in texts[k:k + per_file]:
                    f.write(json.dumps({"text": t}) + "\n")
        raws, packs, steadies, ratios = [], [], [], []
        # warm-up, untimed: on this host the first half minute after an idle spell runs faster (burst
        # credit), which would otherwise favour whichever side runs first
        bench_raw(texts[: len(texts) // 4], tok_dir)
        for r in range(args.rounds):
            if r % 2 == 0:  # the order alternates too (ABBA), so a drift within a round favours neither
                raw, n_raw = bench_raw(texts, tok_dir)
                pk, steady, n_pk, bpt_pk = bench_packerd(src, tok_dir, work, args.workers, args.lz4_level)
            else:
                pk, steady, n_pk, bpt_pk = bench_packerd(src, tok_dir, work, args.workers, args.lz4_level)
                raw, n_raw = bench_raw(texts, tok_dir)
            raws.append(raw), packs.append(pk), steadies.append(steady), ratios.append(pk / raw)
            print(f"round {r + 1}: raw {raw:,.0f} tok/s, packerd {pk:,.0f} tok/s end to end ({pk / raw:.2f}), "
                  f"steady {steady:,.0f} tok/s ({steady / raw:.2f})", flush=True)
        assert n_pk == n_raw, (n_pk, n_raw)  # the same tokens, EOS included
        (work / "p").mkdir()
        ds, n_ds, bpt_ds = bench_datasets(src, tok_dir, work / "p", cores)
    med = statistics.median
    raw = med(raws)
    print(f"\ncorpus: {name} x {args.copies} copies, {len(texts):,} documents, {n_raw:,} tokens; {cores} cores; "
          f"python {sys.version.split()[0]}; medians of {args.rounds} alternating rounds")
    print(f"{'pipeline':48s} {'tokens/s':>12s} {'vs raw':>7s} {'bytes/token':>12s}")
    print(f"{'raw tokenizer (encode_batch_fast, no disk)':48s} {raw:12,.0f} {1.0:7.2f} {'-':>12s}")
    print(f"{'packerd run (process start to finished)':48s} {med(packs):12,.0f} {med(ratios):7.2f} {bpt_pk:12.2f}")
    print(f"{'packerd run (steady: first to last commit)':48s} {med(steadies):12,.0f} "
          f"{med(s / r for s, r in zip(steadies, raws)):7.2f} {bpt_pk:12.2f}")
    print(f"{'datasets map + group_texts + save_to_disk':48s} {ds:12,.0f} {ds / raw:7.2f} {bpt_ds:12.2f}")
    print(f"\ncommand: python bench/bench_packerd.py --copies {args.copies} --rounds {args.rounds}"
          + (f" --workers {args.workers}" if args.workers else "")
          + (f" --lz4-level {args.lz4_level}" if args.lz4_level is not None else ""))


if __name__ == "__main__":
    main()
