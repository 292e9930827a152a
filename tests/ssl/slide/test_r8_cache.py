"""Round 8, mutation testing of augment-cache: a view's features are its own tiles' (not another view's), and views
are drawn without replacement whenever the slide has enough tiles (as many as a view: a permutation)."""
import h5py
import numpy as np
import torch

from gigaslide.features import store
from gigaslide.ssl.slide import cache
from gigaslide.ssl.slide.cache import build_augment_cache, draw_views
from gigaslide.testing import make_slide


def test_each_cached_view_row_is_the_encoding_of_its_own_tile(tmp_path, monkeypatch):
    """With the augmentation replaced by the identity, a view's row t is the plain feature of tile view_tiles[v, t]
    (to float16): the views of one encoder batch each get their own tiles (every view encoded from the first view's
    tiles still passed the layout checks)."""
    from gigaslide.ssl.tile.augment import to_float

    identity = lambda self, tiles, g: torch.stack([to_float(t) for t in tiles])  # noqa: E731
    monkeypatch.setattr(cache.SharedAugment, "__call__", identity)
    slide = make_slide(tmp_path / "s0.tiff", (640, 448), mpp=2.0, seed=0)
    build_augment_cache([str(slide)], tmp_path / "c", encoder="test_resnet", weights="random", views=4,
                        tiles_per_view=5, mpp=2.0, tile_size=32, precision="fp32", device="cpu", log=lambda *a: None)
    ff = store.load(tmp_path / "c" / "features" / "s0.h5")
    with h5py.File(tmp_path / "c" / "features" / "s0.h5") as f:
        views, tiles = f["views"][:].astype(np.float32), f["view_tiles"][:]
    assert views.shape[:2] == (4, 5) and len({tuple(sorted(v)) for v in tiles.tolist()}) == 4  # 4 different views
    np.testing.assert_allclose(views, ff.features[tiles].astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_views_of_exactly_as_many_tiles_as_the_slide_has_hold_each_tile_once():
    idx, repl = draw_views(5, 3, 5, np.random.default_rng(0))
    assert not repl and all(sorted(r) == [0, 1, 2, 3, 4] for r in idx.tolist())
