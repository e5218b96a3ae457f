"""The manifest's commit log beside its snapshot: what a reader sees after commits, torn records, new
snapshots, a replaced cache, and a cache of version 1 (manifest.json alone). Real files, no processes."""
import json

import pytest

import shared.manifest as manifest_mod
from shared.cache import CacheError, CacheReplaced, open_cache
from shared.commitlog import LOG_HEADER_SIZE, parse_records
from shared.manifest import (
    LOG_NAME,
    MANIFEST_NAME,
    ChunkEntry,
    Manifest,
    ManifestWriter,
    load_manifest,
    read_manifest,
)


def new_manifest() -> Manifest:
    return Manifest(seq_len=64, chunk_sequences=4, dtype="uint16", sources=["src"],
                    tokenizer={"name": "t", "vocab_hash": "h", "vocab_size": 50, "eos_id": 0, "pad_id": 0})


def add_chunk(m: Manifest, checksum_of=lambda i: f"{i:016x}") -> ChunkEntry:
    i = len(m.chunks)
    e = ChunkEntry(id=i, sequences=4, tokens=250 + i, bytes=300 + i, checksum=checksum_of(i), start=[i, 0],
                   end=[i + 1, 0], documents=1, committed_at=1000.0 + i)
    m.chunks.append(e)
    m.documents = i + 1
    m.estimate = {"tokens": 10_000, "sequences": 160, "method": "test"}
    return e


def same(a: Manifest, b: Manifest) -> bool:
    return a.chunks == b.chunks and {k: v for k, v in vars(a).items() if not k.startswith("_")} == \
        {k: v for k, v in vars(b).items() if not k.startswith("_")}


def commit_n(tmp_path, n: int, writer: ManifestWriter | None = None, m: Manifest | None = None):
    m = m or new_manifest()
    writer = writer or ManifestWriter(tmp_path)
    for _ in range(n):
        add_chunk(m)
        writer.commit(m)
    return m, writer


def test_every_commit_is_read_back_whole(tmp_path):
    m, w = new_manifest(), ManifestWriter(tmp_path)
    for k in range(1, 30):
        add_chunk(m)
        m.skipped["empty"] = k  # a dict edited in place is logged too
        if k == 29:
            m.finished = True
        w.commit(m, snapshot=m.finished)
        back = load_manifest(tmp_path)
        assert same(back, m), k
    assert back.total_sequences == 4 * 29
    snap = json.loads((tmp_path / MANIFEST_NAME).read_bytes())
    assert snap["version"] == 2 and next(iter(snap)) == "log"
    assert len(snap["chunks"]["id"]) == 29 and snap["finished"]  # finished: manifest.json complete on its own
    assert snap["totals"]["chunks"] == 29


def test_one_commit_appends_one_record_and_leaves_the_snapshot(tmp_path):
    m, w = commit_n(tmp_path, 3)
    snap, size = (tmp_path / MANIFEST_NAME).read_bytes(), (tmp_path / LOG_NAME).stat().st_size
    add_chunk(m)
    w.commit(m)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == snap
    data = (tmp_path / LOG_NAME).read_bytes()
    payloads, end = parse_records(read_manifest(tmp_path)[1].id, data[size:], size)
    assert len(payloads) == 1 and end == len(data)
    assert json.loads(payloads[0])["chunks"][0][0] == 3


def test_a_snapshot_is_rewritten_once_the_log_outgrows_it(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "SNAPSHOT_MIN_BYTES", 2000)
    m, w = new_manifest(), ManifestWriter(tmp_path)
    offsets = []
    for _ in range(60):
        add_chunk(m)
        w.commit(m)
        offsets.append(json.loads((tmp_path / MANIFEST_NAME).read_bytes())["log"]["offset"])
        assert same(load_manifest(tmp_path), m)
    assert len(set(offsets)) > 2                           # rewritten several times, never on every commit
    assert len(set(offsets)) < 20


@pytest.mark.parametrize("cut", ["header", "half", "all_but_one", "checksum"])
def test_a_torn_last_record_is_ignored_and_cut_off_by_the_next_writer(tmp_path, cut):
    m, w = commit_n(tmp_path, 5)
    w.close()
    log = tmp_path / LOG_NAME
    before = log.stat().st_size
    add_chunk(m)
    w = ManifestWriter(tmp_path)
    w.commit(m)
    w.close()
    data = log.read_bytes()
    rec = data[before:]
    torn = {"header": rec[:5], "half": rec[:len(rec) // 2], "all_but_one": rec[:-1],
            "checksum": rec[:6] + bytes([rec[6] ^ 1]) + rec[7:]}[cut]
    log.write_bytes(data[:before] + torn)                  # what a kill -9 mid-append leaves
    back = load_manifest(tmp_path)
    assert len(back.chunks) == 5 and same(back, load_manifest(tmp_path))
    cache = open_cache(tmp_path)
    assert not cache.refresh() and len(cache.chunks) == 5
    # the packer restarts from the 5 chunks, commits the sixth again: the torn bytes are gone
    again = load_manifest(tmp_path)
    add_chunk(again)
    w = ManifestWriter(tmp_path)
    w.commit(again)
    assert same(load_manifest(tmp_path), again)
    assert cache.refresh() and len(cache.chunks) == 6
    _, end = parse_records(read_manifest(tmp_path)[1].id, log.read_bytes()[LOG_HEADER_SIZE:], LOG_HEADER_SIZE)
    assert end == log.stat().st_size                       # nothing invalid left in the log


def test_refresh_reads_only_new_records_into_the_same_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "SNAPSHOT_MIN_BYTES", 1500)
    m, w = commit_n(tmp_path, 3)
    cache = open_cache(tmp_path)
    mine = cache.manifest
    assert not cache.refresh()
    for k in range(40):                                    # across several snapshot rewrites (the same log)
        add_chunk(m)
        w.commit(m)
        assert cache.refresh() and len(cache.chunks) == len(m.chunks)
        assert cache.manifest is mine                      # applied in place: nothing re-read from the start
    assert same(cache.manifest, m) and cache.manifest.total_tokens == m.total_tokens
    cache.check_unchanged()


def test_a_rebuilt_cache_is_named_and_a_deleted_one_is_gone(tmp_path):
    commit_n(tmp_path, 4)[1].close()
    cache = open_cache(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()                    # packerd --force-rebuild: snapshot, then log
    (tmp_path / LOG_NAME).unlink()
    with pytest.raises(CacheError, match="manifest disappeared"):
        cache.refresh()
    with pytest.raises(CacheError, match="manifest disappeared"):
        cache.check_unchanged()
    other = new_manifest()
    for _ in range(6):
        add_chunk(other, checksum_of=lambda i: f"{i + 7:016x}")
    ManifestWriter(tmp_path).commit(other)
    with pytest.raises(CacheReplaced, match="chunk 0 has checksum"):
        cache.check_unchanged()
    with pytest.raises(CacheReplaced, match="chunk 0 has checksum"):
        cache.refresh()
    assert len(cache.chunks) == 4                          # the old manifest stays


def test_a_version_1_cache_is_read_and_continued_with_a_log(tmp_path):
    m = new_manifest()
    for _ in range(3):
        add_chunk(m)
    m.save(tmp_path)                                       # manifest.json alone, as before the log
    assert not (tmp_path / LOG_NAME).exists()
    cache = open_cache(tmp_path)
    assert cache.log is None and same(load_manifest(tmp_path), m)
    m = load_manifest(tmp_path)
    add_chunk(m)
    w = ManifestWriter(tmp_path)
    w.commit(m)                                            # a new log and a snapshot naming it
    add_chunk(m)
    w.commit(m)
    assert (tmp_path / LOG_NAME).exists() and same(load_manifest(tmp_path), m)
    assert cache.refresh() and len(cache.chunks) == 5      # one whole read (a new log), then only what is new
    assert cache.log is not None
    add_chunk(m)
    w.commit(m)
    assert cache.refresh() and len(cache.chunks) == 6


def test_a_snapshot_naming_a_missing_log_is_an_error(tmp_path):
    commit_n(tmp_path, 2)[1].close()
    (tmp_path / LOG_NAME).unlink()
    with pytest.raises(manifest_mod.ManifestError, match="names commit log"):
        load_manifest(tmp_path)


def test_totals_follow_appends_and_a_replaced_list():
    m = new_manifest()
    for _ in range(10):
        add_chunk(m)
        assert m.total_tokens == sum(c.tokens for c in m.chunks)
    m.chunks = m.chunks[:4]
    assert (m.total_sequences, m.total_tokens, m.total_bytes) == (16, 250 + 251 + 252 + 253, 300 + 301 + 302 + 303)
    del m.chunks[2:]
    add_chunk(m)
    assert m.total_tokens == sum(c.tokens for c in m.chunks)


def file_entry(k: int, docs=None) -> dict:
    return {"path": f"/data/part-{k:06d}.jsonl", "size": 1000 + k, "units": 1000.0 + k, "docs": docs}


def records_after(tmp_path, offset: int) -> list[dict]:
    data = (tmp_path / LOG_NAME).read_bytes()
    return [json.loads(p) for p in parse_records(read_manifest(tmp_path)[1].id, data[offset:], offset)[0]]


@pytest.mark.parametrize("hinted", [True, False])
def test_a_commit_logs_only_the_source_files_that_changed(tmp_path, hinted):
    # a source of many files: each file's record count is filled in as it is read, one at a time; a record
    # that repeated the whole list grew with the files (hundreds of KB here, 1.7 MB at 20,000 files)
    m = new_manifest()
    m.source_files = [file_entry(k) for k in range(3000)]
    w = ManifestWriter(tmp_path)
    add_chunk(m)
    w.commit(m)                                            # a new log: the snapshot lists every file
    cache = open_cache(tmp_path)
    start = (tmp_path / LOG_NAME).stat().st_size
    for k in range(20):
        add_chunk(m)
        m.source_files[k]["docs"] = 10 + k
        if k % 5 == 4:
            m.source_files.append(file_entry(3000 + k))    # follow mode: a file appeared
        w.commit(m, files=[k, len(m.source_files) - 1] if hinted else None)
        assert same(load_manifest(tmp_path), m), k
        assert cache.refresh() and same(cache.manifest, m), k
    recs = records_after(tmp_path, start)
    assert len(recs) == 20 and max(len(json.dumps(r)) for r in recs) < 600
    assert [len(r["files"]) for r in recs][:5] == [1, 1, 1, 1, 2]


def test_old_records_that_set_the_whole_file_list_are_still_read(tmp_path):
    m = new_manifest()
    m.source_files = [file_entry(k) for k in range(3)]
    w = ManifestWriter(tmp_path)
    add_chunk(m)
    w.commit(m)
    listed = [file_entry(k, docs=5) for k in range(4)]
    w.log.append(json.dumps({"set": {"source_files": listed}}).encode())          # as written before
    w.log.append(json.dumps({"files": [[1, file_entry(1, docs=9)]]}).encode())   # then a change of one
    assert load_manifest(tmp_path).source_files == listed[:1] + [file_entry(1, docs=9)] + listed[2:]
    w.log.append(json.dumps({"files": [[9, file_entry(9)]]}).encode())           # past the end: damage
    with pytest.raises(manifest_mod.ManifestError, match="source file 9 of 4"):
        load_manifest(tmp_path)


def test_a_commit_of_thousands_of_new_files_is_split_into_records_a_follower_reads(tmp_path, monkeypatch):
    # follow mode can find thousands of files at once; their entries go in several records of at most
    # RECORD_BYTES, the chunk with the last. (A snapshot in their place never reached a follower reading the log
    # from its offset: its next refresh failed on the chunk after.)
    monkeypatch.setattr(manifest_mod, "RECORD_BYTES", 4000)
    m, w = commit_n(tmp_path, 2)
    cache = open_cache(tmp_path)
    size = (tmp_path / LOG_NAME).stat().st_size
    add_chunk(m)
    m.source_files = [file_entry(k) for k in range(200)]   # about 18 KB of entries
    w.commit(m, files=list(range(200)))
    recs = records_after(tmp_path, size)
    sizes = [len(json.dumps(r, separators=(",", ":"))) for r in recs]
    assert len(recs) >= 4 and max(sizes[:-1]) <= 4000 and sizes[-1] < 5000, sizes
    assert "chunks" in recs[-1] and all("chunks" not in r for r in recs[:-1])
    assert cache.refresh() and same(cache.manifest, m) and same(load_manifest(tmp_path), m)
    add_chunk(m)
    w.commit(m)
    assert cache.refresh() and same(cache.manifest, m)


def test_the_log_refuses_a_record_every_reader_would_take_for_damage(tmp_path):
    from shared.commitlog import MAX_RECORD
    m, w = commit_n(tmp_path, 2)
    size = (tmp_path / LOG_NAME).stat().st_size
    with pytest.raises(ValueError, match="at most"):
        w.log.append(b" " * (MAX_RECORD + 1))
    assert (tmp_path / LOG_NAME).stat().st_size == size and same(load_manifest(tmp_path), m)
