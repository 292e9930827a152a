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
