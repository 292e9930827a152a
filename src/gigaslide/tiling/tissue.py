"""Tissue segmentation on a low-resolution thumbnail.

Bright-field (glass background): saturation (HSV) with an Otsu threshold and a floor (so a blank
slide has no tissue); dark background (fluorescence, ``background="dark"``): brightness (max
channel) the same way. Otsu is used only when it separates background from tissue: when the
pixels below its threshold are mostly stained themselves (no glass at all -- a crop of a region,
a TMA core image -- or very little), the floor alone decides, so a slide covered with tissue to
every edge is all tissue. Then closing, hole filling and removal of pieces below a minimum area
(the morphology treats the image border as continuing the edge pixels, so tissue touching the
edge is not eroded). The mask maps to level-0 pixels through ``downsample`` (level-0 px per mask px).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from gigaslide import atomic
from gigaslide.errors import GigaslideError
from gigaslide.slides.slide import Slide
from gigaslide.tiling.stain import detect_background, detect_stain

#: Saturation (0-255) below which nothing counts as tissue, whatever Otsu says.
MIN_SATURATION = 20
#: Pixels brighter than this on every channel are glass.
BACKGROUND_BRIGHTNESS = 235
#: Dark background (fluorescence): max channel (0-255) below which nothing counts as tissue.
DARK_FLOOR = 25
#: Otsu's lower class must be at least this fraction background (below the floor) to be trusted.
OTSU_MIN_BACKGROUND = 0.5
BACKGROUNDS = ("auto", "bright", "dark")


@dataclass
class TissueMask:
    mask: np.ndarray  # bool [h, w]
    downsample: float  # level-0 px per mask px
    slide_dimensions: tuple[int, int]
    info: dict = field(default_factory=dict)  # background, stain (see tiling.stain)

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def integral(self) -> np.ndarray:
        """Summed-area table with a zero first row/column, for O(1) tissue fraction of any box."""
        s = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
        s[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        return s

    def box_fraction(self, x0: np.ndarray, y0: np.ndarray, size0: float, integral: np.ndarray | None = None) -> np.ndarray:
        """Tissue fraction of level-0 boxes [x0, x0+size0) x [y0, y0+size0), exact for the mask taken as
        piecewise constant (partly covered mask px count by their covered area); outside the mask is glass."""
        s = self.integral() if integral is None else integral
        d = self.downsample
        x0 = np.asarray(x0, np.float64) / d
        y0 = np.asarray(y0, np.float64) / d
        k = float(size0) / d
        lim = (self.slide_dimensions[0] / d, self.slide_dimensions[1] / d)  # the mask may overhang the slide a little

        def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return _sat_at(s, x, y, lim)

        tissue = at(x0 + k, y0 + k) - at(x0, y0 + k) - at(x0 + k, y0) + at(x0, y0)
        return np.clip(tissue / max(k * k, 1e-12), 0.0, 1.0)


def _sat_at(s: np.ndarray, x: np.ndarray, y: np.ndarray, lim: tuple[float, float]) -> np.ndarray:
    """The summed-area table at fractional mask coordinates: bilinear interpolation is exact for a
    piecewise-constant mask; coordinates outside the mask (or the slide, ``lim``) are clipped: outside adds nothing."""
    h, w = s.shape[0] - 1, s.shape[1] - 1
    x = np.clip(x, 0, min(w, lim[0]))
    y = np.clip(y, 0, min(h, lim[1]))
    j = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    i = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
    fx, fy = x - j, y - i
    return (s[i, j] * (1 - fx) * (1 - fy) + s[i, j + 1] * fx * (1 - fy) + s[i + 1, j] * (1 - fx) * fy
            + s[i + 1, j + 1] * fx * fy)


def segment_array(rgb: np.ndarray, *, min_area_px: int = 16, closing: int = 2, background: str = "bright") -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail on a ``bright`` (glass) or ``dark`` (fluorescence) background."""
    from skimage.filters import threshold_otsu

    if background == "dark":
        signal, floor = rgb.max(axis=-1), DARK_FLOOR
        excluded = signal < DARK_FLOOR
    else:
        signal, floor = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("HSV"))[..., 1], MIN_SATURATION
        excluded = np.all(rgb >= BACKGROUND_BRIGHTNESS, axis=-1)
    if signal.size == 0 or signal.max() < floor:
        return np.zeros(signal.shape, dtype=bool)
    t = float(floor)
    if signal.min() != signal.max():
        otsu = float(threshold_otsu(signal))
        below = signal[signal < otsu]
        if below.size and (below < floor).mean() >= OTSU_MIN_BACKGROUND:  # Otsu split background from tissue
            t = max(otsu, float(floor))
    mask = (signal >= t) & ~excluded
    if closing > 0:
        pad = closing + 1
        m = np.pad(mask, pad, mode="edge")
        m = ndi.binary_closing(m, structure=np.ones((3, 3)), iterations=closing)
        m = ndi.binary_opening(m, structure=np.ones((3, 3)), iterations=1)
        mask = m[pad:-pad, pad:-pad]
    mask = ndi.binary_fill_holes(mask)
    if min_area_px > 1 and mask.any():
        lab, n = ndi.label(mask)
        sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= min_area_px
        mask = keep[lab]
    return mask


def check_background(background: str) -> str:
    if background not in BACKGROUNDS:
        raise GigaslideError(f"unknown background '{background}'", fix="use --background auto, bright or dark")
    return background


def default_thumb_size(dimensions: tuple[int, int]) -> int:
    """About 32 level-0 px per mask px, between 1024 and 4096 px on the longer side."""
    return int(min(4096, max(1024, max(dimensions) / 32)))


def segment_tissue(slide: Slide, *, thumb_size: int | None = None, min_area_um2: float = 20_000.0,
                   background: str = "auto") -> tuple[TissueMask, np.ndarray]:
    """Tissue mask of ``slide`` from a thumbnail; returns (mask, thumbnail RGB).

    ``background``: ``auto`` (detected, see :mod:`gigaslide.tiling.stain`), ``bright`` or ``dark``.
    The mask's ``info`` holds the background used and the stain guess."""
    thumb, ds, info = thumbnail_info(slide, thumb_size, background)
    mask = detect_on_thumbnail(slide, thumb, ds, info["background"], min_area_um2)
    return TissueMask(mask, ds, slide.dimensions, info), thumb


def thumbnail_info(slide: Slide, thumb_size: int | None, background: str) -> tuple[np.ndarray, float, dict]:
    """(thumbnail RGB, level-0 px per thumbnail px, the info every tissue mask records: the stain guess, the
    background used (``auto``: detected from the thumbnail) and the option given), whatever the tissue's source."""
    check_background(background)
    thumb, ds = slide.thumbnail(thumb_size or default_thumb_size(slide.dimensions))
    bg = detect_background(thumb) if background == "auto" else background
    return thumb, ds, {**detect_stain(thumb).as_attrs(), "background": bg, "background_option": background}


def detect_on_thumbnail(slide: Slide, thumb: np.ndarray, downsample: float, background: str,
                        min_area_um2: float = 20_000.0) -> np.ndarray:
    """Detected tissue of ``slide`` on its thumbnail ``thumb`` (level-0 px per thumbnail px: ``downsample``);
    ``background`` is ``bright`` or ``dark`` (already resolved). Pieces under ``min_area_um2`` are dropped."""
    px_area_um2 = (downsample * slide.mpp) ** 2 if slide.has_mpp else None
    min_area_px = int(max(4, min_area_um2 / px_area_um2)) if px_area_um2 else 16
    return segment_array(thumb, min_area_px=min_area_px, background=background)


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
    from gigaslide.tiling.polygon import find_contours, simplify

    features = []
    lab, n = ndi.label(tm.mask)
    for i in range(1, n + 1):
        piece = np.pad(lab == i, 1)
        contours = find_contours(piece.astype(np.uint8), 0.5)
        if not contours:
            continue
        c = max(contours, key=len)
        c = simplify(c, tolerance)
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
