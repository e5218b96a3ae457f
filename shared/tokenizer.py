"""Loading a Hugging Face tokenizer and its identity: what packerd packs with and trainerd checks against.

Local tokenizers load through `tokenizers` alone (transformers would import torch); hub names go
through transformers. Either way the result wraps the Rust `tokenizers.Tokenizer` that encodes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .builtin import BUILTIN_TOKENIZER, builtin_tokenizer_dir


class TokenizerError(ValueError):
    pass


@dataclass
class TokenizerInfo:
    name: str
    vocab_hash: str
    vocab_size: int
    eos_id: int
    pad_id: int
    backend: object            # the tokenizers.Tokenizer that encodes (shared by the tokenizer threads)

    def identity(self) -> dict:
        return {"name": self.name, "vocab_hash": self.vocab_hash, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id}


def _special(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _local_backend(path: Path):
    """(tokenizers.Tokenizer, eos, pad) from a tokenizer.json and the config files beside it.

    Local tokenizers load through `tokenizers` alone: transformers would import torch (2 s) for nothing."""
    from tokenizers import Tokenizer

    tok_file = path if path.is_file() else path / "tokenizer.json"
    backend = Tokenizer.from_file(str(tok_file))
    eos = pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg_path = tok_file.parent / name
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            eos = eos or _special(cfg.get("eos_token"))
            pad = pad or _special(cfg.get("pad_token"))
    return backend, eos, pad


def _hub_backend(spec: str):
    """(tokenizers.Tokenizer, eos, pad) through transformers: hub names and folders without tokenizer.json."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(spec)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"tokenizer {spec!r} has no fast (Rust) backend; use a fast tokenizer")
    return backend, tok.eos_token, tok.pad_token


def load_tokenizer(spec: str, eos: str | None = None) -> TokenizerInfo:
    """A tokenizer by hub name, local folder or tokenizer.json path, or `builtin:bpe`."""
    path = builtin_tokenizer_dir() if spec == BUILTIN_TOKENIZER else Path(spec)
    local = path.is_file() or (path / "tokenizer.json").is_file()
    try:
        backend, cfg_eos, cfg_pad = _local_backend(path) if local else _hub_backend(spec)
    except TokenizerError:
        raise
    except Exception as e:  # hub errors, bad files: all become one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load tokenizer {spec!r}: {msg}") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    eos_token = eos if eos is not None else cfg_eos
    if eos_token is None:
        raise TokenizerError(f"tokenizer {spec!r} has no EOS token; name one with --eos")
    if eos_token not in vocab:
        raise TokenizerError(f"EOS {eos_token!r} is not a token of {spec!r}")
    eos_id = vocab[eos_token]
    pad_id = vocab.get(cfg_pad, eos_id) if cfg_pad else eos_id
    vocab_blob = json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()
    return TokenizerInfo(
        name=spec if spec == BUILTIN_TOKENIZER or not path.exists() else str(path.resolve()),
        vocab_hash=hashlib.sha256(vocab_blob).hexdigest()[:16],
        vocab_size=max(vocab.values()) + 1,
        eos_id=int(eos_id), pad_id=int(pad_id),
        backend=backend,
    )
