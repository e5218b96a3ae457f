"""The batch encoders the tokenizer threads share: `tokenizers` (hf) or tiktoken, and the guard between them.

`--tokenizer-engine auto` encodes with tiktoken when the Hugging Face tokenizer converts to it exactly
(packerd/tiktoken_convert.py), else with `tokenizers`; both give the same ids, so a cache is the same
bytes whichever engine packs it, and a restart may switch. The guard checks that promise: at start on
PROBE_TEXTS, and while packing on every GUARD_EVERY-th batch, the tiktoken ids are compared with
`tokenizers`' and any difference stops the packer before that batch is used.
"""
from __future__ import annotations

import os
import unicodedata

import numpy as np

from shared.tokenizer import TokenizerInfo

from .tiktoken_convert import NotConvertible, to_tiktoken

ENGINES = ("auto", "tiktoken", "hf")
GUARD_EVERY = 100  # batches of a session between two guarded ones (the first is guarded): about 1% of them


class EngineError(ValueError):
    pass


class Diverged(Exception):
    """The guard found a document the engines encode differently; `position` is its place in the batch."""

    def __init__(self, position: int):
        super().__init__(position)
        self.position = position


def probe_texts() -> list[str]:
    """Text that tends to split differently under two regex engines: a character of every Unicode category
    from every block, long runs of spaces, digits and newlines, contractions in both cases, emoji (with
    joiners and skin tones), special tokens written in the text."""
    by_cat: dict[str, list[str]] = {}
    for cp in range(0x20, 0x30000, 7):
        if not 0xD800 <= cp < 0xE000:
            by_cat.setdefault(unicodedata.category(chr(cp)), []).append(chr(cp))
    texts = ["".join(chars) for chars in by_cat.values()]
    texts += [" ".join(chars[:400]) for chars in by_cat.values()]
    texts += [" " * 1000 + "x", "1" * 1000, " 12345678901234567890 3.14159 1,000,000 ", "\n" * 50 + " \n\t \r\n",
              "I'M he'LL we'Ve they'RE it'S I'd 'tis can't",
              "\U0001F468\u200D\U0001F469\u200D\U0001F467 \U0001F44D\U0001F3FD \u2764\uFE0F flags \U0001F1EB\U0001F1F7", "a<|endoftext|>b <|endoftext|>\n<|endoftext|><|endoftext|>",
              "Ａｂｃ ﬁ ǅ Ⅸ ½ x² ‐‑ \u00a0\u2009\u3000 \u0301e \u200b", "def f(x):\n    return x  # tab\there\n\n\n"]
    return texts


class Engine:
    """Encodes documents to token ids with one of the engines; `name` is what progress and manifest show."""

    def __init__(self, name: str, tok: TokenizerInfo, encoding=None, specials: frozenset = frozenset()):
        self.name = name
        self.hf = tok.backend
        self.core = encoding._core_bpe if encoding is not None else None
        self.specials = specials

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (no EOS)."""
        if self.core is None:
            return self.encode_hf(texts)
        core, specials = self.core, self.specials
        # the buffer call skips a list of Python ints per token; the GIL is released while it encodes
        return [np.frombuffer(core.encode_to_tiktoken_buffer(t, specials), dtype=np.uint32) for t in texts]

    def encode_hf(self, texts: list[str]) -> list[np.ndarray]:
        encs = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def differs(self, texts: list[str], ids: list[np.ndarray]) -> int | None:
        """Position of the first text whose ids differ from `tokenizers`' (None: all equal)."""
        ref = self.encode_hf(texts)
        return next((i for i, (a, b) in enumerate(zip(ids, ref)) if not np.array_equal(a, b)), None)


def choose_engine(tok: TokenizerInfo, wanted: str) -> tuple[Engine, str]:
    """The engine to pack with and why; EngineError when tiktoken is asked for and cannot be exact."""
    if wanted == "hf":
        return Engine("hf", tok), "asked for"
    try:
        encoding, specials = to_tiktoken(tok.backend.to_str(), tok.name)
    except NotConvertible as e:
        if wanted == "tiktoken":
            raise EngineError(f"--tokenizer-engine tiktoken: {tok.name} cannot be encoded exactly by tiktoken "
                              f"({e}); use --tokenizer-engine hf or auto") from None
        return Engine("hf", tok), f"no exact tiktoken conversion: {e}"
    engine = Engine("tiktoken", tok, encoding, specials)
    probes = probe_texts()
    bad = engine.differs(probes, engine.encode(probes))
    if bad is not None:
        msg = f"tiktoken and tokenizers encode the probe text {probes[bad][:40]!r} differently"
        if wanted == "tiktoken":
            raise EngineError(f"--tokenizer-engine tiktoken: {msg}; use --tokenizer-engine hf or auto")
        return Engine("hf", tok), msg
    return engine, "converted exactly (probe text checked)"


class BatchEncoder:
    """Encodes batches of documents; one instance is shared by all tokenizer threads.

    Both engines release the GIL while they encode, so threads of one process tokenize in parallel.
    Threads share one copy of the vocabulary, merges and word cache: on the 2-core test box that made
    them a few percent faster per token than the same work in worker processes (bench/bench_workers.py)."""

    def __init__(self, engine: Engine, eos_id: int, dtype: str):
        # each thread encodes its own batch serially; rayon threads inside a call would oversubscribe cores
        # (read by tokenizers at each call)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.engine = engine
        self.eos = np.array([eos_id], dtype=np.uint32)
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str], guard: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all texts, each followed by EOS, concatenated; and each document's length.

        guard: compare with `tokenizers` first; Diverged names the first differing text."""
        ids = self.engine.encode(texts)
        if guard and self.engine.core is not None:
            bad = self.engine.differs(texts, ids)
            if bad is not None:
                raise Diverged(bad)
        lengths = np.fromiter((len(a) + 1 for a in ids), dtype=np.int64, count=len(ids))
        pieces = [self.eos] * (2 * len(ids))
        pieces[::2] = ids
        return np.concatenate(pieces).astype(self.dtype, copy=False), lengths
