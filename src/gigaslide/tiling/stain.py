"""What kind of image is this? Background (bright-field glass vs dark fluorescence) and stain (H&E or not).

Both are read from the slide thumbnail. Encoders and the tissue detector's defaults assume
bright-field H&E; anything else is tiled (the user may know what they are doing) but warned about
once per slide and recorded in the tiling output (patches h5 attrs, ``TileGrid.extra``).

- background: ``dark`` when the median pixel is dark (max channel below :data:`DARK_MEDIAN`):
  fluorescence scans have a black background; bright-field slides, even ones covered by tissue
  to every edge, are far brighter. Where tissue covers most of a fluorescence scan the median pixel is
  tissue, so it is also ``dark`` when at least :data:`DARK_MIN_BLACK` of the pixels are black (max channel
  below :data:`BLACK`) and almost none (below :data:`DARK_MAX_GLASS`) are glass-white: bright-field
  tissue and glass are never that dark, and a bright-field slide has glass where a fluorescence one is black.
- stain (bright-field): hue of the stained pixels. In H&E nearly all of them are pink (eosin) or
  purple (hematoxylin), hue >= 245° or < 15°; an IHC slide is dominated by a blue hematoxylin
  counterstain (hue 170-245°) and/or brown DAB (15-60°). Measured here: every H&E thumbnail and
  tile in ../shared/data has >= 96 % pink/purple stained pixels; the kidney CD3/CD20 IHC slide 9 %.

The fluorescence warning names ``--background``, which every command that reads slides and prints it takes (tile,
encode, augment-cache, nuclei, train-streaming, heatmap-streaming, pretrain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Median of the per-pixel max channel below which the background is taken as dark (fluorescence).
DARK_MEDIAN = 80
#: Max channel below which a pixel is black (a fluorescence background; no stain or glass is this dark).
BLACK = 40
#: A median that is not dark is still a dark background with at least this share of black pixels ...
DARK_MIN_BLACK = 0.1
#: ... and less than this share of glass-white ones (every channel >= 235).
DARK_MAX_GLASS = 0.01
#: A pixel counts as stained (for the stain guess) with saturation >= this and value > 30 (0-255).
STAINED_SATURATION = 25
#: Fewer stained pixels than this: the stain is "unknown" (no warning).
MIN_STAINED_PIXELS = 200
#: At least this fraction of stained pixels pink/purple: H&E.
HE_MIN_PINK = 0.5
#: At least this fraction brown: DAB (IHC).
DAB_MIN_BROWN = 0.2

H_AND_E = "H&E"
NON_HE = "non-H&E bright-field"
FLUORESCENCE = "fluorescence"
UNKNOWN = "unknown"


class StainWarning(UserWarning):
    """The slide does not look like bright-field H&E (emitted once per slide)."""


@dataclass(frozen=True)
class StainInfo:
    background: str  # "bright" or "dark"
    stain: str  # H_AND_E, NON_HE, FLUORESCENCE or UNKNOWN
    pink_fraction: float | None = None
    brown_fraction: float | None = None

    @property
    def warning(self) -> str | None:
        """One line for the user, or None for H&E / unknown."""
        if self.stain == FLUORESCENCE:
            return ("looks like a fluorescence image (dark background), not bright-field H&E: H&E encoders may give "
                    "meaningless features; if it is a bright-field slide, pass --background bright")
        if self.stain == NON_HE:
            kind = "brown DAB" if (self.brown_fraction or 0) >= DAB_MIN_BROWN else "a blue counterstain"
            return (f"looks like IHC or a special stain, not H&E (only {100 * (self.pink_fraction or 0):.0f}% of stained "
                    f"pixels are pink/purple; {kind}): H&E encoders and models may not transfer")
        return None

    def as_attrs(self) -> dict:
        out = {"background": self.background, "stain": self.stain}
        if self.warning:
            out["stain_warning"] = self.warning
        return out


def detect_background(rgb: np.ndarray) -> str:
    """``dark`` (fluorescence) or ``bright`` (bright-field) from the thumbnail."""
    if rgb.size == 0:
        return "bright"
    mx = rgb.max(axis=-1)
    if float(np.median(mx)) < DARK_MEDIAN:
        return "dark"
    black, glass = float((mx < BLACK).mean()), float(np.all(rgb >= 235, axis=-1).mean())
    return "dark" if black >= DARK_MIN_BLACK and glass < DARK_MAX_GLASS else "bright"


def detect_stain(rgb: np.ndarray, background: str | None = None) -> StainInfo:
    """Background and stain of an RGB thumbnail (see the module docstring)."""
    bg = background or detect_background(rgb)
    if bg == "dark":
        return StainInfo("dark", FLUORESCENCE)
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("HSV"))
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 255.0)
    stained = (hsv[..., 1] >= STAINED_SATURATION) & (hsv[..., 2] > 30) & ~np.all(rgb >= 235, axis=-1)
    h = hue[stained]
    if h.size < MIN_STAINED_PIXELS:
        return StainInfo("bright", UNKNOWN)
    pink = float(((h >= 245) | (h < 15)).mean())
    brown = float(((h >= 15) & (h < 60)).mean())
    return StainInfo("bright", H_AND_E if pink >= HE_MIN_PINK else NON_HE, round(pink, 4), round(brown, 4))


__all__ = ["FLUORESCENCE", "H_AND_E", "NON_HE", "UNKNOWN", "StainInfo", "StainWarning", "detect_background", "detect_stain"]
