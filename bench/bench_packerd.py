"""packerd throughput with each tokenizer engine against the raw tokenizers and the usual datasets pipeline.

    python bench/bench_packerd.py [--copies 64] [--rounds 3] [--workers N] [--lz4-level L] [--no-datasets]
                                  [--baseline PATH]

Prints one table: tokens/s and bytes per token on disk for
  1. the raw Hugging Face tokenizer: tokenizers' encode_batch_fast over all documents (Rust threads on every
     core; encode_batch_fast skips the offsets encode_batch computes, so it is the faster of the two),
  2. raw tiktoken: tiktoken's own encode_ordinary_batch (its thread pool, one thread per core) with the GPT-2
     encoding converted from the same tokenizer.json (packerd/tiktoken_convert.py; tiktoken's own "gpt2"
     would need the network),
  3. packerd end to end with each engine (--tokenizer-engine tiktoken, then hf): the real CLI, from process
     start to a finished manifest (all chunks committed); also its steady rate, first to last chunk commit,
  4. what users write instead: datasets `map(tokenize)` + `group_texts` (transformers' run_clm.py), saved to disk;
  5. with --baseline PATH, packerd --tokenizer-engine tiktoken from another checkout of this repository (an
     earlier commit, `git archive COMMIT | tar -x -C PATH`), in the same rotation: the change against it,
  6. short documents (issue 15's bytes-per-token goal): the same copies split into paragraphs, one document per
     non-empty line, packed by packerd --tokenizer-engine tiktoken into one cache per chunk format (the
     default, then each other one packerd writes); bytes per token on disk, counted as in the table (the whole
     cache folder), and the steady rate. Packed once each, after the rounds: bytes do not depend on the load.
Corpus: ../shared/data/corpora/wikitext-2/valid.jsonl (web-sized documents, about 18 KB each) with the GPT-2
tokenizer, repeated --copies times (each copy numbered, so nothing is deduplicated), written as jsonl shards
of 8 copies (about 2 MB each, as datasets ship shards); falls back to builtin:pydoc + builtin:bpe when absent.
The machine's speed drifts by 10-20% from minute to minute on shared hosts, so the four measurements rotate
their order every round (after an untimed warm-up) and the table gives medians; the ratio columns are the
medians of the per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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


def bench_tiktoken(texts: list[str], tok_dir: str) -> tuple[float, int]:
    """tiktoken's encode_ordinary_batch over all documents at once, one thread per core (EOS counted)."""
    sys.path.insert(0, str(ROOT))
    from packerd.tiktoken_convert import to_tiktoken
    enc, _ = to_tiktoken(Path(tok_dir, "tokenizer.json").read_text())
    t0 = time.perf_counter()
    n = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1))
    return n / (time.perf_counter() - t0), n


def bench_packerd(src: Path, tok_dir: str, work: Path, workers: int, level: int | None,
                  engine: str, code: Path = ROOT, extra: tuple[str, ...] = ()) -> tuple[float, float, int, float, float]:
    """(end-to-end tokens/s, steady tokens/s, tokens, bytes per token, CPU us per token) of one packerd run
    into a new cache. The CPU time (user + system, all threads, start-up included) moves far less with the
    other jobs on the box than the rates do."""
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src), "--tokenizer",
           tok_dir, "--seq-len", "1024", "--endpoint", f"ipc://{work}/bench.sock", "--tokenizer-engine", engine]
    if workers:
        cmd += ["--workers", str(workers)]
    if level is not None:
        cmd += ["--lz4-level", str(level)]
    cmd += extra
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, cwd=code, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(code)))
    dt, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    m = json.loads((cache / "manifest.json").read_text())
    c = m["chunks"]
    tokens = m["totals"]["tokens"]
    steady = (tokens - c["tokens"][0]) / (c["committed_at"][-1] - c["committed_at"][0]) if len(c["id"]) > 2 else float("nan")
    return tokens / dt, steady, tokens, dir_bytes(cache) / tokens, cpu / tokens * 1e6


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


ENGINES = ("tiktoken", "hf")


def rounds(texts: list[str], src: Path, tok_dir: str, work: Path, args) -> dict[str, list]:
    """Each measurement per round, in an order that rotates every round (a drift within a round favours none)."""
    runs = {"raw hf": lambda: bench_raw(texts, tok_dir), "raw tiktoken": lambda: bench_tiktoken(texts, tok_dir)}
    for e in ENGINES:
        runs[e] = lambda e=e: bench_packerd(src, tok_dir, work, args.workers, args.lz4_level, e)
    if args.baseline:
        runs["baseline"] = lambda: bench_packerd(src, tok_dir, work, args.workers, args.lz4_level, "tiktoken",
                                                 args.baseline.resolve())
    names = list(runs)
    out: dict[str, list] = {n: [] for n in names}
    # warm-up, untimed: on this host the first half minute after an idle spell runs faster (burst credit),
    # which would otherwise favour whichever side runs first
    bench_raw(texts[: len(texts) // 4], tok_dir)
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(runs[n]())
        raw = out["raw hf"][-1][0]
        print(f"round {r + 1}: raw hf {raw:,.0f}, raw tiktoken {out['raw tiktoken'][-1][0]:,.0f}, "
              + ", ".join(f"packerd {e} {out[e][-1][0]:,.0f} end to end, {out[e][-1][1]:,.0f} steady"
                          for e in (*ENGINES, "baseline") if e in out)
              + " tok/s", flush=True)
    counts = {n: v[-1][2] if n in (*ENGINES, "baseline") else v[-1][1] for n, v in out.items()}
    assert len(set(counts.values())) == 1, counts  # the same tokens everywhere, EOS included
    return out


def write_shards(texts: list[str], folder: Path, per_file: int) -> None:
    folder.mkdir()
    for k in range(0, len(texts), per_file):
        with open(folder / f"part{k // per_file:03d}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[k:k + per_file])


def short_documents(texts: list[str], tok_dir: str, work: Path, args) -> list[tuple]:
    """(chunk format, documents, tokens, bytes per token, steady tokens/s) of packerd over `texts` split into
    paragraphs, once per chunk format, the default first."""
    sys.path.insert(0, str(ROOT))
    from shared.chunk import FORMAT_VERSION
    paragraphs = [p for t in texts for p in t.split("\n") if p.strip()]
    src = work / "paragraphs"
    write_shards(paragraphs, src, max(1, len(paragraphs) // 4))
    rows = []
    for fmt in sorted((2, 3), key=lambda v: v != FORMAT_VERSION):
        _, steady, tokens, bpt, _ = bench_packerd(src, tok_dir, work, args.workers, args.lz4_level, "tiktoken",
                                                  extra=("--chunk-format", str(fmt)))
        rows.append((fmt, len(paragraphs), tokens, bpt, steady))
    return rows


def report(out: dict[str, list], ds: tuple | None, short: list[tuple], name: str, ntexts: int, args) -> None:
    med = statistics.median
    raw_hf = [r[0] for r in out["raw hf"]]
    raw_tt = [r[0] for r in out["raw tiktoken"]]

    def row(label: str, rates: list[float], bpt) -> None:
        vs_hf = med(x / h for x, h in zip(rates, raw_hf))
        vs_tt = med(x / t for x, t in zip(rates, raw_tt))
        bpt = f"{bpt:.2f}" if isinstance(bpt, float) else bpt
        print(f"{label:58s} {med(rates):12,.0f} {vs_hf:7.2f} {vs_tt:8.2f} {bpt:>12s}")
    print(f"\ncorpus: {name} x {args.copies} copies, {ntexts:,} documents, {out['raw hf'][0][1]:,} tokens; "
          f"{os.cpu_count()} cores; python {sys.version.split()[0]}; medians of {args.rounds} rotating rounds")
    print(f"{'pipeline':58s} {'tokens/s':>12s} {'vs hf':>7s} {'vs tt':>8s} {'bytes/token':>12s}")
    row("raw tokenizers encode_batch_fast (no disk)", raw_hf, "-")
    row("raw tiktoken encode_ordinary_batch (no disk)", raw_tt, "-")
    for e in ENGINES:
        row(f"packerd --tokenizer-engine {e} (process start to finished)", [r[0] for r in out[e]], out[e][-1][3])
        row(f"packerd --tokenizer-engine {e} (steady: first to last commit)", [r[1] for r in out[e]], out[e][-1][3])
    if "baseline" in out:
        for i, what in ((0, "process start to finished"), (1, "steady")):
            row(f"baseline packerd tiktoken ({what})", [r[i] for r in out["baseline"]], out["baseline"][-1][3])
        for i, what in ((0, "end to end"), (1, "steady")):
            ratio = med(a[i] / b[i] for a, b in zip(out["tiktoken"], out["baseline"]))
            print(f"packerd tiktoken against the baseline, {what}: {ratio:.2f} (median of the per-round ratios)")
    for e in (*ENGINES, "baseline"):
        if e in out:
            print(f"CPU per token, packerd {e}: {med(r[4] for r in out[e]):.3f} us (user + system, all threads, "
                  f"start-up included; per round {', '.join(f'{r[4]:.3f}' for r in out[e])})")
    if ds is not None:
        row("datasets map + group_texts + save_to_disk", [ds[0]] * len(raw_hf), ds[2])
    print("\nshort documents: the same copies, one document per non-empty line (packerd --tokenizer-engine tiktoken, "
          "seq_len 1024, packed once)")
    print(f"{'chunk format':<24}{'documents':>11}{'tokens':>12}{'tokens/doc':>11}{'bytes/token':>12}{'steady tok/s':>14}")
    for fmt, docs, tokens, bpt, steady in short:
        label = f"{fmt} (default)" if fmt == short[0][0] else f"{fmt} (--chunk-format {fmt})"
        print(f"{label:<24}{docs:>11,}{tokens:>12,}{tokens / docs:>11.1f}{bpt:>12.3f}{steady:>14,.0f}")
    print(f"\ncommand: python bench/bench_packerd.py --copies {args.copies} --rounds {args.rounds}"
          + (f" --workers {args.workers}" if args.workers else "")
          + (f" --lz4-level {args.lz4_level}" if args.lz4_level is not None else "")
          + (" --no-datasets" if args.no_datasets else "") + (f" --baseline {args.baseline}" if args.baseline else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="packerd --workers (0: one per core)")
    ap.add_argument("--lz4-level", type=int, help="packerd --lz4-level (default: packerd's)")
    ap.add_argument("--no-datasets", action="store_true", help="leave out the datasets pipeline (its row is slow)")
    ap.add_argument("--baseline", type=Path, help="another checkout whose packerd (tiktoken) runs in the same rounds")
    args = ap.parse_args()
    base, tok_dir, name = corpus()
    texts = [f"{k} {t}" for k in range(args.copies) for t in base]
    per_file = 8 * len(base)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "src"
        write_shards(texts, src, per_file)
        out = rounds(texts, src, tok_dir, work, args)
        short = short_documents(texts, tok_dir, work, args)
        ds = None
        if not args.no_datasets:
            (work / "p").mkdir()
            ds = bench_datasets(src, tok_dir, work / "p", os.cpu_count())
    report(out, ds, short, name, len(texts), args)


if __name__ == "__main__":
    main()
