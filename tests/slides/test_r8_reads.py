"""Review round 8 (mutation testing): reads at a target mpp checked against pixels computed here, independently of
the reader -- box averages written out with PIL's rounding, level pixels read with tifffile, the fill outside the
slide counted by hand -- so that a slip in the tolerance, the reduction factor, the level-k coordinates or the
padding changes a number these tests pin."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from gigaslide.slides import TileReader, iter_tiles, open_slide
from gigaslide.slides.slide import LevelChoice
from gigaslide.slides.writer import write_array_as_slide


def _box(px: np.ndarray, k: int) -> np.ndarray:
    """``k`` x ``k`` block means of a uint8 [H, W, 3] array rounded half up, as PIL's ``Image.reduce`` rounds."""
    h, w = px.shape[0] // k, px.shape[1] // k
    s = px[:h * k, :w * k].astype(np.int64).reshape(h, k, w, k, 3).sum((1, 3))
    return ((s + k * k // 2) // (k * k)).astype(np.uint8)


def _random(h: int, w: int, seed: int) -> np.ndarray:
    """Texture with no 0 or 255 (so that a pixel of background is never tissue by chance)."""
    return np.random.default_rng(seed).integers(1, 255, (h, w, 3), dtype=np.uint8)


def test_the_reduction_tolerance_is_relative_to_the_factor():
    """SCALE_TOLERANCE (1 %) is relative: a scale of 2.015 is /2 (within 0.02), 4.035 is /4 (within 0.04), 8.07 is /8;
    1.015 is no /1 (0.015 > 0.01) and 4.045 no /4 (0.045 > 0.04)."""
    want = {1.0: 1, 1.009: 1, 1.015: 0, 2.015: 2, 2.025: 0, 4.035: 4, 4.045: 0, 8.07: 8, 8.09: 0, 3.0: 0}
    assert {s: LevelChoice(0, 1.0, s).factor() for s in want} == want
    assert LevelChoice(0, 1.0, 2.03).factor(tolerance=0.02) == 2  # a wider tolerance: within 0.04


def test_a_scan_just_finer_than_half_the_target_is_box_averaged_by_two(tmp_path):
    """A single-level scan at 0.252 µm/px read at 0.5: scale 1.984, within 1 % of 2 (relative), so each tile px is the
    exact 2 x 2 mean of level-0 px (PIL's rounding) and the tiles' resolution is 0.504 µm/px, not a bilinear resample
    at 0.5. Both the direct reader and Slide.read_region (OpenSlide) give those pixels."""
    img = _random(400, 520, 1)
    p = write_array_as_slide(tmp_path / "s.tiff", img, mpp=0.252, compression="none", min_level_size=10**6)
    with open_slide(p) as s:
        assert s.level_count == 1 and s.mpp == pytest.approx(0.252, rel=1e-6)
        r = TileReader(s, 32, 0.5)
        assert r.direct and r.factor == 2
        assert r.read_mpp() == pytest.approx(0.504, rel=1e-6) and s.read_mpp(0.5) == r.read_mpp()
        for x, y in [(100, 60), (0, 0), (455, 335)]:  # the last one 1 px short of the edge: exact to the border
            want = _box(img[y:y + 64, x:x + 64], 2)
            np.testing.assert_array_equal(r.read(x, y), want)
            np.testing.assert_array_equal(s.read_region((x, y), (32, 32), 0.5), want)


def test_reads_below_a_coarser_level_use_its_pixels_at_level_coordinates(tmp_path):
    """Levels at downsample 1 and 4 (level_factor 4): 4 µm/px is level 1 box-averaged by 2, 8 µm/px by 4. The tile at
    level-0 (x, y) starts at level-1 pixel (x / 4, y / 4) -- level-1 pixels read here with tifffile -- and its
    resolution is 0.5 x 4 x k µm/px."""
    img = _random(1024, 1280, 2)
    p = write_array_as_slide(tmp_path / "x4.tiff", img, mpp=0.5, compression="none", level_factor=4,
                             min_level_size=256)
    with tifffile.TiffFile(p) as tif:
        level1 = tif.pages[1].asarray()
    assert level1.shape == (256, 320, 3)
    with open_slide(p) as s:
        assert s.level_downsamples == [1.0, 4.0]
        for mpp, k in [(4.0, 2), (8.0, 4)]:
            r = TileReader(s, 16, mpp)
            assert r.direct and r.level.level == 1 and r.factor == k
            assert r.read_mpp() == pytest.approx(0.5 * 4 * k)
            for x, y in [(400, 200), (1280 - 16 * 4 * k, 1024 - 16 * 4 * k)]:
                want = _box(level1[y // 4:y // 4 + 16 * k, x // 4:x // 4 + 16 * k], k)
                np.testing.assert_array_equal(r.read(x, y), want)
                np.testing.assert_array_equal(s.read_region((x, y), (16, 16), mpp), want)


@pytest.mark.parametrize("background,fill", [("bright", 255), ("dark", 0)])
def test_tiffslide_reads_past_the_edge_are_padded_with_the_background(tmp_path, monkeypatch, background, fill):
    """tiffslide returns the outside of the slide black and opaque: read_region paints exactly the px outside the
    level with the background (white glass, or black) and keeps every px inside. Level 0 of a 301 x 203 slide read
    at (290, 190): 11 columns and 13 rows inside; at (-6, -4): 6 columns and 4 rows outside; level 1 (150 x 101 px,
    downsample 2.008) read from level-0 x 280: tiffslide starts at level px 139, so 11 columns inside."""
    import tiffslide

    import gigaslide.slides.slide as slide_mod

    img = _random(203, 301, 3)
    p = write_array_as_slide(tmp_path / "t.tiff", img, mpp=0.5, compression="none", tile=64, min_level_size=64)
    monkeypatch.setattr(slide_mod, "open_backend", lambda q: (tiffslide.TiffSlide(str(q)), "tiffslide"))
    with open_slide(p) as s:
        assert s.backend == "tiffslide" and s.level_dimensions[:2] == [(301, 203), (150, 101)]
        want = np.full((32, 32, 3), fill, np.uint8)
        want[:13, :11] = img[190:, 290:]
        np.testing.assert_array_equal(s.read_region((290, 190), (32, 32), 0.5, background=background), want)
        want = np.full((16, 16, 3), fill, np.uint8)
        want[4:, 6:] = img[:12, :10]
        np.testing.assert_array_equal(s.read_region((-6, -4), (16, 16), 0.5, background=background), want)
        raw = np.asarray(s._handle.read_region((280, 20), 1, (16, 16)).convert("RGB"))
        got = s.read_region((280, 20), (16, 16), 1.0, tolerance=0.01, background=background)
        assert s.choose_level(1.0).level == 1
        np.testing.assert_array_equal(got[:, :11], raw[:, :11])
        assert (got[:, 11:] == fill).all() and (got[:, :11] != fill).all(-1).any()


def test_openslide_reads_past_the_edge_are_padded_on_every_path(tmp_path):
    """OpenSlide returns the outside transparent: at the target's own level, at /2 and resampled (0.7 µm/px) the px
    wholly outside the slide are exactly the background, those inside exactly the slide's (or its box means)."""
    img = _random(203, 301, 4)
    p = write_array_as_slide(tmp_path / "o.tiff", img, mpp=0.5, compression="none", min_level_size=10**6)
    with open_slide(p) as s:
        for background, fill in [("bright", 255), ("dark", 0)]:
            got = s.read_region((290, 190), (32, 32), 0.5, background=background)
            want = np.full((32, 32, 3), fill, np.uint8)
            want[:13, :11] = img[190:, 290:]
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(next(iter_tiles(s, [(290, 190)], 32, 0.5, background=background)), want)
            got = s.read_region((280, 180), (16, 16), 1.0, background=background)  # /2: 21 x 23 px inside
            want = np.full((16, 16, 3), fill, np.uint8)
            want[:11, :10] = _box(img[180:202, 280:300], 2)
            np.testing.assert_array_equal(got[:11, :10], want[:11, :10])
            assert (got[12:] == fill).all() and (got[:, 11:] == fill).all()  # the px half inside: a blend
            got = s.read_region((285, 185), (24, 24), 0.7, background=background)  # 1.4 level px per tile px
            cols = (285 + (np.arange(24) - 1) * 1.4 >= 301)  # a px whose bilinear support is all outside
            rows = (185 + (np.arange(24) - 1) * 1.4 >= 203)
            assert cols.sum() >= 2 and rows.sum() >= 2
            assert (got[:, cols] == fill).all() and (got[rows] == fill).all()
            assert (got[:5, :5] != fill).all(-1).any()


def test_split_offset_rounds_the_fraction_to_the_nearest_256th():
    """OpenSlide paints a level at location / downsample with 8-bit sub-pixel weights: 3.5 -> (3, 128), 1.003 ->
    (1, 1) (0.768 / 256 rounds up), 1.001 -> (1, 0), 10.999 -> (11, 0) (255.7 rounds to 256: the next px), -0.25 ->
    (-1, 192)."""
    from gigaslide.slides.tiled import split_offset

    got = [split_offset(v) for v in (3.5, 1.003, 1.001, 10.999, -0.25, 7.0)]
    assert got == [(3, 128), (1, 1), (1, 0), (11, 0), (-1, 192), (7, 0)]


def test_shift_bilinear_is_the_exact_bilinear_value_rounded_half_up():
    """Weights (256 - w, w) / 256 across then down, the result the exact bilinear value rounded half up (pixman):
    with power-of-two weights the float reference below is exact."""
    from gigaslide.slides.tiled import shift_bilinear

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    for wx, wy in [(128, 0), (0, 128), (1, 255), (77, 200), (255, 1)]:
        fx, fy = wx / 256, wy / 256
        s = src.astype(np.float64)
        exact = ((1 - fx) * (1 - fy) * s[:-1, :-1] + fx * (1 - fy) * s[:-1, 1:] + (1 - fx) * fy * s[1:, :-1]
                 + fx * fy * s[1:, 1:])
        np.testing.assert_array_equal(shift_bilinear(src, wx, wy, 10, 8), np.floor(exact + 0.5).astype(np.uint8))
    half = np.array([[[0] * 3, [1] * 3], [[0] * 3, [1] * 3]], np.uint8)
    assert shift_bilinear(half, 128, 0, 1, 1)[0, 0, 0] == 1  # 0.5 rounds up


def test_a_direct_path_that_disagrees_with_openslide_is_turned_off_at_open(tmp_path, monkeypatch):
    """The check read at open compares the stored-tile decode with OpenSlide: a decoder that swaps red and blue is
    caught there, and every tile is then read through OpenSlide (the slide's own pixels)."""
    from gigaslide.slides import tiled

    img = _random(300, 400, 5)
    p = write_array_as_slide(tmp_path / "s.tiff", img, mpp=0.5, compression="none", min_level_size=10**6)
    real = tiled.TiffLevel.region

    def swapped(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        px = real(self, *a, **k)
        px[...] = px[..., ::-1].copy()
        return px

    with open_slide(p) as s:
        assert TileReader(s, 32, 0.5).direct
        monkeypatch.setattr(tiled.TiffLevel, "region", swapped)
        r = TileReader(s, 32, 0.5)
        assert not r.direct
        np.testing.assert_array_equal(r.read(100, 50), img[50:82, 100:132])


@pytest.mark.parametrize("fill", [255, 0])
def test_a_sparse_stored_tile_is_the_background(tmp_path, fill):
    """A tile never written (byte count 0) reads as the background given, as the outside of the level does; the
    tiles around it keep their pixels."""
    from gigaslide.slides.tiled import open_tiff_level

    img = _random(256, 256, 6)
    p = tmp_path / "sp.tiff"
    tifffile.imwrite(p, img, tile=(128, 128), photometric="rgb")
    level = open_tiff_level(p, (256, 256), 64)
    assert level is not None
    level._counts = np.array(level._counts).copy()
    level._counts[1] = 0  # the top-right tile: sparse
    got = level.region(100, 100, 60, 60, fill=fill)  # across all four tiles
    want = img[100:160, 100:160].copy()
    want[:28, 28:] = fill
    np.testing.assert_array_equal(got, want)
    got = level.region(240, -5, 30, 10, fill=fill)  # the sparse tile and the outside, the same fill
    assert (got == fill).all()
    level.close()


def test_a_reader_process_keeps_one_reader_per_resolution_and_background(tmp_path):
    """A reader process keeps its last slides open, keyed by what they read: the same slide asked for at another mpp,
    slide mpp or background gets its own reader -- the level-0 px at 0.5, their 2 x 2 means at 1.0, at 0.25 µm/px
    (given by hand) 4 x 4 means at 1.0, black past the edge for a dark background -- with the read_mpp of each."""
    from gigaslide.slides.pool import ReadTask, _Readers

    img = _random(200, 300, 9)
    p = str(write_array_as_slide(tmp_path / "r.tiff", img, mpp=0.5, compression="none", min_level_size=10**6))
    coords = np.array([[40, 20], [280, 180]])  # the second one overhangs the right and bottom edges
    edge = np.full((32, 32, 3), 255, np.uint8)
    edge[:20, :20] = img[180:, 280:]
    readers = _Readers()
    for kw, want0, want1, read_mpp in [
        (dict(mpp=0.5), img[20:52, 40:72], edge, 0.5),
        (dict(mpp=1.0), _box(img[20:84, 40:104], 2), None, 1.0),
        (dict(mpp=1.0, slide_mpp=0.25), _box(img[20:148, 40:168], 4), None, 1.0),
        (dict(mpp=0.5, background="dark"), img[20:52, 40:72], np.where(edge == 255, 0, edge), 0.5),
        (dict(mpp=0.5), img[20:52, 40:72], edge, 0.5),
    ]:
        px, info = readers.read(ReadTask(0, p, coords, 32, **kw), None, False)
        assert not isinstance(px, str), px
        np.testing.assert_array_equal(px.numpy()[0], want0)
        if want1 is not None:
            np.testing.assert_array_equal(px.numpy()[1], want1)
        assert info["read_mpp"] == pytest.approx(read_mpp, rel=1e-6) and info["direct"]
    readers.close()


def test_no_background_given_is_bright_field_glass(tmp_path):
    """``background=None`` is the default bright field: white past the edge, on both reader paths."""
    img = _random(100, 120, 10)
    p = write_array_as_slide(tmp_path / "n.tiff", img, mpp=0.5, compression="none", min_level_size=10**6)
    want = np.full((16, 16, 3), 255, np.uint8)
    want[:4, :8] = img[96:, 112:]
    with open_slide(p) as s:
        np.testing.assert_array_equal(s.read_region((112, 96), (16, 16), 0.5, background=None), want)
        r = TileReader(s, 16, 0.5, background=None)
        assert r.direct and r.background == "bright"
        np.testing.assert_array_equal(r.read(112, 96), want)


@pytest.mark.parametrize("background", ["bright", "dark"])
def test_sub_pixel_tiles_at_the_levels_border_are_openslides_own(tmp_path, background):
    """A tile at a sub-pixel offset of a level (downsample 2.001 here) whose read reaches the level's last column or
    row is OpenSlide's, exactly (OpenSlide blends the border px with transparency; blending with the background
    instead was up to 3 grey levels off on black): those tiles go through Slide.read_region."""
    from gigaslide.testing import make_slide

    p = make_slide(tmp_path / "b.tiff", (2051, 1539), seed=4)
    with open_slide(p) as s:
        W, H = s.dimensions
        lw, lh = s.level_dimensions[1]
        ds = s.level_downsamples[1]
        r = TileReader(s, 64, 1.0, background=background)
        assert r.direct and r.level.level == 1 and r.factor == 1 and ds != 2.0
        n = 0
        for x in range(W - 120, W - 2, 7):
            for y in (101, H - 3):
                assert x / ds + 64 > lw - 1 or y / ds + 64 > lh - 1  # the read reaches the border
                ref = s.read_region((x, y), (64, 64), 1.0, level=r.level, background=background)
                np.testing.assert_array_equal(r.read(x, y), ref)
                n += 1
        assert n == 34
