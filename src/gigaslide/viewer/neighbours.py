"""The k most similar tiles across all slides: exact cosine similarity on a normalised feature matrix.

All tiles of all slides (one encoder) are stacked into one L2-normalised float32 matrix; a query is
one matrix-vector product plus ``argpartition``. That is exact, and fast enough that no
approximate index is needed at the sizes a viewer opens: 1 M tiles x 512-d is 2 GB and about
0.1-0.3 s per query on one core, 100 k tiles a few ms (``benchmarks/bench_viewer.py`` measures it);
faiss-cpu would only pay off beyond that, so it is not a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Neighbour:
    slide: str
    index: int
    similarity: float


class FeatureIndex:
    """Exact cosine search over the tiles of several slides (features of one encoder / dimension)."""

    def __init__(self, features: dict[str, np.ndarray]):
        self.slides: list[str] = []
        starts, mats = [], []
        n = 0
        for key, f in features.items():
            f = np.asarray(f, np.float32)
            if f.ndim != 2 or not len(f):
                continue
            self.slides.append(key)
            starts.append(n)
            mats.append(f)
            n += len(f)
        self.starts = np.asarray(starts + [n], np.int64)
        self.offset = {k: int(s) for k, s in zip(self.slides, starts)}
        m = np.concatenate(mats) if mats else np.zeros((0, 1), np.float32)
        m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
        self.matrix = m

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def has(self, slide: str) -> bool:
        return slide in self.offset

    def query(self, slide: str, index: int, k: int = 8) -> list[Neighbour]:
        """The ``k`` tiles most similar to tile ``index`` of ``slide`` (itself excluded), best first."""
        row = self.offset[slide] + int(index)
        sims = self.matrix @ self.matrix[row]
        sims[row] = -np.inf
        k = min(k, len(sims) - 1)
        if k <= 0:
            return []
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        which = np.searchsorted(self.starts, top, side="right") - 1
        return [Neighbour(self.slides[w], int(t - self.starts[w]), float(sims[t])) for t, w in zip(top, which)]
