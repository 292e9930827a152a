"""Deep-zoom tiles of a slide: OpenSlide's DeepZoomGenerator, or the same pyramid through :func:`open_slide`.

Level ``L`` of ``n`` levels is the slide shrunk by ``2 ** (n - 1 - L)`` (level ``n - 1`` = level-0 pixels,
level 0 = one pixel), as Deep Zoom / OpenSeadragon expect; overlay layers use the same geometry
(without tile overlap), so every layer lines up with the slide in level-0 coordinates.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.slides import mpp_from_properties, open_slide


class TileOutside(LookupError):
    """A tile address outside the pyramid (answered with 404)."""


@dataclass(frozen=True)
class Geometry:
    width: int
    height: int
    tile_size: int = 254
    overlap: int = 1

    @property
    def level_count(self) -> int:
        return int(math.ceil(math.log2(max(self.width, self.height, 1)))) + 1

    def scale(self, level: int) -> int:
        """Level-0 px per px of ``level``."""
        return 2 ** (self.level_count - 1 - level)

    def level_size(self, level: int) -> tuple[int, int]:
        s = self.scale(level)
        return max(1, -(-self.width // s)), max(1, -(-self.height // s))

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in px of ``level`` of tile (col, row), overlap included."""
        if not 0 <= level < self.level_count:
            raise TileOutside(f"level {level} not in 0..{self.level_count - 1}")
        lw, lh = self.level_size(level)
        ts, ov = self.tile_size, self.overlap
        cols, rows = -(-lw // ts), -(-lh // ts)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileOutside(f"tile {col}_{row} outside level {level} ({cols}x{rows} tiles)")
        x0, y0 = col * ts - (ov if col else 0), row * ts - (ov if row else 0)
        return x0, y0, min(lw, (col + 1) * ts + ov), min(lh, (row + 1) * ts + ov)

    def dzi(self, fmt: str = "jpeg") -> str:
        return ('<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
                f'Format="{fmt}" Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Width="{self.width}" '
                f'Height="{self.height}"/></Image>\n')


class SlideTiles:
    """JPEG deep-zoom tiles of one slide file (thread-safe)."""

    def __init__(self, path: Path, slide_mpp: float | None = None, tile_size: int = 254, overlap: int = 1,
                 quality: int = 80):
        self.path = Path(path)
        self.quality = quality
        self._lock = threading.Lock()
        self._dz = None
        self._osr = None
        self._slide = None
        try:
            osr = self._osr = openslide.OpenSlide(str(self.path))
            self._dz = DeepZoomGenerator(osr, tile_size=tile_size, overlap=overlap, limit_bounds=False)
            w, h = osr.dimensions
            found = mpp_from_properties({str(k): str(v) for k, v in osr.properties.items()})
            mpp = None if found is None else found.mean
            self.backend = "openslide-deepzoom"
        except Exception:  # noqa: BLE001 - not an OpenSlide format: the gigaslide reader below (or its one-line error)
            self._slide = open_slide(self.path)
            mpp = self._slide.mpp if self._slide.has_mpp else None
            if mpp is None:  # the mpp only picks pyramid levels here: any value reads the same pixels
                self._slide.close()
                self._slide = open_slide(self.path, mpp=slide_mpp or 1.0)
            w, h = self._slide.dimensions
            self.backend = f"gigaslide-{self._slide.backend}"
        self.geometry = Geometry(int(w), int(h), tile_size, overlap)
        self.metadata_mpp = None if mpp is None else float(mpp)
        if self._dz is not None and self._dz.level_count != self.geometry.level_count:  # pragma: no cover - sanity
            raise GigaslideError("unexpected deep-zoom level count", path=self.path)

    def close(self) -> None:
        for h in (self._osr, self._slide):
            if h is not None:
                h.close()

    def tile(self, level: int, col: int, row: int) -> bytes:
        x0, y0, x1, y1 = self.geometry.tile_box(level, col, row)
        try:
            if self._dz is not None:
                img = self._dz.get_tile(level, (col, row)).convert("RGB")
            else:
                s = self.geometry.scale(level)
                with self._lock:  # tiffslide / plain images are not promised to be thread-safe
                    arr = self._slide.read_region((x0 * s, y0 * s), (x1 - x0, y1 - y0), self._slide.mpp * s)
                img = Image.fromarray(np.ascontiguousarray(arr))
        except GigaslideError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file: one line, the other tiles and slides go on
            raise self._damaged(f"deep-zoom tile {level}/{col}_{row}", e) from None
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=self.quality)
        return buf.getvalue()

    def _damaged(self, what: str, e: Exception) -> GigaslideError:
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return GigaslideError(f"cannot read {what} ({why})", path=self.path,
                              fix="the file is damaged or incomplete; re-copy it")

    def region(self, x: int, y: int, size0: float, out_px: int) -> Image.Image:
        """A level-0 square (x, y, side ``size0``) shrunk to ``out_px`` (tile thumbnails)."""
        try:
            return self._region(x, y, size0, out_px)
        except GigaslideError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged file: one line, as for its deep-zoom tiles
            raise self._damaged(f"the tile at ({int(x)}, {int(y)})", e) from None

    def _region(self, x: int, y: int, size0: float, out_px: int) -> Image.Image:
        level = self.geometry.level_count - 1
        while level > 0 and size0 / self.geometry.scale(level - 1) >= out_px:
            level -= 1
        s = self.geometry.scale(level)
        side = max(1, int(round(size0 / s)))
        if self._osr is not None:
            lvl = self._osr.get_best_level_for_downsample(s)
            d = self._osr.level_downsamples[lvl]
            w = max(1, int(round(size0 / d)))
            rgba = self._osr.read_region((int(x), int(y)), lvl, (w, w))
            # outside the slide (edge tiles reach past it) or unscanned: transparent, shown on the slide's background
            # colour as in its deep-zoom tiles (DeepZoomGenerator), not black
            bg = "#" + self._osr.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
            img = Image.composite(rgba, Image.new("RGBA", rgba.size, bg), rgba).convert("RGB")
            return img.resize((out_px, out_px), Image.Resampling.BILINEAR)
        with self._lock:
            arr = self._slide.read_region((int(x), int(y)), (side, side), self._slide.mpp * s)
        return Image.fromarray(np.ascontiguousarray(arr)).resize((out_px, out_px), Image.Resampling.BILINEAR)
