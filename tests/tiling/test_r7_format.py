"""Review round 7: a tile-coordinate file a newer gigaslide wrote is refused by ``load_grid`` and tiled again."""

from __future__ import annotations

import h5py
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.tiling import TilingParams, layout, load_grid, tile_slide

PARAMS = TilingParams(mpp=2.0, tile_size=64, min_tissue=0.5)


def test_a_grid_in_a_newer_format_is_refused_in_one_line_and_tiled_again(tmp_path, synthetic_slide):
    """``load_grid`` read a grid whose ``format_version`` is newer than this gigaslide's as its own layout (feature
    files were already refused); ``tile`` / ``encode`` then reused it as if this gigaslide had written it."""
    grid = tile_slide(synthetic_slide, tmp_path, PARAMS, overlays=False)
    coords = layout(tmp_path, grid.slide_id)["coords"]
    with h5py.File(coords, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(GigaslideError, match="format version 99") as e:
        load_grid(coords)
    assert str(coords) in str(e.value) and "\n" not in str(e.value)
    again = tile_slide(synthetic_slide, tmp_path, PARAMS, overlays=False)
    assert (again.coords == grid.coords).all()
    with h5py.File(coords, "r") as f:
        assert int(f.attrs["format_version"]) == 1
    assert len(load_grid(coords)) == len(grid)
