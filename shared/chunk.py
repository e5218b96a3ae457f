"""The chunk file: a fixed header, three small index arrays, and an LZ4 block of token ids.

Layout (all little-endian):

    header   64 bytes  see HEADER below
    lengths  uint32[num_sequences]        real tokens in each sequence (== seq_len except a final window)
    doc_ptr  uint32[num_sequences + 1]    CSR pointers into doc_starts
    doc_starts uint32[num_doc_starts]     positions inside each sequence where a document begins
    payload  LZ4 block                    the real tokens of all sequences, concatenated, as uint16/uint32

Padding is not stored: a reader pads a short final sequence itself. The checksum (xxh64) covers the
header fields before it and everything after the header; the header's reserved bytes after the checksum
must be zero. So any flipped byte is caught. Nothing
time-dependent is in the file: a chunk regenerated from the same source range is byte-identical.
Tokens are raw integer arrays, never pickles.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash

MAGIC = b"PKCHUNK\x00"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHBBIIIQQQ")  # magic, version, dtype bytes, lz4 level, seq_len, n_seq, n_doc, n_tok, payload bytes, checksum
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
        out = np.full((self.num_sequences, self.seq_len), pad_id, dtype=self.tokens.dtype)
        if self.num_tokens == self.num_sequences * self.seq_len:
            out[:] = self.tokens.reshape(self.num_sequences, self.seq_len)
            return out
        offs = self.offsets()
        for i in range(self.num_sequences):
            out[i, : self.lengths[i]] = self.tokens[offs[i]:offs[i + 1]]
        return out


def encode_chunk(chunk: Chunk, level: int = DEFAULT_LZ4_LEVEL) -> bytes:
    tokens = np.ascontiguousarray(chunk.tokens)
    if tokens.dtype.itemsize not in DTYPES:
        raise ValueError(f"unsupported token dtype {tokens.dtype}")
    tokens = tokens.astype(DTYPES[tokens.dtype.itemsize], copy=False)
    if int(chunk.lengths.sum()) != len(tokens):
        raise ValueError("sequence lengths do not add up to the token count")
    if len(chunk.lengths) and int(chunk.lengths.max()) > chunk.seq_len:
        raise ValueError("a sequence is longer than seq_len")
    raw = tokens.tobytes()
    if level > 0:
        payload = lz4.block.compress(raw, mode="high_compression", compression=level, store_size=False)
    else:
        payload = lz4.block.compress(raw, mode="default", store_size=False)
    meta = (
        np.asarray(chunk.lengths, dtype="<u4").tobytes()
        + np.asarray(chunk.doc_ptr, dtype="<u4").tobytes()
        + np.asarray(chunk.doc_starts, dtype="<u4").tobytes()
    )
    fields = (MAGIC, FORMAT_VERSION, tokens.dtype.itemsize, max(level, 0), chunk.seq_len,
              len(chunk.lengths), len(chunk.doc_starts), len(tokens), len(payload))
    head_wo_sum = HEADER.pack(*fields, 0)[:-8]
    checksum = xxhash.xxh64(head_wo_sum + meta + payload).intdigest()
    header = HEADER.pack(*fields, checksum).ljust(HEADER_SIZE, b"\x00")
    return header + meta + payload


def read_header(buf: bytes | memoryview) -> dict:
    if len(buf) < HEADER_SIZE:
        raise ChunkError(f"truncated header ({len(buf)} bytes)")
    magic, version, itemsize, level, seq_len, n_seq, n_doc, n_tok, n_payload, checksum = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ChunkError("not a chunk file (bad magic)")
    if version != FORMAT_VERSION:
        raise ChunkError(f"chunk format version {version} is not supported (expected {FORMAT_VERSION})")
    if itemsize not in DTYPES:
        raise ChunkError(f"bad dtype width {itemsize}")
    if any(bytes(buf[HEADER.size:HEADER_SIZE])):  # outside the checksum: writers leave them zero
        raise ChunkError("reserved header bytes are not zero")
    return dict(version=version, itemsize=itemsize, level=level, seq_len=seq_len, num_sequences=n_seq,
                num_doc_starts=n_doc, num_tokens=n_tok, payload_bytes=n_payload, checksum=checksum)


def decode_chunk(buf: bytes | memoryview, verify: bool = True) -> Chunk:
    buf = memoryview(buf)
    h = read_header(buf)
    n_seq, n_doc = h["num_sequences"], h["num_doc_starts"]
    meta_len = 4 * (n_seq + n_seq + 1 + n_doc)
    expected = HEADER_SIZE + meta_len + h["payload_bytes"]
    if len(buf) != expected:
        raise ChunkError(f"size {len(buf)} does not match header ({expected} bytes)")
    if verify:
        got = xxhash.xxh64(bytes(buf[:HEADER.size - 8])) 
        got.update(buf[HEADER_SIZE:])
        if got.intdigest() != h["checksum"]:
            raise ChunkError("checksum mismatch")
    meta = np.frombuffer(buf, dtype="<u4", count=meta_len // 4, offset=HEADER_SIZE)
    lengths, doc_ptr, doc_starts = meta[:n_seq], meta[n_seq:2 * n_seq + 1], meta[2 * n_seq + 1:]
    dtype = DTYPES[h["itemsize"]]
    try:
        raw = lz4.block.decompress(buf[HEADER_SIZE + meta_len:], uncompressed_size=h["num_tokens"] * dtype.itemsize)
    except lz4.block.LZ4BlockError as e:
        raise ChunkError(f"LZ4 payload does not decode: {e}") from None
    tokens = np.frombuffer(raw, dtype=dtype)
    if len(tokens) != h["num_tokens"] or int(lengths.sum()) != len(tokens):
        raise ChunkError("token count does not match the sequence lengths")
    return Chunk(seq_len=h["seq_len"], tokens=tokens, lengths=lengths, doc_ptr=doc_ptr, doc_starts=doc_starts)


def file_checksum(buf: bytes | memoryview) -> str:
    """The checksum the manifest records for a chunk file (the one stored in its header), as hex."""
    return f"{read_header(buf)['checksum']:016x}"

