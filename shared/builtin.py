"""The embedded default: a corpus and a tokenizer that need no network.

`builtin:pydoc` is CPython's own documentation text (the `pydoc_data.topics` module that ships with
every Python): about 80 documents, 0.47 MB. `builtin:stdlib` is the standard library's own source code:
about 550 files, 10 MB. `builtin:bpe` is a byte-level BPE tokenizer trained on the documentation text
once and cached as a Hugging Face tokenizer folder. packerd reads the corpus as a source; packerd
and trainerd both resolve `builtin:bpe` to the cached folder.
"""
from __future__ import annotations

import os
from pathlib import Path

BUILTIN_SOURCE = "builtin:pydoc"
STDLIB_SOURCE = "builtin:stdlib"
BUILTIN_TOKENIZER = "builtin:bpe"
BUILTIN_VOCAB = 4096
EOS = "<|endoftext|>"


def pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def stdlib_documents() -> list[str]:
    """The standard library's own Python source files, one document each, in path order: about 550 files
    and 10 MB in CPython 3.11 (tests, idlelib, encodings and site-packages left out). The same on every run
    of one Python installation, so a restart or `--mode inverse` reads the same documents."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    # tests, the IDE and the codecs' generated tables (long runs of repeated lines) are left out
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "encodings", "__pycache__"}
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # a file another encoding declares: the corpus stays the same without it
    return docs


# the embedded sources packerd reads by name
BUILTIN_SOURCES = {BUILTIN_SOURCE: pydoc_documents, STDLIB_SOURCE: stdlib_documents}


def cache_home() -> Path:
    return Path(os.environ.get("STREAMPACK_HOME", Path.home() / ".cache" / "streampack"))


def train_bpe(texts, vocab_size: int, out_dir: str | os.PathLike) -> Path:
    """Train a byte-level BPE with an EOS token and save it as a folder AutoTokenizer can load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first; theirs is identical
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def builtin_tokenizer_dir(vocab_size: int = BUILTIN_VOCAB) -> Path:
    """The cached built-in tokenizer folder, trained on first use (about a second)."""
    out = cache_home() / "tokenizers" / f"pydoc-bpe-{vocab_size}"
    if not (out / "tokenizer.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        train_bpe(pydoc_documents(), vocab_size, out)
    return out
