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


def write_stain_cache(folder: Path, n_slides: int = 24, views: int = 6, tiles: int = 24, n_tiles: int = 36,
                      dim: int = 16, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A cache with known slide structure: two slide types differ in the "morphology" dims
    (the last 3/4); the first 1/4 carry a large per-slide "stain" offset that each cached augmented version shifts
    again (as colour augmentation does). An encoder that ignores stain separates the types; a random
    one is dominated by stain. Returns (folder, slide types)."""
    rng = np.random.default_rng(seed)
    types = np.arange(n_slides) % 2
    tile0 = 64.0
    side = int(np.ceil(np.sqrt(n_tiles)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_tiles]
    coords = (grid * tile0).astype(np.int64)
    for s in range(n_slides):
        ns = dim // 4
        morph = rng.normal(size=(n_tiles, dim - ns)) + 1.0 * types[s] + rng.normal(scale=0.7, size=dim - ns)
        stain = np.broadcast_to(rng.normal(scale=3.0, size=ns), (n_tiles, ns))
        feats = np.concatenate([stain, morph], 1).astype(np.float32)
        idx = np.stack([rng.choice(n_tiles, tiles, replace=False) for _ in range(views)])
        shift = np.concatenate([rng.normal(scale=6.0, size=(views, 1, ns)), np.zeros((views, 1, dim - ns))], 2)
        vfeats = (feats[idx] + shift + rng.normal(scale=0.1, size=(views, tiles, dim))).astype(np.float16)
        store.save(folder / "features" / f"slide{s:02d}.h5", feats, coords,
                   attrs={"encoder": "fake", "encoder_weights_sha256": "x", "mpp": 0.5, "tile_size": 64,
                          "slide_id": f"slide{s:02d}", "views": views, "tiles_per_view": tiles, "complete": 1},
                   coords_attrs={"patch_size": 64, "patch_size_level0": tile0, "target_mpp": 0.5, "level0_mpp": 0.5},
                   extra={"views": vfeats, "view_coords": coords[idx], "view_tiles": idx})
    return folder, types


@pytest.fixture
def make_stain_cache():
    return write_stain_cache


def write_planted_slide(path: Path, sid: str, types, dim: int, means: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A feature file of regions of 4 x 4 tiles of 64 px (128 µm at 0.5 µm/px), region r of type ``types[r]``
    (features ``means[type]`` + noise), 4 regions per row; returns each tile's type."""
    coords, feats, kind = [], [], []
    for r, t in enumerate(types):
        ox, oy = (r % 4) * 256, (r // 4) * 256
        for dx in range(4):
            for dy in range(4):
                coords.append([ox + dx * 64, oy + dy * 64])
                feats.append(means[t] + rng.normal(size=dim))
                kind.append(t)
    store.save(path, np.array(feats, np.float32), np.array(coords),
               attrs={"encoder": "fake", "encoder_weights_sha256": "x", "mpp": 0.5, "tile_size": 64, "slide_id": sid},
               coords_attrs={"patch_size_level0": 64.0, "level0_mpp": 0.5})
    return np.array(kind)


@pytest.fixture
def planted_slide():
    """The :func:`write_planted_slide` helper."""
    return write_planted_slide


@pytest.fixture
def add_empty_slide():
    """Adds ``features/empty.h5``, a feature file without tiles (and otherwise like the fake caches'), to a folder."""
    def add(folder: Path) -> Path:
        return store.save(Path(folder) / "features" / "empty.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2)),
                          attrs={"encoder": "fake", "encoder_weights_sha256": "x", "mpp": 0.5, "tile_size": 64,
                                 "slide_id": "empty"},
                          coords_attrs={"patch_size_level0": 64.0, "level0_mpp": 0.5})
    return add
