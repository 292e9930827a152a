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
#: When the minimum area drops every piece, pieces of at least this fraction of the whole image are kept: on an image
#: not much larger than the minimum area (a crop of a region, a small TMA core image) no piece could otherwise count.
MIN_AREA_MAX_FRACTION = 0.05
#: Tissue pieces smaller than this (µm²) are dropped as specks (see :func:`min_area_px`).
DEFAULT_MIN_AREA_UM2 = 20_000.0
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


def segment_array(rgb: np.ndarray, *, min_area_px: int = 16, closing: int = 2, background: str = "bright",
                  fallback_area_px: int = 0) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail on a ``bright`` (glass) or ``dark`` (fluorescence) background. Pieces
    under ``min_area_px`` are dropped; when that would drop every piece, those of at least ``fallback_area_px`` (when
    given) are kept."""
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
        if not keep.any() and fallback_area_px:  # every piece under the minimum: the image's own large pieces stay
            keep[1:] = sizes >= fallback_area_px
        mask = keep[lab]
    return mask


def check_background(background: str) -> str:
    if background not in BACKGROUNDS:
        raise GigaslideError(f"unknown background '{background}'", fix="use --background auto, bright or dark")
    return background


def default_thumb_size(dimensions: tuple[int, int]) -> int:
    """About 32 level-0 px per mask px, between 1024 and 4096 px on the longer side."""
    return int(min(4096, max(1024, max(dimensions) / 32)))


def segment_tissue(slide: Slide, *, thumb_size: int | None = None, min_area_um2: float = DEFAULT_MIN_AREA_UM2,
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
    return thumb, ds, {**detect_stain(thumb, bg).as_attrs(), "background": bg, "background_option": background}


def slide_background(path: str | os.PathLike, slide_mpp: float | str | None = None,
                     background: str = "auto") -> str | None:
    """The background of slide ``path`` as tissue detection takes it (``bright`` or ``dark``; ``background`` when it
    is not ``auto``), found on its thumbnail; None when the slide cannot be opened. For a stage asking whether a
    result recorded before its edge fill was (``edge_fill``) was made on a dark slide, padded white then."""
    from gigaslide.slides import open_slide

    try:
        with open_slide(path, mpp=slide_mpp) as slide:
            return thumbnail_info(slide, None, background)[2]["background"]
    except GigaslideError:
        return None


def detect_on_thumbnail(slide: Slide, thumb: np.ndarray, downsample: float, background: str,
                        min_area_um2: float = DEFAULT_MIN_AREA_UM2) -> np.ndarray:
    """Detected tissue of ``slide`` on its thumbnail ``thumb`` (level-0 px per thumbnail px: ``downsample``);
    ``background`` is ``bright`` or ``dark`` (already resolved). Pieces under ``min_area_um2`` are dropped; when
    that drops every piece (an image not much larger than the minimum area: a crop of a region, a small TMA core),
    pieces of at least :data:`MIN_AREA_MAX_FRACTION` of the image are kept."""
    return segment_array(thumb, min_area_px=min_area_px(slide, downsample, min_area_um2), background=background,
                         fallback_area_px=max(1, int(MIN_AREA_MAX_FRACTION * thumb.shape[0] * thumb.shape[1])))


def min_area_px(slide: Slide, downsample: float, min_area_um2: float = DEFAULT_MIN_AREA_UM2) -> int:
    """The smallest piece of tissue kept, in thumbnail px (``downsample``: level-0 px per thumbnail px):
    ``min_area_um2`` (16 px without a resolution)."""
    px_area_um2 = (downsample * slide.mpp) ** 2 if slide.has_mpp else None
    return int(max(4, min_area_um2 / px_area_um2)) if px_area_um2 else 16


def largest_speck_um2(slide: Slide, thumb: np.ndarray, downsample: float, background: str) -> float | None:
    """The area (µm², or thumbnail px without a resolution) of the largest piece of tissue that detection finds
    on ``thumb`` before small pieces are dropped; None when it finds none (a blank slide)."""
    mask = segment_array(thumb, min_area_px=1, background=background)
    if not mask.any():
        return None
    lab, n = ndi.label(mask)
    largest = float(ndi.sum_labels(mask, lab, index=np.arange(1, n + 1)).max())
    return largest * (downsample * slide.mpp) ** 2 if slide.has_mpp else largest


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


#: Default simplification (level-0 px) of the tissue outlines written as GeoJSON: 0 writes them exactly.
GEOJSON_TOLERANCE = 0.0


def check_tolerance(tolerance: float) -> float:
    """An outline tolerance (level-0 px): a finite number >= 0, else one line."""
    try:
        t = float(tolerance)
    except (TypeError, ValueError):
        t = float("nan")
    if not (t >= 0 and np.isfinite(t)):
        raise GigaslideError(f"outline tolerance {tolerance} must be a finite number of level-0 px, at least 0",
                             fix="use 0 (the mask's exact outline) or e.g. 16 (the outline within 16 level-0 px)")
    return t


def mask_to_geojson(tm: TissueMask, *, tolerance: float = GEOJSON_TOLERANCE) -> dict:
    """Each tissue piece of the mask as a GeoJSON Polygon in level-0 px (QuPath opens it): its outer boundary and
    its holes (e.g. left out of ``--tissue-from`` polygons), along the mask pixels' edges -- the area the tiles'
    tissue fractions were computed on -- clipped to the slide.

    ``tolerance`` (level-0 px, >= 0) simplifies each ring (Ramer-Douglas-Peucker: it keeps a subset of the exact
    outline's corners, and every point of the exact outline lies within ``tolerance`` of the simplified ring);
    0 (the default) writes the exact outline. A ring that simplification would reduce to under three corners is
    written exactly. Exterior rings have a positive shoelace area in (x, y) and holes a negative one (RFC 7946's
    right-hand rule)."""
    from gigaslide.tiling.polygon import find_contours, pixel_outline, ring_area, simplify

    tol = check_tolerance(tolerance) / tm.downsample  # in mask px
    W, H = tm.slide_dimensions
    features = []
    lab, n = ndi.label(tm.mask)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        piece = np.pad(lab[sl] == i, 1)
        rings = [r for r in (pixel_outline(c) for c in find_contours(piece.astype(np.uint8), 0.5)) if len(r)]
        if not rings:
            continue
        rings.sort(key=lambda r: -abs(ring_area(r)))  # the outer boundary encloses the piece's holes
        coords = []
        for k, r in enumerate(rings):
            s = simplify(r, tol) if tol > 0 else r
            if len(s) < 4:  # collapsed: keep the exact ring
                s = r
            # (row, col) in the padded crop's pixel-centre coordinates -> (x, y) level-0 px
            xy = np.stack([s[:, 1] - 0.5 + sl[1].start, s[:, 0] - 0.5 + sl[0].start], 1) * tm.downsample
            xy = np.clip(xy, 0, [W, H])
            if (ring_area(xy) < 0) == (k == 0):
                xy = xy[::-1]
            coords.append([[float(x), float(y)] for x, y in xy])
        features.append({
            "type": "Feature",
            "id": f"tissue-{i}",
            "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}},
        })
    return {"type": "FeatureCollection", "features": features}


#: Member of a written tissue GeoJSON recording its outline tolerance (level-0 px), second in the file (after
#: ``type``), so :func:`saved_tolerance` reads it from the file's first bytes; GeoJSON readers ignore it (RFC 7946 6.1).
TOLERANCE_MEMBER = "gigaslide_outline_tolerance"


def save_geojson(tm: TissueMask, path: str | os.PathLike, *, tolerance: float = GEOJSON_TOLERANCE) -> Path:
    """The tissue outlines of :func:`mask_to_geojson` (``tolerance`` in level-0 px; 0: exact) written to ``path``,
    with the tolerance recorded (:data:`TOLERANCE_MEMBER`)."""
    gj = mask_to_geojson(tm, tolerance=tolerance)
    doc = {"type": gj.pop("type"), TOLERANCE_MEMBER: check_tolerance(tolerance), **gj}
    return atomic.write_text(path, json.dumps(doc))


def saved_tolerance(path: str | os.PathLike) -> float | None:
    """The outline tolerance a tissue GeoJSON written by :func:`save_geojson` records (read from its first bytes);
    None when the file is missing or does not record one (written by another tool or before it was recorded)."""
    import re

    try:
        with open(path, "rb") as fh:
            head = fh.read(256).decode("utf-8", "replace")
    except OSError:
        return None
    m = re.search(rf'"{TOLERANCE_MEMBER}":\s*([0-9.eE+-]+)', head)
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None
