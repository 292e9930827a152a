"""The grid rule: anchored at (0, 0), every tissue pixel in some tile, edge tiles padded with glass."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from gigaslide.errors import GigaslideError
from gigaslide.slides import open_slide
from gigaslide.slides.writer import write_pyramidal_tiff
from gigaslide.testing import H_AND_E
from gigaslide.tiling import (GRID_RULE, TilingParams, TissueMask, grid_positions, load_grid, make_grid,
                              padding_fraction, segment_tissue, select_tiles, tile_slide)


def covered_fraction(tm: TissueMask, coords: np.ndarray, t0: float) -> float:
    """Fraction of tissue-mask pixels (centre inside the slide) whose centre lies in one of the tiles (vectorised:
    the tiles lie on a lattice, so each pixel's candidate tiles are a rectangle of lattice indices).
    Tile starts are floored to whole level-0 px, so a tile is taken to reach 1 px further."""
    if not tm.mask.any():
        return 1.0
    if len(coords) == 0:
        return 0.0
    xs, ys = np.unique(coords[:, 0]), np.unique(coords[:, 1])
    kept = np.zeros((len(ys), len(xs)), np.int64)
    kept[np.searchsorted(ys, coords[:, 1]), np.searchsorted(xs, coords[:, 0])] = 1
    s = np.zeros((len(ys) + 1, len(xs) + 1), np.int64)
    s[1:, 1:] = kept.cumsum(0).cumsum(1)
    iy, ix = np.nonzero(tm.mask)
    cy, cx = (iy + 0.5) * tm.downsample, (ix + 0.5) * tm.downsample
    inside = (cx < tm.slide_dimensions[0]) & (cy < tm.slide_dimensions[1])  # the thumbnail is rounded to whole px
    cy, cx = cy[inside], cx[inside]
    x0, x1 = np.searchsorted(xs, cx - t0 - 1, "right"), np.searchsorted(xs, cx, "right")  # starts in (c - t0 - 1, c]
    y0, y1 = np.searchsorted(ys, cy - t0 - 1, "right"), np.searchsorted(ys, cy, "right")
    hits = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
    return float((hits > 0).mean())


@given(length=st.integers(1, 5000), tile=st.floats(1, 800), stride_frac=st.floats(0.05, 1.0))
def test_grid_positions_cover_every_pixel_from_inside(length, tile, stride_frac):
    stride = max(1.0, tile * stride_frac)  # a stride is at least one target px, >= ~1 level-0 px
    pos = grid_positions(length, tile, stride)
    assert len(pos) >= 1 and pos[0] == 0 and (pos < length).all()  # every tile starts inside
    assert (np.diff(pos) >= np.floor(stride)).all() and (np.diff(pos) <= np.ceil(stride)).all()  # a regular grid
    starts = np.zeros(length + 1, np.int64)
    np.add.at(starts, pos, 1)
    np.add.at(starts, np.minimum(np.ceil(pos + tile).astype(np.int64), length), -1)
    assert (np.cumsum(starts)[:length] > 0).all()  # no pixel (tissue or not) is left out
    assert pos[-1] + tile - length < max(stride, 1.0) + 1e-6 or len(pos) == 1  # reaches past the edge by < a stride
    if len(pos) > 1:
        assert pos[-2] + tile <= length - 1 + 1e-6  # minimal: without the last tile a pixel is uncovered


def _blob_mask(rng: np.random.Generator, h: int, w: int, edge: bool) -> np.ndarray:
    m = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2, h / 2), rng.uniform(2, w / 2)
        Y, X = np.ogrid[:h, :w]
        m |= ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2 <= 1
    if edge:  # tissue along the right and bottom edges, where the old grid never reached
        m[-max(1, h // 10):, :] = True
        m[:, -max(1, w // 10):] = True
    return m


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), W=st.integers(300, 6000), H=st.integers(300, 6000), ds=st.floats(1.0, 16.0),
       factor=st.floats(0.5, 16.0), tile=st.integers(16, 512), overlap_frac=st.floats(0, 0.9), edge=st.booleans())
def test_kept_tiles_cover_the_tissue_mask(seed, W, H, ds, factor, tile, overlap_frac, edge):
    """At any mpp (factor = target / slide mpp), tile size and overlap: >= 99.5 % of the mask is tiled,
    tiles start inside the slide and reach outside it only by their recorded padding."""
    tile0 = tile * factor
    stride0 = (tile - int(tile * overlap_frac)) * factor
    if tile0 > min(W, H):
        return  # refused by make_grid ("more than the slide")
    w, h = max(1, round(W / ds)), max(1, round(H / ds))
    mask = _blob_mask(np.random.default_rng(seed), h, w, edge)
    tm = TissueMask(mask, W / w, (W, H))
    coords, frac, pad = select_tiles(tm, (W, H), tile0, stride0, min_tissue=1e-9)
    assert covered_fraction(tm, coords, tile0) >= 0.995
    assert (coords >= 0).all() and (coords[:, 0] < W).all() and (coords[:, 1] < H).all()
    outside_x = np.maximum(coords[:, 0] + tile0 - W, 0)
    outside_y = np.maximum(coords[:, 1] + tile0 - H, 0)
    assert (outside_x < max(stride0, 1) + 1e-6).all() and (outside_y < max(stride0, 1) + 1e-6).all()
    inside = (tile0 - outside_x) * (tile0 - outside_y)
    np.testing.assert_allclose(pad, 1 - inside / tile0**2, atol=1e-5)
    assert (frac <= 1 - pad + 1e-5).all()  # what lies outside is glass, never tissue


def _slide(path, size, fn, mpp=0.5):
    return write_pyramidal_tiff(path, size[0], size[1], fn, mpp=mpp, tile=256)


def _he_texture(X, Y):  # noqa: ANN001, ANN202
    n = ((X // 24).astype(np.int64) * 7 + (Y // 24).astype(np.int64) * 13) % 4 == 0
    return np.where(n[..., None], H_AND_E[1], H_AND_E[0])


def full_tissue(x0, y0, w, h, ds):  # noqa: ANN001, ANN201
    """H&E-coloured tissue to every edge: no glass anywhere (a crop of a region, a TMA core image)."""
    X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
    return _he_texture(X, Y).clip(0, 255).astype(np.uint8)


def test_slide_without_glass_is_all_tissue_and_fully_tiled(tmp_path):
    p = _slide(tmp_path / "crop.tiff", (1000, 700), full_tissue)
    with open_slide(p) as s:
        tm, _ = segment_tissue(s)
        assert tm.fraction > 0.98  # was 0.0: the detector needed glass
        g = make_grid(s, tm, target_mpp=1.0, tile_size=64, min_tissue=0.25)
    t0 = g.tile_size_level0
    xs, ys = np.unique(g.coords[:, 0]), np.unique(g.coords[:, 1])
    assert xs.tolist() == list(range(0, 1000, 128)) and ys.tolist() == list(range(0, 700, 128))  # whole grid
    assert covered_fraction(tm, g.coords, t0) == 1.0
    last = (g.coords[:, 0] == 896) & (g.coords[:, 1] == 640)  # corner tile: 104 x 60 of its 128 x 128 px inside
    assert g.padding[last] == pytest.approx(1 - 104 * 60 / 128**2, abs=1e-6)


def edge_tissue(x0, y0, w, h, ds):  # noqa: ANN001, ANN201
    """Glass, with a band of tissue along the right and bottom edges (60 level-0 px wide)."""
    X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
    band = (X >= 1100 - 60) | (Y >= 950 - 60)
    return np.where(band[..., None], _he_texture(X, Y), 245).clip(0, 255).astype(np.uint8)


def test_edge_tissue_is_tiled_and_padding_is_white_and_recorded(tmp_path):
    p = _slide(tmp_path / "edge.tiff", (1100, 950), edge_tissue)
    g = tile_slide(p, tmp_path / "out", TilingParams(mpp=1.0, tile_size=64, min_tissue=0.01))
    t0 = g.tile_size_level0  # 128: 1100 = 8 * 128 + 76, 950 = 7 * 128 + 54
    right = g.coords[:, 0] == 1024
    assert right.sum() >= 6  # the right-edge column is kept (the old centred grid stopped 38 px short of the edge)
    assert (g.padding[right] > 0).all() and (g.padding[~right & (g.coords[:, 1] < 896)] == 0).all()
    back = load_grid(tmp_path / "out" / "patches" / "edge.h5")
    np.testing.assert_array_equal(back.padding, g.padding)
    assert back.extra["grid_rule"] == GRID_RULE
    with open_slide(p) as s:
        tm, _ = segment_tissue(s)
        tile = s.read_region(tuple(g.coords[right][0]), (64, 64), 1.0)
    assert covered_fraction(tm, g.coords, t0) >= 0.995
    inside = int((1100 - 1024) / 2)  # 38 target px inside the slide
    assert (tile[:, inside + 1:] == 255).all()  # the part outside the slide is white glass
    assert tile[:, : inside - 1].mean() < 200  # the part inside is tissue
    np.testing.assert_allclose(padding_fraction(g.coords[right][:1], t0, (1100, 950)), [1 - 76 / 128], atol=1e-6)
    bottom = g.coords[:, 1] == 896
    assert bottom.sum() >= 8  # the bottom band: 54 of the last row's 128 px are inside, all tissue
    np.testing.assert_allclose(g.tissue[bottom], 1 - g.padding[bottom], atol=0.03)  # outside counted as glass


@pytest.mark.realdata
def test_tiffslide_pads_outside_white(real_slides):
    """kidney-48-5.tif opens with tiffslide, which returns out-of-slide pixels black; read_region makes them white."""
    with open_slide(real_slides / "kidney-48-5.tif", mpp=0.5) as s:
        assert s.backend == "tiffslide"
        W, H = s.dimensions  # 1493 x 901
        tile = s.read_region((W - 40, H - 20), (64, 64), 0.5)
        assert (tile[25:, :] == 255).all() and (tile[:, 45:] == 255).all()
        assert tile[:15, :35].mean() < 255
        half = s.read_region((W - 40, H - 20), (32, 32), 1.0)  # a resized read too
        assert (half[12:, :] == 255).all() and (half[:, 22:] == 255).all()


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mpp=st.sampled_from([0.5, 0.8, 1.3, 2.0]), tile=st.sampled_from([32, 100, 224]))
def test_real_pipeline_grid_covers_synthetic_tissue(synthetic_slide, mpp, tile):
    with open_slide(synthetic_slide) as s:
        tm, _ = segment_tissue(s)
        g = make_grid(s, tm, target_mpp=mpp, tile_size=tile, min_tissue=1e-9)
    assert covered_fraction(tm, g.coords, g.tile_size_level0) >= 0.995


def test_a_step_under_one_level0_pixel_is_refused_not_repeated(tmp_path):
    """8 px tiles, 7 px overlap at 0.46 µm/px on a 0.5 µm/px scan step 0.92 level-0 px: floored to whole pixels, one
    start in twelve was listed twice (1.28 M tiles, 1.09 M distinct on a 1100 x 1000 slide)."""
    p = write_pyramidal_tiff(tmp_path / "s.tiff", 300, 200, lambda x0, y0, w, h, ds: np.full((h, w, 3), 200, np.uint8),
                             mpp=0.5)
    with open_slide(p) as s:
        with pytest.raises(GigaslideError, match="less than one: tiles would repeat"):
            make_grid(s, None, target_mpp=0.46, tile_size=8, overlap=7, min_tissue=0)
        g = make_grid(s, None, target_mpp=0.5, tile_size=8, overlap=7, min_tissue=0)  # a step of one pixel: fine
        assert len(g) == len(np.unique(g.coords, axis=0)) == (300 - 8 + 1) * (200 - 8 + 1)
