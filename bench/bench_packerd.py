"""packerd throughput against the raw tokenizer and the usual datasets pipeline, on the same documents.

    python bench/bench_packerd.py [--copies 16] [--workers N]

Prints one table: tokens/s and bytes per token on disk for
  1. the raw tokenizer: tokenizers' encode_batch over all documents (Rust threads on every core),
  2. packerd end to end: the real CLI, from process start to a finished manifest (all chunks committed),
  3. what users write instead: datasets `map(tokenize)` + `group_texts` (transformers' run_clm.py), saved to disk.
Corpus: ../shared/data/corpora/wikitext-2/valid.jsonl with the GPT-2 tokenizer, repeated --copies times
(each copy numbered, so nothing is deduplicated); falls back to builtin:pydoc + builtin:bpe when absent.
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


def corpus() -> tuple[list[str], str, str]:
    wt = DATA / "corpora" / "wikitext-2" / "valid.jsonl"
    tok = DATA / "tokenizers" / "gpt2"
    if wt.exists() and tok.exists():
        return [json.loads(l)["text"] for l in open(wt)], str(tok), "wikitext-2 valid + GPT-2"
    sys.path.insert(0, str(ROOT))
    from packerd.builtin import builtin_tokenizer_dir, pydoc_documents
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


def bench_packerd(src: Path, tok_dir: str, work: Path, workers: int) -> tuple[float, int, float]:
    cache = work / "cache"
    cmd = [sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src), "--tokenizer",
           tok_dir, "--seq-len", "1024", "--endpoint", f"ipc://{work}/bench.sock"]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    m = json.loads((cache / "manifest.json").read_text())
    return m["totals"]["tokens"] / dt, m["totals"]["tokens"], dir_bytes(cache) / m["totals"]["tokens"]


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
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="packerd --workers (0: one per core)")
    args = ap.parse_args()
    base, tok_dir, name = corpus()
    texts = [f"{k} {t}" for k in range(args.copies) for t in base]
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        for k in range(args.copies):
            with open(src / f"part{k:03d}.jsonl", "w") as f:
                for t in texts[k * len(base):(k + 1) * len(base)]:
                    f.write(json.dumps({"text": t}) + "\n")
        raw, n_raw = bench_raw(texts, tok_dir)
        pk, n_pk, bpt_pk = bench_packerd(src, tok_dir, work, args.workers)
        (work / "p").mkdir()
        ds, n_ds, bpt_ds = bench_datasets(src, tok_dir, work / "p", cores)
    print(f"\ncorpus: {name} x {args.copies} copies, {len(texts):,} documents, {n_raw:,} tokens; {cores} cores; "
          f"python {sys.version.split()[0]}")
    print(f"{'pipeline':44s} {'tokens/s':>12s} {'vs raw':>7s} {'bytes/token':>12s}")
    print(f"{'raw tokenizer (encode_batch_fast, no disk)':44s} {raw:12,.0f} {1.0:7.2f} {'-':>12s}")
    print(f"{'packerd run (process start to finished)':44s} {pk:12,.0f} {pk / raw:7.2f} {bpt_pk:12.2f}")
    print(f"{'datasets map + group_texts + save_to_disk':44s} {ds:12,.0f} {ds / raw:7.2f} {bpt_ds:12.2f}")
    print(f"\ncommand: python bench/bench_packerd.py --copies {args.copies}" + (f" --workers {args.workers}" if args.workers else ""))


if __name__ == "__main__":
    main()
