"""packerd through its real CLI: the exactly-once invariant, commits, notifications, modes, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import ROOT, free_endpoint, run_packerd, write_jsonl
from packerd.cli import main as packerd_cli
from shared.cache import CorruptChunk, open_cache
from shared.fsutil import FolderLock
from shared.manifest import load_manifest
from shared.protocol import Subscriber


def reference_documents(texts, tokenizer_dir) -> list[np.ndarray]:
    """Each non-empty source document tokenized on its own, EOS appended: what the cache must hold."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [np.array(tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for t in texts if t]


def assert_exactly_once(cache_dir, texts, tokenizer_dir):
    docs = list(open_cache(cache_dir).iter_documents())
    ref = reference_documents(texts, tokenizer_dir)
    assert len(docs) == len(ref), f"{len(docs)} documents in the cache, {len(ref)} in the source"
    for i, (a, b) in enumerate(zip(docs, ref)):
        assert np.array_equal(a, b), f"document {i} differs"


def test_invariant_every_document_exactly_once(tmp_path, corpus_texts, tokenizer_dir):
    # two files, an empty document, and a seq_len that does not divide the stream
    texts = list(corpus_texts)
    texts.insert(5, "")
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", texts[:40])
    write_jsonl(src / "b.jsonl", texts[40:])
    cache = tmp_path / "cache"
    run_packerd("run", "--cache-dir", cache, "--source", src, "--tokenizer", tokenizer_dir, "--seq-len", 100,
                "--chunk-sequences", 30, "--workers", 2, "--endpoint", free_endpoint(tmp_path))
    assert_exactly_once(cache, texts, tokenizer_dir)
    m = load_manifest(cache)
    assert m.finished and m.skipped == {"empty": 1} and m.documents == len(texts)
    assert m.dtype == "uint16"
    # every chunk is full except the last; only the very last sequence is short (padding, real length kept)
    assert all(c.sequences == 30 for c in m.chunks[:-1])
    lengths = [len(s) for s in open_cache(cache).iter_sequences()]
    assert all(n == 100 for n in lengths[:-1]) and 0 < lengths[-1] <= 100
    # chunk source ranges chain: each starts where the previous ended
    for a, b in zip(m.chunks, m.chunks[1:]):
        assert a.end == b.start
    assert m.chunks[0].start == [0, 0] and m.chunks[-1].end == [len(texts), 0]


def test_packer_reads_in_batches_in_order_without_importing_torch(tmp_path, corpus_texts, tokenizer_dir):
    """More records in one file than one datasets read batch, an empty record across a batch boundary, and
    the packer process never loads torch (datasets would import it for every streaming dataset)."""
    from packerd.source import READ_BATCH
    texts = [f"{k} {t}" for k in range(4) for t in corpus_texts]
    texts[READ_BATCH] = ""
    assert len(texts) > READ_BATCH + 10
    write_jsonl(tmp_path / "one.jsonl", texts)
    cache = tmp_path / "cache"
    code = ("import sys\nfrom packerd.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
            "    print('modules:', 'datasets' in sys.modules, 'torch' in sys.modules)")
    args = ["run", "--cache-dir", cache, "--source", tmp_path / "one.jsonl", "--tokenizer", tokenizer_dir,
            "--seq-len", 64, "--chunk-sequences", 50, "--workers", 2, "--endpoint", free_endpoint(tmp_path)]
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    # .jsonl is read by pyarrow (packerd/source.py), so neither datasets nor torch is even imported
    assert "modules: False False" in r.stdout, r.stdout
    assert_exactly_once(cache, texts, tokenizer_dir)
    assert load_manifest(cache).skipped == {"empty": 1}


def test_cache_is_byte_identical_whatever_the_number_of_tokenizer_threads(tmp_path, corpus_texts, tokenizer_dir,
                                                                          monkeypatch):
    """Tokenizer threads finish their batches in any order; the cache must not depend on that."""
    import packerd.pack as pack
    monkeypatch.setattr(pack, "BATCH_CHARS", 3000)  # many small batches in flight at once
    src = write_jsonl(tmp_path / "src.jsonl", [f"{k} {t}" for k in range(3) for t in corpus_texts])
    chunks = {}
    for workers in (1, 3):
        cache = tmp_path / f"cache{workers}"
        r = CliRunner().invoke(packerd_cli, ["run", "--cache-dir", str(cache), "--source", str(src), "--tokenizer",
                                             str(tokenizer_dir), "--seq-len", "64", "--chunk-sequences", "8",
                                             "--workers", str(workers), "--endpoint", free_endpoint(tmp_path)])
        assert r.exit_code == 0, r.output
        chunks[workers] = {p.name: p.read_bytes() for p in sorted(cache.glob("chunk-*"))}
    assert len(chunks[1]) > 10 and chunks[1] == chunks[3]
    assert_exactly_once(tmp_path / "cache3", [f"{k} {t}" for k in range(3) for t in corpus_texts], tokenizer_dir)


def test_real_gpt2_on_wikitext(tmp_path, gpt2_dir, wikitext_jsonl):
    texts = [json.loads(line)["text"] for line in open(wikitext_jsonl)]
    cache = tmp_path / "cache"
    run_packerd("run", "--cache-dir", cache, "--source", wikitext_jsonl, "--tokenizer", gpt2_dir, "--seq-len", 512,
                "--workers", 2, "--endpoint", free_endpoint(tmp_path))  # default chunk size: 1024 sequences
    assert_exactly_once(cache, texts, gpt2_dir)
    t = load_manifest(cache).totals()
    assert t["tokens"] == 253_647 + len(texts)  # the corpus's GPT-2 token count plus one EOS per document
    assert t["bytes_per_token"] <= 1.30


def big_source(tmp_path, corpus_texts, copies=6) -> tuple[Path, list[str]]:
    src = tmp_path / "big"
    src.mkdir()
    texts = []
    for k in range(copies):
        part = [f"copy {k}: {t}" for t in corpus_texts]
        write_jsonl(src / f"part{k}.jsonl", part)
        texts += part
    return src, texts


def test_kill9_at_random_instants_then_resume(tmp_path, corpus_texts, tokenizer_dir):
    src, texts = big_source(tmp_path, corpus_texts, copies=3)
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src),
            "--tokenizer", str(tokenizer_dir), "--seq-len", "64", "--chunk-sequences", "48", "--workers", "1",
            "--endpoint", free_endpoint(tmp_path)]
    rng = np.random.default_rng(1)
    seen_partial = []
    for kill in range(4):
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        have = len(load_manifest(cache).chunks) if (cache / "manifest.json").exists() else 0
        target = have + int(rng.integers(1, 12))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            # a reader polling the cache during the run never sees a partial chunk
            if (cache / "manifest.json").exists():
                c = open_cache(cache)
                for e in c.chunks[-2:]:
                    try:
                        c.read_chunk(e.id)
                    except CorruptChunk as err:
                        seen_partial.append(str(err))
                if len(c.chunks) >= target:
                    time.sleep(float(rng.uniform(0, 0.05)))  # land anywhere: tokenizing, writing, committing
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not seen_partial
    assert not load_manifest(cache).finished
    run_packerd(*args[3:])
    assert run_packerd("verify", "--cache-dir", cache).returncode == 0
    assert_exactly_once(cache, texts, tokenizer_dir)
    assert not list(cache.glob(".tmp-*"))


def test_notifications_reach_a_real_sub_socket(tmp_path, corpus_jsonl, tokenizer_dir):
    endpoint = free_endpoint(tmp_path)
    cache = tmp_path / "cache"
    sub = Subscriber(endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source",
                             str(corpus_jsonl), "--tokenizer", str(tokenizer_dir), "--seq-len", "64",
                             "--chunk-sequences", "64", "--workers", "1", "--endpoint", endpoint],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    # a PUB socket drops messages sent before the subscriber joins (the slow-joiner rule: the subscriber's
    # connect is retried every 100 ms until packerd binds, and a fast packer may commit its first chunks
    # before that); what it hears from then on is every message, in order (the trainer's reconciliation
    # covers the ones before, see trainerd/follow.py)
    msgs = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(m["type"] == "finished" for m in msgs):
        msgs += sub.poll(200)
    proc.wait(timeout=60)
    sub.close()
    chunks = [m for m in msgs if m["type"] == "chunk"]
    m = load_manifest(cache)
    assert chunks and chunks[-1]["chunk_id"] == m.chunks[-1].id
    assert [c["chunk_id"] for c in chunks] == [e.id for e in m.chunks[chunks[0]["chunk_id"]:]]
    assert chunks[-1]["total_sequences"] == m.total_sequences
    assert msgs[-1]["type"] == "finished" and msgs[-1]["total_tokens"] == m.total_tokens
    seqs = [m["seq"] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no message lost on the way
    for c in chunks:  # the manifest already listed the chunk when it was announced
        assert m.chunks[c["chunk_id"]].committed_at == c["committed_at"] <= c["sent_at"]


def test_inverse_mode_restores_deleted_and_corrupt_chunks_byte_identical(tmp_path, make_cache, tokenizer_dir):
    cache = make_cache(seq_len=64, chunk_sequences=16)
    m = load_manifest(cache)
    assert len(m.chunks) >= 6
    files = {e.id: (cache / e.file).read_bytes() for e in m.chunks}
    untouched_mtime = (cache / m.chunks[0].file).stat().st_mtime_ns
    (cache / m.chunks[2].file).unlink()
    (cache / m.chunks[3].file).unlink()
    (cache / m.chunks[-1].file).unlink()  # the short final chunk too
    bad = bytearray(files[4])
    bad[len(bad) // 2] ^= 1
    (cache / m.chunks[4].file).write_bytes(bytes(bad))
    proc = run_packerd("verify", "--cache-dir", cache, "--quarantine", check=False)
    assert proc.returncode == 1 and "bad chunk 4" in proc.stdout and "bad chunk 2" in proc.stdout
    run_packerd("run", "--cache-dir", cache, "--mode", "inverse", "--workers", 1, "--endpoint", free_endpoint(tmp_path))
    for e in m.chunks:
        assert (cache / e.file).read_bytes() == files[e.id], f"chunk {e.id} differs"
    assert (cache / m.chunks[0].file).stat().st_mtime_ns == untouched_mtime
    assert load_manifest(cache).chunks == m.chunks


def test_a_version_2_cache_is_regenerated_in_version_2(tmp_path, make_cache):
    """A cache packed before chunk format 3 (its manifest without chunk_format): inverse mode regenerates its
    chunks byte for byte in version 2."""
    from shared.chunk import decode_chunk, encode_chunk, file_checksum
    cache = make_cache(seq_len=64, chunk_sequences=16)
    m = load_manifest(cache)
    for e in m.chunks:  # the cache as the version-2 packer wrote it
        data = encode_chunk(decode_chunk((cache / e.file).read_bytes()), m.lz4_level, version=2)
        (cache / e.file).write_bytes(data)
        e.bytes, e.checksum = len(data), file_checksum(data)
    d = m.to_json()
    del d["chunk_format"]
    for name in ("manifest.json", "manifest.log"):
        (cache / name).unlink()
    (cache / "manifest.json").write_text(json.dumps(d))
    files = {e.id: (cache / e.file).read_bytes() for e in m.chunks}
    (cache / m.chunks[1].file).unlink()
    (cache / m.chunks[-1].file).unlink()
    run_packerd("run", "--cache-dir", cache, "--mode", "inverse", "--workers", 1, "--endpoint", free_endpoint(tmp_path))
    for e in m.chunks:
        assert (cache / e.file).read_bytes() == files[e.id], f"chunk {e.id} differs"
    assert load_manifest(cache).chunk_format == 2


def test_a_version_3_cache_is_regenerated_in_version_3(tmp_path, make_cache):
    """Version 3 is asked for, not the default: a restart keeps it, and inverse mode regenerates its chunks
    byte for byte in version 3."""
    from shared.chunk import read_header
    cache = make_cache(seq_len=64, chunk_sequences=16, extra=("--chunk-format", "3"))
    m = load_manifest(cache)
    assert m.chunk_format == 3 and {read_header((cache / e.file).read_bytes())["version"] for e in m.chunks} == {3}
    files = {e.id: (cache / e.file).read_bytes() for e in m.chunks}
    (cache / m.chunks[1].file).unlink()
    run_packerd("run", "--cache-dir", cache, "--mode", "inverse", "--workers", 1, "--endpoint", free_endpoint(tmp_path))
    assert all((cache / e.file).read_bytes() == files[e.id] for e in m.chunks)
    assert load_manifest(cache).chunk_format == 3


def test_verify_names_a_flipped_byte(tmp_path, make_cache):
    cache = make_cache()
    m = load_manifest(cache)
    assert run_packerd("verify", "--cache-dir", cache).returncode == 0
    p = cache / m.chunks[1].file
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x40
    p.write_bytes(bytes(data))
    proc = run_packerd("verify", "--cache-dir", cache, "--json", check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert [b["chunk_id"] for b in report["bad"]] == [1]


def test_a_second_packer_on_the_same_cache_refuses(tmp_path, corpus_jsonl, tokenizer_dir):
    cache = tmp_path / "cache"
    cache.mkdir()
    with FolderLock(cache):
        proc = run_packerd("run", "--cache-dir", cache, "--source", corpus_jsonl, "--tokenizer", tokenizer_dir,
                           "--endpoint", free_endpoint(tmp_path), check=False)
    assert proc.returncode != 0
    assert "another packer is running on this cache" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cache / "manifest.json").exists()


def test_restart_continues_and_refuses_changed_settings(tmp_path, make_cache, corpus_texts, tokenizer_dir):
    cache = make_cache()
    before = load_manifest(cache)
    # a finished cache: restarting with the same settings does nothing
    proc = run_packerd("run", "--cache-dir", cache, "--endpoint", free_endpoint(tmp_path))
    assert "is finished" in proc.stderr and load_manifest(cache).chunks == before.chunks
    proc = run_packerd("run", "--cache-dir", cache, "--seq-len", 128, "--endpoint", free_endpoint(tmp_path), check=False)
    assert proc.returncode != 0 and "seq_len 64 (now 128)" in proc.stderr
    proc = run_packerd("run", "--cache-dir", cache, "--force-rebuild", "--yes", "--seq-len", 128,
                       "--endpoint", free_endpoint(tmp_path))
    assert load_manifest(cache).seq_len == 128
    assert_exactly_once(cache, corpus_texts, tokenizer_dir)


@pytest.mark.parametrize("damage", ["truncated snapshot", "log deleted"])
def test_force_rebuild_replaces_a_manifest_that_cannot_be_read(tmp_path, make_cache, corpus_texts, corpus_jsonl,
                                                              tokenizer_dir, damage):
    cache = make_cache()
    if damage == "truncated snapshot":
        (cache / "manifest.json").write_bytes((cache / "manifest.json").read_bytes()[:40])
    else:
        (cache / "manifest.log").unlink()
    proc = run_packerd("run", "--cache-dir", cache, "--endpoint", free_endpoint(tmp_path), check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("Error:")
    run_packerd("run", "--cache-dir", cache, "--source", corpus_jsonl, "--tokenizer",
                tokenizer_dir, "--seq-len", 64, "--chunk-sequences", 16, "--force-rebuild", "--yes",
                "--endpoint", free_endpoint(tmp_path))
    assert_exactly_once(cache, corpus_texts, tokenizer_dir)


def test_force_rebuild_deletes_only_what_packerd_and_the_trainer_wrote(tmp_path, make_cache, corpus_jsonl,
                                                                       tokenizer_dir):
    # asked of the wrong folder (or of a cache kept among other files), a rebuild took the folders named
    # holdout and quarantine whole
    proj = tmp_path / "proj"
    (proj / "holdout").mkdir(parents=True)
    (proj / "quarantine").mkdir()
    (proj / "holdout" / "eval_set.jsonl").write_text("{}\n")
    (proj / "quarantine" / "notes.txt").write_text("mine")
    (proj / "README").write_text("mine")
    (proj / "quarantine" / "chunk-0000003.lz4.1700000000").write_bytes(b"moved aside by a trainer")
    args = ("run", "--cache-dir", proj, "--source", corpus_jsonl, "--tokenizer", tokenizer_dir, "--seq-len", 64,
            "--chunk-sequences", 16, "--endpoint", free_endpoint(tmp_path))
    run_packerd(*args, "--force-rebuild", "--yes")
    assert (proj / "holdout" / "eval_set.jsonl").exists() and (proj / "quarantine" / "notes.txt").exists()
    assert (proj / "README").exists() and not (proj / "quarantine" / "chunk-0000003.lz4.1700000000").exists()
    assert load_manifest(proj).finished
    # a held-out cache cannot go where other files are; it is made and rebuilt where there are none
    proc = run_packerd(*args, "--force-rebuild", "--yes", "--holdout", 0.1, check=False)
    assert proc.returncode != 0 and "holds files that are not a cache's (eval_set.jsonl)" in proc.stderr
    (proj / "holdout" / "eval_set.jsonl").unlink()
    run_packerd(*args, "--force-rebuild", "--yes", "--holdout", 0.1)
    assert load_manifest(proj / "holdout").holdout_of
    run_packerd(*args, "--force-rebuild", "--yes")
    assert not (proj / "holdout").exists() and load_manifest(proj).holdout is None


def test_a_file_where_a_folder_of_the_cache_goes_is_a_one_line_error(tmp_path, make_cache, corpus_jsonl,
                                                                     tokenizer_dir):
    cache = make_cache()
    (cache / "holdout").write_text("a stray file")
    args = ("run", "--cache-dir", cache, "--source", corpus_jsonl, "--tokenizer", tokenizer_dir, "--seq-len", 64,
            "--chunk-sequences", 16, "--endpoint", free_endpoint(tmp_path))
    proc = run_packerd(*args, "--force-rebuild", "--yes", "--holdout", 0.1, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error:") and "is a file" in proc.stderr
    run_packerd(*args, "--force-rebuild", "--yes")          # without --holdout the file is left alone
    assert (cache / "holdout").read_text() == "a stray file" and load_manifest(cache).finished
    other = tmp_path / "other"
    (other / "manifest.json").mkdir(parents=True)
    for argv in (("status", "--cache-dir", other), ("run", "--cache-dir", other, "--endpoint", free_endpoint(tmp_path))):
        proc = run_packerd(*argv, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("Error:")


def test_follow_mode_packs_files_that_appear(tmp_path, corpus_texts, tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", corpus_texts[:20])
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--cache-dir", str(cache), "--source", str(src),
                             "--tokenizer", str(tokenizer_dir), "--seq-len", "64", "--chunk-sequences", "16",
                             "--workers", "1", "--follow", "--endpoint", free_endpoint(tmp_path)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        def wait_for(pred, what):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                m = load_manifest(cache) if (cache / "manifest.json").exists() else None
                if m and pred(m):
                    return m
                time.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}")
        first = wait_for(lambda m: m.documents >= 19, "the first file")
        write_jsonl(src / "b.jsonl", corpus_texts[20:40])
        m = wait_for(lambda m: m.total_tokens > first.total_tokens and m.documents >= 39, "the second file")
        assert not m.finished
        assert [f["path"].rsplit("/", 1)[-1] for f in m.source_files] == ["a.jsonl", "b.jsonl"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    # the partial window still in memory at SIGTERM was not committed; a run without --follow finishes it
    run_packerd("run", "--cache-dir", cache, "--endpoint", free_endpoint(tmp_path))
    assert_exactly_once(cache, corpus_texts[:40], tokenizer_dir)


def test_a_source_of_many_files_logs_each_file_once_and_restarts(tmp_path, corpus_texts, tokenizer_dir):
    # each commit-log record carried the whole source_files list, so records (and the log) grew with the
    # number of files; now a record holds the files counted since the last commit
    src = tmp_path / "src"
    src.mkdir()
    texts = [t for t in corpus_texts if t][:60] * 4
    for k, t in enumerate(texts):
        write_jsonl(src / f"part-{k:04d}.jsonl", [t])
    cache = tmp_path / "cache"
    args = ("run", "--cache-dir", cache, "--source", src, "--tokenizer", tokenizer_dir, "--seq-len", 64,
            "--chunk-sequences", 4, "--workers", 1, "--endpoint", free_endpoint(tmp_path))
    proc = run_packerd(*args, check=False, env=dict(os.environ, STREAMPACK_FAULT="torn-append:40"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr      # killed mid-append, as by kill -9
    run_packerd(*args)
    assert_exactly_once(cache, texts, tokenizer_dir)
    m = load_manifest(cache)
    assert [f["docs"] for f in m.source_files] == [1] * len(texts)
    from shared.commitlog import LOG_HEADER_SIZE, parse_records
    from shared.manifest import read_manifest
    data = (cache / "manifest.log").read_bytes()
    payloads, _ = parse_records(read_manifest(cache)[1].id, data[LOG_HEADER_SIZE:], LOG_HEADER_SIZE)
    assert len(payloads) > 50 and max(map(len, payloads)) < 2000  # the whole list is about 30 KB


def test_status_and_config_file(tmp_path, corpus_jsonl, tokenizer_dir):
    cfg = tmp_path / "pack.toml"
    cfg.write_text(f'cache_dir = "{tmp_path / "cache"}"\nsource = ["{corpus_jsonl}"]\ntokenizer = "{tokenizer_dir}"\n'
                   f'seq_len = 32\nchunk_sequences = 100\nworkers = 1\nendpoint = "{free_endpoint(tmp_path)}"\n')
    run_packerd("run", "--config", cfg, "--seq-len", 48)  # the flag wins over the file
    proc = run_packerd("status", "--cache-dir", tmp_path / "cache", "--json")
    info = json.loads(proc.stdout)
    assert info["seq_len"] == 48 and info["finished"] is True
    assert info["tokens"] == load_manifest(tmp_path / "cache").total_tokens
    assert info["estimate"]["tokens"] >= info["tokens"] and info["estimate"]["method"] == "file-sizes"
    human = run_packerd("status", "--cache-dir", tmp_path / "cache").stdout
    assert "finished     yes" in human


# -- bad input: one line, non-zero exit, nothing written -----------------------------------------------------

def _bad(tmp_path, tokenizer_dir, *args, tokenizer=True):
    cache = tmp_path / "cache"
    argv = ["run", "--cache-dir", str(cache), "--endpoint", free_endpoint(tmp_path), "--workers", "1", *map(str, args)]
    if tokenizer:
        argv += ["--tokenizer", str(tokenizer_dir)]
    result = CliRunner().invoke(packerd_cli, argv)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [l for l in result.output.splitlines() if l.startswith("Error")]
    assert len(lines) == 1, result.output
    m = load_manifest(cache) if (cache / "manifest.json").exists() else None
    assert m is None or not m.chunks
    assert not list(cache.glob("chunk-*")) and not list(cache.glob(".tmp-*"))
    return lines[0]


def test_bad_inputs(tmp_path, tokenizer_dir, corpus_jsonl):
    d = tmp_path
    (d / "badjson.jsonl").write_text('{"text": "fine"}\nnot json at all\n')
    (d / "nonutf8.jsonl").write_bytes(b'{"text": "caf\xe9 \xff"}\n')
    (d / "nofield.jsonl").write_text('{"body": "hello"}\n')
    (d / "notstr.jsonl").write_text('{"text": 12}\n')
    (d / "data.csv").write_text("a,b\n")
    cases = {
        "does not exist": ["--source", d / "missing.jsonl"],
        "not valid JSON": ["--source", d / "badjson.jsonl"],
        "not UTF-8": ["--source", d / "nonutf8.jsonl"],
        "has no field 'text'": ["--source", d / "nofield.jsonl"],
        "is a int, not text": ["--source", d / "notstr.jsonl"],
        "unsupported file type": ["--source", d / "data.csv"],
        "seq_len must be at least 2": ["--source", corpus_jsonl, "--seq-len", 1],
        "chunk_sequences must be at least 1": ["--source", corpus_jsonl, "--chunk-sequences", 0],
        "endpoint must start with": ["--source", corpus_jsonl, "--endpoint", "http://x"],
        "not valid TOML": ["--source", corpus_jsonl, "--config", d / "bad.toml"],
    }
    (d / "bad.toml").write_text("seq_len = = 3\n")
    for expect, args in cases.items():
        line = _bad(tmp_path, tokenizer_dir, *args)
        assert expect in line or (expect == "not valid JSON" and "cannot be read" in line), (expect, line)


def test_bad_tokenizers(tmp_path, tokenizer_dir, corpus_jsonl):
    line = _bad(tmp_path, tokenizer_dir, "--source", corpus_jsonl, "--tokenizer", "no-such-org/no-such-tokenizer", tokenizer=False)
    assert "cannot load tokenizer" in line
    # a tokenizer with no EOS is refused unless --eos names one
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<sep>"], show_progress=False))
    tok.save(str(tmp_path / "noeos.json"))
    line = _bad(tmp_path, tokenizer_dir, "--source", corpus_jsonl, "--tokenizer", tmp_path / "noeos.json", tokenizer=False)
    assert "has no EOS token" in line
    line = _bad(tmp_path, tokenizer_dir, "--source", corpus_jsonl, "--tokenizer", tmp_path / "noeos.json", "--eos", "<nope>", tokenizer=False)
    assert "is not a token of" in line
    run_packerd("run", "--cache-dir", tmp_path / "ok", "--source", corpus_jsonl, "--tokenizer", tmp_path / "noeos.json",
                       "--eos", "<sep>", "--workers", 1, "--endpoint", free_endpoint(tmp_path))
    assert load_manifest(tmp_path / "ok").tokenizer["eos_id"] == 0


def test_bad_record_after_commits_keeps_what_was_committed(tmp_path, corpus_texts, tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", corpus_texts)
    (src / "b.jsonl").write_text('{"text": "ok"}\n{broken\n')
    cache = tmp_path / "cache"
    proc = run_packerd("run", "--cache-dir", cache, "--source", src, "--tokenizer", tokenizer_dir, "--seq-len", 64,
                       "--chunk-sequences", 16, "--workers", 1, "--endpoint", free_endpoint(tmp_path), check=False)
    assert proc.returncode == 1 and "b.jsonl" in proc.stderr and "committed chunks are intact" in proc.stderr
    m = load_manifest(cache)
    assert m.chunks and not m.finished
    assert run_packerd("verify", "--cache-dir", cache).returncode == 0
    write_jsonl(src / "b.jsonl", ["ok", "fixed"])  # repair the file and continue
    run_packerd("run", "--cache-dir", cache, "--endpoint", free_endpoint(tmp_path))
    assert_exactly_once(cache, list(corpus_texts) + ["ok", "fixed"], tokenizer_dir)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_is_a_clear_error_and_loses_nothing(tmp_path, corpus_texts, tokenizer_dir):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "160k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        src, texts = big_source(tmp_path, corpus_texts, copies=2)
        proc = run_packerd("run", "--cache-dir", mnt / "cache", "--source", src, "--tokenizer", tokenizer_dir,
                           "--seq-len", 64, "--chunk-sequences", 32, "--workers", 1, "--endpoint", free_endpoint(tmp_path),
                           check=False)
        assert proc.returncode == 1, proc.stderr
        assert "disk full" in proc.stderr and "Traceback" not in proc.stderr
        m = load_manifest(mnt / "cache")
        assert m.chunks and not m.finished
        assert not list((mnt / "cache").glob(".tmp-*"))
        assert run_packerd("verify", "--cache-dir", mnt / "cache").returncode == 0
    finally:
        subprocess.run(["umount", str(mnt)])


def test_curve_endpoint_only_serves_subscribers_with_keys(tmp_path, corpus_jsonl, tokenizer_dir):
    keys = tmp_path / "keys"
    run_packerd("keys", keys)
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0  # secrets readable by the owner only
    endpoint = free_endpoint(tmp_path)
    with_keys, without = Subscriber(endpoint, curve_dir=keys), Subscriber(endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "packerd", "run", "--cache-dir", str(tmp_path / "cache"),
                             "--source", str(corpus_jsonl), "--tokenizer", str(tokenizer_dir), "--workers", "1",
                             "--endpoint", endpoint, "--curve-dir", str(keys)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    got, stolen = [], []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(m["type"] == "finished" for m in got):
        got += with_keys.poll(100)
        stolen += without.poll(0)
    proc.wait(timeout=30)
    stolen += without.poll(200)
    with_keys.close()
    without.close()
    assert any(m["type"] == "finished" for m in got)
    assert stolen == []


def test_cache_files_follow_the_umask(tmp_path, corpus_jsonl, tokenizer_dir):
    cache = tmp_path / "cache"
    run_packerd("run", "--cache-dir", cache, "--source", corpus_jsonl, "--tokenizer", tokenizer_dir, "--workers", 1,
                "--endpoint", free_endpoint(tmp_path), preexec_fn=lambda: os.umask(0o027))
    files = [p for p in cache.iterdir() if p.is_file()]
    assert files
    for p in files:
        mode = p.stat().st_mode & 0o777
        assert mode & 0o002 == 0, f"{p.name} is world-writable ({oct(mode)})"
        assert mode & 0o027 == 0, f"{p.name} ignores the umask ({oct(mode)})"


def test_hub_code_path_with_metadata_estimate(tmp_path, corpus_texts, tokenizer_dir):
    """`hf:NAME` goes through datasets.load_dataset(streaming=True) and the split sizes of the dataset card;
    a local dataset folder stands in for the hub (no network here). The card claims twice the real rows, so
    the estimate must come out near twice the packed tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    ds = tmp_path / "hub_dataset"
    (ds / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": corpus_texts}), ds / "data" / "train-00000-of-00001.parquet")
    (ds / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  splits:\n  - name: train\n"
        f"    num_examples: {2 * len(corpus_texts)}\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train\n    path: data/train-*\n---\n")
    cache = tmp_path / "cache"
    run_packerd("run", "--cache-dir", cache, "--source", f"hf:{ds}", "--tokenizer", tokenizer_dir, "--workers", 1,
                "--seq-len", 64, "--chunk-sequences", 16, "--endpoint", free_endpoint(tmp_path))
    assert_exactly_once(cache, corpus_texts, tokenizer_dir)
    m = load_manifest(cache)
    assert m.estimate["method"] == "dataset-metadata"
    assert 1.8 < m.estimate["tokens"] / m.total_tokens < 2.2


def test_chunk_format_2_is_chosen_once_for_the_life_of_the_cache(tmp_path, make_cache):
    from shared.chunk import read_header
    cache = make_cache(seq_len=64, chunk_sequences=16, extra=("--chunk-format", "2"))
    m = load_manifest(cache)
    assert m.chunk_format == 2 and {read_header((cache / e.file).read_bytes())["version"] for e in m.chunks} == {2}
    proc = run_packerd("run", "--cache-dir", cache, "--chunk-format", "3", "--endpoint", free_endpoint(tmp_path),
                       check=False)
    assert proc.returncode == 1 and "chunk_format 2 (now 3)" in proc.stderr
