"""Bytes per token on disk of chunk formats v3 (opt-in, `--chunk-format 3`), v2 (the default) and v1, on
paragraph-sized documents; decode speed.

    python bench/bench_chunk_size.py [--seq-len 1024] [--chunk-sequences 64] [--lz4-level 9] [--rounds 5]

Corpora (GPT-2 tokenizer, an EOS after each document): ../shared/data/corpora/tinyshakespeare/input.txt one
document per non-empty line (about 10 tokens each), wikitext-2 valid one document per paragraph (about
100 tokens) and per article (about 4,000). The chunks are cut as packerd cuts them
(packerd.pack.build_chunk) and encoded as v3 and as v2; the v1 figure is the same chunks' v1 size (64-byte
header + uint32 lengths, doc_ptr and doc_starts + v2's LZ4 token block), computed in the same run. The
index columns are what the sequence and document index costs per token; "tokens" columns the token block
alone. Decode: decode_chunk (checksum, index, tokens) over all chunks of each version, the two versions
alternating for --rounds rounds, median tokens/s and MB/s of the tokens as uint16 (2 bytes a token).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from packerd.pack import build_chunk
from shared.chunk import HEADER_SIZE, decode_chunk, encode_chunk, read_header


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(DATA / "tokenizers" / "gpt2" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids = [e.ids + [eos] for e in tok.encode_batch(texts, add_special_tokens=False)]
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    return np.concatenate([np.asarray(i, dtype=np.uint16) for i in ids]), lengths


def measure(tokens, lengths, seq_len: int, chunk_sequences: int, level: int, rounds: int) -> dict:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    size = seq_len * chunk_sequences
    r = dict.fromkeys(("v1", "v2", "v3", "v1_index", "v2_index", "v2_tokens", "v3_tokens"), 0)
    files = {2: [], 3: []}
    for lo in range(0, len(tokens), size):
        hi = min(lo + size, len(tokens))
        mine = starts[(starts >= lo) & (starts < hi)] - lo
        chunk = build_chunk(tokens[lo:hi], mine, seq_len)
        for v in (2, 3):
            data = encode_chunk(chunk, level, version=v)
            files[v].append(data)
            h = read_header(data)
            r[f"v{v}"] += len(data)
            r[f"v{v}_tokens"] += h["payload_bytes"]
        r["v2_index"] += h["index_bytes"]
        v1_index = 4 * (2 * chunk.num_sequences + 1 + len(mine))
        r["v1_index"] += v1_index
        r["v1"] += HEADER_SIZE + v1_index + read_header(files[2][-1])["payload_bytes"]
    n = len(tokens)
    out = {k: v / n for k, v in r.items()}
    times = {2: [], 3: []}
    for _ in range(rounds):
        for v in (2, 3):
            t0 = time.perf_counter()
            for data in files[v]:
                decode_chunk(data)
            times[v].append(time.perf_counter() - t0)
    for v in (2, 3):
        out[f"v{v}_decode"] = n / statistics.median(times[v])
    return {"tokens": n, "documents": len(lengths), "tokens_per_doc": n / len(lengths), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk-sequences", type=int, default=64)
    ap.add_argument("--lz4-level", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    wt, ts = DATA / "corpora" / "wikitext-2" / "valid.jsonl", DATA / "corpora" / "tinyshakespeare" / "input.txt"
    if not wt.exists() or not ts.exists() or not (DATA / "tokenizers" / "gpt2").exists():
        sys.exit(f"needs {wt}, {ts} and the GPT-2 tokenizer in {DATA / 'tokenizers' / 'gpt2'}")
    with open(wt) as f:
        articles = [json.loads(line)["text"] for line in f]
    corpora = (("tinyshakespeare lines", [p for p in ts.read_text().split("\n") if p.strip()]),
               ("wikitext-2 paragraphs", [p for t in articles for p in t.split("\n") if p.strip()]),
               ("wikitext-2 articles", articles))
    print(f"seq_len {a.seq_len}, {a.chunk_sequences} sequences a chunk, LZ4 level {a.lz4_level}; bytes per token; "
          f"decode in M tokens/s (MB/s of uint16 tokens), median of {a.rounds} alternating rounds")
    print(f"{'documents':<23}{'tokens':>9}{'tok/doc':>8}{'v1':>7}{'v2':>7}{'v3':>7}{'v2 tokens':>10}{'v3 tokens':>10}"
          f"{'v1 index':>9}{'v2/3 index':>11}{'v2 decode':>16}{'v3 decode':>16}")
    for name, texts in corpora:
        r = measure(*tokenize(texts), a.seq_len, a.chunk_sequences, a.lz4_level, a.rounds)
        dec = [f"{r[f'v{v}_decode'] / 1e6:.1f} ({2 * r[f'v{v}_decode'] / 1e6:.0f})" for v in (2, 3)]
        print(f"{name:<23}{r['tokens']:>9,}{r['tokens_per_doc']:>8.1f}{r['v1']:>7.3f}{r['v2']:>7.3f}{r['v3']:>7.3f}"
              f"{r['v2_tokens']:>10.3f}{r['v3_tokens']:>10.3f}{r['v1_index']:>9.4f}{r['v2_index']:>11.4f}"
              f"{dec[0]:>16}{dec[1]:>16}")


if __name__ == "__main__":
    main()
