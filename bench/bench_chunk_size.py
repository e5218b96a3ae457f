"""Bytes per token on disk of chunk format v2 against v1, on paragraph-sized documents.

    python bench/bench_chunk_size.py [--seq-len 1024] [--chunk-sequences 64] [--lz4-level 9]

Corpora (GPT-2 tokenizer, an EOS after each document): ../shared/data/corpora/tinyshakespeare/input.txt one
document per non-empty line (about 10 tokens each), wikitext-2 valid one document per paragraph (about
100 tokens) and per article (about 4,000). The chunks are cut as packerd cuts them
(packerd.pack.build_chunk) and encoded with today's encoder (v2); the v1 figure is the same chunks' v1 size
(64-byte header + uint32 lengths, doc_ptr and doc_starts + the same LZ4 token block), computed in the same
run. The index columns are what the sequence and document index costs per token in each version.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from packerd.pack import build_chunk
from shared.chunk import HEADER_SIZE, encode_chunk, read_header


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(DATA / "tokenizers" / "gpt2" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids = [e.ids + [eos] for e in tok.encode_batch(texts, add_special_tokens=False)]
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    return np.concatenate([np.asarray(i, dtype=np.uint16) for i in ids]), lengths


def measure(tokens, lengths, seq_len: int, chunk_sequences: int, level: int) -> dict:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    size = seq_len * chunk_sequences
    v1 = v2 = index1 = index2 = tokens_bytes = 0
    for lo in range(0, len(tokens), size):
        hi = min(lo + size, len(tokens))
        mine = starts[(starts >= lo) & (starts < hi)] - lo
        chunk = build_chunk(tokens[lo:hi], mine, seq_len)
        data = encode_chunk(chunk, level)
        h = read_header(data)
        v2 += len(data)
        index2 += h["index_bytes"]
        tokens_bytes += h["payload_bytes"]
        index1 += 4 * (2 * chunk.num_sequences + 1 + len(mine))
        v1 += HEADER_SIZE + 4 * (2 * chunk.num_sequences + 1 + len(mine)) + h["payload_bytes"]
    n = len(tokens)
    return {"tokens": n, "documents": len(lengths), "tokens_per_doc": n / len(lengths),
            "v1": v1 / n, "v2": v2 / n, "lz4_tokens": tokens_bytes / n, "v1_index": index1 / n, "v2_index": index2 / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk-sequences", type=int, default=64)
    ap.add_argument("--lz4-level", type=int, default=9)
    a = ap.parse_args()
    wt, ts = DATA / "corpora" / "wikitext-2" / "valid.jsonl", DATA / "corpora" / "tinyshakespeare" / "input.txt"
    if not wt.exists() or not ts.exists() or not (DATA / "tokenizers" / "gpt2").exists():
        sys.exit(f"needs {wt}, {ts} and the GPT-2 tokenizer in {DATA / 'tokenizers' / 'gpt2'}")
    with open(wt) as f:
        articles = [json.loads(line)["text"] for line in f]
    corpora = (("tinyshakespeare lines", [p for p in ts.read_text().split("\n") if p.strip()]),
               ("wikitext-2 paragraphs", [p for t in articles for p in t.split("\n") if p.strip()]),
               ("wikitext-2 articles", articles))
    print(f"seq_len {a.seq_len}, {a.chunk_sequences} sequences a chunk, LZ4 level {a.lz4_level}; bytes per token")
    print(f"{'documents':<23}{'tokens':>9}{'tok/doc':>9}{'v1':>7}{'v2':>7}{'LZ4 tokens':>12}{'v1 index':>10}{'v2 index':>10}")
    for name, texts in corpora:
        r = measure(*tokenize(texts), a.seq_len, a.chunk_sequences, a.lz4_level)
        print(f"{name:<23}{r['tokens']:>9,}{r['tokens_per_doc']:>9.1f}{r['v1']:>7.3f}{r['v2']:>7.3f}"
              f"{r['lz4_tokens']:>12.3f}{r['v1_index']:>10.4f}{r['v2_index']:>10.4f}")


if __name__ == "__main__":
    main()
