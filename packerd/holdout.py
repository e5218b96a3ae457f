"""The held-out share of a cache (`packerd run --holdout F`): which documents, and the folder they go to.

A document is held out when a 64-bit hash of its global source index (xxh64 of the index as a little-endian
uint64, with a fixed seed) falls below F * 2**64. The hash depends on the index alone, never on the text or
on how the source was read, so a restart and `--mode inverse` route every document as the first run did;
unlike `index % n` it follows no pattern in how the source is laid out (every 10th record of a file that
alternates two kinds of text would be all of one kind).
"""
from __future__ import annotations

import numpy as np
import xxhash

HOLDOUT_SEED = 0x686F6C646F7574  # fixed for the life of every cache: "holdout" in ASCII
# recorded in both manifests, so a packer that chose documents another way refuses to continue the cache
HOLDOUT_HASH = f"xxh64(index as little-endian uint64, seed=0x{HOLDOUT_SEED:x}) < fraction * 2**64"
MAX_FRACTION = 0.5


def holdout_record(fraction: float) -> dict:
    """What both manifests record about the holdout."""
    return {"fraction": fraction, "hash": HOLDOUT_HASH}


def held_out(indices, fraction: float | None) -> np.ndarray:
    """A bool per source index: True where the document goes to the held-out cache."""
    n = len(indices)
    if not fraction or not n:
        return np.zeros(n, dtype=bool)
    limit = int(fraction * (1 << 64))
    return np.fromiter((xxhash.xxh64_intdigest(int(i).to_bytes(8, "little"), seed=HOLDOUT_SEED) < limit
                        for i in indices), dtype=bool, count=n)
