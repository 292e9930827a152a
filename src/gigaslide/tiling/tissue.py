"""Tissue segmentation on a low-resolution thumbnail.

Saturation (HSV) with an Otsu threshold and a floor (so a blank slide has no tissue), bright
background removed, then closing, hole filling and removal of pieces below a minimum area.
The mask maps to level-0 pixels through ``downsample`` (level-0 px per mask px).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from gigaslide import atomic
from gigaslide.slides.slide import Slide

#: Saturation (0-255) below which nothing counts as tissue, whatever Otsu says.
MIN_SATURATION = 20
#: Pixels brighter than this on every channel are glass.
BACKGROUND_BRIGHTNESS = 235


@dataclass
class TissueMask:
    mask: np.ndarray  # bool [h, w]
    downsample: float  # level-0 px per mask px
    slide_dimensions: tuple[int, int]

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def integral(self) -> np.ndarray:
        """Summed-area table with a zero first row/column, for O(1) tissue fraction of any box."""
        s = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        s[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        return s

    def box_fraction(self, x0: np.ndarray, y0: np.ndarray, size0: float, integral: np.ndarray | None = None) -> np.ndarray:
        """Tissue fraction of level-0 boxes [x0, x0+size0) x [y0, y0+size0)."""
        s = self.integral() if integral is None else integral
        h, w = self.mask.shape
        d = self.downsample
        ax = np.clip(np.floor(np.asarray(x0) / d).astype(np.int64), 0, w)
        ay = np.clip(np.floor(np.asarray(y0) / d).astype(np.int64), 0, h)
        bx = np.clip(np.ceil((np.asarray(x0) + size0) / d).astype(np.int64), 0, w)
        by = np.clip(np.ceil((np.asarray(y0) + size0) / d).astype(np.int64), 0, h)
        area = np.maximum((bx - ax) * (by - ay), 1)
        tissue = s[by, bx] - s[ay, bx] - s[by, ax] + s[ay, ax]
        return tissue / area


def segment_array(rgb: np.ndarray, *, min_area_px: int = 16, closing: int = 2) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail."""
    from skimage.filters import threshold_otsu

    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    sat = hsv[..., 1]
    not_glass = ~np.all(rgb >= BACKGROUND_BRIGHTNESS, axis=-1)
    if sat.max() < MIN_SATURATION:
        return np.zeros(sat.shape, dtype=bool)
    t = threshold_otsu(sat) if sat.min() != sat.max() else MIN_SATURATION
    mask = (sat >= max(float(t), MIN_SATURATION)) & not_glass
    if closing > 0:
        mask = ndi.binary_closing(mask, structure=np.ones((3, 3)), iterations=closing, border_value=0)
        mask = ndi.binary_opening(mask, structure=np.ones((3, 3)), iterations=1)
    mask = ndi.binary_fill_holes(mask)
    if min_area_px > 1 and mask.any():
        lab, n = ndi.label(mask)
        sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= min_area_px
        mask = keep[lab]
    return mask


def default_thumb_size(dimensions: tuple[int, int]) -> int:
    """About 32 level-0 px per mask px, between 1024 and 4096 px on the longer side."""
    return int(min(4096, max(1024, max(dimensions) / 32)))


def segment_tissue(slide: Slide, *, thumb_size: int | None = None, min_area_um2: float = 20_000.0) -> tuple[TissueMask, np.ndarray]:
    """Tissue mask of ``slide`` from a thumbnail; returns (mask, thumbnail RGB)."""
    thumb, ds = slide.thumbnail(thumb_size or default_thumb_size(slide.dimensions))
    px_area_um2 = (ds * slide.mpp) ** 2 if slide.has_mpp else None
    min_area_px = int(max(4, min_area_um2 / px_area_um2)) if px_area_um2 else 16
    mask = segment_array(thumb, min_area_px=min_area_px)
    return TissueMask(mask, ds, slide.dimensions), thumb


def overlay_png(thumb: np.ndarray, mask: np.ndarray, path: str | os.PathLike, color=(0, 160, 0)) -> Path:
    """Thumbnail with the tissue mask tinted and its outline drawn."""
    out = thumb.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = 0.65 * out[m] + 0.35 * np.array(color, np.float32)
    edge = m ^ ndi.binary_erosion(m, iterations=1)
    out[edge] = color
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    with atomic.atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def mask_to_geojson(tm: TissueMask, *, tolerance: float = 1.0) -> dict:
    """Outer boundary of each tissue piece as a GeoJSON polygon in level-0 px (QuPath opens it)."""
    from skimage.measure import approximate_polygon, find_contours

    features = []
    lab, n = ndi.label(tm.mask)
    for i in range(1, n + 1):
        piece = np.pad(lab == i, 1)
        contours = find_contours(piece.astype(np.uint8), 0.5)
        if not contours:
            continue
        c = max(contours, key=len)
        c = approximate_polygon(c, tolerance=tolerance)
        # (row, col) in padded mask px -> (x, y) level-0 px
        xy = [[float((col - 1 + 0.5) * tm.downsample), float((row - 1 + 0.5) * tm.downsample)] for row, col in c]
        if len(xy) < 4:
            continue
        if xy[0] != xy[-1]:
            xy.append(xy[0])
        features.append({
            "type": "Feature",
            "id": f"tissue-{i}",
            "geometry": {"type": "Polygon", "coordinates": [xy]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}},
        })
    return {"type": "FeatureCollection", "features": features}


def save_geojson(tm: TissueMask, path: str | os.PathLike) -> Path:
    return atomic.write_text(path, json.dumps(mask_to_geojson(tm)))
