"""The percentile every bench reports (p50, p90, p99): nearest rank.

The q-th percentile of n values is the ceil(q/100 * n)-th smallest of them: always a value that was measured
(no interpolation between two), and for the tail the smallest value that at least q% of the values do not
exceed (numpy names this method "inverted_cdf").
"""
from __future__ import annotations

import math


def percentile(values, q: float) -> float:
    """The q-th percentile (0 < q <= 100) of `values` by nearest rank; nan when there are none."""
    s = sorted(values)
    if not s:
        return float("nan")
    # rounded before ceil: in floating point 99.9 * 1000 / 100 is 999.0000000000001, which is rank 999
    return s[max(0, math.ceil(round(q * len(s) / 100, 9)) - 1)]
