"""Tissue outlines: the RDP simplification agrees with scikit-image's, and stays within tolerance."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from skimage.measure import approximate_polygon

from gigaslide.tiling.polygon import find_contours, simplify


def _blob(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:120, :120]
    r = 40 + 12 * np.sin(rng.integers(2, 7) * np.arctan2(yy - 60, xx - 60) + rng.uniform(0, 6))
    return (np.hypot(yy - 60, xx - 60) < r).astype(np.uint8)


def _max_deviation(chain: np.ndarray, simplified: np.ndarray) -> float:
    """Largest distance of a chain point to the simplified segment that replaces it (simplified ⊂ chain, in order)."""
    idx = [int(np.flatnonzero((chain == q).all(1))[0]) for q in simplified[:-1]] + [len(chain) - 1]
    assert idx == sorted(idx) and idx[0] == 0
    worst = 0.0
    for i, j in zip(idx[:-1], idx[1:]):
        a, b, p = chain[i], chain[j], chain[i:j + 1]
        ab = b - a
        t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-12), 0, 1)
        worst = max(worst, float(np.hypot(*(p - (a + t[:, None] * ab)).T).max()))
    return worst


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tol", [0.6, 1.1, 2.9])
def test_simplify_agrees_with_scikit_image(seed, tol):
    (c,) = find_contours(np.pad(_blob(seed), 1), 0.5)
    ours, ref = simplify(c, tol), approximate_polygon(c, tol)
    assert _max_deviation(c, ours) <= tol + 1e-9 and _max_deviation(c, ref) <= tol + 1e-9
    assert (ours[0] == c[0]).all() and (ours[-1] == c[-1]).all()
    # same algorithm; only distances that tie with the tolerance on the half-pixel contour grid may round apart
    assert abs(len(ours) - len(ref)) <= max(2, 0.05 * len(ref)) and len(ours) < len(c) / 2


def test_simplify_drops_collinear_points_and_keeps_bumps_above_tolerance():
    square = np.array([[0, 0], [0, 5], [0, 10], [5, 10.2], [10, 10], [10, 5], [10, 0], [5, 0.3], [0, 0]], float)
    assert simplify(square, 0.5).tolist() == [[0, 0], [0, 10], [10, 10], [10, 0], [0, 0]]
    assert simplify(square, 0.1).tolist() == [[0, 0], [0, 10], [5, 10.2], [10, 10], [10, 0], [5, 0.3], [0, 0]]
    assert simplify(square, 0).tolist() == square.tolist()


def test_tiling_does_not_import_scipy_signal():
    code = ("import sys; import gigaslide.tiling.tissue as t, gigaslide.tiling.polygon as p; "
            "p.simplify(p.find_contours([[0, 1], [1, 1]])[0], 1.0); print('scipy.signal' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
