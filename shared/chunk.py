"""The chunk file: a fixed header, the index of sequences and documents, and an LZ4 block of token ids.

Version 3 (written for caches started with `packerd run --chunk-format 3`; new caches get version 2,
FORMAT_VERSION), all little-endian:

    header   64 bytes  see HEADER_V3 below
    index    LZ4 block of varints (LEB128): for each sequence seq_len - its length (0 except a final
             window), then for each document start the distance from the previous one in the chunk's
             token stream (the first from position 0)
    payload  LZ4 block of varints: the chunk's table, its K (at most 127) most frequent token ids (count
             descending, then id ascending), then per real token its place in the table if it is there,
             else K + its id

A token then costs one byte before LZ4 when it is among the table's, two when its id is below 16384 - K,
three otherwise: on GPT-2 text the table holds about 59% of the tokens and 7% take three bytes, and LZ4
still finds the repeated phrases, now shorter. Against version 2's fixed-width ids that is 6% fewer bytes
for the token block (wikitext paragraphs: 1.22 bytes a token instead of 1.30) and half of LZ4 HC's time,
since it reads 1.5 bytes a token instead of 2 (bench/bench_chunk_size.py). The price is decoding: numpy
parses the varints in about ten whole-array passes, 4 to 20 times slower than LZ4 alone decodes version 2.

The index costs about one byte per document start (paragraph-sized documents of 13 tokens: 0.08 bytes per
token) where version 1 stored three uint32 arrays (0.32 bytes per token). doc_ptr is not stored: it follows
from the absolute start positions and the sequence lengths, because every start lies inside its sequence.

Version 2 (still read, and written by `encode_chunk(..., version=2)` to regenerate chunks of caches packed
with it): header HEADER_V2, the same index, then the real tokens as fixed-width uint16/uint32 in one LZ4
block. Version 1 (still read): header (HEADER_V1), then uncompressed uint32 arrays lengths[num_sequences],
doc_ptr[num_sequences + 1], doc_starts[num_doc_starts], then the version 2 payload.

Padding is not stored: a reader pads a short final sequence itself. The checksum (xxh64) covers the
header fields before it and everything after the header; the header's reserved bytes after the checksum
must be zero. So any flipped byte is caught. Nothing time-dependent is in the file: a chunk regenerated
from the same source range is byte-identical. Tokens are raw integer arrays, never pickles.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash

MAGIC = b"PKCHUNK\x00"
FORMAT_VERSION = 2  # what a new cache writes unless told (3 is smaller, 2 decodes 4 to 20 times faster); decode_chunk reads 1, 2 and 3
# magic, version, dtype bytes, lz4 level, seq_len, n_seq, n_doc, n_tok, payload bytes, checksum
HEADER_V1 = struct.Struct("<8sHBBIIIQQQ")
# the same with the index's varint bytes and its LZ4 block's size before the checksum
HEADER_V2 = struct.Struct("<8sHBBIIIQQIIQ")
# the same with the payload's varint bytes and the size of the token table before the checksum
HEADER_V3 = struct.Struct("<8sHBBIIIQQIIIHQ")
HEADERS = {1: HEADER_V1, 2: HEADER_V2, 3: HEADER_V3}
TABLE_SIZE = 127  # token ids a version-3 chunk codes in one byte: all one-byte LEB128 values
HEADER_SIZE = 64
DEFAULT_LZ4_LEVEL = 9  # high compression: about 18% smaller on token ids, same decompression speed

DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ChunkError(ValueError):
    """A chunk file that is truncated, corrupt or of an unknown format."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return DTYPES[2] if vocab_size <= 65536 else DTYPES[4]


@dataclass
class Chunk:
    seq_len: int
    tokens: np.ndarray       # all real tokens, concatenated
    lengths: np.ndarray      # uint32[num_sequences]
    doc_ptr: np.ndarray      # uint32[num_sequences + 1]
    doc_starts: np.ndarray   # uint32[num_doc_starts]

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def offsets(self) -> np.ndarray:
        out = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def sequence(self, i: int) -> np.ndarray:
        offs = self.offsets()
        return self.tokens[offs[i]:offs[i + 1]]

    def doc_starts_of(self, i: int) -> np.ndarray:
        return self.doc_starts[self.doc_ptr[i]:self.doc_ptr[i + 1]]

    def padded(self, pad_id: int) -> np.ndarray:
        """All sequences as a [num_sequences, seq_len] array, short ones padded with pad_id."""
        head, tail = self.padded_parts(pad_id)
        return np.concatenate([head, tail]) if len(tail) else head.copy()

    def padded_parts(self, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """padded() as two arrays: the rows before the first short one (a view of the tokens: nothing
        copied) and the rest, padded with pad_id (a new array; in a packed chunk only its last row is short)."""
        n, L = self.num_sequences, self.seq_len
        lengths = np.asarray(self.lengths)
        short = np.flatnonzero(lengths < L)
        full = int(short[0]) if short.size else n
        rest = np.full((n - full, L), pad_id, dtype=self.tokens.dtype)
        # the tokens fill each row's first `length` slots, row after row: exactly the True places of this mask in
        # row-major order (one numpy assignment instead of a Python loop over the rows)
        rest[np.arange(L) < lengths[full:, None]] = self.tokens[full * L:]
        return self.tokens[:full * L].reshape(full, L), rest


# -- varints (LEB128: 7 bits a byte, low bits first, the high bit set on every byte but a value's last) ---
# Whole-array numpy passes, as few as the values' length allows: the packer encodes and every trainer rank
# decodes each chunk's tokens once an epoch. Encoding writes byte position k of every value at least k + 1
# bytes long; decoding reads the 4 bytes that end at each value's last byte as one word.
def varint_encode(values: np.ndarray) -> bytes:
    v = np.asarray(values)
    if v.size == 0:
        return b""
    wide = np.uint64 if int(v.max()) >> 32 else np.uint32  # 32-bit arithmetic is twice as fast where it fits
    v = v.astype(wide, copy=False)
    nbytes = np.ones(v.size, dtype=np.uint8)
    for k in range(1, 10):
        if 7 * k >= 8 * v.itemsize or not (longer := v >= wide(1 << 7 * k)).any():
            break
        nbytes += longer
    at = np.cumsum(nbytes, dtype=np.int64) - nbytes  # each value's first byte
    out = np.empty(int(at[-1] + nbytes[-1]), dtype=np.uint8)
    rest, n = v, nbytes
    for k in range(int(nbytes.max())):
        if k:
            sel = np.flatnonzero(n > k)
            at, rest, n = at[sel] + 1, rest[sel] >> wide(7), n[sel]
        out[at] = (rest & wide(0x7F)).astype(np.uint8) | ((n > k + 1).view(np.uint8) << 7)
    return out.tobytes()


def varint_decode(buf: bytes, count: int) -> np.ndarray:
    """Exactly `count` values from `buf` (which they must fill), as uint32 when none is longer than 4 bytes,
    else uint64; raises ChunkError otherwise."""
    b = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(ends) != count or (count and ends[-1] != len(b) - 1) or (not count and len(b)):
        raise ChunkError(f"varint block holds {len(ends)} values, the header says {count}")
    if not count:
        return np.zeros(0, dtype=np.uint64)
    nbytes = np.diff(ends, prepend=-1)
    longest = int(nbytes.max())
    if longest > 10 or (longest == 10 and int(b[ends[nbytes == 10]].max()) > 1):
        raise ChunkError("varint value longer than 64 bits")
    if longest <= 4:
        return _varint_decode_short(b, ends, nbytes)
    out = b[ends].astype(np.uint64)  # the last byte holds the highest bits: shift them up as lower ones come in
    sel = np.arange(count)
    for k in range(1, longest):
        sel = sel[nbytes[sel] > k]
        out[sel] = (out[sel] << np.uint64(7)) | (b[ends[sel] - k] & 0x7F).astype(np.uint64)
    return out


def _varint_decode_short(b: np.ndarray, ends: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Values of at most 4 bytes (token codes, index entries), as uint32: the 4 bytes ending at each value's
    last byte read as one little-endian uint32 (an unaligned strided view), the bytes of the value before
    shifted out, the 7-bit groups joined. Whole-array operations only, no selection per length."""
    padded = np.concatenate([np.zeros(3, dtype=np.uint8), b])
    words = np.ndarray((len(b),), dtype="<u4", buffer=padded, strides=(1,))[ends]
    words >>= (np.uint32(32) - (nbytes.astype(np.uint32) << np.uint32(3)))
    out = words & np.uint32(0x7F)
    for k in range(1, int(nbytes.max())):
        out |= (words >> np.uint32(k)) & np.uint32(0x7F << 7 * k)
    return out


# -- encoding --------------------------------------------------------------------------------------
def _compress(raw: bytes, level: int) -> bytes:
    if level > 0:
        return lz4.block.compress(raw, mode="high_compression", compression=level, store_size=False)
    return lz4.block.compress(raw, mode="default", store_size=False)


def _absolute_starts(chunk: Chunk) -> np.ndarray:
    """Each document start as a position in the chunk's token stream; ValueError when a start lies outside
    its sequence or the starts go backwards (then doc_ptr could not be rebuilt from them)."""
    doc_ptr = np.asarray(chunk.doc_ptr, dtype=np.int64)
    starts = np.asarray(chunk.doc_starts, dtype=np.int64)
    lengths = np.asarray(chunk.lengths, dtype=np.int64)
    if len(doc_ptr) != len(lengths) + 1 or doc_ptr[0] != 0 or doc_ptr[-1] != len(starts) or (np.diff(doc_ptr) < 0).any():
        raise ValueError("doc_ptr does not index doc_starts")
    seq_of = np.repeat(np.arange(len(lengths)), np.diff(doc_ptr))
    if (starts >= lengths[seq_of]).any():
        raise ValueError("a document start lies beyond its sequence's length")
    absolute = chunk.offsets()[seq_of] + starts
    if (np.diff(absolute) < 0).any():
        raise ValueError("document starts are not in order")
    return absolute


def _token_codes(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table, codes) of version 3: the chunk's TABLE_SIZE most frequent ids (count descending, then id),
    and per token its place in the table, or len(table) + its id."""
    if not len(tokens):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if int(tokens.max()) < 1 << 20:  # every vocabulary in use: counting is linear, a sort is not
        counts = np.bincount(tokens)
        present = np.flatnonzero(counts)
        table = present[np.lexsort((present, -counts[present]))[:TABLE_SIZE]]
        code = np.arange(len(counts), dtype=np.int64) + len(table)
        code[table] = np.arange(len(table))
        return table, code[tokens]
    present, inverse, counts = np.unique(tokens, return_inverse=True, return_counts=True)
    order = np.lexsort((present, -counts))[:TABLE_SIZE]
    code = present.astype(np.int64) + len(order)
    code[order] = np.arange(len(order))
    return present[order].astype(np.int64), code[inverse]


def encode_chunk(chunk: Chunk, level: int = DEFAULT_LZ4_LEVEL, version: int = FORMAT_VERSION) -> bytes:
    """The chunk file's bytes in format `version` (2 or 3; a cache keeps the version it was started with,
    so a regenerated chunk is byte-identical)."""
    tokens = np.ascontiguousarray(chunk.tokens)
    if tokens.dtype.itemsize not in DTYPES:
        raise ValueError(f"unsupported token dtype {tokens.dtype}")
    if version not in (2, 3):
        raise ValueError(f"chunk format version {version} cannot be written (2 or 3)")
    tokens = tokens.astype(DTYPES[tokens.dtype.itemsize], copy=False)
    if int(chunk.lengths.sum()) != len(tokens):
        raise ValueError("sequence lengths do not add up to the token count")
    if len(chunk.lengths) and int(chunk.lengths.max()) > chunk.seq_len:
        raise ValueError("a sequence is longer than seq_len")
    absolute = _absolute_starts(chunk)
    index_raw = varint_encode(np.concatenate([
        chunk.seq_len - np.asarray(chunk.lengths, dtype=np.int64), np.diff(absolute, prepend=0)]))
    index = _compress(index_raw, level)
    fields = (MAGIC, version, tokens.dtype.itemsize, max(level, 0), chunk.seq_len, len(chunk.lengths),
              len(absolute), len(tokens))
    if version == 2:
        payload = _compress(tokens.tobytes(), level)
        fields += (len(payload), len(index_raw), len(index))
    else:
        table, codes = _token_codes(tokens)
        payload_raw = varint_encode(np.concatenate([table, codes]))
        payload = _compress(payload_raw, level)
        fields += (len(payload), len(index_raw), len(index), len(payload_raw), len(table))
    head_wo_sum = HEADERS[version].pack(*fields, 0)[:-8]
    checksum = xxhash.xxh64(head_wo_sum + index + payload).intdigest()
    header = HEADERS[version].pack(*fields, checksum).ljust(HEADER_SIZE, b"\x00")
    return header + index + payload


# -- decoding --------------------------------------------------------------------------------------
def read_header(buf: bytes | memoryview) -> dict:
    if len(buf) < HEADER_SIZE:
        raise ChunkError(f"truncated header ({len(buf)} bytes)")
    magic, version = struct.unpack_from("<8sH", buf)
    if magic != MAGIC:
        raise ChunkError("not a chunk file (bad magic)")
    if version not in HEADERS:
        raise ChunkError(f"chunk format version {version} is not supported (this reader reads {sorted(HEADERS)})")
    fmt = HEADERS[version]
    values = fmt.unpack_from(buf)
    _, _, itemsize, level, seq_len, n_seq, n_doc, n_tok, n_payload = values[:9]
    if itemsize not in DTYPES:
        raise ChunkError(f"bad dtype width {itemsize}")
    if any(bytes(buf[fmt.size:HEADER_SIZE])):  # outside the checksum: writers leave them zero
        raise ChunkError("reserved header bytes are not zero")
    h = {"version": version, "itemsize": itemsize, "level": level, "seq_len": seq_len, "num_sequences": n_seq,
         "num_doc_starts": n_doc, "num_tokens": n_tok, "payload_bytes": n_payload, "checksum": values[-1]}
    if version == 1:
        h.update(index_raw_bytes=4 * (2 * n_seq + 1 + n_doc), index_bytes=4 * (2 * n_seq + 1 + n_doc))
    else:
        h.update(index_raw_bytes=values[9], index_bytes=values[10])
    if version == 3:
        h.update(payload_raw_bytes=values[11], table_size=values[12])
        if values[12] > TABLE_SIZE:
            raise ChunkError(f"token table of {values[12]} ids (at most {TABLE_SIZE})")
    return h


def _decompress(buf, size: int, what: str) -> bytes:
    try:
        raw = lz4.block.decompress(buf, uncompressed_size=size)
    except lz4.block.LZ4BlockError as e:
        raise ChunkError(f"LZ4 {what} does not decode: {e}") from None
    if len(raw) != size:
        raise ChunkError(f"LZ4 {what} holds {len(raw)} bytes, the header says {size}")
    return raw


def _index_v1(buf: memoryview, h: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_seq = h["num_sequences"]
    meta = np.frombuffer(buf, dtype="<u4", count=h["index_bytes"] // 4, offset=HEADER_SIZE)
    return meta[:n_seq], meta[n_seq:2 * n_seq + 1], meta[2 * n_seq + 1:]


def _index_v2(buf: memoryview, h: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_seq, n_doc, seq_len = h["num_sequences"], h["num_doc_starts"], h["seq_len"]
    raw = _decompress(buf[HEADER_SIZE:HEADER_SIZE + h["index_bytes"]], h["index_raw_bytes"], "index")
    values = varint_decode(raw, n_seq + n_doc).astype(np.int64)
    lengths = seq_len - values[:n_seq]
    if (lengths < 0).any():
        raise ChunkError("a sequence length is negative")
    absolute = np.cumsum(values[n_seq:])
    offsets = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if n_doc and absolute[-1] >= offsets[-1]:
        raise ChunkError("a document starts beyond the last token")
    doc_ptr = np.searchsorted(absolute, offsets, side="left")
    seq_of = np.searchsorted(offsets, absolute, side="right") - 1
    return (lengths.astype(np.uint32), doc_ptr.astype(np.uint32),
            (absolute - offsets[seq_of]).astype(np.uint32))


def _tokens_v2(payload: memoryview, h: dict) -> np.ndarray:
    dtype = DTYPES[h["itemsize"]]
    return np.frombuffer(_decompress(payload, h["num_tokens"] * dtype.itemsize, "payload"), dtype=dtype)


def _tokens_v3(payload: memoryview, h: dict) -> np.ndarray:
    dtype, k = DTYPES[h["itemsize"]], h["table_size"]
    values = varint_decode(_decompress(payload, h["payload_raw_bytes"], "payload"), k + h["num_tokens"])
    table, codes = values[:k], values[k:]
    top = int(np.iinfo(dtype).max)
    if k and int(table.max()) > top:
        raise ChunkError(f"a token id does not fit {dtype}")
    try:
        if h["itemsize"] == 2:  # one gather through the table, then every id shifted by k (take checks bounds)
            return np.take(np.concatenate([table.astype(dtype), np.arange(top + 1, dtype=dtype)]), codes)
        if len(codes) and int(codes.max()) > top + k:
            raise IndexError
    except IndexError:
        raise ChunkError(f"a token id does not fit {dtype}") from None
    small = codes < k
    out = (codes - np.minimum(codes, k)).astype(dtype)  # ids past the table; those in it are set next
    out[small] = table[codes[small]]
    return out


def decode_chunk(buf: bytes | memoryview, verify: bool = True) -> Chunk:
    """A chunk of format version 1, 2 or 3, checked against its checksum (with verify) and its header."""
    buf = memoryview(buf)
    h = read_header(buf)
    expected = HEADER_SIZE + h["index_bytes"] + h["payload_bytes"]
    if len(buf) != expected:
        raise ChunkError(f"size {len(buf)} does not match header ({expected} bytes)")
    if verify:
        got = xxhash.xxh64(bytes(buf[:HEADERS[h["version"]].size - 8]))
        got.update(buf[HEADER_SIZE:])
        if got.intdigest() != h["checksum"]:
            raise ChunkError("checksum mismatch")
    lengths, doc_ptr, doc_starts = (_index_v1 if h["version"] == 1 else _index_v2)(buf, h)
    tokens = (_tokens_v3 if h["version"] == 3 else _tokens_v2)(buf[HEADER_SIZE + h["index_bytes"]:], h)
    if len(tokens) != h["num_tokens"] or int(lengths.sum()) != len(tokens):
        raise ChunkError("token count does not match the sequence lengths")
    return Chunk(seq_len=h["seq_len"], tokens=tokens, lengths=lengths, doc_ptr=doc_ptr, doc_starts=doc_starts)


def file_checksum(buf: bytes | memoryview) -> str:
    """The checksum the manifest records for a chunk file (the one stored in its header), as hex."""
    return f"{read_header(buf)['checksum']:016x}"
