from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gigaslide.errors import GigaslideError
from gigaslide.slides import open_slide
from gigaslide.testing import make_slide
from gigaslide.tiling import (Scan, TilingParams, TissueMask, grid_positions, load_grid, make_grid, mask_to_geojson,
                              segment_array, segment_tissue, tile_slide)


@pytest.fixture(scope="module")
def slide_and_mask(synthetic_slide):
    s = open_slide(synthetic_slide)
    tm, thumb = segment_tissue(s)
    yield s, tm, thumb
    s.close()


def test_tissue_mask_finds_blobs_not_glass(slide_and_mask):
    s, tm, thumb = slide_and_mask
    assert 0.05 < tm.fraction < 0.8
    glass = np.all(thumb > 235, axis=-1)
    assert (tm.mask & glass).mean() < 0.01  # almost no glass inside the mask
    assert tm.downsample == pytest.approx(s.dimensions[0] / thumb.shape[1], rel=1e-3)


def test_blank_slide_has_no_tissue():
    rgb = np.full((200, 300, 3), 244, np.uint8)
    rgb += np.random.default_rng(0).integers(0, 6, rgb.shape, dtype=np.uint8)
    assert not segment_array(rgb).any()


def test_holes_are_filled_and_specks_removed():
    rgb = np.full((100, 100, 3), 245, np.uint8)
    rgb[20:80, 20:80] = (200, 120, 170)
    rgb[45:55, 45:55] = 245  # a hole
    rgb[2:4, 2:4] = (200, 120, 170)  # a speck
    m = segment_array(rgb, min_area_px=30)
    assert m[50, 50] and not m[3, 3] and m[25, 25]


def test_box_fraction_matches_bruteforce():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) > 0.5
    tm = TissueMask(mask, 4.0, (200, 160))
    xs, ys = np.array([0, 8, 100, 196, 5]), np.array([0, 12, 80, 156, 7])
    got = tm.box_fraction(xs, ys, 16.0)
    fine = np.zeros((176, 216), bool)  # level-0 px; outside the mask counts as glass (edge tiles are padded with glass)
    fine[:160, :200] = np.kron(mask, np.ones((4, 4), bool))
    for x, y, g in zip(xs, ys, got):
        assert g == pytest.approx(fine[y: y + 16, x: x + 16].mean())  # exact, also for boxes not on mask px
    assert got[3] == pytest.approx(mask[39:, 49:].sum() / 16)  # the corner box: 1 of its 16 mask px is inside


def test_grid_at_coarser_mpp_and_overlap(slide_and_mask):
    s, tm, _ = slide_and_mask
    g = make_grid(s, tm, target_mpp=1.0, tile_size=128, overlap=32, min_tissue=0.5)
    assert len(g) > 0
    assert g.tile_size_level0 == pytest.approx(256)
    steps = np.diff(np.unique(g.coords[:, 0]))
    assert steps.min() % 192 == 0  # stride = (128 - 32) * 2 level-0 px
    assert (g.tissue >= 0.5).all()


def test_tile_larger_than_slide_refused(slide_and_mask):
    s, tm, _ = slide_and_mask
    with pytest.raises(GigaslideError, match="more than the slide"):
        make_grid(s, tm, target_mpp=0.5, tile_size=4000)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mpp=st.floats(0.5, 4.0), tile=st.integers(16, 700), overlap_frac=st.floats(0, 0.9), min_tissue=st.floats(0, 1))
def test_grid_properties(slide_and_mask, mpp, tile, overlap_frac, min_tissue):
    s, tm, _ = slide_and_mask
    overlap = int(tile * overlap_frac)
    W, H = s.dimensions
    try:
        g = make_grid(s, tm, target_mpp=mpp, tile_size=tile, overlap=overlap, min_tissue=min_tissue)
    except GigaslideError as e:
        assert "more than the slide" in str(e)
        return
    t0 = g.tile_size_level0
    assert g.coords.dtype == np.int64 and g.padding.shape == (len(g),)
    if len(g):
        assert (g.coords >= 0).all() and (g.coords[:, 0] < W).all() and (g.coords[:, 1] < H).all()  # start inside
        assert (g.tissue >= min_tissue).all()
        if min_tissue > 0:
            assert (g.tissue > 0).all()
        assert (g.tissue <= 1 - g.padding + 1e-6).all()  # the padding is glass


def test_geojson_in_level0_coords(slide_and_mask):
    s, tm, _ = slide_and_mask
    gj = mask_to_geojson(tm)
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) >= 1
    W, H = s.dimensions
    for f in gj["features"]:
        ring = np.array(f["geometry"]["coordinates"][0])
        assert ring[0].tolist() == ring[-1].tolist()
        assert (ring[:, 0] >= -tm.downsample).all() and (ring[:, 0] <= W + tm.downsample).all()
        assert (ring[:, 1] <= H + tm.downsample).all()
        assert f["properties"]["classification"]["name"] == "Tissue"


def test_tile_slide_writes_artifacts_and_reuses(tmp_path, synthetic_slide):
    params = TilingParams(mpp=1.0, tile_size=128)
    g = tile_slide(synthetic_slide, tmp_path, params)
    for sub, ext in (("patches", "h5"), ("tissue", "png"), ("tissue", "geojson"), ("grid", "png")):
        assert (tmp_path / sub / f"synth.{ext}").is_file()
    json.loads((tmp_path / "tissue" / "synth.geojson").read_text())
    back = load_grid(tmp_path / "patches" / "synth.h5")
    np.testing.assert_array_equal(back.coords, g.coords)
    assert back.target_mpp == 1.0 and back.tile_size == 128 and back.slide_mpp == pytest.approx(0.5, rel=1e-3)
    assert back.extra["format_version"] == 1
    mtime = (tmp_path / "patches" / "synth.h5").stat().st_mtime_ns
    tile_slide(synthetic_slide, tmp_path, params)
    assert (tmp_path / "patches" / "synth.h5").stat().st_mtime_ns == mtime  # reused, not rewritten


def test_tile_slide_tiles_again_for_a_corrected_slide_mpp(tmp_path, synthetic_slide):
    params = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.5)
    coarse = tile_slide(synthetic_slide, tmp_path, params, slide_mpp=0.5, overlays=False)
    assert coarse.slide_mpp == 0.5 and coarse.tile_size_level0 == 128
    fine = tile_slide(synthetic_slide, tmp_path, params, slide_mpp=0.25, overlays=False)
    assert fine.slide_mpp == 0.25 and fine.tile_size_level0 == 256
    back = load_grid(tmp_path / "patches" / "synth.h5")
    assert back.slide_mpp == 0.25 and back.tile_size_level0 == 256 and back.coords.tolist() == fine.coords.tolist()
    mtime = (tmp_path / "patches" / "synth.h5").stat().st_mtime_ns
    tile_slide(synthetic_slide, tmp_path, params, slide_mpp=0.25, overlays=False)
    assert (tmp_path / "patches" / "synth.h5").stat().st_mtime_ns == mtime  # the same scan: reused
    assert tile_slide(synthetic_slide, tmp_path, params, overlays=False).slide_mpp == 0.5  # the file's own mpp again


def test_tile_slide_tiles_again_when_another_scan_has_taken_the_file_name(tmp_path):
    src = make_slide(tmp_path / "s" / "a.tiff", (1024, 768), seed=1)
    params = TilingParams(mpp=1.0, tile_size=32, min_tissue=0.5)
    assert tile_slide(src, tmp_path / "o", params, overlays=False).slide_dimensions == (1024, 768)
    make_slide(src, (768, 768), seed=2)  # same name, same resolution, another slide
    g = tile_slide(src, tmp_path / "o", params, overlays=False)
    assert g.slide_dimensions == (768, 768)
    assert load_grid(tmp_path / "o" / "patches" / "a.h5").slide_dimensions == (768, 768)
    with open_slide(src) as s:  # the new scan's grid
        assert g.coords.tolist() == make_grid(s, segment_tissue(s)[0], target_mpp=1.0, tile_size=32,
                                              min_tissue=0.5).coords.tolist()


def test_scan_compares_what_a_grid_or_feature_file_recorded():
    scan = Scan(0.25, (1000, 800))
    assert scan.made(0.25, [1000, 800]) and scan.made(0.25, None) and scan.made(None, None)  # absent: not compared
    assert not scan.made(0.5, [1000, 800]) and not scan.made(0.25, [800, 1000])
    assert not Scan(None, (1000, 800)).made(0.25, [1000, 800])  # no resolution now: never the same scan
    assert not scan.made("n/a", [1000, 800]) and not scan.made(0.25, 7)  # another tool's odd attributes


def test_blank_slide_tiling_refused(tmp_path):
    p = make_slide(tmp_path / "blank.tiff", (1024, 1024), blank=True)
    with pytest.raises(GigaslideError, match="no tissue"):
        tile_slide(p, tmp_path / "out", TilingParams(0.5, 128))
    assert not (tmp_path / "out" / "patches" / "blank.h5").exists()


@pytest.mark.realdata
def test_real_slide_tiles_on_tissue(real_slides, tmp_path):
    g = tile_slide(real_slides / "cmu-1-small-region.svs", tmp_path, TilingParams(0.5, 224, min_tissue=0.5))
    assert 40 < len(g) < 130  # the CMU region is mostly tissue: 9 x 13 grid at most
    with open_slide(real_slides / "cmu-1-small-region.svs") as s:
        tile = s.read_region(tuple(g.coords[0]), (224, 224), 0.5)
    assert tile.mean() < 230  # not glass


def test_grid_is_anchored_at_the_origin():
    assert grid_positions(1000, 300, 300).tolist() == [0, 300, 600, 900]  # the last tile is 2/3 outside
    assert grid_positions(900, 300, 300).tolist() == [0, 300, 600]  # exact fit: no padding
    assert grid_positions(1000, 300, 200).tolist() == [0, 200, 400, 600, 800]


def test_coords_file_without_mpp_is_refused_not_read_as_zero(tmp_path):
    import h5py

    with h5py.File(tmp_path / "clam.h5", "w") as f:  # a CLAM-style patches file: coords, patch size, no resolution
        f["coords"] = np.zeros((3, 2), np.int64)
        f["coords"].attrs["patch_size"] = 256
    with pytest.raises(GigaslideError, match="has no mpp") as e:
        load_grid(tmp_path / "clam.h5")
    assert "clam.h5" in str(e.value)


@pytest.mark.parametrize("mpp,tile", [(0.5, 128), (1.0, 128), (0.7, 100)])
def test_coords_file_gives_trident_and_clam_each_tile_footprint(tmp_path, synthetic_slide, mpp, tile):
    """TRIDENT's patcher reads ``patch_size * level0_magnification / target_magnification`` level-0 px (magnification
    = 10 / mpp; without those attrs it falls back to the CLAM reading): that must be each tile's footprint at any
    --mpp, a pyramid level or not. CLAM reads ``patch_size`` px of ``patch_level``: right where --mpp is that level."""
    import h5py

    g = tile_slide(synthetic_slide, tmp_path, TilingParams(mpp, tile, min_tissue=0.5))
    with h5py.File(tmp_path / "patches" / "synth.h5", "r") as f:
        a = dict(f["coords"].attrs)
    trident = round(a["patch_size"] * (10 / a["target_magnification"]) / (10 / a["level0_magnification"]))
    assert trident == round(g.tile_size_level0) == round(a["patch_size_level0"])
    with open_slide(synthetic_slide) as s:
        clam = a["patch_size"] * s.level_downsamples[int(a["patch_level"])]
    if mpp == 0.5:  # level 0 of this 0.5 µm/px slide
        assert clam == pytest.approx(g.tile_size_level0)


def _pink_square_slide(path, size, square, mpp):  # noqa: ANN001, ANN202
    """Glass with one H&E-pink square of side ``square`` level-0 px in the middle."""
    from gigaslide.slides.writer import write_pyramidal_tiff

    w, h = size
    lo, hi = (w - square) // 2, (w + square) // 2

    def fn(x0, y0, tw, th, ds):  # noqa: ANN001, ANN202
        X, Y = np.meshgrid(x0 + (np.arange(tw) + 0.5) * ds, y0 + (np.arange(th) + 0.5) * ds)
        inside = (X >= lo) & (X < hi) & (Y >= (h - square) // 2) & (Y < (h + square) // 2)
        return np.where(inside[..., None], np.array([200, 110, 170], np.uint8), np.uint8(244)).astype(np.uint8)

    return write_pyramidal_tiff(path, w, h, fn, mpp=mpp, tile=128)


def test_an_image_smaller_than_the_minimum_area_still_has_tissue(tmp_path):
    """A 200 x 160 µm crop (under the 20,000 µm² minimum piece area itself) with tissue on a third of it: the
    tissue is kept (it was dropped as a speck: "no tissue tiles found ... check the slide is not blank")."""
    p = _pink_square_slide(tmp_path / "crop.tiff", (400, 320), 180, 0.5)
    g = tile_slide(p, tmp_path / "out", TilingParams(0.5, 32, min_tissue=0.5))
    assert len(g) >= 16 and g.tissue.max() == pytest.approx(1.0)


def test_tissue_dropped_as_too_small_is_named_not_called_blank(tmp_path):
    """Detection that finds tissue but drops every piece as under the minimum area says so, with the piece's area
    and the resolution it was measured at (a --slide-mpp given too fine makes tissue look small)."""
    p = _pink_square_slide(tmp_path / "speck.tiff", (2000, 2000), 60, 0.5)  # 30 x 30 µm of tissue in 1 x 1 mm
    with pytest.raises(GigaslideError, match=r"every piece is under the minimum area .* 0\.5 µm/px") as e:
        tile_slide(p, tmp_path / "out", TilingParams(0.5, 32))
    assert "--slide-mpp" in str(e.value) and "blank" not in str(e.value)
    blank = make_slide(tmp_path / "blank.tiff", (1024, 1024), blank=True)
    with pytest.raises(GigaslideError, match="no tissue tiles found"):
        tile_slide(blank, tmp_path / "out", TilingParams(0.5, 128))


def test_a_tile_larger_than_the_slide_is_told_a_fix_that_exists(tmp_path):
    """At the scan's own resolution no finer --mpp exists: the fix names only the tile size (it said "or a finer
    --mpp", which check_target_mpp then refuses); where a finer one fits, it names the coarsest that does."""
    p = make_slide(tmp_path / "small.tiff", (200, 160), mpp=0.5, seed=1)
    with open_slide(p) as s:
        with pytest.raises(GigaslideError, match="more than the slide") as e:
            make_grid(s, None, target_mpp=0.5, tile_size=224)
        assert "at most 160)" in str(e.value) and "--mpp" not in str(e.value).split("fix:")[1]
        with pytest.raises(GigaslideError, match="more than the slide") as e:
            make_grid(s, None, target_mpp=2.0, tile_size=64)
        assert "at most 40) or a finer --mpp (at most 1.25)" in str(e.value)
        make_grid(s, None, target_mpp=1.25, tile_size=64)  # which fits


def test_fallback_area_applies_only_when_every_piece_is_under_the_minimum():
    rgb = np.full((100, 100, 3), 245, np.uint8)
    rgb[10:40, 10:40] = (200, 110, 170)  # 900 px
    rgb[60:70, 60:70] = (200, 110, 170)  # 100 px
    assert segment_array(rgb, min_area_px=500, fallback_area_px=50).sum() == 900  # a piece passes: no fallback
    assert segment_array(rgb, min_area_px=5000, fallback_area_px=50).sum() == 1000  # none passes: both kept
    assert segment_array(rgb, min_area_px=5000).sum() == 0


def test_tile_slide_writes_the_exact_tissue_outline_or_the_tolerance_asked(tmp_path, synthetic_slide):
    """OUT/tissue/<slide>.geojson is the mask's exact outline by default (rasterised back: the mask), simplified
    within TilingParams.outline_tolerance level-0 px when given (fewer vertices); a negative one is refused."""
    from gigaslide.tiling.annotations import rasterize

    with open_slide(synthetic_slide) as s:
        tm, _ = segment_tissue(s)
    tile_slide(synthetic_slide, tmp_path / "a", TilingParams(1.0, 128))
    tile_slide(synthetic_slide, tmp_path / "b", TilingParams(1.0, 128, outline_tolerance=64.0))
    exact, coarse = (json.loads((tmp_path / d / "tissue" / "synth.geojson").read_text()) for d in "ab")
    polys = [[np.array(r) for r in f["geometry"]["coordinates"]] for f in exact["features"]]
    assert np.array_equal(rasterize(polys, tm.mask.shape, tm.downsample), tm.mask)
    n = [sum(len(r) for f in g["features"] for r in f["geometry"]["coordinates"]) for g in (exact, coarse)]
    assert n[1] < n[0] / 2
    with pytest.raises(GigaslideError, match="outline tolerance"):
        tile_slide(synthetic_slide, tmp_path / "c", TilingParams(1.0, 128, outline_tolerance=-1.0))


def test_tiling_a_slide_without_mpp_names_the_target_and_slide_mpp(tmp_path):
    """A file without a resolution: one error naming the resolution the tiles needed and --slide-mpp as the fix;
    nothing written."""
    path = make_slide(tmp_path / "nompp.tiff", (512, 512), mpp=None, seed=0)
    with pytest.raises(GigaslideError) as e:
        tile_slide(path, tmp_path / "out", TilingParams(1.0, 128))
    assert "no resolution (mpp)" in e.value.what and "needed to read it at 1 µm/px" in e.value.what
    assert "--slide-mpp" in e.value.fix
    assert not (tmp_path / "out" / "patches").exists()
    assert len(tile_slide(path, tmp_path / "out", TilingParams(1.0, 128), slide_mpp=0.5)) > 0


def test_a_rerun_with_another_outline_tolerance_rewrites_the_geojson_and_keeps_the_grid(tmp_path, synthetic_slide):
    """The outline tolerance is no tiling setting (the grid is reused), but a re-run asking another one gets its
    GeoJSON (it was silently kept); the same one rewrites nothing; a deleted GeoJSON is written again."""
    out = tmp_path / "o"
    gj, coords = out / "tissue" / "synth.geojson", out / "patches" / "synth.h5"

    def vertices() -> int:
        return sum(len(r) for f in json.loads(gj.read_text())["features"] for r in f["geometry"]["coordinates"])

    tile_slide(synthetic_slide, out, TilingParams(1.0, 128))
    exact, grid_bytes = vertices(), coords.read_bytes()
    tile_slide(synthetic_slide, out, TilingParams(1.0, 128, outline_tolerance=64.0))
    assert vertices() < exact / 2 and coords.read_bytes() == grid_bytes
    stamp = gj.stat().st_mtime_ns
    tile_slide(synthetic_slide, out, TilingParams(1.0, 128, outline_tolerance=64.0))
    assert gj.stat().st_mtime_ns == stamp
    tile_slide(synthetic_slide, out, TilingParams(1.0, 128))
    assert vertices() == exact
    gj.unlink()
    tile_slide(synthetic_slide, out, TilingParams(1.0, 128))
    assert vertices() == exact and coords.read_bytes() == grid_bytes


def test_tiling_a_batch_lists_each_output_folder_once_not_once_per_slide(tmp_path, monkeypatch):
    """A killed run's temporary files of a slide are removed when it is tiled again, but the output folders (O(n)
    entries each) are listed once per process, not for every slide: listing per slide made a batch of n slides
    O(n^2). A temporary file made after the listing (another live run's) is left alone."""
    import os

    slides = [make_slide(tmp_path / "in" / f"s{i}.tiff", (512, 384), mpp=0.5, seed=i, tile=128) for i in range(6)]
    out = tmp_path / "out"
    (out / "tissue").mkdir(parents=True)
    stale = out / "tissue" / ".tmp-s3.png.abc123.png"  # left by a run killed while writing s3's overlay
    stale.write_bytes(b"partial")
    other = out / "tissue" / ".tmp-x9.png.def456.png"  # another slide's: not this batch's to remove
    other.write_bytes(b"partial")
    listed: list[str] = []
    scandir = os.scandir

    def counted(path=".", *a):  # noqa: ANN001, ANN002, ANN202
        listed.append(str(path))
        return scandir(path, *a)

    monkeypatch.setattr(os, "scandir", counted)
    for i, s in enumerate(slides):
        if i == 4:
            live = out / "tissue" / ".tmp-s5.png.ghi789.png"  # a live run writing s5 since the listing
            live.write_bytes(b"in use")
        tile_slide(s, out, TilingParams(1.0, 64))
    monkeypatch.undo()
    in_out = [p for p in listed if p.startswith(str(out))]
    assert sorted(p.rsplit("/", 1)[-1] for p in in_out) == ["grid", "patches", "tissue"]  # once each (old: 4 a slide)
    assert not stale.exists() and other.exists() and live.exists()
