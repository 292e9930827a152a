"""The direct (decode-once) tile reader gives OpenSlide's pixels, white outside the slide, in order."""

from __future__ import annotations

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
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


# --- downsample="dct": /2, /4, /8 by the JPEG decoder's DCT scaling -------------------------------------------
@pytest.fixture(scope="module")
def one_level(tmp_path_factory):
    """A JPEG slide with level 0 only: every coarser resolution is a /2, /4 or /8 read of it."""
    p = tmp_path_factory.mktemp("dct") / "one.tiff"
    return write_pyramidal_tiff(p, 2100, 1600, tissue_fn(2100, 1600, 6, 5), mpp=0.25, min_level_size=10**6)


@pytest.mark.parametrize("mpp,k", [(0.5, 2), (1.0, 4), (2.0, 8)])
def test_dct_reads_are_the_decoders_scaled_tiles_close_to_box_averages(one_level, mpp, k):
    from gigaslide.slides.tiled import jpeg_decode_scaled

    tile = 64
    with open_slide(one_level) as s:
        box, dct = TileReader(s, tile, mpp), TileReader(s, tile, mpp, downsample="dct")
        assert box.factor == dct.factor == k and dct.downsample == "dct" and box.downsample == "box"
        step = tile * k
        xs, ys = np.meshgrid(np.arange(0, 2100, step), np.arange(0, 1600, step))
        coords = np.stack([xs.ravel(), ys.ravel()], 1)
        a, b = box.read_batch(coords), dct.read_batch(coords)
        assert dct.decoded_tiles == box.decoded_tiles == 9 * 7  # each stored tile once, at 1/k
        diff = np.abs(a.astype(int) - b)
        assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 8  # a low-pass close to the box average ...
        assert diff.max() > 0  # ... and not the same pixels: the scaled decode really ran
        # a tile inside stored tile (1, 2) is that tile decoded at 1/k, cropped: no resampling of our own
        level = dct.tiff_level
        x0, y0 = 256 * 2 + 8 * k, 256 * 1 + 16 * k
        want = jpeg_decode_scaled(level.jpeg_stream(1 * level.tiles_across + 2), k, (256 // k, 256 // k))
        size = min(tile, 256 // k - 16)
        got = TileReader(s, size, mpp, downsample="dct").read(x0, y0)
        np.testing.assert_array_equal(got, want[16:16 + size, 8:8 + size])


def test_dct_rounds_a_corner_between_reduced_pixels_and_decodes_each_tile_once(one_level):
    # a grid whose level-0 stride (here 449) is not a multiple of the reduction (2): odd corners round to the
    # reduced grid, and every stored tile is still decoded once, at 1/2 only
    with open_slide(one_level) as s:
        r = TileReader(s, 64, 0.5, downsample="dct")
        x, y = max(((x, y) for x in range(101, 1900, 200) for y in range(101, 1400, 200)),
                   key=lambda c: r.read(*c).std())  # an odd corner on textured tissue
        np.testing.assert_array_equal(r.read(x, y), r.read(x + 1, y + 1))  # x / 2 = m + 0.5 rounds to m + 1
        assert not np.array_equal(r.read(x, y), r.read(x - 1, y - 1))  # ... not to m
        r2 = TileReader(s, 224, 0.5, downsample="dct")
        xs = np.floor(np.arange(0, 1600, 448.9)).astype(int)
        coords = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
        r2.read_batch(coords)
        box = TileReader(s, 224, 0.5)
        box.read_batch(coords)
        assert r2.decoded_tiles == box.decoded_tiles  # no stored tile decoded twice (whole and scaled)


def test_dct_falls_back_to_box_where_it_cannot_apply(one_level, generated, tmp_path):
    with open_slide(one_level) as s:  # level 0 itself: nothing to reduce
        assert TileReader(s, 64, 0.25, downsample="dct").downsample == "box"
    z = write_pyramidal_tiff(tmp_path / "z.tiff", 1200, 900, tissue_fn(1200, 900, 2), mpp=0.25, min_level_size=10**6,
                             compression="zlib")
    with open_slide(z) as s:  # deflate tiles: no DCT to scale
        r = TileReader(s, 64, 0.5, downsample="dct")
        assert r.direct and r.downsample == "box"
        np.testing.assert_array_equal(r.read(300, 200), TileReader(s, 64, 0.5).read(300, 200))
    with open_slide(one_level) as s, pytest.raises(GigaslideError, match="unknown downsample 'lanczos'"):
        TileReader(s, 64, 0.5, downsample="lanczos")


def test_a_scaled_decoder_that_gets_colours_wrong_is_caught_at_open(one_level, monkeypatch):
    from gigaslide.slides import tiled

    real = tiled.jpeg_decode_scaled
    monkeypatch.setattr(tiled, "jpeg_decode_scaled", lambda *a: real(*a)[..., ::-1])  # RGB -> BGR
    with open_slide(one_level) as s:
        r = TileReader(s, 64, 0.5, downsample="dct")
        assert r.downsample == "box"
        np.testing.assert_array_equal(r.read(512, 512), TileReader(s, 64, 0.5).read(512, 512))


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


# --- a fluorescence slide's tiles at its edges are padded with its own black background -------------------------
def _dark_fn(x0, y0, w, h, ds):  # noqa: ANN001, ANN202
    """Green tissue (never black) on a black background."""
    X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
    g = 90 + ((X // 7 + Y // 5) % 9) * 15
    return np.stack([np.full_like(g, 30), g, np.full_like(g, 60)], -1).astype(np.uint8)


@pytest.mark.parametrize("mpp,tile", [(0.5, 64), (1.0, 48), (0.7, 40), (2.0, 32)])
def test_dark_background_pads_edge_tiles_black(tmp_path, mpp, tile):
    """background="dark": outside the slide is 0 on every reader path (direct cut, /2 box, OpenSlide resampling,
    a level read at a sub-pixel offset), inside unchanged; the default stays white glass."""
    from gigaslide.slides.pool import ReadTask, _Readers

    p = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1031, 777, _dark_fn, mpp=0.5, tile=128)
    with open_slide(p) as s:
        t0 = int(tile * mpp / 0.5)
        coords = np.array([(1031 - t0 // 3, 100), (200, 777 - t0 // 2), (-t0 // 2, -t0 // 3), (1031 - t0 // 2 + 1, 3)])
        dark = np.stack(list(iter_tiles(s, coords, tile, mpp, background="dark")))
        white = np.stack(list(iter_tiles(s, coords, tile, mpp)))
        ref = np.stack([s.read_region((int(x), int(y)), (tile, tile), mpp, background="dark") for x, y in coords])
    f = mpp / 0.5  # level-0 px per tile px; pixels two px off the slide's edge on either side are not blended
    ax = np.arange(tile) * f
    inside = np.zeros(dark.shape[:3], bool)
    outside = np.zeros(dark.shape[:3], bool)
    for i, (x, y) in enumerate(coords):
        ix, iy = (x + ax - f >= 0) & (x + ax + 2 * f <= 1031), (y + ax - f >= 0) & (y + ax + 2 * f <= 777)
        inside[i] = iy[:, None] & ix[None, :]
        ox, oy = (x + ax + 2 * f < 0) | (x + ax - 2 * f >= 1031), (y + ax + 2 * f < 0) | (y + ax - 2 * f >= 777)
        outside[i] = oy[:, None] | ox[None, :]
    assert inside.sum() > tile * 4 and outside.sum() > tile * 4
    assert (white[outside] == 255).all() and (dark[outside] == 0).all()
    assert (dark[inside] == white[inside]).all() and (dark[inside] != 0).any(-1).all()
    assert np.abs(dark.astype(np.int16) - ref).max() <= MAX_DIFF  # the direct path as OpenSlide's on black
    got, _ = _Readers().read(ReadTask(0, str(p), coords, tile, mpp, background="dark"), None, False)
    assert np.array_equal(got.numpy(), dark)


def test_dark_background_on_the_device_reader(tmp_path):
    from gigaslide.slides.device_decode import DeviceTileReader

    p = write_pyramidal_tiff(tmp_path / "fluo.tiff", 1030, 770, _dark_fn, mpp=0.5, tile=128)
    coords = np.array([(1030 - 20, 100), (200, 770 - 30), (-40, -20), (1100, 10)])
    with open_slide(p) as s:
        dev = DeviceTileReader(s, 64, 0.5, "cpu", background="dark")
        got = dev.read_batch(coords).numpy()
        assert dev.on_device and np.array_equal(got, TileReader(s, 64, 0.5, background="dark").read_batch(coords))
    assert (got[3] == 0).all() and (got[0][:, 20:] == 0).all() and (got[0][:, :20] != 0).any(-1).all()


def test_unknown_background_is_one_line(generated):
    with open_slide(generated["jpeg"]) as s, pytest.raises(GigaslideError, match="bright .* or dark"):
        TileReader(s, 32, 0.5, background="auto")


def test_resampled_tiles_span_exactly_their_footprint(tmp_path):
    """A tile at an mpp that is no level (nor /2, /4, /8 of one) covers exactly tile x scale level px: on a ramp whose
    value is the level-0 x, each pixel reads its own centre's x (within uint8 rounding). The read was rounded up to
    whole px and the whole of it resized onto the tile: stretched by up to one level px (1.2 grey levels here)."""

    def ramp(x0, y0, w, h, ds):  # noqa: ANN001, ANN202
        v = np.broadcast_to((x0 + (np.arange(w) + 0.5) * ds - 0.5)[None, :], (h, w))
        return np.stack([v, v, v], -1).clip(0, 255).astype(np.uint8)

    p = write_pyramidal_tiff(tmp_path / "ramp.tiff", 256, 256, ramp, mpp=0.5, tile=128, compression="none")
    with open_slide(p) as s:
        for mpp, t in [(0.75, 99), (0.7, 97), (1.3, 77), (1.7, 59), (0.6, 201)]:
            assert TileReader(s, t, mpp).factor == 0
            px = next(iter_tiles(s, [(10, 10)], t, mpp))[t // 2, :, 0].astype(float)
            want = 10 + (np.arange(t) + 0.5) * mpp / 0.5 - 0.5
            inner = (want < 250) & (np.arange(t) >= 3) & (np.arange(t) < t - 3)  # no filter edge, no clipped ramp
            assert np.abs(px[inner] - want[inner]).max() <= 0.5 + 1e-6, (mpp, t)


def test_a_damaged_stored_tile_is_one_line_naming_the_file(tmp_path):
    """A stored tile the JPEG decoder refuses (the check read at open passes: the damage is elsewhere) reaches the
    caller as a GigaslideError naming the file, not the decoder's own exception; other tiles still read."""
    import tifffile

    p = make_slide(tmp_path / "s.tiff", (1024, 1024), seed=1)
    with tifffile.TiffFile(p) as tif:
        off, n = int(tif.pages[0].dataoffsets[0]), int(tif.pages[0].databytecounts[0])
    raw = bytearray(p.read_bytes())
    raw[off + 2:off + n - 2] = (b"\xff\x01" * n)[:n - 4]  # tile 0 (top-left): markers with bogus lengths, same size
    p.write_bytes(bytes(raw))
    with open_slide(p) as s:
        r = TileReader(s, 64, 0.5)
        assert r.direct
        assert r.read(512, 512).shape == (64, 64, 3)
        with pytest.raises(GigaslideError, match="cannot read pixels") as e:
            r.read(0, 0)
    assert str(p) in str(e.value)


@pytest.mark.realdata
def test_an_unreadable_real_slide_is_one_line(real_slides):
    with open_slide(real_slides / "corrupt" / "unreadable.svs") as s, pytest.raises(GigaslideError, match="damaged"):
        list(iter_tiles(s, [(0, 0)], 8, s.mpp))
