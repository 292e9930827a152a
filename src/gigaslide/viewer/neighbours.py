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

from gigaslide.errors import GigaslideError


@dataclass
class Neighbour:
    slide: str
    index: int
    similarity: float


class FeatureIndex:
    """Exact cosine search over the tiles of several slides (features of one encoder / dimension)."""

    def __init__(self, features: dict[str, np.ndarray]):
        """``features``: per slide an [n, d] array, or anything with ``shape`` that ``np.asarray`` reads (a feature
        file's :class:`~gigaslide.features.store.LazyFeatures`): read one slide at a time straight into the matrix, so
        the index costs the matrix alone, not a second copy of every slide's features."""
        self.slides: list[str] = []
        starts, n, dim = [], 0, None
        shapes = {k: tuple(getattr(f, "shape", np.shape(f))) for k, f in features.items()}
        for key, shape in shapes.items():
            if len(shape) != 2 or not shape[0] or (dim is not None and shape[1] != dim):
                continue
            dim = shape[1]
            self.slides.append(key)
            starts.append(n)
            n += shape[0]
        self.starts = np.asarray(starts + [n], np.int64)
        self.offset = {k: int(s) for k, s in zip(self.slides, starts)}
        m = np.zeros((n, dim or 1), np.float32)
        self.dead = np.zeros(n, bool)  # tiles never returned nor searched from
        self.unreadable: list[str] = []  # slides whose features could not be read: never returned
        for key, s, e in zip(self.slides, starts, starts[1:] + [n]):
            try:
                m[s:e] = np.asarray(features[key], np.float32)
            except GigaslideError:  # a damaged file: the other slides are searched
                self.unreadable.append(key)
                self.dead[s:e] = True
                continue
            with np.errstate(invalid="ignore"):  # inf / inf: NaN, left out just below
                m[s:e] /= np.maximum(np.linalg.norm(m[s:e], axis=1, keepdims=True), 1e-12)
            # a tile with NaN / inf features (an encoder that overflowed) is similar to nothing: its NaN row made every
            # similarity of a search from it NaN (the tile itself came first, then arbitrary tiles), and NaN sorts last
            # in the other tiles' searches, so a large k returned it as well
            bad = ~np.isfinite(m[s:e]).all(1)
            if bad.any():
                m[s:e][bad] = 0.0
                self.dead[s:e] = bad
        self.matrix = m

    def __len__(self) -> int:
        """Tiles searched (those of unreadable slides and those with NaN / inf features left out)."""
        return int(self.matrix.shape[0] - self.dead.sum())

    def has(self, slide: str) -> bool:
        return slide in self.offset

    def searchable(self, slide: str, index: int) -> bool:
        """Whether tile ``index`` of ``slide`` is searched (not: its slide is unreadable, or its features NaN / inf)."""
        return slide in self.offset and not self.dead[self.offset[slide] + int(index)]

    def query(self, slide: str, index: int, k: int = 8) -> list[Neighbour]:
        """The ``k`` tiles most similar to tile ``index`` of ``slide`` (itself excluded), best first; none for a tile
        that is not :meth:`searchable`."""
        row = self.offset[slide] + int(index)
        if self.dead[row]:
            return []
        sims = self.matrix @ self.matrix[row]
        sims[row] = -np.inf
        sims[self.dead] = -np.inf
        k = min(k, len(sims) - 1 - int(self.dead.sum()))
        if k <= 0:
            return []
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        which = np.searchsorted(self.starts, top, side="right") - 1
        return [Neighbour(self.slides[w], int(t - self.starts[w]), float(sims[t])) for t, w in zip(top, which)]
