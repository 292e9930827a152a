"""A tile grid at a target resolution, kept where there is tissue.

Coordinates are level-0 pixels of each tile's top-left corner. A tile of ``tile_size`` target px
covers ``tile_size * target_mpp / slide_mpp`` level-0 px.

The grid is anchored at the slide's top-left corner (0, 0) and runs until every pixel of the
slide lies in some tile, so tissue at the edges is tiled too: every tile starts inside the slide,
and the last row and column may reach past its right / bottom edge by less than one stride. That
part is read as the slide's background (white glass; black on a fluorescence slide, when the reader is
given the grid's ``extra["background"]``: ``iter_tiles(..., background=)``) and counts as background in
the tile's tissue fraction; ``TileGrid.padding`` records each tile's outside
fraction. (Before grid rule 2 the grid held only tiles fully inside the slide, centred, dropping up
to one tile of tissue on every side.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.slides.slide import MPP_TOLERANCE, Slide
from gigaslide.tiling.tissue import TissueMask

#: Version of the rule placing tiles (stored with every grid; a grid made by another rule is recomputed).
GRID_RULE = 2


#: ``TileGrid.extra`` key of the (w, h) of pyramid level ``read_level`` (CLAM's ``level_dim``): set by
#: :func:`make_grid` from the slide it has open, and by ``load_grid`` from a coords file that recorded it.
LEVEL_DIM_KEY = "patch_level_dim"


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
    padding: np.ndarray | None = None  # float32 [N]: fraction of each tile outside the slide (read as glass)

    def __post_init__(self) -> None:
        if self.padding is None:
            self.padding = np.zeros(len(self.coords), np.float32)

    @property
    def tile_size_level0(self) -> float:
        return self.tile_size * self.target_mpp / self.slide_mpp

    @property
    def edge_fill(self) -> str:
        """What the outside of the slide reads as in edge tiles: ``dark`` (black) on a dark-background (fluorescence)
        slide, else ``bright`` (white glass) -- the ``background=`` every reader of these tiles passes."""
        return "dark" if self.extra.get("background") == "dark" else "bright"

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def grid_positions(length0: int, tile0: float, stride0: float) -> np.ndarray:
    """Level-0 starts (0, stride, 2 stride, ..., floored) of tiles of ``tile0`` px until every pixel of
    ``[0, length0)`` lies in one; every start is inside, the last tile may reach past ``length0``."""
    if length0 < 1 or tile0 <= 0 or stride0 <= 0:
        return np.zeros(0, dtype=np.int64)
    n = max(1, int(np.ceil((length0 - tile0) / stride0 - 1e-9)) + 1)
    while n > 1 and np.floor((n - 2) * stride0 + 1e-9) + tile0 > length0 - 1:  # one fewer still covers
        n -= 1
    while np.floor((n - 1) * stride0 + 1e-9) + tile0 <= length0 - 1:  # flooring left the last pixel out
        n += 1
    return np.floor(np.arange(n) * stride0 + 1e-9).astype(np.int64)


def padding_fraction(coords: np.ndarray, tile0: float, dimensions: tuple[int, int]) -> np.ndarray:
    """Fraction of each tile's area that lies outside the slide."""
    W, H = dimensions
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    iw = np.clip(W - coords[:, 0], 0, tile0)
    ih = np.clip(H - coords[:, 1], 0, tile0)
    return (1.0 - iw * ih / (tile0 * tile0)).clip(0, 1).astype(np.float32)


def select_tiles(tissue: TissueMask | None, dimensions: tuple[int, int], tile0: float, stride0: float,
                 min_tissue: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coords, tissue fraction, padding fraction) of the grid's tiles kept at ``min_tissue``."""
    W, H = dimensions
    xs = grid_positions(W, tile0, stride0)
    ys = grid_positions(H, tile0, stride0)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    pad = padding_fraction(coords, tile0, (W, H))
    if tissue is not None:
        frac = tissue.box_fraction(coords[:, 0], coords[:, 1], tile0).astype(np.float32)
    else:
        frac = (1.0 - pad).astype(np.float32)
    keep = frac >= min_tissue if min_tissue > 0 else np.ones(len(coords), bool)
    if min_tissue > 0:
        keep &= frac > 0
    return coords[keep], frac[keep], pad[keep]


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
    if stride0 < 1:  # level-0 starts are whole pixels: steps under one would start several tiles at one pixel
        raise GigaslideError(
            f"tiles {tile_size} px with {overlap} px overlap at {target_mpp} µm/px step {stride0:.3g} level-0 px, "
            "less than one: tiles would repeat", path=slide.path, fix="use a smaller --overlap")
    if tile0 > W + 1e-6 or tile0 > H + 1e-6:
        finest = min(W, H) * slide.mpp / tile_size  # the coarsest --mpp at which this tile still fits
        finer = f" or a finer --mpp (at most {finest:.3g})" if finest >= slide.mpp * (1 - MPP_TOLERANCE) else ""
        raise GigaslideError(
            f"a {tile_size} px tile at {target_mpp} µm/px spans {tile0:.0f} level-0 px, more than the slide ({W}x{H} px)",
            path=slide.path,
            fix=f"use a smaller --tile-size (at most {int(min(W, H) / f)}){finer}",
        )
    coords, frac, pad = select_tiles(tissue, (W, H), tile0, stride0, min_tissue)
    level = slide.choose_level(target_mpp).level
    extra = {"grid_rule": GRID_RULE, **(tissue.info if tissue is not None else {}),
             LEVEL_DIM_KEY: [int(d) for d in slide.level_dimensions[level]]}
    return TileGrid(
        coords=coords, tissue=frac, slide_id=slide.id, slide_path=os.path.abspath(slide.path),
        target_mpp=float(target_mpp), tile_size=int(tile_size), overlap=int(overlap), slide_mpp=float(slide.mpp),
        slide_dimensions=(W, H), read_level=level, min_tissue=float(min_tissue), extra=extra, padding=pad,
    )
