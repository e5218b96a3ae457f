"""Fast checks of two fault paths, on real files (the slow end-to-end versions are in tests/faults):

    - a cache rebuilt under a reader: Cache.refresh, Cache.read_chunk and CacheFollower name the change
      (CacheReplaced), never read the new cache with the old layout, never quarantine its chunks, and a
      manifest that is missing for a while (packerd deletes it first) is not an error for the follower
    - ENOSPC while appending the JSON-lines log (/dev/full): one TrainError naming the file, and close()
      in a finally never raises over it
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import run_packerd, write_jsonl
from shared.cache import CacheError, CacheReplaced, CorruptChunk, open_cache
from shared.manifest import MANIFEST_NAME, load_manifest
from trainerd.follow import CacheFollower


@pytest.fixture(scope="module")
def caches(tmp_path_factory, corpus_texts, tokenizer_dir) -> dict[str, Path]:
    """Three caches of real packerd runs: `a` (seq_len 64), `short` (seq_len 32, same source) and `other`
    (seq_len 64, other documents first: same layout, other chunk checksums)."""
    tmp = tmp_path_factory.mktemp("rebuilt")
    out = {}
    for name, seq_len, texts in (("a", 64, corpus_texts[:30]), ("short", 32, corpus_texts[:30]),
                                 ("other", 64, corpus_texts[30:60])):
        src = write_jsonl(tmp / f"{name}.jsonl", texts)
        run_packerd("run", "--cache-dir", tmp / name, "--source", src, "--tokenizer", tokenizer_dir,
                    "--seq-len", seq_len, "--chunk-sequences", 16, "--workers", 1, "--endpoint", f"ipc://{tmp}/{name}.sock")
        out[name] = tmp / name
    return out


def install(src: Path, dst: Path, chunks: int | None = None) -> None:
    """Make dst hold src's chunk files and manifest (its first `chunks` chunks, unfinished, when given), the
    way a packer does: chunk files first, the manifest last."""
    dst.mkdir(exist_ok=True)
    m = load_manifest(src)
    for e in m.chunks:
        shutil.copyfile(src / e.file, dst / e.file)
    if chunks is not None:
        m.chunks, m.finished = m.chunks[:chunks], False
    m.save(dst)


def rebuild(src: Path, dst: Path) -> None:
    """packerd run --force-rebuild's order: the manifest goes first, then every chunk; then the new cache."""
    (dst / MANIFEST_NAME).unlink(missing_ok=True)
    for p in dst.glob("chunk-*.lz4"):
        p.unlink()
    install(src, dst)


@pytest.mark.parametrize("new, why", [("short", "seq_len is 32, was 64"), ("other", "checksum")])
def test_refresh_and_read_name_a_rebuilt_cache(tmp_path, caches, new, why):
    live = tmp_path / "live"
    install(caches["a"], live, chunks=3)
    cache = open_cache(live)
    install(caches["a"], live, chunks=5)       # growth of the same cache is no error
    assert cache.refresh() and len(cache.chunks) == 5
    assert cache.read_chunk(0).num_sequences == cache.chunks[0].sequences

    (live / MANIFEST_NAME).unlink()            # the rebuild has begun: a read of a deleted chunk is no corruption
    (live / cache.chunks[1].file).unlink()
    with pytest.raises(CacheError, match="manifest disappeared") as e:
        cache.read_chunk(1)
    assert not isinstance(e.value, CorruptChunk)
    with pytest.raises(CacheError, match="manifest disappeared"):
        cache.refresh()

    rebuild(caches[new], live)
    # a chunk read with the old manifest meets a chunk of the new cache: named, and not quarantined
    with pytest.raises(CacheReplaced, match=why):
        cache.read_chunk(0)
    assert not (live / "quarantine").exists()
    with pytest.raises(CacheReplaced, match=why):
        cache.refresh()
    assert cache.seq_len == 64                 # the old manifest stays: nothing reads the new cache as the old


def test_a_cache_with_fewer_chunks_is_another_cache(tmp_path, caches):
    live = tmp_path / "live"
    install(caches["a"], live, chunks=5)
    cache = open_cache(live)
    install(caches["a"], live, chunks=2)       # a rebuild of the same source that has committed 2 chunks so far
    with pytest.raises(CacheReplaced, match="lists 2 chunks, 5 before"):
        cache.refresh()


def test_follower_waits_through_a_missing_manifest_and_names_the_new_cache(tmp_path, caches):
    live = tmp_path / "live"
    install(caches["a"], live, chunks=4)
    # nobody publishes there: the follower reads the manifest on its timer alone
    follower = CacheFollower(live, f"ipc://{tmp_path}/nobody.sock", reconcile_seconds=1e-3)
    try:
        assert follower.poll().known_chunks == 4
        install(caches["a"], live, chunks=6)
        assert follower.poll(5).known_chunks == 6
        (live / MANIFEST_NAME).unlink()        # packerd --force-rebuild deletes the manifest first
        for _ in range(3):
            s = follower.poll(5)
            assert (s.known_chunks, s.finished) == (6, False)
        rebuild(caches["short"], live)
        with pytest.raises(CacheReplaced, match="seq_len is 32, was 64"):
            follower.poll(5)
    finally:
        follower.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_while_logging_is_one_train_error():
    from trainerd.output import JsonlLog
    from trainerd.rundir import TrainError
    log = JsonlLog(Path("/dev/full"))          # every write there fails with ENOSPC
    with pytest.raises(TrainError, match="disk full while writing the training log /dev/full"):
        log.event("started", step=0)
    log.write({"step": 1})                     # the log is closed: later records are dropped, not raised again
    log.close(quiet=True)
    log.close()
