"""Round 8 (lens U): overlay layers at their level-0 tiles -- fractional tile sides, tiles off the lattice, the tile
grid's outlines -- with expectations computed from the tiles' boxes directly."""

from __future__ import annotations

import numpy as np

from gigaslide.viewer.overlays import TileLattice, render_grid


def test_tiles_of_a_fractional_level0_side_leave_no_seam():
    """224 px at 0.5 µm/px of a 0.24972 µm/px slide are 448.5 level-0 px; tiling floors each corner to a whole pixel
    (0, 448, 897, ...), so consecutive tiles leave sub-pixel gaps between them (896.5 to 897). Every pixel centre
    from the first tile's corner to the last tile's end belongs to a tile (no transparent line down the heatmap at
    every seam), the one it lies in (or, in a gap, the tile left of / above it)."""
    size0 = 448.5
    k = np.arange(6)
    starts = np.floor(k * size0)
    cx, cy = np.meshgrid(starts, starts[:4])
    lat = TileLattice(np.stack([cx.ravel(), cy.ravel()], 1), size0)
    xs = np.arange(int(starts[-1] + size0)) + 0.5
    ys = np.arange(int(starts[3] + size0)) + 0.5
    idx = lat.sample(xs, ys)
    assert (idx >= 0).all()
    dx = xs[None, :] - starts[idx % 6]  # from the tile's corner: inside it, or in the gap right of / below it
    dy = ys[:, None] - starts[idx // 6]
    assert ((dx >= 0) & (dx < size0 + 1) & (dy >= 0) & (dy < size0 + 1)).all()
    assert idx[100, 100] == 0 and idx[1000, 2400] == 2 * 6 + 5  # well inside a tile: that tile


def test_a_pixel_no_tile_covers_is_never_painted():
    """Tiles off one lattice (CLAM / TRIDENT tile each tissue contour on a grid of its own origin): a pixel is given a
    tile only when it lies in that tile's square (within the 1 px of floored corners), never the tile of a lattice
    cell the pixel merely shares."""
    rng = np.random.default_rng(0)
    size0 = 64.0
    grid = np.stack(np.meshgrid(np.arange(4) * 64, np.arange(3) * 64), -1).reshape(-1, 2)
    other = grid[:6] + (300, 230) + rng.integers(5, 40, 2)  # a second contour's grid, offset by a part of a tile
    coords = np.concatenate([grid, other]).astype(float)
    lat = TileLattice(coords, size0)
    xs = ys = np.arange(0, 560, 3) + 0.5
    idx = lat.sample(xs, ys)
    inside = idx >= 0
    c = coords[np.maximum(idx, 0)]
    dx, dy = xs[None, :] - c[..., 0], ys[:, None] - c[..., 1]
    assert ((dx[inside] >= -1) & (dx[inside] < size0 + 1) & (dy[inside] >= -1) & (dy[inside] < size0 + 1)).all()
    for i, (x, y) in enumerate(coords[:len(grid)]):  # the first contour's tiles are found where they are
        assert lat.at(x + 32, y + 32) == i


def test_tile_grid_outlines_every_side_of_each_tile():
    """At 1 level-0 px per screen px, tiles of 64 px: the line (64 / 64 = 1 px wide) is drawn on each tile's first and
    last column and row, nowhere inside, nothing off the tiles; zoomed out (4 px per screen px) it is one screen px."""
    coords = np.array([[0, 0], [64, 0], [0, 64]])
    lat = TileLattice(coords, 64)
    a = render_grid(lat, (0, 0, 160, 160), 1.0)[..., 3] > 0
    want = np.zeros((160, 160), bool)
    for x, y in coords:
        want[y:y + 64, x:x + 64] = True
        want[y + 1:y + 63, x + 1:x + 63] = False
    np.testing.assert_array_equal(a, want)
    b = render_grid(TileLattice(coords * 4, 256), (0, 0, 160, 160), 4.0)[..., 3] > 0  # the same tiles on screen
    np.testing.assert_array_equal(b, want)
