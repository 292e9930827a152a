"""save_grid writes the slide file's identity with the grid in one atomic write (a caller adding it afterwards
wrapped save_grid in a second atomic write, whose inner temporary file a kill left behind for good)."""

from __future__ import annotations

import numpy as np

from gigaslide.tiling.grid import TileGrid
from gigaslide.tiling.store import load_grid, save_grid


def test_slide_identity_round_trips(tmp_path):
    g = TileGrid(coords=np.array([[0, 0], [224, 0]], np.int64), tissue=np.array([0.5, 1.0], np.float32),
                 slide_id="s", slide_path="/x/s.tiff", target_mpp=0.5, tile_size=224, overlap=0, slide_mpp=0.25,
                 slide_dimensions=(1000, 800), read_level=0, min_tissue=0.25,
                 extra={"grid_rule": 2, "slide_identity": "v1:123:abc"})
    p = save_grid(g, tmp_path / "patches" / "s.h5")
    back = load_grid(p)
    assert back.extra["slide_identity"] == "v1:123:abc"
    save_grid(back, tmp_path / "again.h5")  # a loaded grid saved again keeps it
    assert load_grid(tmp_path / "again.h5").extra["slide_identity"] == "v1:123:abc"
    assert sorted(f.name for f in (tmp_path / "patches").iterdir()) == ["s.h5"]
