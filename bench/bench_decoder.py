"""Would a compiled decoder make chunk format 3 fast enough to be the default? Format 2 against format 3 decoded by
numpy (shipped) and by a small C decoder (not shipped: built here with the system's C compiler, loaded with ctypes).

    python bench/bench_decoder.py [--copies 16] [--rounds 5] [--epochs 5] [--cc cc]

Issue 15 asks for at most 1.25 bytes per token on paragraph-sized documents, which format 3 gives and format 2
does not; issue 3 asks the loader for at least 200 M tokens per second per core, which format 2 gives and format
3 decoded by numpy does not. This bench measures the third way: format 3's token varints decoded by a loop in C
(one pass, branch-free for codes of up to 3 bytes, the table lookup folded into one 64K-entry array), swapped in
for shared.chunk._tokens_v3 while it runs. Two caches of the same documents are packed by packerd (seq_len
1024, 1024 sequences a chunk), one per format; per round, on one thread and alternating:
  - cache.read_chunk over every chunk (read, xxh64, index, tokens): format 2, format 3 with numpy, with C;
  - the loader, DataPlan.get_batch over every step of --epochs epochs (32 x 1024 a step, rank 0 of 1): format 2,
    format 3 with C (format 3 with numpy is in bench_loader.py --chunk-format 3; it is 6 to 8 times slower).
Medians of the rounds, and the median of the per-round ratios against format 2. Every chunk's tokens from the C
decoder are checked against numpy's first.
Corpus: as bench_loader.py (wikitext-2 valid with GPT-2, repeated --copies times).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_loader import corpus, pack_cache, timed_loop  # noqa: E402

C_SOURCE = r"""
#include <stdint.h>
/* codes: LEB128 varints of at most 3 bytes; out[i] = ids[code]. Returns the bytes read, or -1 when the
   varints are malformed, do not end exactly at nraw, or a code is not below nids. */
int64_t decode_codes(const uint8_t *restrict raw, int64_t nraw, int64_t n,
                     const uint16_t *restrict ids, int64_t nids, uint16_t *restrict out) {
    int64_t p = 0, i = 0;
    for (; i < n && p + 3 <= nraw; i++) {
        uint32_t b0 = raw[p], b1 = raw[p + 1], b2 = raw[p + 2];
        uint32_t c0 = b0 >> 7, c1 = c0 & (b1 >> 7);
        uint32_t v = (b0 & 0x7F) | ((c0 * (b1 & 0x7F)) << 7) | ((c1 * b2) << 14);
        if ((c1 & (b2 >> 7)) | (v >= nids)) return -1;
        out[i] = ids[v];
        p += 1 + c0 + c1;
    }
    for (; i < n; i++) {
        uint32_t v = 0;
        for (int s = 0;; s += 7) {
            if (p >= nraw || s > 14) return -1;
            uint32_t b = raw[p++];
            v |= (b & 0x7F) << s;
            if (b < 0x80) break;
        }
        if (v >= nids) return -1;
        out[i] = ids[v];
    }
    return p == nraw ? p : -1;
}
"""


def build_decoder(cc: str, folder: Path):
    src, lib = folder / "decode.c", folder / "decode.so"
    src.write_text(C_SOURCE)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    fn = ctypes.CDLL(str(lib)).decode_codes
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    return fn


def c_tokens_v3(fn):
    """A drop-in for shared.chunk._tokens_v3 (uint16 chunks) that decodes the codes with `fn`."""
    from shared import chunk as C

    def tokens_v3(payload, h):
        k, n = h["table_size"], h["num_tokens"]
        if h["itemsize"] != 2:
            raise ValueError("the C decoder here writes uint16 only")
        raw = np.frombuffer(C._decompress(payload, h["payload_raw_bytes"], "payload"), dtype=np.uint8)
        table_end = int(np.flatnonzero(raw[:5 * k] < 0x80)[k - 1]) + 1 if k else 0
        table = C.varint_decode(bytes(raw[:table_end]), k)
        if k and int(table.max()) > 0xFFFF:
            raise C.ChunkError("a token id does not fit <u2")
        ids = np.concatenate([table.astype(np.uint16), np.arange(1 << 16, dtype=np.uint16)])
        body = raw[table_end:]
        out = np.empty(n, dtype=np.uint16)
        if fn(body.ctypes.data, len(body), n, ids.ctypes.data, len(ids), out.ctypes.data) < 0:
            raise C.ChunkError("malformed token codes")
        return out
    return tokens_v3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--cc", default="cc", help="the C compiler")
    a = ap.parse_args()
    import torch

    from shared import chunk as C
    from shared.cache import open_cache
    from trainerd.data import DataPlan

    torch.set_num_threads(1)
    texts, tok_dir, name = corpus()
    docs = [t for _ in range(a.copies) for t in texts]
    with tempfile.TemporaryDirectory(prefix="bench-decoder-") as tmp:
        work = Path(tmp)
        decoder = c_tokens_v3(build_decoder(a.cc, work))
        caches = {}
        for fmt in (2, 3):
            args = argparse.Namespace(seq_len=1024, chunk_sequences=1024, chunk_format=fmt)
            caches[fmt] = open_cache(pack_cache(work, f"v{fmt}", docs, tok_dir, args))
        numpy_v3 = C._tokens_v3
        for e in caches[3].chunks:  # the C decoder gives numpy's tokens, chunk by chunk
            want = caches[3].read_chunk(e.id).tokens
            C._tokens_v3 = decoder
            got = caches[3].read_chunk(e.id).tokens
            C._tokens_v3 = numpy_v3
            assert np.array_equal(want, got), e.id
        plans = [0]

        def reads(fmt, tokens_v3):
            def run() -> int:
                C._tokens_v3 = tokens_v3
                return sum(caches[fmt].read_chunk(e.id).num_tokens for e in caches[fmt].chunks)
            return run

        def loader(fmt, tokens_v3):
            def run() -> int:
                C._tokens_v3 = tokens_v3
                plans[0] += 1  # a new seed each time: other windows, every chunk read again
                plan = DataPlan(caches[fmt], seed=plans[0], global_batch=32, rank=0, world_size=1,
                                target_epochs=a.epochs)
                return sum(plan.get_batch(s).num_tokens for s in range(plan.total_steps))
            return run

        cases = [("cache.read_chunk, format 2", reads(2, numpy_v3), 1.0),
                 ("cache.read_chunk, format 3, numpy decoder", reads(3, numpy_v3), 1.0),
                 ("cache.read_chunk, format 3, C decoder", reads(3, decoder), 1.0),
                 ("loader DataPlan.get_batch, format 2", loader(2, numpy_v3), 2.0),
                 ("loader DataPlan.get_batch, format 3, C decoder", loader(3, decoder), 2.0)]
        for _, fn, _ in cases:
            fn()  # warm up: page cache, allocator
        rates: dict[str, list[float]] = {label: [] for label, _, _ in cases}
        for _ in range(a.rounds):
            for label, fn, seconds in cases:
                rates[label].append(timed_loop(fn, seconds)[0])
        C._tokens_v3 = numpy_v3
        tokens = sum(e.tokens for e in caches[2].chunks)
        bpt = {fmt: sum(e.bytes for e in c.chunks) / tokens for fmt, c in caches.items()}

    print(f"\ncorpus: {name} x {a.copies}, {tokens:,} tokens; chunk files: format 2 {bpt[2]:.3f}, "
          f"format 3 {bpt[3]:.3f} bytes/token; one thread, medians of {a.rounds} alternating rounds")
    print(f"{'':50s} {'M tokens/s':>11s} {'vs format 2':>12s}")
    for label, _, _ in cases:
        base = rates[cases[3 if label.startswith("loader") else 0][0]]
        ratio = statistics.median(x / b for x, b in zip(rates[label], base))
        print(f"{label:50s} {statistics.median(rates[label]) / 1e6:11.1f} {ratio:12.2f}")
    print("target (issue 3): loader >= 200 M tokens/s per core")
    print(f"\ncommand: python bench/bench_decoder.py --copies {a.copies} --rounds {a.rounds} --epochs {a.epochs}")


if __name__ == "__main__":
    main()
