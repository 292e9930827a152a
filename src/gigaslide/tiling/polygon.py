"""Polygon outlines of a binary mask without importing scipy.signal (``gigaslide tile`` starts in < 0.5 s).

``skimage.measure.approximate_polygon`` lives in a module that imports ``scipy.signal`` (~1 s here), so
the Ramer-Douglas-Peucker simplification is done here, tested against scikit-image's function;
contours come from scikit-image's marching squares (its module imports nothing heavy). :func:`pixel_outline`
turns a marching-squares contour of a binary mask into the mask's exact outline along pixel edges.
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


def pixel_outline(contour: np.ndarray) -> np.ndarray:
    """The exact outline, along pixel edges, of the binary-mask region a marching-squares contour at level 0.5
    goes round: ``[m, 2]`` (row, col) pixel corners in pixel-centre coordinates (pixel ``(i, j)`` spans
    ``[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]``), closed (last == first), without collinear points.

    Marching squares cuts every corner of the mask diagonally (a lone pixel becomes a diamond of half its area).
    Each of its segments crosses one cell of four pixel centres, whose middle is the pixel corner the true
    outline turns at or passes through; the sequence of those corners is the staircase outline."""
    c = np.asarray(contour, np.float64)
    if len(c) > 1 and np.array_equal(c[0], c[-1]):
        c = c[:-1]
    if len(c) < 2:
        return np.zeros((0, 2))
    nxt = np.roll(c, -1, axis=0)
    corners = np.floor(np.minimum(c, nxt) + 1e-9) + 0.5  # the middle of the cell each segment crosses
    corners = corners[np.any(corners != np.roll(corners, 1, axis=0), axis=1)]  # no repeated corner
    if len(corners) < 3:
        return np.zeros((0, 2))
    prev, after = np.roll(corners, 1, axis=0), np.roll(corners, -1, axis=0)
    cross = (corners - prev)[:, 0] * (after - corners)[:, 1] - (corners - prev)[:, 1] * (after - corners)[:, 0]
    out = corners[np.abs(cross) > 1e-9]  # turning points only
    if len(out) < 3:
        return np.zeros((0, 2))
    return np.vstack([out, out[:1]])


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of a closed or open ring ``[n, 2]``."""
    r = np.asarray(ring, np.float64)
    x, y = r[:, 0], r[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
