"""Round 8 (lens U): the deep-zoom pyramid and overlay geometry checked against OpenSlide's own DeepZoomGenerator, tile
by tile, at slide sizes that are not powers of two (the tiny project's 1024 px slides hide ceil / floor slips)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from openslide import ImageSlide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from gigaslide.viewer.deepzoom import Geometry, SlideTiles, TileOutside


@pytest.mark.parametrize("size", [(1000, 700), (517, 1030), (300, 1)])
@pytest.mark.parametrize("tile, overlap", [(254, 1), (256, 0)])  # the slide's pyramid and the overlays'
def test_every_tile_box_is_openslides(size, tile, overlap):
    """Levels, level sizes, tiles per level and each tile's position and size (overlap included) are those of
    OpenSlide's DeepZoomGenerator (what OpenSeadragon is given as the Deep Zoom layout); one past the last column or
    row is outside."""
    dz = DeepZoomGenerator(ImageSlide(Image.new("RGB", size)), tile_size=tile, overlap=overlap, limit_bounds=False)
    g = Geometry(*size, tile, overlap)
    assert g.level_count == dz.level_count
    for level in range(dz.level_count):
        assert g.level_size(level) == dz.level_dimensions[level], level
        cols, rows = dz.level_tiles[level]
        for col in range(cols):
            for row in range(rows):
                x0, y0, x1, y1 = g.tile_box(level, col, row)
                (lx, ly), _, _ = dz.get_tile_coordinates(level, (col, row))
                s = g.scale(level)
                assert ((x0 * s, y0 * s), (x1 - x0, y1 - y0)) == ((lx, ly), dz.get_tile_dimensions(level, (col, row)))
        for col, row in ((cols, 0), (0, rows), (-1, 0)):
            with pytest.raises(TileOutside):
                g.tile_box(level, col, row)


def test_tiles_of_an_image_read_through_open_slide_are_openslides_at_every_level(tmp_path):
    """A plain image (not an OpenSlide format) is served through gigaslide's reader: each tile of a zoomed-out level,
    away from the image's corner too, shows the pixels OpenSlide's DeepZoomGenerator shows for that address."""
    yy, xx = np.mgrid[0:700, 0:1200]
    arr = np.stack([xx * 255 // 1199, yy * 255 // 699, (xx + yy) * 255 // 1898], -1).astype(np.uint8)  # smooth
    Image.fromarray(arr).save(tmp_path / "photo.png")
    t = SlideTiles(tmp_path / "photo.png", slide_mpp=0.5)
    assert t.backend.startswith("gigaslide-")
    dz = DeepZoomGenerator(ImageSlide(Image.fromarray(arr)), tile_size=254, overlap=1, limit_bounds=False)
    top = dz.level_count - 1
    for level, col, row in ((top, 4, 2), (top - 1, 2, 1), (top - 1, 1, 0), (top - 2, 1, 0)):
        got = np.asarray(Image.open(io.BytesIO(t.tile(level, col, row))).convert("RGB")).astype(int)
        want = np.asarray(dz.get_tile(level, (col, row)).convert("RGB")).astype(int)
        assert got.shape == want.shape, (level, col, row)
        assert np.abs(got - want).mean() < 3, (level, col, row)  # JPEG and resampling only
    t.close()


def test_neighbours_carry_their_own_tiles_corner(tmp_path):
    """Each neighbour's x, y are the level-0 corner of that tile in its slide's feature file (a slide's first tile
    too: the slide of a row of the stacked index is found from the slides' first rows)."""
    from fastapi.testclient import TestClient

    from gigaslide.features import store
    from gigaslide.viewer import ViewerState, build_app

    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    feats = {"a": rng.standard_normal((5, 8)).astype(np.float32), "b": rng.standard_normal((4, 8)).astype(np.float32)}
    feats["b"][0] = feats["a"][2] * 3  # b's first tile is a's tile 2 (cosine 1)
    coords = {"a": np.array([[0, 0], [64, 0], [128, 0], [0, 64], [64, 64]]),
              "b": np.array([[640, 128], [0, 192], [64, 192], [128, 192]])}
    for k in feats:
        store.save(out / "features" / f"{k}.h5", feats[k], coords[k],
                   attrs={"encoder": "x", "mpp": 0.5, "tile_size": 64, "slide_id": k},
                   coords_attrs={"patch_size_level0": 64, "patch_size": 64, "target_mpp": 0.5, "level0_mpp": 0.5})
    Image.new("RGB", (800, 400), "white").save(tmp_path / "a.png")
    Image.new("RGB", (800, 400), "white").save(tmp_path / "b.png")
    (out / "manifest.json").write_text(json.dumps({"slides": {k: {"status": "done", "path": str(tmp_path / f"{k}.png")}
                                                              for k in feats}}))
    c = TestClient(build_app(ViewerState([out])))
    r = c.get("/api/slides/a/tiles/2/neighbours?k=8")
    assert r.status_code == 200, r.text
    nb = r.json()["neighbours"]
    assert (nb[0]["slide"], nb[0]["index"], nb[0]["x"], nb[0]["y"]) == ("b", 0, 640, 128)
    assert nb[0]["similarity"] == pytest.approx(1.0, abs=1e-6) and len(nb) == 8
    for n in nb:
        assert [n["x"], n["y"]] == coords[n["slide"]][n["index"]].tolist()


def test_tile_thumbnail_is_the_tiles_own_square(tmp_path):
    """A neighbour's thumbnail (``/tiles/<i>.jpeg``) is the level-0 square of that tile (x, y, side), shrunk: the
    pixels the slide holds there, not those at (y, x) nor at another size."""
    from fastapi.testclient import TestClient

    from gigaslide.features import store
    from gigaslide.slides import open_slide
    from gigaslide.testing import make_slide
    from gigaslide.viewer import ViewerState, build_app

    p = make_slide(tmp_path / "s.tiff", (1000, 700), mpp=1.0, seed=3, blobs=4)
    out = tmp_path / "out"
    coords = np.array([[576, 128], [128, 384], [320, 448]])
    store.save(out / "features" / "s.h5", np.eye(3, 8, dtype=np.float32), coords,
               attrs={"encoder": "x", "mpp": 1.0, "tile_size": 128, "slide_id": "s", "slide_path": str(p)},
               coords_attrs={"patch_size_level0": 128, "patch_size": 128, "target_mpp": 1.0, "level0_mpp": 1.0})
    c = TestClient(build_app(ViewerState([out])))
    with open_slide(p) as s:
        for i, (x, y) in enumerate(coords.tolist()):
            r = c.get(f"/api/slides/s/tiles/{i}.jpeg?px=64")
            assert r.status_code == 200, r.text
            got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
            want = np.asarray(Image.fromarray(s.read_region((x, y), (128, 128), 1.0)).resize((64, 64))).astype(int)
            other = np.asarray(Image.fromarray(s.read_region((y, x), (128, 128), 1.0)).resize((64, 64))).astype(int)
            assert np.abs(got - want).mean() < 4 < np.abs(got - other).mean(), i  # JPEG only; (y, x) is elsewhere
