"""Shared fixtures: tiny synthetic view caches and feature folders (no slides, no encoder)."""
from pathlib import Path

import numpy as np
import pytest

from gigaslide.features import store




def write_fake_cache(folder: Path, n_slides: int = 6, views: int = 4, tiles: int = 6, dim: int = 8, n_tiles: int = 20,
                     encoder: str = "fake", seed: int = 0, tile0: float = 64.0) -> Path:
    """A cache folder as augment-cache writes it, with random features: two classes of slides whose
    tile features have different means (so embeddings can separate them)."""
    rng = np.random.default_rng(seed)
    for s in range(n_slides):
        label = s % 2
        side = int(np.ceil(np.sqrt(n_tiles)))
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_tiles]
        coords = (grid * tile0).astype(np.int64)
        feats = rng.normal(size=(n_tiles, dim)).astype(np.float32) + label
        idx = np.stack([rng.choice(n_tiles, tiles, replace=False) for _ in range(views)])
        vfeats = (feats[idx] + rng.normal(scale=0.1, size=(views, tiles, dim))).astype(np.float16)
        store.save(folder / "features" / f"slide{s}.h5", feats, coords,
                   attrs={"encoder": encoder, "encoder_weights_sha256": "x", "mpp": 0.5, "tile_size": 64,
                          "slide_id": f"slide{s}", "views": views, "tiles_per_view": tiles, "complete": 1},
                   coords_attrs={"patch_size": 64, "patch_size_level0": tile0, "target_mpp": 0.5, "level0_mpp": 0.5},
                   extra={"views": vfeats, "view_coords": coords[idx], "view_tiles": idx})
    return folder


@pytest.fixture
def make_fake_cache():
    """The :func:`write_fake_cache` helper (tests take it as a fixture; no imports between test files)."""
    return write_fake_cache


@pytest.fixture
def fake_cache(tmp_path):
    return write_fake_cache(tmp_path / "cache")
