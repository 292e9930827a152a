"""The direct (decode-once) tile reader gives OpenSlide's pixels, white outside the slide, in order."""

from __future__ import annotations

import numpy as np
import pytest

from gigaslide.slides import TileReader, iter_tiles, open_slide
from gigaslide.slides.slide import box_reduce
from gigaslide.slides.writer import write_pyramidal_tiff
from gigaslide.testing import make_slide, tissue_fn

MAX_DIFF = 2  # per channel, against OpenSlide


def _coords(s, tile_size: int, mpp: float, n: int, seed: int) -> np.ndarray:
    """Random tile corners, a quarter of them overhanging the slide's right / bottom / left / top border."""
    W, H = s.dimensions
    t0 = int(tile_size * mpp / s.mpp)
    rng = np.random.default_rng(seed)
    xy = np.stack([rng.integers(0, max(1, W - t0), n), rng.integers(0, max(1, H - t0), n)], 1)
    k = n // 4
    xy[:k, 0] = W - t0 // 3  # overhang right
    xy[k:2 * k, 1] = H - t0 // 2  # overhang bottom
    xy[2 * k, :] = (-t0 // 2, -t0 // 3)  # overhang top-left
    return xy


def _max_diff_to_openslide(path, mpp: float, tile_size: int, *, slide_mpp=None, n: int = 24, seed: int = 0):  # noqa: ANN001
    with open_slide(path, mpp=slide_mpp) as s:
        coords = _coords(s, tile_size, mpp, n, seed)
        r = TileReader(s, tile_size, mpp)
        worst = 0
        for (x, y), tile in zip(coords, iter_tiles(s, coords, tile_size, mpp)):
            ref = s.read_region((int(x), int(y)), (tile_size, tile_size), mpp)
            assert tile.shape == (tile_size, tile_size, 3) and tile.dtype == np.uint8
            worst = max(worst, int(np.abs(tile.astype(np.int16) - ref).max()))
        return worst, r.direct, r.factor, r.read_mpp()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    return {"jpeg": make_slide(d / "j.tiff", (2051, 1539), seed=4),
            "none": make_slide(d / "n.tiff", (2061, 1541), seed=5, compression="none")}


@pytest.mark.parametrize("kind", ["jpeg", "none"])
@pytest.mark.parametrize("mpp,tile", [(0.5, 64), (1.0, 64), (2.0, 48), (1.5, 40)])
def test_generated_slides_match_openslide(generated, kind, mpp, tile):
    worst, direct, factor, read_mpp = _max_diff_to_openslide(generated[kind], mpp, tile)
    assert worst <= MAX_DIFF
    # 0.5 = level 0, 1.0 / 2.0 = levels 1 / 2 (downsample 2.001 / 4.007: within 1 %), 1.5: resampled by OpenSlide
    assert direct == (mpp != 1.5) and factor == (0 if mpp == 1.5 else 1)
    if direct and mpp > 0.5:
        assert read_mpp != mpp and read_mpp == pytest.approx(mpp, rel=0.01)  # the level's own resolution


def test_power_of_two_below_a_level_is_box_averaged(tmp_path):
    p = write_pyramidal_tiff(tmp_path / "x4.tiff", 2100, 2050, tissue_fn(2100, 2050, 3), mpp=0.5, level_factor=4)
    with open_slide(p) as s:  # levels 1, 4: 1.0 µm/px is level 0 at /2, 4.0 and 8.0 level 1 at /2, /4
        for mpp, level, k in ((1.0, 0, 2), (4.0, 1, 2), (8.0, 1, 4)):
            r = TileReader(s, 32, mpp)
            assert r.direct and r.factor == k and r.level.level == level
            tile = r.read(600, 400)
            level_px = TileReader(s, 32 * k, mpp / k).read(600, 400)  # the level itself, no resampling
            np.testing.assert_array_equal(tile, box_reduce(level_px, k))
            assert np.abs(tile.astype(int) - s.read_region((600, 400), (32, 32), mpp)).max() <= MAX_DIFF


def test_each_stored_tile_decoded_once_in_grid_order(generated):
    with open_slide(generated["jpeg"]) as s:
        r = TileReader(s, 100, 0.5)
        xs, ys = np.arange(0, 2051, 100), np.arange(0, 1539, 100)
        coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
        r.read_batch(coords)
        stored = -(-2051 // 256) * -(-1539 // 256)
        assert r.decoded_tiles == stored and r.fallback_tiles == 0


def test_outside_the_slide_is_white(generated):
    with open_slide(generated["jpeg"]) as s:
        tile = next(iter_tiles(s, [(2051 - 10, 0)], 64, 0.5))
    assert (tile[:, 10:] == 255).all() and (tile[:, :10] != 255).any()


def test_iter_tiles_keeps_order_and_opens_paths(generated):
    coords = [(400, 300), (10, 20), (400, 300), (900, 600)]
    tiles = list(iter_tiles(generated["jpeg"], coords, 32, 0.5))
    np.testing.assert_array_equal(tiles[0], tiles[2])
    with open_slide(generated["jpeg"]) as s:
        for (x, y), t in zip(coords, tiles):
            np.testing.assert_array_equal(t, s.read_region((x, y), (32, 32), 0.5))


def test_within_tolerance_not_resampled_outside_it_is(tmp_path):
    p = make_slide(tmp_path / "s.tiff", (600, 600), mpp=0.499)
    with open_slide(p) as s:
        assert TileReader(s, 64, 0.5).factor == 1 and s.read_mpp(0.5) == pytest.approx(0.499)
        assert TileReader(s, 64, 0.5, tolerance=0.001).factor == 0 and s.read_mpp(0.5, 0.001) == 0.5


# --- every shared slide: direct where it applies, OpenSlide otherwise, same pixels --------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("name,mpp,tile,slide_mpp,direct", [
    ("cmu-1-small-region.svs", 0.5, 224, None, True),  # 0.499 within 1 %: stored JPEG tiles cut directly
    ("cmu-1-small-region.svs", 1.0, 112, None, True),  # /2 box average of level 0
    ("cmu-1-small-region.svs", 0.75, 100, None, False),  # resampled: OpenSlide
    ("tcga-cr-7395-01a-01-ts1.svs", 0.5, 128, 0.5, True),  # JPEG 2000 tiles
    ("tcga-cr-7395-01a-01-ts1.svs", 2.0, 96, 0.5, True),  # level 1 at a sub-pixel offset
    ("formats/boxes.tiff", 2.0, 32, 1.0, True),  # deflate tiles, level 1
    ("formats/small.svs", 0.499, 8, None, True),
    ("kidney-48-5.tif", 1.0, 64, 1.0, False),  # plain image: no TIFF tiles
    ("formats/boxes_0.dcm", 0.499, 8, None, False),  # DICOM: OpenSlide
])
def test_real_slides_match_openslide(real_slides, name, mpp, tile, slide_mpp, direct):
    worst, was_direct, _, _ = _max_diff_to_openslide(real_slides / name, mpp, tile, slide_mpp=slide_mpp, n=16)
    assert was_direct == direct
    assert worst <= MAX_DIFF
