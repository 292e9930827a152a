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
