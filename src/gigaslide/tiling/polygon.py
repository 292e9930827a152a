"""Polygon outlines of a binary mask without importing scipy.signal (``gigaslide tile`` starts in < 0.5 s).

``skimage.measure.approximate_polygon`` lives in a module that imports ``scipy.signal`` (~1 s here), so
the Ramer-Douglas-Peucker simplification is done here, tested against scikit-image's function;
contours come from scikit-image's marching squares (its module imports nothing heavy).
"""

from __future__ import annotations

import numpy as np


def find_contours(mask: np.ndarray, level: float = 0.5) -> list[np.ndarray]:
    """Iso-contours (row, col) of ``mask`` at ``level`` (scikit-image's marching squares)."""
    try:
        from skimage.measure._find_contours import find_contours as fc  # light module; the package pulls in scipy.signal
    except ImportError:  # pragma: no cover - another scikit-image layout
        from skimage.measure import find_contours as fc
    return fc(np.asarray(mask, np.float64), level)


def _segment_distances(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each point of ``p`` [n, 2] to the segment a-b."""
    ab = b - a
    den = float(ab @ ab)
    if den == 0.0:
        return np.hypot(*(p - a).T)
    t = np.clip(((p - a) @ ab) / den, 0.0, 1.0)
    return np.hypot(*(p - (a + t[:, None] * ab)).T)


def simplify(coords: np.ndarray, tolerance: float) -> np.ndarray:
    """Ramer-Douglas-Peucker: the sub-chain of ``coords`` [n, 2] within ``tolerance`` of every original point."""
    coords = np.asarray(coords, np.float64)
    if tolerance <= 0 or len(coords) < 3:
        return coords
    keep = np.zeros(len(coords), bool)
    keep[[0, -1]] = True
    stack = [(0, len(coords) - 1)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        d = _segment_distances(coords[i + 1:j], coords[i], coords[j])
        k = int(np.argmax(d))
        if d[k] > tolerance:
            m = i + 1 + k
            keep[m] = True
            stack += [(i, m), (m, j)]
    return coords[keep]
