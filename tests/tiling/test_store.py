"""Tile-coordinate files as CLAM's and TRIDENT's readers read them (tiling/store.py)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from gigaslide.slides import open_slide
from gigaslide.testing import make_slide
from gigaslide.tiling import Scan, TilingParams, load_grid, save_grid, tile_slide
from gigaslide.tiling.store import coords_attrs, level0_dimensions


@pytest.fixture(scope="module")
def level1_grid(tmp_path_factory):  # noqa: ANN001, ANN201
    """A 0.25 µm/px slide with odd level-0 sides tiled at 0.5 µm/px: read from pyramid level 1, not level 0."""
    d = tmp_path_factory.mktemp("lvl")
    src = make_slide(d / "s" / "odd.tiff", (2049, 1537), mpp=0.25, seed=1)
    grid = tile_slide(src, d / "o", TilingParams(0.5, 64, min_tissue=0.25), overlays=False)
    with open_slide(src) as s:
        levels = list(s.level_dimensions)
    return src, d / "o" / "patches" / "odd.h5", grid, levels


def _attrs(path) -> dict:  # noqa: ANN001
    with h5py.File(path, "r") as f:
        return dict(f["coords"].attrs)


def test_clam_level_attrs_describe_the_patch_level_not_level_0(level1_grid):
    """CLAM's create_patches_fp.py writes ``level_dim`` = ``downsampled_level_dim`` = the (w, h) of ``patch_level``
    and ``downsample`` = that level's level-0 px per level px (level-0 size / level size)."""
    _, path, grid, levels = level1_grid
    a = _attrs(path)
    assert int(a["patch_level"]) == 1 and levels[1] != levels[0]
    assert list(a["level_dim"]) == list(levels[1])
    assert list(a["downsampled_level_dim"]) == list(levels[1])
    assert list(a["downsample"]) == pytest.approx([levels[0][0] / levels[1][0], levels[0][1] / levels[1][1]])
    assert [int(a["level0_width"]), int(a["level0_height"])] == list(levels[0])  # TRIDENT's level-0 size
    assert a["name"] == "odd"
    # CLAM's readers (Whole_Slide_Bag_FP, StitchCoords) read patch_size px of patch_level: the tile's footprint here
    assert a["patch_size"] * a["downsample"][0] == pytest.approx(grid.tile_size_level0, rel=2e-3)
    assert a["patch_size"] * a["downsample"][1] == pytest.approx(grid.tile_size_level0, rel=2e-3)


def test_gigaslide_reads_level_0_size_from_new_and_older_files(level1_grid, tmp_path):
    src, path, grid, levels = level1_grid
    g = load_grid(path)
    assert g.slide_dimensions == tuple(levels[0]) and Scan.read(src).made_grid(g)
    old = tmp_path / "old.h5"  # as gigaslide wrote it before: level_dim held level 0's size, no level0_width
    old.write_bytes(path.read_bytes())
    with h5py.File(old, "r+") as f:
        for k in ("level0_width", "level0_height", "downsampled_level_dim", "downsample"):
            del f["coords"].attrs[k]
        f["coords"].attrs["level_dim"] = list(levels[0])
    assert load_grid(old).slide_dimensions == tuple(levels[0]) and Scan.read(src).made_grid(load_grid(old))
    assert level0_dimensions(_attrs(old)) == list(levels[0]) == level0_dimensions(_attrs(path))
    assert level0_dimensions({"patch_size": 256}) is None  # a CLAM file records no level-0 size


def test_level_attrs_are_kept_from_the_file_or_left_out_never_guessed(level1_grid, tmp_path):
    _, path, grid, levels = level1_grid
    g = load_grid(path)
    g.slide_path = str(tmp_path / "moved-away.tiff")  # the slide is gone: the file's own level size is kept
    save_grid(g, tmp_path / "again.h5")
    assert list(_attrs(tmp_path / "again.h5")["level_dim"]) == list(levels[1])
    bare = load_grid(path)
    bare.extra = {}
    bare.slide_path = g.slide_path  # neither the file's record nor the slide: no level attrs rather than level 0's
    a = coords_attrs(bare)
    assert "level_dim" not in a and "downsample" not in a and (a["level0_width"], a["level0_height"]) == levels[0]
    g0 = load_grid(path)
    g0.read_level, g0.extra = 0, {}
    a0 = coords_attrs(g0)
    assert a0["level_dim"] == list(levels[0]) and a0["downsample"] == [1.0, 1.0]
    assert np.array_equal(load_grid(tmp_path / "again.h5").coords, grid.coords)
