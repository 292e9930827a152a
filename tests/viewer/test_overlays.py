"""Categorical overlays: matplotlib's palettes, one distinct colour per id, at the id's level-0 cell."""

from __future__ import annotations

import numpy as np
import pytest

from gigaslide.viewer.overlays import TileLattice, palette, render_categories


@pytest.mark.parametrize("k, name", [(3, "tab10"), (10, "tab10"), (14, "tab20"), (20, "tab20")])
def test_palette_is_matplotlibs(k: int, name: str) -> None:
    import matplotlib
    from matplotlib.colors import to_hex

    assert palette(k) == [to_hex(c) for c in matplotlib.colormaps[name].colors[:k]]
    assert len(set(palette(k))) == k  # distinct ids, distinct colours


def test_render_categories_colours_each_cell_by_its_id() -> None:
    coords = np.array([[0, 0], [10, 0], [0, 10], [10, 10]])
    ids = np.array([0, 1, -1, 2])
    rgba = render_categories(TileLattice(coords, 10), ids, (0, 0, 40, 40), 0.5, 3)  # 2 px per level-0 px
    colours = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in palette(3)])
    for (x, y), cid in zip(coords, ids):
        cell = rgba[2 * y:2 * y + 20, 2 * x:2 * x + 20]
        if cid < 0:
            assert (cell[..., 3] == 0).all()
        else:
            assert (cell[..., 3] == 255).all() and (cell[..., :3] == colours[cid]).all()
    assert len({tuple(c) for c in colours}) == 3


def test_zoomed_out_nuclei_are_all_drawn_each_at_its_centre(tmp_path) -> None:
    """Zoomed out (a nucleus a few px), every nucleus of a tile is a dot at the px holding its centre: the tile of a
    dense slide drew only its first 20,000 nuclei (file order: a strip at the tile's top, the rest empty)."""
    import json

    from gigaslide.viewer.overlays import NucleiOutlines

    step = 32  # a 10 x 10 px nucleus every 32 level-0 px over 8192 x 8192 px: 65,536 nuclei
    feats = [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        [[x + 3, y + 5], [x + 13, y + 5], [x + 13, y + 15], [x + 3, y + 15], [x + 3, y + 5]]]}}
        for y in range(0, 8192, step) for x in range(0, 8192, step)]
    (tmp_path / "n.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    nuc = NucleiOutlines(tmp_path / "n.geojson")
    a = nuc.render((0, 0, 256, 256), 32.0)[..., 3] > 0  # one px per 32 level-0 px: a dot in every px
    assert a.all()
    b = nuc.render((0, 0, 256, 256), 8.0)[..., 3] > 0  # 2048 level-0 px: 64 x 64 nuclei, centres (8, 10) + 32 k
    want = np.zeros((256, 256), bool)
    want[(10 + 32 * np.arange(64)) // 8, :] = True
    cols = np.zeros(256, bool)
    cols[(8 + 32 * np.arange(64)) // 8] = True
    np.testing.assert_array_equal(b, want & cols[None, :])
    np.testing.assert_allclose(nuc.centres[:2], [[8, 10], [40, 10]])  # the closing vertex counted once


def _tissue_file(tmp_path, rings):  # noqa: ANN001, ANN202
    import json

    path = tmp_path / "t.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": r}} for r in rings]}))
    return path


# a square piece with a square hole, and a triangle (a slanted edge): level-0 px, even coordinates
PIECES = [[[[100, 60], [300, 60], [300, 260], [100, 260], [100, 60]], [[160, 120], [220, 120], [220, 180], [160, 180]]],
          [[[340, 40], [500, 40], [340, 300]]]]


@pytest.mark.parametrize("scale, box", [(1, (0, 0, 512, 320)), (0.5, (500, 40, 756, 296)), (2, (0, 0, 256, 160))])
def test_tissue_layer_is_the_outline_no_pixel_beyond_it_holes_left_out(tmp_path, scale, box) -> None:
    """The tissue layer drew each piece one pixel beyond its outline (right and bottom: the raster filled every pixel
    the outline touched) and filled its holes: a pixel is tissue exactly when its centre lies inside the outline, at
    any zoom (1 and 0.5 level-0 px per px: finer than the ~2048 px raster of a 4096 px slide; 2: the raster itself)."""
    from gigaslide.tiling.annotations import rasterize
    from gigaslide.viewer.overlays import TissueRaster

    tissue = TissueRaster(_tissue_file(tmp_path, PIECES), (4096, 3072))
    assert tissue.ds == 2
    got = tissue.render(box, scale)
    x0, y0, x1, y1 = box
    polys = [[np.array(r, float) - (x0 * scale, y0 * scale) for r in p] for p in PIECES]
    want = rasterize(polys, (y1 - y0, x1 - x0), scale)  # the tiling's own: pixel centres inside, holes out
    assert want.sum() > 1000
    np.testing.assert_array_equal(got[..., 3] == 255, want)
    assert (got[want][:, :3] == (0, 170, 0)).all()


def test_nucleus_across_a_tile_edge_is_drawn_once_on_the_seam(tmp_path) -> None:
    """A nucleus across the edge of two tiles, its left side in the last px column of the left tile: that side was drawn
    there and again in the first column of the right tile (PIL truncates -0.5 to 0): a doubled line on the seam."""
    import json

    from gigaslide.viewer.overlays import NucleiOutlines

    for scale in (1.0, 2.0, 4.0):
        x0, y0 = 256 * scale - scale / 2, 100.5 * scale  # x0: in the left tile's last px column
        ring = [[x0, y0], [x0 + 40 * scale, y0], [x0 + 40 * scale, y0 + 50 * scale], [x0, y0 + 50 * scale], [x0, y0]]
        path = tmp_path / f"n{scale}.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
        nuc = NucleiOutlines(path)
        left = nuc.render((0, 0, 256, 256), scale)[..., 3] > 0
        right = nuc.render((256, 0, 512, 256), scale)[..., 3] > 0
        assert left[100:151, 255].all() and left[:, :255].sum() == 0  # the side, on the left tile's last column
        assert right[101:150, 0].sum() == 0, scale  # not again on the right tile's first column
        assert right[[100, 150], 0].all() and right[100:151, 39].all()  # top, bottom and right sides go on
