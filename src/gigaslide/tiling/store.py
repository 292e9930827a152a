"""Tile-coordinate files: ``<out>/patches/<slide_id>.h5`` in the CLAM/TRIDENT layout.

Dataset ``coords`` [N, 2] int64 level-0 (x, y), with attrs ``patch_size`` (target px),
``patch_size_level0``, ``patch_level`` (pyramid level read), ``target_mpp``, ``level0_mpp``; plus
``tissue`` [N] and file-level provenance attrs.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from gigaslide import atomic
from gigaslide.artifacts import decode_attrs, provenance
from gigaslide.errors import GigaslideError
from gigaslide.tiling.grid import TileGrid


def save_grid(grid: TileGrid, path: str | os.PathLike, *, seed: int | None = None) -> Path:
    with atomic.atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("coords", data=grid.coords.astype(np.int64))
            d.attrs.update({
                "patch_size": grid.tile_size, "patch_size_level0": grid.tile_size_level0, "patch_level": grid.read_level,
                "target_mpp": grid.target_mpp, "level0_mpp": grid.slide_mpp, "overlap": grid.overlap,
                "level_dim": list(grid.slide_dimensions), "name": grid.slide_id,
            })
            f.create_dataset("tissue", data=grid.tissue.astype(np.float32))
            f.attrs.update(provenance(
                kind="tile_coords", slide_id=grid.slide_id, slide_path=grid.slide_path, mpp=grid.target_mpp,
                tile_size=grid.tile_size, overlap=grid.overlap, min_tissue=grid.min_tissue, slide_mpp=grid.slide_mpp,
                seed=seed,
            ))
    return Path(path)


def load_grid(path: str | os.PathLike) -> TileGrid:
    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            coords = np.asarray(f["coords"][:], dtype=np.int64)
            ca = decode_attrs(f["coords"].attrs)
            fa = decode_attrs(f.attrs)
            tissue = np.asarray(f["tissue"][:], np.float32) if "tissue" in f else np.ones(len(coords), np.float32)
    except (OSError, KeyError) as e:
        raise GigaslideError(f"not a tile-coordinate file ({e})", path=p, fix="re-run `gigaslide tile`") from None
    target_mpp = float(ca.get("target_mpp", fa.get("mpp", 0)) or 0)
    slide_mpp = float(ca.get("level0_mpp", fa.get("slide_mpp", 0)) or 0)
    dims = ca.get("level_dim", [0, 0])
    return TileGrid(
        coords=coords, tissue=tissue, slide_id=str(fa.get("slide_id", ca.get("name", p.stem))),
        slide_path=str(fa.get("slide_path", "")), target_mpp=target_mpp, tile_size=int(ca.get("patch_size", 0)),
        overlap=int(ca.get("overlap", 0)), slide_mpp=slide_mpp, slide_dimensions=(int(dims[0]), int(dims[1])),
        read_level=int(ca.get("patch_level", 0)), min_tissue=float(fa.get("min_tissue", 0.0)), extra=fa,
    )
