"""Draw a tile grid over a slide thumbnail (PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gigaslide import atomic
from gigaslide.tiling.grid import TileGrid


def grid_overlay_png(thumb: np.ndarray, downsample: float, grid: TileGrid, path: str | os.PathLike) -> Path:
    img = Image.fromarray(thumb).convert("RGB")
    draw = ImageDraw.Draw(img)
    s = grid.tile_size_level0 / downsample
    for x, y in grid.coords:
        x0, y0 = x / downsample, y / downsample
        draw.rectangle([x0, y0, x0 + s, y0 + s], outline=(20, 60, 220), width=1)
    with atomic.atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
