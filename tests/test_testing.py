"""gigaslide.testing fixtures are themselves correct."""

import numpy as np
from PIL import Image

from gigaslide.testing import TILE_CLASS_COLOURS, make_tile_folder


def test_tile_folder_classes_are_separable_by_colour(tmp_path):
    d = make_tile_folder(tmp_path / "t", 4, size=16, seed=1)
    for k, cls in enumerate(("normal", "tumor")):
        files = sorted((d / cls).glob("*.png"))
        assert len(files) == 4
        means = [np.asarray(Image.open(f)).reshape(-1, 3).mean(0) for f in files]
        assert all(np.abs(m - TILE_CLASS_COLOURS[k]).max() < 10 for m in means)
    flat = make_tile_folder(tmp_path / "f", flat=5)
    assert sorted(p.name for p in flat.iterdir()) == [f"t{i:03d}.png" for i in range(5)]
    again = make_tile_folder(tmp_path / "t2", 4, size=16, seed=1)
    assert np.array_equal(np.asarray(Image.open(again / "tumor" / "002.png")), np.asarray(Image.open(d / "tumor" / "002.png")))
