"""Regions for SLPD: tiles grouped into square regions from their level-0 coordinates, at any mpp.

The region side is given as ``region_size`` px at ``region_mpp`` µm/px (SLPD/HIPT: 4096 px at 20x,
i.e. 0.5 µm/px = 2048 µm) and converted to level-0 px with the feature file's level-0 mpp. A tile
belongs to the region containing its top-left corner; inside a region, tiles sit on a
``grid x grid`` lattice (``grid = ceil(region side / tile step)``, the step being the tile side less any
overlap) used for positional embeddings.
:func:`grid_crop` cuts SLPD's region views as contiguous sub-grids of that lattice (the feature-level
analogue of DINO's image crops: 2 large "global" and several small "local" crops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gigaslide.errors import GigaslideError
from gigaslide.features.store import FeatureFile


@dataclass
class SlideRegions:
    slide_id: str
    origins: np.ndarray  # [R, 2] level-0 region corners
    members: list[np.ndarray]  # per region: tile indices into the feature file
    local: list[np.ndarray]  # per region: [n, 2] (x, y) positions on the region lattice
    grid: int  # lattice side

    def __len__(self) -> int:
        return len(self.members)


def level0_mpp(ff: FeatureFile) -> float:
    a, c = ff.attrs, ff.coords_attrs
    v = c.get("level0_mpp", a.get("slide_mpp"))
    if v is None and a.get("mpp") is not None and a.get("tile_size") is not None and c.get("patch_size_level0"):
        v = float(a["mpp"]) * float(a["tile_size"]) / float(c["patch_size_level0"])
    if v is None:
        raise GigaslideError("feature file does not say its level-0 µm/px (coords attr level0_mpp)", path=ff.path,
                             fix="re-encode with `gigaslide encode` (it stores the resolution)")
    return float(v)


def group_regions(coords: np.ndarray, tile0: float, region0: float, *, min_tiles: int = 1,
                  slide_id: str = "", step: float | None = None) -> SlideRegions:
    """Group tiles (level-0 corners ``coords`` [N, 2], tile side ``tile0``) into regions of side ``region0``; the
    lattice inside a region steps by ``step`` (the tiling's stride: less than the side where tiles overlap;
    default the side)."""
    if region0 < tile0:
        raise GigaslideError(f"region side ({region0:.0f} level-0 px) is smaller than a tile ({tile0:.0f} px)",
                             fix="use a larger --region-size")
    step = float(step or tile0)
    grid = max(1, math.ceil(region0 / step - 1e-9))
    cell = np.floor(coords / region0 + 1e-9).astype(np.int64)
    keys, inverse = np.unique(cell, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    origins, members, local = [], [], []
    for r, key in enumerate(keys):
        idx = np.flatnonzero(inverse == r)
        if len(idx) < min_tiles:
            continue
        origin = key * region0
        lp = np.clip(np.floor((coords[idx] - origin) / step + 1e-6).astype(np.int64), 0, grid - 1)
        origins.append(np.round(origin).astype(np.int64))
        members.append(idx)
        local.append(lp)
    o = np.stack(origins) if origins else np.zeros((0, 2), np.int64)
    return SlideRegions(slide_id, o, members, local, grid)


def regions_of(ff: FeatureFile, region_size: int, region_mpp: float = 0.5, min_tiles: int = 1) -> SlideRegions:
    """Regions of one feature file (region side = ``region_size`` px at ``region_mpp`` µm/px)."""
    tile0 = ff.require_tile_size_level0()
    region0 = region_size * region_mpp / level0_mpp(ff)
    return group_regions(ff.coords, tile0, region0, min_tiles=min_tiles, slide_id=ff.slide_id,
                         step=ff.tile_step_level0)


def pack(feats: np.ndarray, regions: SlideRegions, which: list[int] | np.ndarray,
         max_tiles: int | None = None, grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Regions -> padded ``feats`` [R, T, D] float32, lattice index [R, T] long (y * grid + x), mask [R, T].

    ``grid``: the lattice side of the model the index is for (default the slide's own). Slides of one cohort
    can have lattices of different sides (level-0 µm/px or tile overlap differ; the model's is the largest):
    the index must use the model's side, or the tile at (x, y) of a smaller lattice reads the position
    embedding of another cell. Cells beyond the model's lattice go to its last row / column."""
    g = int(grid or regions.grid)
    sel = [regions.members[i] for i in which]
    t = max(len(m) for m in sel)
    if max_tiles is not None:
        t = min(t, max_tiles)
    d = feats.shape[1]
    f = np.zeros((len(sel), t, d), np.float32)
    p = np.zeros((len(sel), t), np.int64)
    m = np.zeros((len(sel), t), bool)
    for k, i in enumerate(which):
        idx, lp = regions.members[i][:t], regions.local[i][:t]
        f[k, : len(idx)] = feats[idx]
        lp = np.minimum(lp, g - 1)
        p[k, : len(idx)] = lp[:, 1] * g + lp[:, 0]
        m[k, : len(idx)] = True
    return torch.from_numpy(f), torch.from_numpy(p), torch.from_numpy(m)


def grid_crop(lattice: torch.Tensor, mask: torch.Tensor, grid: int, side: tuple[float, float],
              rng: np.random.Generator) -> torch.Tensor:
    """A random contiguous square sub-grid per region: the tiles of ``mask`` [R, T] whose lattice index
    ``lattice`` [R, T] (y * grid + x) falls inside it. The crop side is ``side`` (fractions of ``grid``,
    at least one tile) and the crop is placed to contain a random present tile, so no crop is empty."""
    r, t = mask.shape
    x, y = (lattice % grid).numpy(), (lattice // grid).numpy()
    m = mask.numpy()
    out = np.zeros_like(m)
    for i in range(r):
        present = np.flatnonzero(m[i])
        if len(present) == 0:
            continue
        s = int(np.clip(round(rng.uniform(*side) * grid), 1, grid))
        a = present[rng.integers(len(present))]
        x0 = int(rng.integers(max(0, x[i, a] - s + 1), min(x[i, a], grid - s) + 1))
        y0 = int(rng.integers(max(0, y[i, a] - s + 1), min(y[i, a], grid - s) + 1))
        out[i] = m[i] & (x[i] >= x0) & (x[i] < x0 + s) & (y[i] >= y0) & (y[i] < y0 + s)
    return torch.from_numpy(out)


def compact(feats: torch.Tensor, lattice: torch.Tensor, mask: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A crop's tiles only: ``feats`` [R, T, D], ``lattice`` [R, T], ``mask`` [R, T] -> the same with T = the most
    tiles any region keeps, each region's kept tiles first in their order, padding masked out.

    The encoder's output does not change (padding is masked from attention), but a small crop then costs its own
    tiles, not the whole region's: SLPD's local crops keep 4-20 % of a region."""
    keep = mask.sum(1)
    t = max(1, int(keep.max()))
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :t]
    f = torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
    return f, torch.gather(lattice, 1, idx), torch.arange(t, device=mask.device)[None] < keep[:, None]
