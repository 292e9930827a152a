"""Write pyramidal, tiled TIFF slides that OpenSlide reads (generic tiled TIFF).

Used by the mosaic benchmark and by tests that need slides of any size: pixels come from a
callback per tile, so a 40k x 40k slide never has to fit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from gigaslide import atomic

#: ``fn(x0, y0, w, h, downsample) -> uint8 [h, w, 3]``: pixels of the box at level-0 (x0, y0), size in level px.
TileFn = Callable[[int, int, int, int, float], np.ndarray]


def write_pyramidal_tiff(path: str | os.PathLike, width: int, height: int, tile_fn: TileFn, *, mpp: float | None,
                         tile: int = 256, min_level_size: int = 512, compression: str = "jpeg", quality: int = 90,
                         level_factor: int = 2) -> Path:
    """Write a generic pyramidal TIFF (levels as tiled pages, each ``level_factor`` smaller)."""
    import tifffile

    levels = [1]
    while max(width, height) / (levels[-1] * level_factor) >= min_level_size:
        levels.append(levels[-1] * level_factor)

    def tiles(ds: int, lw: int, lh: int) -> Iterator[np.ndarray]:
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                w, h = min(tile, lw - tx), min(tile, lh - ty)
                px = np.asarray(tile_fn(tx * ds, ty * ds, w, h, float(ds)), dtype=np.uint8)
                if px.shape != (tile, tile, 3):
                    pad = np.full((tile, tile, 3), 255, np.uint8)
                    pad[:h, :w] = px[:h, :w]
                    px = pad
                yield px

    comp = None if compression in (None, "none") else compression
    comp_args = {"compressionargs": {"level": quality}} if comp == "jpeg" else {}
    with atomic.atomic_path(path, suffix=".tiff") as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tw:
            for ds in levels:
                lw, lh = max(1, width // ds), max(1, height // ds)
                res = {}
                if mpp:
                    res = {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}
                tw.write(tiles(ds, lw, lh), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                         photometric="rgb", compression=comp, subfiletype=0 if ds == 1 else 1,
                         description=f"gigaslide pyramidal tiff level downsample={ds}", metadata=None, **res,
                         **comp_args)
    return Path(path)


def write_array_as_slide(path: str | os.PathLike, rgb: np.ndarray, *, mpp: float | None, **kw) -> Path:  # noqa: ANN003
    """Write an in-memory RGB array as a pyramidal TIFF."""
    rgb = np.asarray(rgb, np.uint8)
    H, W = rgb.shape[:2]

    def fn(x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        d = int(ds)
        block = rgb[y0: y0 + h * d, x0: x0 + w * d]
        if d > 1:
            hh, ww = block.shape[0] // d, block.shape[1] // d
            block = block[: hh * d, : ww * d].reshape(hh, d, ww, d, 3).mean(axis=(1, 3)).astype(np.uint8)
        out = np.full((h, w, 3), 255, np.uint8)
        out[: block.shape[0], : block.shape[1]] = block[:h, :w]
        return out

    return write_pyramidal_tiff(path, W, H, fn, mpp=mpp, **kw)
