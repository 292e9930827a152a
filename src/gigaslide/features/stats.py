"""Per-dimension statistics of tile features over a cohort, in one pass over its slides.

Each slide's array is used once and dropped, so the cohort never has to be in memory at once (the
arrays may be :class:`~gigaslide.features.store.LazyFeatures` read from disk, or MIL bags).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

#: Smallest std returned: a constant dimension is divided by this, not by 0.
STD_FLOOR = 1e-6
#: Rows converted to float64 at a time (bounds the temporary copy of a large slide).
ROWS = 8192


def feature_stats(arrays: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 ``[D]`` over every row of every ``[N, D]`` array (float64 accumulation, population
    std floored at :data:`STD_FLOOR`). Arrays of no rows are skipped; all rows being absent is an error."""
    n, s1, s2 = 0, None, None
    for a in arrays:
        a = np.asarray(a)
        for r in range(0, len(a), ROWS):
            d = a[r:r + ROWS].astype(np.float64)
            s1 = d.sum(0) if s1 is None else s1 + d.sum(0)
            s2 = np.square(d).sum(0) if s2 is None else s2 + np.square(d).sum(0)
            n += len(d)
    if not n:
        raise ValueError("feature_stats: no rows")
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)


def nonfinite_rows(a: np.ndarray, rows: int = 8192) -> int:
    """How many rows (tiles; the last axis is the feature) of ``a`` hold a NaN / inf, checked ``rows`` at a time (bounds
    the temporaries)."""
    a = np.asarray(a)
    a2 = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    return sum(int((~np.isfinite(a2[j:j + rows])).any(-1).sum()) for j in range(0, len(a2), rows))

