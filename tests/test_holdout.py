"""`packerd run --holdout F` through the real CLI: every document in exactly one of the two caches, chosen by
the hash of its index; restarts after kill -9 and from either cache being behind; inverse mode; the restart
refusal; the `cache: holdout` notifications; the protocol's and the manifest's optional fields."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from conftest import ROOT, free_endpoint, run_packerd, write_jsonl
from packerd.holdout import HOLDOUT_HASH, HOLDOUT_SEED
from shared.cache import CorruptChunk, open_cache
from shared.manifest import Manifest, load_manifest
from shared.protocol import PROTOCOL_VERSION, ProtocolError, Subscriber, validate
from test_packerd import reference_documents

FRACTION = 0.2
PACK = ["--tokenizer", None, "--seq-len", "64", "--chunk-sequences", "16", "--workers", "1", "--holdout", str(FRACTION)]


def selected(n: int) -> list[bool]:
    """The documents the issue's rule holds out, computed here from its definition (not packerd's code)."""
    limit = int(FRACTION * 2 ** 64)
    return [xxhash.xxh64_intdigest(i.to_bytes(8, "little"), seed=HOLDOUT_SEED) < limit for i in range(n)]


def pack_args(cache: Path, src: Path, tokenizer_dir, endpoint: str) -> list[str]:
    args = ["run", "--cache-dir", str(cache), "--source", str(src), *PACK, "--endpoint", endpoint]
    args[args.index("--tokenizer") + 1] = str(tokenizer_dir)
    return args


def cache_bytes(cache: Path) -> dict:
    """Both caches' chunk files and manifest chunk entries (without their commit times)."""
    out = {}
    for folder in (cache, cache / "holdout"):
        m = load_manifest(folder)
        out[folder.name] = ([(e.id, e.sequences, e.tokens, e.bytes, e.checksum, e.start, e.end, e.documents)
                             for e in m.chunks],
                            {p.name: p.read_bytes() for p in sorted(folder.glob("chunk-*.lz4"))})
    return out


def assert_split_exactly_once(cache: Path, texts: list[str], tokenizer_dir) -> None:
    """Each non-empty source document is in the held-out cache if the hash selects its index, else in the main
    one; each cache holds its documents in source order, each once."""
    ref = reference_documents(texts, tokenizer_dir)
    nonempty = [held for held, t in zip(selected(len(texts)), texts) if t]
    want = {"main": [d for d, h in zip(ref, nonempty) if not h], "holdout": [d for d, h in zip(ref, nonempty) if h]}
    for name, folder in (("main", cache), ("holdout", cache / "holdout")):
        docs = list(open_cache(folder).iter_documents())
        assert len(docs) == len(want[name]), f"{name}: {len(docs)} documents, {len(want[name])} expected"
        for i, (a, b) in enumerate(zip(docs, want[name])):
            assert np.array_equal(a, b), f"{name} document {i} differs"


@pytest.fixture(scope="module")
def source(tmp_path_factory, corpus_texts) -> tuple[Path, list[str]]:
    """Two files, 158 documents, one of them empty."""
    src = tmp_path_factory.mktemp("holdout_src")
    texts = []
    for k in range(2):
        part = [f"copy {k}: {t}" for t in corpus_texts]
        if k == 0:
            part.insert(7, "")
        write_jsonl(src / f"part{k}.jsonl", part)
        texts += part
    return src, texts


@pytest.fixture(scope="module")
def reference(tmp_path_factory, source, tokenizer_dir) -> Path:
    """An uninterrupted run with --holdout 0.2: what every other run must reproduce byte for byte."""
    tmp = tmp_path_factory.mktemp("holdout_ref")
    cache = tmp / "cache"
    run_packerd(*pack_args(cache, source[0], tokenizer_dir, free_endpoint(tmp)))
    return cache


def test_every_document_lands_once_in_the_cache_its_hash_chooses(reference, source, tokenizer_dir):
    src, texts = source
    assert_split_exactly_once(reference, texts, tokenizer_dir)
    main, held = load_manifest(reference), load_manifest(reference / "holdout")
    assert main.holdout == held.holdout == {"fraction": FRACTION, "hash": HOLDOUT_HASH}
    assert main.holdout_of is None and held.holdout_of == "cache"
    for name in ("seq_len", "chunk_sequences", "dtype", "tokenizer", "lz4_level", "sources"):
        assert getattr(main, name) == getattr(held, name), name
    assert main.finished and held.finished
    # the empty record is counted once, by the cache its index goes to
    empty_held = selected(len(texts))[7]
    assert (held if empty_held else main).skipped == {"empty": 1} and (main if empty_held else held).skipped == {}
    share = sum(selected(len(texts))) / len(texts)
    assert 0.1 < share < 0.3 and 0 < held.total_tokens < main.total_tokens  # documents differ in length
    for m in (main, held):  # chunk source ranges chain inside each cache
        assert all(a.end == b.start for a, b in zip(m.chunks, m.chunks[1:]))
        assert all(c.sequences == 16 for c in m.chunks[:-1])
    assert run_packerd("verify", "--cache-dir", reference / "holdout").returncode == 0
    info = json.loads(run_packerd("status", "--cache-dir", reference, "--json").stdout)
    assert info["holdout"] == {"fraction": FRACTION, "cache_dir": str(reference / "holdout"), "chunks": len(held.chunks),
                               "sequences": held.total_sequences, "tokens": held.total_tokens, "finished": True}
    assert "held out     " in run_packerd("status", "--cache-dir", reference).stdout
    assert json.loads(run_packerd("status", "--cache-dir", reference / "holdout", "--json").stdout)["holdout_of"] == "cache"


def _wait_and_kill(proc, cache: Path, folder: str, target: int, rng, partial: list) -> None:
    """SIGKILL proc soon after `folder` (main or holdout) holds `target` chunks, reading the newest chunks of
    both caches meanwhile: a reader must never see a partial one."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        counts = {}
        for name, d in (("main", cache), ("holdout", cache / "holdout")):
            if (d / "manifest.json").exists():
                c = open_cache(d)
                counts[name] = len(c.chunks)
                for e in c.chunks[-2:]:
                    try:
                        c.read_chunk(e.id)
                    except CorruptChunk as err:
                        partial.append(str(err))
        if counts.get(folder, 0) >= target:
            time.sleep(float(rng.uniform(0, 0.03)))  # land anywhere: tokenizing, writing, committing
            break
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill9_then_restart_gives_both_caches_byte_identical(tmp_path, reference, source, tokenizer_dir):
    src, texts = source
    cache = tmp_path / "cache"
    args = pack_args(cache, src, tokenizer_dir, free_endpoint(tmp_path))
    rng = np.random.default_rng(7)
    partial = []
    for folder in ("main", "holdout", "main", "holdout"):  # kills just after a commit to one cache or the other
        d = cache if folder == "main" else cache / "holdout"
        have = len(load_manifest(d).chunks) if (d / "manifest.json").exists() else 0
        proc = subprocess.Popen([sys.executable, "-m", "packerd", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_and_kill(proc, cache, folder, have + int(rng.integers(1, 6 if folder == "holdout" else 20)), rng, partial)
    assert not partial
    assert not load_manifest(cache).finished
    run_packerd(*args)
    assert cache_bytes(cache) == cache_bytes(reference)
    assert_split_exactly_once(cache, texts, tokenizer_dir)
    assert not list(cache.glob(".tmp-*")) and not list((cache / "holdout").glob(".tmp-*"))


def _roll_back(folder: Path, keep: int) -> None:
    """What a crash after the keep-th commit of this cache leaves: the manifest of then, no later chunk."""
    m = load_manifest(folder)
    for e in m.chunks[keep:]:
        (folder / e.file).unlink()
    m.chunks = m.chunks[:keep]
    m.documents = m.chunks[-1].end[0] if m.chunks else 0
    m.finished = False
    m.save(folder)


@pytest.mark.parametrize("behind", ["main", "holdout"])
def test_restart_reads_from_the_cache_that_is_behind(tmp_path, reference, source, tokenizer_dir, behind):
    """Each cache resumes at its own end, whichever of the two is further back in the source."""
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    main, held = load_manifest(cache), load_manifest(cache / "holdout")
    if behind == "main":
        _roll_back(cache, len(main.chunks) // 3)
        _roll_back(cache / "holdout", len(held.chunks) * 2 // 3)
    else:
        _roll_back(cache / "holdout", len(held.chunks) // 3)
        _roll_back(cache, len(main.chunks) * 2 // 3)
    ends = {"main": load_manifest(cache).chunks[-1].end, "holdout": load_manifest(cache / "holdout").chunks[-1].end}
    assert ends[behind] < ends["holdout" if behind == "main" else "main"]
    run_packerd(*pack_args(cache, source[0], tokenizer_dir, free_endpoint(tmp_path)))
    assert cache_bytes(cache) == cache_bytes(reference)


def test_inverse_mode_regenerates_chunks_of_both_caches(tmp_path, reference, source, tokenizer_dir):
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    held = load_manifest(cache / "holdout")
    (cache / "holdout" / held.chunks[1].file).unlink()
    (cache / "holdout" / held.chunks[-1].file).unlink()  # the short final one, which needs the source's end
    bad = bytearray((cache / "chunk-0000003.lz4").read_bytes())
    bad[len(bad) // 2] ^= 1
    (cache / "chunk-0000003.lz4").write_bytes(bytes(bad))
    assert run_packerd("verify", "--cache-dir", cache, "--quarantine", check=False).returncode == 1
    proc = run_packerd("run", "--cache-dir", cache, "--mode", "inverse", "--holdout", FRACTION,
                       "--endpoint", free_endpoint(tmp_path))
    assert "regenerating 2 missing chunk(s) of the held-out cache" in proc.stderr, proc.stderr
    assert cache_bytes(cache) == cache_bytes(reference)


def test_a_restart_keeps_the_holdout_or_is_refused(tmp_path, make_cache):
    with_holdout = make_cache("with", extra=("--holdout", FRACTION))
    without = make_cache("without")
    before = {d: (d / "manifest.json").read_bytes() for d in (with_holdout, with_holdout / "holdout", without)}
    ep = free_endpoint(tmp_path)
    for cache, extra, expect in [(with_holdout, ["--holdout", "0.3"], "holdout 0.2 (now 0.3)"),
                                 (with_holdout, [], "holdout 0.2 (now None)"),
                                 (without, ["--holdout", "0.2"], "holdout None (now 0.2)"),
                                 (with_holdout / "holdout", ["--holdout", "0.2"], "is the held-out cache of")]:
        proc = run_packerd("run", "--cache-dir", cache, "--endpoint", ep, *extra, check=False)
        errors = [l for l in proc.stderr.splitlines() if l.startswith("Error")]
        assert proc.returncode == 1 and len(errors) == 1 and expect in errors[0], proc.stderr
    assert before == {d: (d / "manifest.json").read_bytes() for d in before}
    # the same --holdout continues (here: finished, nothing to do)
    assert "is finished" in run_packerd("run", "--cache-dir", with_holdout, "--holdout", FRACTION, "--endpoint", ep).stderr


def test_held_out_commits_are_announced_with_cache_holdout(tmp_path, corpus_jsonl, tokenizer_dir):
    endpoint = free_endpoint(tmp_path)
    cache = tmp_path / "cache"
    sub = Subscriber(endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "packerd", *pack_args(cache, corpus_jsonl, tokenizer_dir, endpoint)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    msgs = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(m["type"] == "finished" and "cache" not in m for m in msgs):
        msgs += sub.poll(200)
    proc.wait(timeout=60)
    sub.close()
    main, held = load_manifest(cache), load_manifest(cache / "holdout")
    chunks = [m for m in msgs if m["type"] == "chunk"]
    assert {m.get("cache") for m in chunks} == {None, "holdout"}
    assert [c["chunk_id"] for c in chunks if "cache" not in c] == [e.id for e in main.chunks]
    assert [c["chunk_id"] for c in chunks if c.get("cache") == "holdout"] == [e.id for e in held.chunks]
    for c in chunks:  # the manifest of the cache named already listed the chunk when it was announced
        m = held if c.get("cache") == "holdout" else main
        assert m.chunks[c["chunk_id"]].committed_at == c["committed_at"]
    finished = [m for m in msgs if m["type"] == "finished"]
    assert [m.get("cache") for m in finished] == ["holdout", None]  # the main cache's last, as before
    assert finished[0]["total_tokens"] == held.total_tokens and finished[1]["total_tokens"] == main.total_tokens
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one publisher, no message lost


def test_follow_mode_hands_over_the_complete_windows_of_both_caches(tmp_path, corpus_texts, tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", corpus_texts[:20])
    cache = tmp_path / "cache"
    args = pack_args(cache, src, tokenizer_dir, free_endpoint(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "packerd", *args, "--follow"], cwd=ROOT, stderr=subprocess.PIPE, text=True)

    def wait_for(last_doc: int) -> list[Manifest]:
        """Both manifests, once one of them has reached the last document (the other may end before it)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (cache / "holdout" / "manifest.json").exists() and (cache / "manifest.json").exists():
                ms = [load_manifest(cache), load_manifest(cache / "holdout")]
                if max(m.documents for m in ms) >= last_doc:
                    return ms
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for document {last_doc}")
    try:
        wait_for(19)
        write_jsonl(src / "b.jsonl", corpus_texts[20:40])
        for m in wait_for(39):  # only whole windows while the source may grow
            assert not m.finished and m.total_tokens == m.total_sequences * 64
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    run_packerd(*args)  # without --follow: both partial windows, which were still in memory, are packed now
    assert_split_exactly_once(cache, corpus_texts[:40], tokenizer_dir)


def test_protocol_accepts_a_str_cache_field_only():
    base = {"v": PROTOCOL_VERSION, "type": "chunk", "run": "r", "seq": 0, "chunk_id": 0, "sequences": 1, "tokens": 5,
            "total_sequences": 1, "total_tokens": 5, "est_total_sequences": 1, "committed_at": 1.0}
    fin = {"v": PROTOCOL_VERSION, "type": "finished", "run": "r", "seq": 1, "total_sequences": 1, "total_tokens": 5}
    for msg in (base, fin):
        assert validate(dict(msg)) and validate({**msg, "cache": "holdout"})
        for bad in (1, None, True, b"holdout"):
            with pytest.raises(ProtocolError, match="cache"):
                validate({**msg, "cache": bad})


def test_a_message_whose_type_or_version_is_not_a_plain_value_is_a_protocol_error():
    # a list or map as the type does not even hash: the follower thread died on it and stopped the run
    import msgpack

    from shared.protocol import decode
    fin = {"v": PROTOCOL_VERSION, "type": "finished", "run": "r", "seq": 1, "total_sequences": 1, "total_tokens": 5}
    assert decode(msgpack.packb(fin)) == fin
    for bad in ({"type": ["finished"]}, {"type": {"a": 1}}, {"v": True}, {"v": [1]}):
        with pytest.raises(ProtocolError):
            decode(msgpack.packb({**fin, **bad}))


def test_manifest_holdout_keys_are_optional():
    m = Manifest(seq_len=8, chunk_sequences=2, dtype="uint16", tokenizer={}, sources=["x"])
    d = m.to_json()
    assert "holdout" not in d and "holdout_of" not in d  # a cache without a holdout: the manifest as before
    assert Manifest.from_json(d).holdout is None
    m.holdout, m.holdout_of = {"fraction": 0.1, "hash": HOLDOUT_HASH}, "cache"
    back = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert back.holdout == m.holdout and back.holdout_of == "cache"


def test_empty_records_counted_when_the_held_out_cache_finished_are_not_counted_again(tmp_path, tokenizer_dir):
    # the held-out cache finishes first, counting the empty records after its last chunk; killed before the
    # main cache's finish, the restart read those records again and counted them twice
    n = 40  # the main cache's tokens fit one chunk: its first commit writes a snapshot, its finish appends
    texts = ["" if held else f"record {i} of the main cache." for i, held in enumerate(selected(n))]
    src = write_jsonl(tmp_path / "src.jsonl", texts)
    cache = tmp_path / "cache"
    args = pack_args(cache, src, tokenizer_dir, free_endpoint(tmp_path))
    proc = run_packerd(*args, check=False, env={**os.environ, "STREAMPACK_FAULT": "torn-append:1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    held = load_manifest(cache / "holdout")
    assert held.finished and held.skipped == {"empty": sum(selected(n))} and not load_manifest(cache).finished
    run_packerd(*args)
    assert load_manifest(cache).finished
    assert load_manifest(cache / "holdout").skipped == {"empty": sum(selected(n))}
