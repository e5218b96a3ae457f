"""The chunk file: a fixed header, the index of sequences and documents, and an LZ4 block of token ids.

Version 2 (written today), all little-endian:

    header   64 bytes  see HEADER_V2 below
    index    LZ4 block of varints (LEB128): for each sequence seq_len - its length (0 except a final
             window), then for each document start the distance from the previous one in the chunk's
             token stream (the first from position 0)
    payload  LZ4 block                    the real tokens of all sequences, concatenated, as uint16/uint32

The index costs about one byte per document start (paragraph-sized documents of 13 tokens: 0.08 bytes per
token) where version 1 stored three uint32 arrays (0.32 bytes per token). doc_ptr is not stored: it follows
from the absolute start positions and the sequence lengths, because every start lies inside its sequence.

Version 1 (still read): header (HEADER_V1), then uncompressed uint32 arrays lengths[num_sequences],
doc_ptr[num_sequences + 1], doc_starts[num_doc_starts], then the same payload.

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
FORMAT_VERSION = 2  # what encode_chunk writes; decode_chunk reads 1 and 2
# magic, version, dtype bytes, lz4 level, seq_len, n_seq, n_doc, n_tok, payload bytes, checksum
HEADER_V1 = struct.Struct("<8sHBBIIIQQQ")
# the same with the index's varint bytes and its LZ4 block's size before the checksum
HEADER_V2 = struct.Struct("<8sHBBIIIQQIIQ")
HEADERS = {1: HEADER_V1, 2: HEADER_V2}
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
        n, L = self.num_sequences, self.seq_len
        out = np.empty((n, L), dtype=self.tokens.dtype)
        lengths = np.asarray(self.lengths)
        short = np.flatnonzero(lengths < L)
        full = int(short[0]) if short.size else n   # the rows before the first short one: one copy
        out[:full] = self.tokens[:full * L].reshape(full, L)
        rest = out[full:]
        rest[:] = pad_id
        # the tokens fill each row's first `length` slots, row after row: exactly the True places of this mask in
        # row-major order (one numpy assignment instead of a Python loop over the rows)
        rest[np.arange(L) < lengths[full:, None]] = self.tokens[full * L:]
        return out


# -- varints (LEB128: 7 bits a byte, low bits first, the high bit set on every byte but a value's last) ---
def varint_encode(values: np.ndarray) -> bytes:
    v = np.asarray(values, dtype=np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, 10):
        nbytes += v >= (np.uint64(1) << np.uint64(7 * k))
    ends = np.cumsum(nbytes)
    first = ends - nbytes
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    value_of = np.repeat(np.arange(v.size), nbytes)
    k = np.arange(out.size) - first[value_of]            # which 7-bit group of its value each byte holds
    out[:] = ((v[value_of] >> (np.uint64(7) * k.astype(np.uint64))) & np.uint64(0x7F)).astype(np.uint8)
    cont = np.ones(out.size, dtype=bool)
    cont[ends - 1] = False
    out[cont] |= 0x80
    return out.tobytes()


def varint_decode(buf: bytes, count: int) -> np.ndarray:
    """Exactly `count` values from `buf` (which they must fill); raises ChunkError otherwise."""
    b = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(ends) != count or (count and ends[-1] != len(b) - 1) or (not count and len(b)):
        raise ChunkError(f"index holds {len(ends)} values, the header says {count}")
    if not count:
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if int((ends - starts).max()) > 9:
        raise ChunkError("index value longer than 64 bits")
    value_of = np.repeat(np.arange(count), ends - starts + 1)
    shift = (np.arange(len(b)) - starts[value_of]).astype(np.uint64) * np.uint64(7)
    return np.add.reduceat((b & 0x7F).astype(np.uint64) << shift, starts)


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


def encode_chunk(chunk: Chunk, level: int = DEFAULT_LZ4_LEVEL) -> bytes:
    tokens = np.ascontiguousarray(chunk.tokens)
    if tokens.dtype.itemsize not in DTYPES:
        raise ValueError(f"unsupported token dtype {tokens.dtype}")
    tokens = tokens.astype(DTYPES[tokens.dtype.itemsize], copy=False)
    if int(chunk.lengths.sum()) != len(tokens):
        raise ValueError("sequence lengths do not add up to the token count")
    if len(chunk.lengths) and int(chunk.lengths.max()) > chunk.seq_len:
        raise ValueError("a sequence is longer than seq_len")
    absolute = _absolute_starts(chunk)
    index_raw = varint_encode(np.concatenate([
        chunk.seq_len - np.asarray(chunk.lengths, dtype=np.int64), np.diff(absolute, prepend=0)]))
    index = _compress(index_raw, level)
    payload = _compress(tokens.tobytes(), level)
    fields = (MAGIC, FORMAT_VERSION, tokens.dtype.itemsize, max(level, 0), chunk.seq_len, len(chunk.lengths),
              len(absolute), len(tokens), len(payload), len(index_raw), len(index))
    head_wo_sum = HEADER_V2.pack(*fields, 0)[:-8]
    checksum = xxhash.xxh64(head_wo_sum + index + payload).intdigest()
    header = HEADER_V2.pack(*fields, checksum).ljust(HEADER_SIZE, b"\x00")
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


def decode_chunk(buf: bytes | memoryview, verify: bool = True) -> Chunk:
    """A chunk of format version 1 or 2, checked against its checksum (with verify) and its header."""
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
    dtype = DTYPES[h["itemsize"]]
    raw = _decompress(buf[HEADER_SIZE + h["index_bytes"]:], h["num_tokens"] * dtype.itemsize, "payload")
    tokens = np.frombuffer(raw, dtype=dtype)
    if len(tokens) != h["num_tokens"] or int(lengths.sum()) != len(tokens):
        raise ChunkError("token count does not match the sequence lengths")
    return Chunk(seq_len=h["seq_len"], tokens=tokens, lengths=lengths, doc_ptr=doc_ptr, doc_starts=doc_starts)


def file_checksum(buf: bytes | memoryview) -> str:
    """The checksum the manifest records for a chunk file (the one stored in its header), as hex."""
    return f"{read_header(buf)['checksum']:016x}"
