"""Fixtures built on the fly: a small corpus (CPython's pydoc topics), a BPE tokenizer trained on it, caches.

Tests on the real corpora in ../shared/data skip with a visible reason where that folder is absent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the slow fault and soak tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    # the built-in tokenizer cache and HF caches go to a temporary folder, never the user's home
    home = tmp_path_factory.mktemp("home")
    old = {k: os.environ.get(k) for k in ("STREAMPACK_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")}
    os.environ["STREAMPACK_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pydoc_texts() -> list[str]:
    from shared.builtin import pydoc_documents
    return pydoc_documents()


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """About 80 real documents (0.47 MB) of CPython's documentation."""
    return pydoc_texts()


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, field: t}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, corpus_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "pydoc.jsonl", corpus_texts)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_texts) -> Path:
    """A byte-level BPE (vocabulary 512, EOS <|endoftext|> = 0) saved as a Hugging Face folder."""
    from shared.builtin import train_bpe
    return train_bpe(corpus_texts, 512, tmp_path_factory.mktemp("tok") / "bpe512")


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    p = SHARED_DATA / "tokenizers" / "gpt2"
    if not p.exists():
        pytest.skip(f"real GPT-2 tokenizer not present ({p} is absent)")
    return p


@pytest.fixture(scope="session")
def wikitext_jsonl() -> Path:
    p = SHARED_DATA / "corpora" / "wikitext-2" / "valid.jsonl"
    if not p.exists():
        pytest.skip(f"real corpus not present ({p} is absent)")
    return p


def run_packerd(*args, check: bool = True, timeout: float = 300, start=("-m", "packerd"),
                **kw) -> subprocess.CompletedProcess:
    """Run the real `packerd` CLI in a subprocess. start: Python's arguments that run it (a test may give
    ("-c", code, ...) that patches packerd before it calls packerd.cli.main)."""
    proc = subprocess.run([sys.executable, *map(str, start), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"packerd {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def run_trainerd(*args, fault: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the real `trainerd` in a subprocess. fault: the trainer's fault hook TRAINERD_FAULT (a kill at a
    known step); unset otherwise, so that one in the outer environment never reaches a test's trainer."""
    env = dict(os.environ)
    env.pop("TRAINERD_FAULT", None)
    if fault:
        env["TRAINERD_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "trainerd", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


def records(run_dir: Path, run: str, k: int) -> list[dict]:
    """The lines of the training log of run `run`'s k-th start (steps and events)."""
    with open(run_dir / "training_logs" / f"{run}_run_{k}.jsonl") as f:
        return [json.loads(line) for line in f]


def free_port() -> int:
    """A TCP port free now on the loopback (for accelerate's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_endpoint(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/packerd.sock"


@pytest.fixture
def make_cache(tmp_path, corpus_jsonl, tokenizer_dir):
    """make_cache(seq_len=64, chunk_sequences=16, **flags) -> cache folder packed by the real packerd."""
    def make(name: str = "cache", seq_len: int = 64, chunk_sequences: int = 16, source=None, workers: int = 1, extra=()):
        cache = tmp_path / name
        run_packerd("run", "--cache-dir", cache, "--source", source or corpus_jsonl, "--tokenizer", tokenizer_dir,
                    "--seq-len", seq_len, "--chunk-sequences", chunk_sequences, "--workers", workers,
                    "--endpoint", free_endpoint(tmp_path), *extra)
        return cache
    return make
