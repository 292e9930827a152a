"""A tile grid at a target resolution, kept where there is tissue.

Coordinates are level-0 pixels of each tile's top-left corner. A tile of ``tile_size`` target px
covers ``tile_size * target_mpp / slide_mpp`` level-0 px.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.slides.slide import Slide
from gigaslide.tiling.tissue import TissueMask


@dataclass
class TileGrid:
    """Tile coordinates of one slide plus everything needed to read them again."""

    coords: np.ndarray  # int64 [N, 2] level-0 (x, y)
    tissue: np.ndarray  # float32 [N] tissue fraction per tile
    slide_id: str
    slide_path: str
    target_mpp: float
    tile_size: int  # px at target mpp
    overlap: int  # px at target mpp
    slide_mpp: float
    slide_dimensions: tuple[int, int]
    read_level: int
    min_tissue: float
    extra: dict = field(default_factory=dict)

    @property
    def tile_size_level0(self) -> float:
        return self.tile_size * self.target_mpp / self.slide_mpp

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def grid_positions(length0: int, tile0: float, stride0: float) -> np.ndarray:
    """Level-0 starts of tiles of ``tile0`` px at ``stride0`` px that lie fully inside ``[0, length0)``, centred."""
    if tile0 > length0 + 1e-6:
        return np.zeros(0, dtype=np.int64)
    n = int(np.floor((length0 - tile0) / stride0 + 1e-9)) + 1
    margin = (length0 - tile0 - (n - 1) * stride0) / 2  # centre the grid: equal slack on both sides
    return np.floor(margin + np.arange(n) * stride0 + 1e-9).astype(np.int64)


def make_grid(slide: Slide, tissue: TissueMask | None, *, target_mpp: float, tile_size: int, overlap: int = 0,
              min_tissue: float = 0.25) -> TileGrid:
    if tile_size < 1:
        raise GigaslideError(f"tile size {tile_size} must be at least 1 px", fix="use e.g. --tile-size 224")
    if not 0 <= overlap < tile_size:
        raise GigaslideError(f"overlap {overlap} must be in [0, tile size {tile_size})", fix="use e.g. --overlap 0")
    if not 0.0 <= min_tissue <= 1.0:
        raise GigaslideError(f"min tissue {min_tissue} must be in [0, 1]", fix="use e.g. --min-tissue 0.25")
    slide.check_target_mpp(target_mpp)
    W, H = slide.dimensions
    f = target_mpp / slide.mpp
    tile0 = tile_size * f
    stride0 = (tile_size - overlap) * f
    if tile0 > W + 1e-6 or tile0 > H + 1e-6:
        raise GigaslideError(
            f"a {tile_size} px tile at {target_mpp} µm/px spans {tile0:.0f} level-0 px, more than the slide ({W}x{H} px)",
            path=slide.path,
            fix=f"use a smaller --tile-size (at most {int(min(W, H) / f)}) or a finer --mpp",
        )
    xs = grid_positions(W, tile0, stride0)
    ys = grid_positions(H, tile0, stride0)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    if tissue is not None:
        frac = tissue.box_fraction(coords[:, 0], coords[:, 1], tile0).astype(np.float32)
    else:
        frac = np.ones(len(coords), dtype=np.float32)
    keep = frac >= min_tissue if min_tissue > 0 else np.ones(len(coords), bool)
    if min_tissue > 0:
        keep &= frac > 0
    return TileGrid(
        coords=coords[keep], tissue=frac[keep], slide_id=slide.id, slide_path=str(slide.path),
        target_mpp=float(target_mpp), tile_size=int(tile_size), overlap=int(overlap), slide_mpp=float(slide.mpp),
        slide_dimensions=(W, H), read_level=slide.choose_level(target_mpp).level, min_tissue=float(min_tissue),
    )
