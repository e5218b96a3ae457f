"""Tokenizer engines (--tokenizer-engine): tiktoken converted from the Hugging Face tokenizer encodes like
`tokenizers` on adversarial text, packs the same cache bytes, and the guard refuses what differs."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, free_endpoint, run_packerd, write_jsonl

from packerd.tiktoken_convert import KNOWN_SPLIT_PATTERNS
from packerd.tokenizer import choose_engine, probe_texts
from shared.manifest import load_manifest
from shared.tokenizer import load_tokenizer


def adversarial_texts(corpus_texts) -> list[str]:
    """Every Unicode category (probe_texts), runs of spaces and digits, emoji, the EOS token written in the
    text, paragraphs, and a 1 MB document."""
    big = "\n\n".join(corpus_texts)
    big = (big * (1_000_000 // len(big) + 1))[:1_000_000]
    return probe_texts() + [
        " " * 5000 + "a" + " " * 3, "9" * 5000 + " 0" * 300, "<|endoftext|>", "doc<|endoftext|>doc <|endoftext|> x",
        "\U0001F600" * 500 + " \U0001F9D1\U0001F3FF\u200D\U0001F680", "\t\t\n \n\r\n  \u00a0\u00a0x",
        *[p for t in corpus_texts[:10] for p in t.split("\n\n") if p.strip()], big]


def tokenizer_variant(tmp_path: Path, tokenizer_dir: Path, name: str, **changes) -> Path:
    """A copy of the test tokenizer folder with top-level tokenizer.json entries replaced."""
    out = tmp_path / name
    shutil.copytree(tokenizer_dir, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec.update(changes)
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def split_pre_tokenizer(pattern: str) -> dict:
    """Llama-3 / Qwen2 style: a regex Split, then byte-level mapping without its own regex."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def assert_same_ids(tok_path, texts):
    engine, why = choose_engine(load_tokenizer(str(tok_path)), "auto")
    assert engine.name == "tiktoken", why
    for t, a, b in zip(texts, engine.encode(texts), engine.encode_hf(texts)):
        assert np.array_equal(a, b), f"engines differ on {t[:60]!r}"


def test_builtin_bpe_converts_and_encodes_like_tokenizers(tokenizer_dir, corpus_texts):
    assert_same_ids(tokenizer_dir, adversarial_texts(corpus_texts))


def test_gpt2_converts_and_encodes_like_tokenizers(gpt2_dir, corpus_texts, wikitext_jsonl):
    wiki = [json.loads(line)["text"] for line in wikitext_jsonl.read_text().splitlines()]
    assert_same_ids(gpt2_dir, adversarial_texts(corpus_texts) + wiki)


@pytest.mark.parametrize("pattern", KNOWN_SPLIT_PATTERNS, ids=["llama3", "qwen2"])
def test_llama3_and_qwen2_split_patterns_encode_like_tokenizers(tmp_path, tokenizer_dir, corpus_texts, pattern):
    variant = tokenizer_variant(tmp_path, tokenizer_dir, "split", pre_tokenizer=split_pre_tokenizer(pattern))
    assert_same_ids(variant, adversarial_texts(corpus_texts))


def cache_bytes(cache: Path) -> tuple[dict, list]:
    """Every chunk file's bytes and the manifest's chunk records without their commit times."""
    m = load_manifest(cache)
    files = {p.name: p.read_bytes() for p in sorted(cache.glob("chunk-*.lz4"))}
    return files, [(c.id, c.checksum, c.bytes, c.tokens, c.start, c.end) for c in m.chunks]


def pack(tmp_path, name, src, tok, engine, *extra, check=True, start=("-m", "packerd")):
    return run_packerd("run", "--cache-dir", tmp_path / name, "--source", src, "--tokenizer", tok,
                       "--tokenizer-engine", engine, "--seq-len", 64, "--chunk-sequences", 16, "--workers", 2,
                       "--endpoint", free_endpoint(tmp_path), *extra, check=check, start=start)


def test_cache_is_byte_identical_with_either_engine_and_a_switch_mid_pack(tmp_path, tokenizer_dir, corpus_texts):
    src = write_jsonl(tmp_path / "adv.jsonl", adversarial_texts(corpus_texts))
    for engine in ("auto", "tiktoken", "hf"):
        proc = pack(tmp_path, engine, src, tokenizer_dir, engine)
        shown = "hf" if engine == "hf" else "tiktoken"
        assert f"({shown})" in proc.stderr  # the progress line names the engine
        assert load_manifest(tmp_path / engine).tokenizer_engines == [{"engine": shown, "from_chunk": 0}]
    ref = cache_bytes(tmp_path / "hf")
    assert len(ref[0]) > 10
    assert cache_bytes(tmp_path / "auto") == ref and cache_bytes(tmp_path / "tiktoken") == ref
    # a restart that switches engine: hf, paced and stopped after a few chunks, then tiktoken to the end
    args = [sys.executable, "-m", "packerd", "run", "--cache-dir", str(tmp_path / "switch"), "--source", str(src),
            "--tokenizer", str(tokenizer_dir), "--tokenizer-engine", "hf", "--seq-len", "64",
            "--chunk-sequences", "16", "--max-tokens-per-s", "20000", "--endpoint", free_endpoint(tmp_path)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        m = load_manifest(tmp_path / "switch") if (tmp_path / "switch" / "manifest.json").exists() else None
        if m and len(m.chunks) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stopped = load_manifest(tmp_path / "switch")
    assert not stopped.finished and 3 <= len(stopped.chunks) < len(ref[0])
    pack(tmp_path, "switch", src, tokenizer_dir, "tiktoken")
    assert cache_bytes(tmp_path / "switch") == ref
    assert load_manifest(tmp_path / "switch").tokenizer_engines == [
        {"engine": "hf", "from_chunk": 0}, {"engine": "tiktoken", "from_chunk": len(stopped.chunks)}]


def test_lone_surrogates_in_json_are_the_same_error_with_either_engine(tmp_path, tokenizer_dir):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "pair \\ud83d\\ude00"}\n')
    errors = []
    for engine in ("tiktoken", "hf"):
        proc = pack(tmp_path, engine, src, tokenizer_dir, engine, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and lines[-1].startswith("Error: ") and "surrogate" in lines[-1]
        errors.append(lines[-1])
        assert not (tmp_path / engine).exists()
    assert errors[0] == errors[1]


@pytest.mark.parametrize("change", [
    {"normalizer": {"type": "NFC"}},
    {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}},
    {"pre_tokenizer": split_pre_tokenizer(r"\s+|\w+|[^\s\w]+")},
], ids=["nfc-normalizer", "prefix-space", "unknown-split"])
def test_tiktoken_forced_on_a_tokenizer_it_cannot_express_is_refused(tmp_path, tokenizer_dir, corpus_jsonl, change):
    variant = tokenizer_variant(tmp_path, tokenizer_dir, "variant", **change)
    proc = pack(tmp_path, "cache", corpus_jsonl, variant, "tiktoken", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: --tokenizer-engine tiktoken: ")
    assert not (tmp_path / "cache").exists()
    # auto falls back to tokenizers and says so
    proc = pack(tmp_path, "cache", corpus_jsonl, variant, "auto")
    assert "tokenizer engine hf (no exact tiktoken conversion" in proc.stderr
    assert load_manifest(tmp_path / "cache").tokenizer_engines == [{"engine": "hf", "from_chunk": 0}]


# `packerd run` in which the tiktoken engine gets the first id of one document (the text in the file named by
# argv[1]) wrong, as a conversion with a flaw the start-up probe missed would: what the guard is there to
# stop. Patched here, in the test's subprocess, so that the packer's encode path carries no test hook.
DIVERGING_PACKERD = """
import sys
from pathlib import Path
import numpy as np
from packerd.cli import main
from packerd.tokenizer import Engine

target = Path(sys.argv.pop(1)).read_text(encoding="utf-8")
encode = Engine.encode

def diverging(self, texts):
    ids = encode(self, texts)
    if self.core is None:  # the hf engine is `tokenizers` itself, what the guard compares with
        return ids
    return [np.concatenate([a[:1] ^ 1, a[1:]]) if t == target else a for t, a in zip(texts, ids)]

Engine.encode = diverging
main(prog_name="packerd")
"""


def test_guard_stops_a_divergence_while_packing(tmp_path, tokenizer_dir, corpus_texts):
    src = write_jsonl(tmp_path / "src.jsonl", corpus_texts)
    (tmp_path / "diverging.txt").write_text(corpus_texts[7], encoding="utf-8")  # document 7, once in the corpus
    diverging = ("-c", DIVERGING_PACKERD, tmp_path / "diverging.txt")
    proc = pack(tmp_path, "cache", src, tokenizer_dir, "auto", check=False, start=diverging)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[-1].startswith("Error: tokenizer engines differ: tiktoken and tokenizers encode document 7 "
                                "differently")
    assert not (tmp_path / "cache").exists()  # document 7 is in the first batch: nothing was committed
    # the hf engine is not guarded against itself, and the patch only touches tiktoken's ids
    pack(tmp_path, "cache", src, tokenizer_dir, "hf", start=diverging)


def incomplete_merges_tokenizer(folder: Path) -> Path:
    """A byte-level BPE that passes every conversion rule yet encodes differently: "he" merges before "th",
    and "the" comes only from "th" + "e". `tokenizers` leaves "t" + "he" apart; tiktoken joins any two
    pieces whose concatenation is a token, so it makes "the". Only encoding text can tell."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab |= {"he": 256, "th": 257, "the": 258, "<|endoftext|>": 259}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("t", "h"), ("th", "e")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


def test_a_conversion_that_encodes_differently_is_refused_at_start(tmp_path, corpus_jsonl):
    tok = incomplete_merges_tokenizer(tmp_path / "tok")
    proc = pack(tmp_path, "cache", corpus_jsonl, tok, "tiktoken", check=False)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: --tokenizer-engine tiktoken: tiktoken and tokenizers encode the probe text"), line
    assert not (tmp_path / "cache").exists()
    proc = pack(tmp_path, "cache", corpus_jsonl, tok, "auto")
    assert "tokenizer engine hf (tiktoken and tokenizers encode the probe text" in proc.stderr
