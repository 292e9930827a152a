"""Read many tiles of one slide at a target resolution, at the speed of the JPEG decoder where possible.

:func:`iter_tiles` is the path ``gigaslide encode`` reads with. A :class:`TileReader` decodes the
stored tiles of a tiled TIFF/SVS level directly (:mod:`gigaslide.slides.tiled`) when

* OpenSlide opened the slide as an Aperio SVS or a generic tiled TIFF,
* the target resolution is a pyramid level, or that level divided by 2, 4 or 8 (within
  ``tolerance``, default 1 %: the pixels then have the level's own resolution, see
  :meth:`TileReader.read_mpp`), and
* a check read at open gives the same pixels as OpenSlide (max difference <= 2 per channel);

and reads through :meth:`Slide.read_region` (OpenSlide) otherwise, or for single tiles that the
direct path cannot reproduce (a sub-pixel offset at the level's border). Both paths give the same
pixels: the background outside the slide (white glass; black with ``background="dark"``, for fluorescence
slides: a tile at the slide's edge is padded with the slide's own background), box averages for the /2, /4, /8
cases.

``downsample="dct"`` (opt-in) makes the /2, /4, /8 cases on JPEG tiles decode the stored tiles at that
reduction directly (the JPEG decoder's DCT scaling) instead of decoding them whole and box-averaging: faster,
and not the same pixels (a few grey levels apart, most at sharp edges; ``benchmarks/results/downsample.md``).
A tile's corner is then rounded to the nearest pixel of the reduced grid (less than one output pixel, as a
grid whose level-0 stride is not a multiple of the reduction puts some corners between its pixels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.slides.slide import SCALE_TOLERANCE, Slide, box_reduce, check_size, fill_value
from gigaslide.slides.tiled import TiffLevel, open_tiff_level, shift_bilinear, split_offset

#: OpenSlide vendors whose levels are plain tiled TIFF pages painted without overlap.
DIRECT_VENDORS = ("aperio", "generic-tiff")
#: Largest per-channel difference to OpenSlide that the check read at open accepts.
CHECK_MAX_DIFF = 2
#: How a /2, /4, /8 read is reduced: box averages of the decoded level (the default, OpenSlide's path's pixels) or
#: the JPEG decoder's DCT scaling (JPEG tiles only; elsewhere box).
DOWNSAMPLE_MODES = ("box", "dct")
#: Largest mean absolute difference between DCT-scaled and box-averaged pixels the check read at open accepts
#: (measured means are below 1; a decoder that gets colours wrong is off by tens).
DCT_CHECK_MEAN_DIFF = 4.0


class TileReader:
    """Reads ``tile_size`` x ``tile_size`` tiles at ``mpp`` whose top-left corners are level-0 coords.

    ``background``: ``bright`` (default; outside the slide is white glass) or ``dark`` (fluorescence: black), as
    the tile grid records it (``grid.extra["background"]``). A ``mpp`` the slide cannot give (no scan resolution,
    finer than the scan by more than :data:`~gigaslide.slides.slide.MPP_TOLERANCE`, not positive and finite) or a
    ``tile_size`` under 1 px is refused with a :class:`GigaslideError`, as tiling refuses it."""

    def __init__(self, slide: Slide, tile_size: int, mpp: float, *, tolerance: float = SCALE_TOLERANCE,
                 direct: bool = True, downsample: str = "box", background: str | None = "bright"):
        if downsample not in DOWNSAMPLE_MODES:
            raise GigaslideError(f"unknown downsample '{downsample}'", fix="use box (the default) or dct")
        self.fill = fill_value(background)
        self.background = "dark" if self.fill == 0 else "bright"
        check_size((tile_size, tile_size), "tile size")
        slide.check_target_mpp(mpp)  # 0.01 on a 0.5 µm/px scan read 1 px per 50 and upsampled it without a word
        self.slide, self.tile_size, self.mpp, self.tolerance = slide, int(tile_size), float(mpp), tolerance
        self.level = slide.choose_level(mpp, tolerance)
        self.factor = self.level.factor(tolerance)
        self._tiff: TiffLevel | None = None
        self._dct = False  # /2, /4, /8 reads by DCT scaling (set after the check read, which is box)
        self.fallback_tiles = 0  # tiles read through OpenSlide while the direct path is on
        if direct and self.factor and slide.backend == "openslide" and slide.vendor in DIRECT_VENDORS:
            self._tiff = open_tiff_level(slide.path, slide.level_dimensions[self.level.level], self.tile_size * self.factor)
            if self._tiff is not None and not self._check():
                self._tiff.close()
                self._tiff = None
        if downsample == "dct" and self._tiff is not None and self.factor > 1 and self._tiff.can_scale(self.factor):
            self._dct = self._check_dct()

    @property
    def downsample(self) -> str:
        """How /2, /4, /8 reads are reduced here: ``dct`` (DCT scaling in use) or ``box``."""
        return "dct" if self._dct else "box"

    @property
    def direct(self) -> bool:
        """True when tiles are decoded from the stored TIFF tiles (not through OpenSlide)."""
        return self._tiff is not None

    @property
    def tiff_level(self) -> TiffLevel | None:
        """The stored-tile level the direct path decodes (None when reading through OpenSlide)."""
        return self._tiff

    @property
    def decoded_tiles(self) -> int:
        return 0 if self._tiff is None else self._tiff.decoded

    def read_mpp(self) -> float:
        """The resolution of the pixels returned (the level's when resampling is skipped within tolerance)."""
        return self.slide.read_mpp(self.mpp, self.tolerance, self.level)

    def _check(self) -> bool:
        """Compare one region near the level's centre with OpenSlide's pixels."""
        W, H = self.slide.dimensions
        size = min(self.tile_size, 64)
        x, y = W // 2 + 1, H // 2 + 1  # odd: a sub-pixel offset on levels with non-integer downsamples
        try:
            mine = self._read_direct(x, y, size)
        except Exception:  # noqa: BLE001 - stored tiles the decoder refuses (a damaged file): OpenSlide reads, or says
            mine = None
        finally:
            self._tiff.forget()  # the check must not count as a decode of the pass
        if mine is None:
            return False
        ref = self.slide.read_region((x, y), (size, size), self.mpp, level=self.level, tolerance=self.tolerance,
                                     background=self.background)
        return int(np.abs(mine.astype(np.int16) - ref).max()) <= CHECK_MAX_DIFF

    def _check_dct(self) -> bool:
        """DCT-scaled pixels near the level's centre close to the box-averaged ones (a decoder that gets colours
        wrong is caught here); the check's decodes are not counted."""
        t, k = self._tiff, self.factor
        assert t is not None
        m = min(self.tile_size, 64)
        cx, cy = t.width // (2 * k), t.height // (2 * k)  # a corner on the 1/k grid, near the centre
        try:
            box = box_reduce(t.region(cx * k, cy * k, m * k, m * k), k)
            dct = t.region(cx, cy, m, m, k=k)
        except Exception:  # noqa: BLE001 - a tile the scaled decoder cannot read: box averages, as by default
            return False
        finally:
            t.forget()
        return float(np.abs(dct.astype(np.int16) - box).mean()) <= DCT_CHECK_MEAN_DIFF

    def _read_direct(self, x: int, y: int, size: int, out: np.ndarray | None = None) -> np.ndarray | None:
        t = self._tiff
        assert t is not None
        k = self.factor
        n = size * k
        ds = self.level.level_downsample
        if self._dct:  # the DCT-scaled tiles' 1/k grid: the corner rounded to its nearest pixel (< 1 output px off)
            return t.region(math.floor(x / ds / k + 0.5), math.floor(y / ds / k + 0.5), size, size, out=out, k=k,
                            fill=self.fill)
        ix, wx = split_offset(x / ds)  # OpenSlide's level coordinate: level-0 location / downsample
        iy, wy = split_offset(y / ds)
        if wx == 0 and wy == 0:
            if k == 1:
                return t.region(ix, iy, n, n, out=out, fill=self.fill)
            px = t.region(ix, iy, n, n, fill=self.fill)
        elif ix >= 0 and iy >= 0 and ix + n + 1 <= t.width and iy + n + 1 <= t.height:
            px = shift_bilinear(t.region(ix, iy, n + 1, n + 1, fill=self.fill), wx, wy, n, n)
        else:  # a sub-pixel offset that touches the border: OpenSlide blends with transparency there
            return None
        return box_reduce(px, self.factor)

    def read(self, x: int, y: int, out: np.ndarray | None = None) -> np.ndarray:
        """One RGB uint8 tile ``[tile_size, tile_size, 3]`` (written into ``out`` when given)."""
        if self._tiff is not None:
            try:
                px = self._read_direct(int(x), int(y), self.tile_size, out)
            except Exception:  # noqa: BLE001 - a stored tile the decoder refuses: OpenSlide reads it, or names the file
                px = None
            if px is not None:
                if out is not None and px is not out:
                    out[:] = px
                return px if out is None else out
            self.fallback_tiles += 1
        ts = self.tile_size
        px = self.slide.read_region((int(x), int(y)), (ts, ts), self.mpp, level=self.level, tolerance=self.tolerance,
                                    background=self.background)
        if out is not None:
            out[:] = px
            return out
        return px

    def read_batch(self, coords: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Tiles of ``coords`` [N, 2] into ``out`` (uint8 [N, T, T, 3], allocated when None)."""
        ts = self.tile_size
        if out is None:
            out = np.empty((len(coords), ts, ts, 3), np.uint8)
        for k, (x, y) in enumerate(np.asarray(coords).tolist()):
            self.read(x, y, out[k])
        return out

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None


def iter_tiles(slide: Slide | str | Path, coords: Iterable, tile_size: int, mpp: float, *,
               tolerance: float = SCALE_TOLERANCE, downsample: str = "box",
               background: str | None = "bright") -> Iterator[np.ndarray]:
    """RGB uint8 tiles ``[tile_size, tile_size, 3]`` at ``mpp``, one per level-0 ``(x, y)`` of ``coords``, in order.

    ``slide`` may be an open :class:`Slide` (it stays open) or a path. This is the reader
    ``gigaslide encode`` uses; see the module docstring for when it decodes stored tiles directly, and for
    ``downsample``. ``background``: what a tile reaching past the slide's edge is padded with -- ``bright``
    (white glass, the default) or ``dark`` (black: fluorescence; pass a tile grid's ``grid.extra["background"]``).
    """
    own = not isinstance(slide, Slide)
    s = Slide(slide) if own else slide
    try:
        reader = TileReader(s, tile_size, mpp, tolerance=tolerance, downsample=downsample, background=background)
    except BaseException:  # refused arguments: the slide opened here is closed (it stayed open until a collection)
        if own:
            s.close()
        raise
    try:
        for x, y in coords:
            yield reader.read(x, y)
    finally:
        reader.close()
        if own:
            s.close()
