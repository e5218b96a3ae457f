"""Loading a Hugging Face tokenizer, its identity, and the worker-side batch encoder.

The worker side imports only numpy and `tokenizers`: worker processes start in a fraction of a second
and receive the tokenizer as its JSON serialisation rather than loading transformers.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class TokenizerError(ValueError):
    pass


@dataclass
class TokenizerInfo:
    name: str
    vocab_hash: str
    vocab_size: int
    eos_id: int
    pad_id: int
    backend_json: str          # tokenizers.Tokenizer serialised, for the workers

    def identity(self) -> dict:
        return {"name": self.name, "vocab_hash": self.vocab_hash, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id}


def load_tokenizer(spec: str, eos: str | None = None) -> TokenizerInfo:
    """A tokenizer by hub name, local folder or tokenizer.json path, or `builtin:bpe`."""
    import transformers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from .builtin import BUILTIN_TOKENIZER, builtin_tokenizer_dir

    transformers.logging.set_verbosity_error()
    path = builtin_tokenizer_dir() if spec == BUILTIN_TOKENIZER else Path(spec)
    try:
        if path.is_file() and path.suffix == ".json":
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        else:
            tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except Exception as e:  # hub errors, bad files: all become one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load tokenizer {spec!r}: {msg}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"tokenizer {spec!r} has no fast (Rust) backend; use a fast tokenizer")
    vocab = tok.get_vocab()
    if eos is not None:
        if eos not in vocab:
            raise TokenizerError(f"--eos {eos!r} is not a token of {spec!r}")
        eos_id = vocab[eos]
    elif tok.eos_token_id is not None:
        eos_id = tok.eos_token_id
    else:
        raise TokenizerError(f"tokenizer {spec!r} has no EOS token; name one with --eos")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    vocab_blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return TokenizerInfo(
        name=spec if spec == BUILTIN_TOKENIZER or not path.exists() else str(path.resolve()),
        vocab_hash=hashlib.sha256(vocab_blob).hexdigest()[:16],
        vocab_size=max(len(tok), max(vocab.values()) + 1),
        eos_id=int(eos_id), pad_id=int(pad_id),
        backend_json=backend.to_str(),
    )


# ---- worker side -------------------------------------------------------------------------------
_worker: dict = {}


def init_worker(backend_json: str, eos_id: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; no rayon threads inside
    from tokenizers import Tokenizer
    _worker["tok"] = Tokenizer.from_str(backend_json)
    _worker["eos"] = eos_id
    _worker["dtype"] = np.dtype(dtype)


def encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all texts, each followed by EOS, concatenated; and each document's length."""
    tok, eos, dtype = _worker["tok"], _worker["eos"], _worker["dtype"]
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
    out = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for e, n in zip(encs, lengths):
        out[pos:pos + n - 1] = e.ids
        out[pos + n - 1] = eos
        pos += n
    return out, lengths
