"""Tissue outlines: the RDP simplification agrees with scikit-image's, and stays within tolerance; the GeoJSON
outline of a tissue mask is the mask's exact outline (holes included), or within the tolerance given in level-0 px."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from skimage.measure import approximate_polygon

from gigaslide.errors import GigaslideError
from gigaslide.tiling.annotations import rasterize
from gigaslide.tiling.polygon import find_contours, pixel_outline, ring_area, simplify
from gigaslide.tiling.tissue import TissueMask, mask_to_geojson


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


def _holey_mask() -> np.ndarray:
    """Pieces with holes (one holding an island), a lone pixel, a diagonal step and a piece at the mask's border."""
    m = np.zeros((70, 90), bool)
    m[5:45, 5:60] = True
    m[12:30, 15:40] = False  # a hole (an excluded region of a --tissue-from polygon)
    m[18:22, 22:26] = True  # an island in it: a piece of its own
    m[35:40, 45:50] = False  # a second hole
    m[50, 70] = True  # a lone pixel
    m[55:69, 75:90] = True  # touches the right and bottom border
    m[60:62, 80:82] = False  # and has a hole
    m[50:53, 20:23] = True
    m[53:56, 23:26] = True  # touches the piece above only at a corner: its own piece
    return m


@pytest.mark.parametrize("ds", [1.0, 3.7])
def test_geojson_outline_is_the_masks_exact_outline(ds):
    """Tolerance 0: the polygons, rasterised back (pixel centres, holes excluded), give the mask pixel for pixel;
    holes are interior rings; every vertex is a mask-pixel corner in level-0 px; the area is the mask's."""
    m = _holey_mask()
    tm = TissueMask(m, ds, (round(m.shape[1] * ds), round(m.shape[0] * ds)))
    gj = mask_to_geojson(tm, tolerance=0)
    polys = [[np.array(r) for r in f["geometry"]["coordinates"]] for f in gj["features"]]
    assert np.array_equal(rasterize(polys, m.shape, ds), m)
    assert sorted(len(p) for p in polys) == [1, 1, 1, 1, 2, 3]  # island, lone px, the corner step (2), border piece
    area = sum(ring_area(p[0]) - sum(abs(ring_area(h)) for h in p[1:]) for p in polys)
    assert area == pytest.approx(m.sum() * ds * ds)
    for p in polys:
        assert ring_area(p[0]) > 0 and all(ring_area(h) < 0 for h in p[1:])
        for r in p:
            assert r[0].tolist() == r[-1].tolist()
            np.testing.assert_allclose(r / ds, np.round(r / ds), atol=1e-9)  # on the pixel grid


def test_geojson_tolerance_is_level0_px_and_keeps_every_ring():
    """A tolerance in level-0 px: each exact corner lies within it of the simplified ring (a mask px is 32 level-0
    px here); simplified rings stay rings; negative tolerances are refused in one line."""
    m = _blob(1).astype(bool)
    m[50:70, 50:70] = False  # a hole
    m[2:6, 2:6] = True  # a small square piece: simplification must not collapse it
    ds = 32.0
    tm = TissueMask(m, ds, (m.shape[1] * 32, m.shape[0] * 32))
    exact = mask_to_geojson(tm, tolerance=0)["features"]
    for tol in (16.0, 40.0):
        simp = mask_to_geojson(tm, tolerance=tol)["features"]
        assert [len(f["geometry"]["coordinates"]) for f in simp] == [len(f["geometry"]["coordinates"]) for f in exact]
        for fe, fs in zip(exact, simp):
            for re_, rs in zip(fe["geometry"]["coordinates"], fs["geometry"]["coordinates"]):
                re_, rs = np.array(re_), np.array(rs)
                assert len(rs) >= 4 and len(rs) <= len(re_)
                assert _max_deviation(re_, rs) <= tol + 1e-6 or len(rs) == len(re_)
    assert sum(len(r) for f in mask_to_geojson(tm, tolerance=40.0)["features"] for r in f["geometry"]["coordinates"]) \
        < sum(len(r) for f in exact for r in f["geometry"]["coordinates"])
    with pytest.raises(GigaslideError, match="level-0 px"):
        mask_to_geojson(tm, tolerance=-1)


def test_pixel_outline_of_a_lone_pixel_is_its_square():
    (c,) = find_contours(np.pad([[1]], 1), 0.5)
    out = pixel_outline(c)
    assert abs(ring_area(out)) == 1.0 and len(out) == 5
    assert sorted(map(tuple, out[:-1].tolist())) == [(0.5, 0.5), (0.5, 1.5), (1.5, 0.5), (1.5, 1.5)]


def test_geojson_outline_is_exact_on_noise_masks():
    """Random masks (diagonal touches, holes in holes, pieces at every border): rasterised back, the exact outlines
    give the mask pixel for pixel."""
    for seed in range(40):
        rng = np.random.default_rng(seed)
        m = rng.random((24, 30)) < rng.uniform(0.3, 0.7)
        gj = mask_to_geojson(TissueMask(m, 2.0, (60, 48)), tolerance=0)
        polys = [[np.array(r) for r in f["geometry"]["coordinates"]] for f in gj["features"]]
        assert np.array_equal(rasterize(polys, m.shape, 2.0), m), seed
