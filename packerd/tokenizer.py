"""The batch encoder the tokenizer threads share.

packerd encodes with the Rust `tokenizers.Tokenizer` that shared.tokenizer.load_tokenizer returns.
"""
from __future__ import annotations

import os

import numpy as np


class BatchEncoder:
    """Encodes batches of documents; one instance is shared by all tokenizer threads.

    `tokenizers` releases the GIL while it encodes, so threads of one process tokenize in parallel.
    Threads share one copy of the vocabulary, merges and word cache: on the 2-core test box that made
    them a few percent faster per token than the same work in worker processes (bench/bench_workers.py)."""

    def __init__(self, backend, eos_id: int, dtype: str):
        # each thread encodes its own batch serially; rayon threads inside a call would oversubscribe cores
        # (read by tokenizers at each call)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.tok = backend
        self.eos = eos_id
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all texts, each followed by EOS, concatenated; and each document's length."""
        encs = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e) + 1 for e in encs), dtype=np.int64, count=len(encs))
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for e, n in zip(encs, lengths):
            out[pos:pos + n - 1] = e.ids
            out[pos + n - 1] = self.eos
            pos += n
        return out, lengths
