"""The chunk file format and the manifest, without processes."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from packerd.pack import build_chunk
from shared.chunk import FORMAT_VERSION, Chunk, ChunkError, decode_chunk, encode_chunk, read_header
from shared.manifest import ChunkEntry, Manifest, load_manifest


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_round_trip(dtype, level):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50000, size=1000).astype(dtype)
    chunk = build_chunk(tokens, np.array([0, 5, 130, 131, 900]), seq_len=128)
    back = decode_chunk(encode_chunk(chunk, level))
    assert back.tokens.dtype == np.dtype(dtype)
    assert np.array_equal(back.tokens, tokens)
    assert list(back.lengths) == [128] * 7 + [1000 - 7 * 128]
    assert list(back.doc_starts_of(0)) == [0, 5]
    assert list(back.doc_starts_of(1)) == [2, 3]
    assert list(back.doc_starts_of(7)) == [900 - 7 * 128]
    padded = back.padded(pad_id=7)
    assert padded.shape == (8, 128) and (padded[7, 1000 - 7 * 128:] == 7).all()


def test_tokens_stored_as_raw_uint16_not_pickle():
    chunk = build_chunk(np.arange(256, dtype=np.uint16), np.array([0]), seq_len=64)
    data = encode_chunk(chunk, level=0)
    assert read_header(data)["itemsize"] == 2
    assert b"torch" not in data and not data.startswith(b"\x80")  # no pickle protocol header


def test_every_flipped_byte_is_detected():
    chunk = build_chunk(np.arange(300, dtype=np.uint16) % 50, np.array([0, 17]), seq_len=64)
    data = encode_chunk(chunk)
    for i in range(len(data)):   # the header's reserved bytes (48 to 63) too: they must stay zero
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(ChunkError):
            decode_chunk(bytes(bad))


def test_truncated_file_is_rejected():
    data = encode_chunk(build_chunk(np.arange(100, dtype=np.uint16), np.array([0]), seq_len=64))
    for cut in (10, 64, len(data) - 1):
        with pytest.raises(ChunkError):
            decode_chunk(data[:cut])


def test_manifest_round_trip_and_totals(tmp_path):
    m = Manifest(seq_len=4, chunk_sequences=2, dtype="uint16", tokenizer={"name": "t", "vocab_hash": "h",
                 "vocab_size": 10, "eos_id": 0, "pad_id": 0}, sources=["a"])
    m.chunks.append(ChunkEntry(id=0, sequences=2, tokens=8, bytes=100, checksum="ab", start=[0, 0], end=[3, 1],
                               documents=3, committed_at=1.0))
    m.chunks.append(ChunkEntry(id=1, sequences=1, tokens=3, bytes=50, checksum="cd", start=[3, 1], end=[4, 0],
                               documents=0, committed_at=2.0))
    m.finished = True
    m.save(tmp_path)
    back = load_manifest(tmp_path)
    assert back.chunks == m.chunks and back.finished
    totals = json.loads((tmp_path / "manifest.json").read_text())["totals"]
    # utilization counts real lengths, never token id 0 (which is EOS here) as padding
    assert totals == {"chunks": 2, "sequences": 3, "tokens": 11, "bytes": 150, "bytes_per_token": round(150 / 11, 4),
                      "utilization": round(11 / 12, 6)}
    assert not list(tmp_path.glob(".tmp-*"))


def _write_cache(tmp_path, chunks):
    from shared.chunk import file_checksum
    from shared.manifest import chunk_filename
    m = Manifest(seq_len=64, chunk_sequences=4, dtype="uint16", tokenizer={"name": "t", "vocab_hash": "h",
                 "vocab_size": 50, "eos_id": 0, "pad_id": 0}, sources=["a"])
    for cid, chunk in enumerate(chunks):
        data = encode_chunk(chunk)
        (tmp_path / chunk_filename(cid)).write_bytes(data)
        m.chunks.append(ChunkEntry(id=cid, sequences=chunk.num_sequences, tokens=chunk.num_tokens, bytes=len(data),
                                   checksum=file_checksum(data), start=[0, 0], end=[0, 0], documents=1,
                                   committed_at=1.0))
    m.save(tmp_path)


def test_read_chunk_results_outlive_the_next_read(tmp_path):
    """read_chunk reads files into one reused buffer per thread: what it returned must not change when
    the next chunk is read into that buffer."""
    from shared.cache import open_cache
    a = build_chunk((np.arange(256, dtype=np.uint16) * 7) % 50, np.array([0, 9, 100, 200]), seq_len=64)
    b = build_chunk(np.arange(200, dtype=np.uint16) % 50, np.array([0, 3, 70]), seq_len=64)  # fits a's buffer
    _write_cache(tmp_path, [a, b])
    cache = open_cache(tmp_path)
    first = cache.read_chunk(0)
    second = cache.read_chunk(1)
    for got, want in ((first, a), (second, b)):
        assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.lengths, want.lengths)
        assert np.array_equal(got.doc_ptr, want.doc_ptr) and np.array_equal(got.doc_starts, want.doc_starts)


@pytest.mark.parametrize("change", ["truncated", "longer", "missing"])
def test_read_chunk_names_a_file_of_the_wrong_size(tmp_path, change):
    from shared.cache import CorruptChunk, open_cache
    from shared.manifest import chunk_filename
    _write_cache(tmp_path, [build_chunk(np.arange(200, dtype=np.uint16) % 50, np.array([0]), seq_len=64)])
    path = tmp_path / chunk_filename(0)
    data = path.read_bytes()
    if change == "missing":
        path.unlink()
    else:
        path.write_bytes(data[:-5] if change == "truncated" else data + b"xx")
    with pytest.raises(CorruptChunk, match="file is missing" if change == "missing" else "manifest says"):
        open_cache(tmp_path).read_chunk(0)


# ---- format versions -----------------------------------------------------------------------------------------
V1_FIXTURE = Path(__file__).parent / "data" / "chunk-v1.lz4"  # written by the version-1 encoder (commit 054f11f)


def v1_fixture_chunk():
    tokens = (np.arange(1000, dtype=np.uint16) * 7919 % 50257).astype(np.uint16)
    return build_chunk(tokens, np.array([0, 5, 130, 131, 900]), seq_len=128)


def test_a_version_1_chunk_still_decodes():
    data = V1_FIXTURE.read_bytes()
    assert read_header(data)["version"] == 1
    want, back = v1_fixture_chunk(), decode_chunk(data)
    for name in ("tokens", "lengths", "doc_ptr", "doc_starts"):
        assert np.array_equal(getattr(back, name), getattr(want, name)), name
    assert read_header(encode_chunk(want))["version"] == FORMAT_VERSION == 2  # what is written by default
    for i in range(len(data)):  # a flipped byte in a version-1 file is caught as before
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(ChunkError):
            decode_chunk(bytes(bad))


def test_a_cache_of_version_1_and_version_2_chunks_reads_and_verifies(tmp_path):
    from packerd.cli import main
    from shared.cache import open_cache
    v2 = build_chunk(np.arange(700, dtype=np.uint16) % 50, np.array([0, 3, 64, 650]), seq_len=128)
    _write_cache(tmp_path, [v1_fixture_chunk(), v2])
    (tmp_path / "chunk-0000000.lz4").write_bytes(V1_FIXTURE.read_bytes())  # the very bytes of the old encoder
    m = load_manifest(tmp_path)
    m.chunks[0].bytes = V1_FIXTURE.stat().st_size
    m.chunks[0].checksum = f"{read_header(V1_FIXTURE.read_bytes())['checksum']:016x}"
    m.save(tmp_path)
    cache = open_cache(tmp_path)
    assert np.array_equal(cache.read_chunk(0).doc_starts, v1_fixture_chunk().doc_starts)
    assert np.array_equal(cache.read_chunk(1).tokens, v2.tokens)
    r = CliRunner().invoke(main, ["verify", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0 and "2 of 2 chunks ok" in r.output


@pytest.mark.parametrize("seed", range(20))
def test_version_2_index_round_trips_any_layout(seed):
    rng = np.random.default_rng(seed)
    n, seq_len = int(rng.integers(1, 5000)), int(rng.integers(1, 2000))
    starts = np.unique(rng.integers(0, n, size=int(rng.integers(0, 400))))
    chunk = build_chunk(rng.integers(0, 70000, n).astype(np.uint32), starts, seq_len)
    back = decode_chunk(encode_chunk(chunk, int(rng.integers(0, 10))))
    for name in ("tokens", "lengths", "doc_ptr", "doc_starts"):
        assert np.array_equal(getattr(back, name), getattr(chunk, name)), name


def test_version_2_index_costs_about_a_byte_per_document():
    # 13-token documents, the case where version 1's uint32 starts cost 0.31 bytes a token
    rng = np.random.default_rng(0)
    n, seq_len = 64 * 1024, 1024
    starts = np.cumsum(rng.integers(5, 22, size=n // 13))
    starts = np.concatenate([[0], starts[starts < n]])
    h = read_header(encode_chunk(build_chunk(rng.integers(0, 50257, n).astype(np.uint16), starts, seq_len)))
    assert h["num_doc_starts"] == len(starts)
    assert h["index_bytes"] <= 1.05 * len(starts)                  # version 1: 4 bytes each, plus 8 a sequence
    assert h["index_bytes"] / n < 0.085


def test_an_index_that_does_not_fit_its_sequences_is_refused():
    chunk = build_chunk(np.arange(100, dtype=np.uint16), np.array([0, 10]), seq_len=64)
    chunk.doc_starts = np.array([0, 60], dtype=np.uint32)   # 60 is past the short last sequence (36 tokens)
    chunk.doc_ptr = np.array([0, 1, 2], dtype=np.uint32)
    with pytest.raises(ValueError, match="beyond its sequence"):
        encode_chunk(chunk)


def test_padded_puts_each_sequence_at_the_start_of_its_row():
    """Short sequences anywhere in a chunk (not only the last): each row holds its sequence, then pad_id."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        L, n = int(rng.integers(1, 40)), int(rng.integers(1, 20))
        lengths = rng.integers(0, L + 1, size=n).astype(np.uint32)
        tokens = rng.integers(0, 500, size=int(lengths.sum())).astype(np.uint16)
        chunk = Chunk(L, tokens, lengths, np.zeros(n + 1, np.uint32), np.zeros(0, np.uint32))
        out = chunk.padded(7)
        assert out.shape == (n, L) and out.dtype == tokens.dtype
        at = 0
        for i, k in enumerate(int(x) for x in lengths):
            assert (out[i, :k] == tokens[at:at + k]).all() and (out[i, k:] == 7).all()
            at += k


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("version", [2, 3])
def test_versions_2_and_3_round_trip_odd_layouts(seed, version):
    """Short and odd layouts: one token, fewer distinct ids than the table holds, the largest ids of the dtype,
    a short last window, ties in the table's counts; each chunk decodes to what was encoded."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if seed % 2 else np.uint32
    top = int(np.iinfo(dtype).max)
    n, seq_len = int(rng.integers(1, 3000)), int(rng.integers(1, 700))
    pool = rng.choice([3, 50, 127, 128, 129, 5000], size=1)[0]
    ids = rng.integers(max(0, top - 300) if seed % 3 == 0 else 0, top + 1, size=int(pool), dtype=np.int64)
    tokens = rng.choice(ids, size=n).astype(dtype)
    starts = np.unique(np.concatenate([[0], rng.integers(0, n, size=int(rng.integers(0, 50)))]))
    chunk = build_chunk(tokens, starts, seq_len)
    data = encode_chunk(chunk, int(rng.integers(0, 12)), version=version)
    assert read_header(data)["version"] == version
    back = decode_chunk(data)
    assert back.tokens.dtype == np.dtype(dtype)
    for name in ("tokens", "lengths", "doc_ptr", "doc_starts"):
        assert np.array_equal(getattr(back, name), getattr(chunk, name)), name


def test_version_3_table_holds_the_most_frequent_ids_ties_by_id():
    from shared.chunk import TABLE_SIZE, _token_codes
    tokens = np.array([9] * 5 + [4] * 3 + [7] * 3 + list(range(1000, 1200)), dtype=np.uint16)
    table, codes = _token_codes(tokens)
    assert list(table[:3]) == [9, 4, 7] and len(table) == TABLE_SIZE
    assert list(table[3:6]) == [1000, 1001, 1002]           # count 1 each: by id
    assert codes[0] == 0 and codes[-1] == 1199 + TABLE_SIZE   # 1199 is not in the table


def test_version_3_is_smaller_than_version_2_on_text_like_ids():
    # a Zipf-like id distribution, as token ids of text have
    rng = np.random.default_rng(0)
    ranks = np.minimum(rng.zipf(1.2, size=64 * 1024), 50000)
    perm = rng.permutation(50257)
    chunk = build_chunk(perm[ranks].astype(np.uint16), np.arange(0, 64 * 1024, 97), 1024)
    assert len(encode_chunk(chunk, version=3)) < 0.95 * len(encode_chunk(chunk, version=2))


def test_a_token_id_beyond_the_dtype_is_refused():
    from shared.chunk import HEADER_V3, _compress, varint_encode
    import xxhash
    index_raw = varint_encode(np.array([63, 0]))
    payload_raw = varint_encode(np.array([5] + [65536 + 1]))  # table [5], then a code for id 65536
    index, payload = _compress(index_raw, 0), _compress(payload_raw, 0)
    fields = (b"PKCHUNK\x00", 3, 2, 0, 64, 1, 1, 1, len(payload), len(index_raw), len(index), len(payload_raw), 1)
    checksum = xxhash.xxh64(HEADER_V3.pack(*fields, 0)[:-8] + index + payload).intdigest()
    data = HEADER_V3.pack(*fields, checksum).ljust(64, b"\x00") + index + payload
    with pytest.raises(ChunkError, match="does not fit"):
        decode_chunk(data)


def test_a_manifest_without_chunk_format_is_a_version_2_cache(tmp_path):
    m = Manifest(seq_len=4, chunk_sequences=2, dtype="uint16", tokenizer={"name": "t", "vocab_hash": "h",
                 "vocab_size": 10, "eos_id": 0, "pad_id": 0}, sources=["a"], chunk_format=3)
    assert m.chunk_format == 3
    d = m.to_json()
    del d["chunk_format"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    assert load_manifest(tmp_path).chunk_format == 2
