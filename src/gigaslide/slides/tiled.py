"""Direct decoding of a tiled TIFF/SVS level: each stored tile is decoded once, requested regions are cut out.

Used by :mod:`gigaslide.slides.reader` when a slide's level is a tiled TIFF page (JPEG, JPEG 2000,
deflate, LZW or uncompressed tiles) that OpenSlide would read the same way. The stored tiles are
read with ``tifffile`` and decoded with ``imagecodecs`` (through ``TiffPage.decode``); decoded
tiles stay in a bounded LRU cache, so regions requested in grid order (row bands) decode every
stored tile once per pass. Pixels outside the level (and sparse tiles) are white (255), or the ``fill``
given (0 for a fluorescence slide's black), as ``Slide.read_region`` gives them (OpenSlide returns them
transparent and ``to_rgb`` puts them on the background).
:meth:`TiffLevel.jpeg_stream` hands a stored JPEG tile to other decoders (nvJPEG through
``torchvision.io.decode_jpeg(..., device="cuda")``, DALI, PIL) as a self-contained file.

OpenSlide reads a level at ``level-0 location / downsample``; when that is not a whole pixel it
paints the stored tiles at the fractional offset with bilinear filtering (8-bit weights).
:func:`shift_bilinear` reproduces that to within 2 grey levels.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

#: Upper bound on decoded tiles kept per level (256² RGB tiles: ~200 KB each).
MAX_CACHE_BYTES = 384 * 2**20
_DECODABLE_PHOTOMETRIC = (2, 6)  # RGB, YCbCr
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
#: Reductions the JPEG decoder can make by DCT scaling (libjpeg's scale_denom).
DCT_FACTORS = (2, 4, 8)
#: APP14 "Adobe" segment with transform 0: the three components are RGB, not YCbCr (libjpeg's rule).
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class PageCycleError(ValueError):
    """A TIFF whose chain of image directories (IFDs) points back to one it has passed (a damaged file)."""


def tiff_pages(tif):  # noqa: ANN001, ANN201 - a tifffile TiffFile; its pages
    """The pages of ``tif`` in order; :class:`PageCycleError` at a page whose IFD was seen already. tifffile follows
    the chain without a check: iterating a 300 byte file whose IFD points to itself never ended."""
    seen: set[int] = set()
    for page in tif.pages:
        offset = int(page.offset)
        if offset in seen:
            raise PageCycleError(f"page {len(seen)} is the IFD at byte {offset:,} again: the IFD chain is a cycle")
        seen.add(offset)
        yield page


class TiffLevel:
    """One tiled TIFF page; :meth:`region` returns level pixels (RGB uint8, white or ``fill`` outside the page)."""

    def __init__(self, tif, page, cache_tiles: int):  # noqa: ANN001 - tifffile objects
        self._tif = tif
        self.page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.tiles_across = math.ceil(self.width / self.tile_w)
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._decode = page.decode
        self._tables = getattr(page, "jpegtables", None)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_tiles = max(4, int(cache_tiles))
        self.decoded = 0  # stored tiles decoded so far (tests and benchmarks count them)

    def _tile(self, index: int, k: int = 1) -> np.ndarray | None:
        """Stored tile ``index`` decoded (at 1/``k`` of its size by the JPEG decoder's DCT scaling when k > 1)."""
        key = index if k == 1 else (index, k)
        t = self._cache.get(key)
        if t is not None:
            self._cache.move_to_end(key)
            return t
        if int(self._counts[index]) == 0:  # a sparse (never written) tile
            t = None
        elif k > 1:
            t = jpeg_decode_scaled(self.jpeg_stream(index), k, (self.tile_h // k, self.tile_w // k))
            self.decoded += 1
        else:
            seg, _, _ = self._decode(self._raw(index), index, jpegtables=self._tables)
            t = np.asarray(seg[0, ..., :3])
            self.decoded += 1
        self._cache[key] = t
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return t

    def _raw(self, index: int) -> bytes:
        """The stored bytes of tile ``index``."""
        fh = self._tif.filehandle
        fh.seek(int(self._offsets[index]))
        return fh.read(int(self._counts[index]))

    def forget(self) -> None:
        """Drop the decoded tiles and the count of decodes (a check read at open is not part of the pass)."""
        self._cache.clear()
        self.decoded = 0

    def tiles_under(self, x0: int, y0: int, x1: int, y1: int, k: int = 1) -> list[tuple[int, int, int]]:
        """``(index, x, y)`` of the stored tiles that pixels ``[x0, x1) x [y0, y1)`` of the level at 1/``k`` lie in
        (the box clipped to the level; its tiles' corners in that grid), row by row."""
        tw, th = self.tile_w // k, self.tile_h // k
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, -(-self.width // k)), min(y1, -(-self.height // k))
        if x0 >= x1 or y0 >= y1:
            return []
        return [(ty * self.tiles_across + tx, tx * tw, ty * th)
                for ty in range(y0 // th, (y1 - 1) // th + 1) for tx in range(x0 // tw, (x1 - 1) // tw + 1)]

    def can_scale(self, k: int) -> bool:
        """Whether stored tiles can be decoded at 1/``k`` by DCT scaling (JPEG tiles whose sides ``k`` divides)."""
        return k in DCT_FACTORS and self.is_jpeg and self.tile_w % k == 0 and self.tile_h % k == 0

    @property
    def is_jpeg(self) -> bool:
        """True when the stored tiles are baseline JPEG (TIFF compression 7)."""
        return int(self.page.compression) == 7

    def jpeg_stream(self, index: int) -> bytes | None:
        """Stored tile ``index`` as a self-contained JPEG file, or None for a sparse (never written) tile.

        The page's shared ``JPEGTables`` are spliced in, and on an RGB page (photometric 2: Aperio SVS
        writes its JPEG tiles so) an Adobe APP14 marker with transform 0 is added unless the tile has
        one: without it a decoder takes three-component JPEG for YCbCr and shifts every colour.
        Decoding the result with libjpeg-turbo gives the pixels :meth:`region` cuts from (tested).
        """
        if not self.is_jpeg:
            raise ValueError(f"stored tiles are not JPEG (TIFF compression {int(self.page.compression)})")
        if int(self._counts[index]) == 0:
            return None
        raw = self._raw(index)
        if raw[:2] != _SOI:
            raise ValueError(f"stored tile {index} does not start with a JPEG SOI marker")
        tables = self._tables[2:-2] if self._tables and self._tables[-2:] == _EOI else b""
        adobe = ADOBE_RGB if int(self.page.photometric) == 2 and not _has_adobe(raw) else b""
        return _SOI + adobe + tables + raw[2:]

    def region(self, x: int, y: int, w: int, h: int, out: np.ndarray | None = None, k: int = 1,
               fill: int = 255) -> np.ndarray:
        """Level pixels ``[h, w, 3]`` at (x, y), written into ``out`` when given (no fresh memory to fault in);
        pixels outside the level and sparse tiles are ``fill`` (255: white glass; 0: a fluorescence slide's black).

        ``k`` > 1 (see :meth:`can_scale`): the level at 1/k, coordinates in that grid, from stored tiles decoded
        at 1/k by the JPEG decoder (its DCT scaling: not a box average, see :func:`jpeg_decode_scaled`)."""
        x, y = int(x), int(y)
        tw, th = self.tile_w // k, self.tile_h // k
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, -(-self.width // k)), min(y + h, -(-self.height // k))
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out[:] = fill
        for index, bx, by in self.tiles_under(x0, y0, x1, y1, k):
            t = self._tile(index, k)
            sx0, sy0 = max(x0, bx), max(y0, by)
            sx1, sy1 = min(x1, bx + tw), min(y1, by + th)
            if t is None:  # a sparse tile: background
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = fill
            else:
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = t[sy0 - by:sy1 - by, sx0 - bx:sx1 - bx]
        return out

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()


def open_tiff_level(path: str | Path, size: tuple[int, int], read_w: int) -> TiffLevel | None:
    """The tiled page of ``path`` whose (width, height) is ``size``, or None when it cannot be decoded directly."""
    try:
        import tifffile

        tif = tifffile.TiffFile(str(path))
    except Exception:  # noqa: BLE001 - not a TIFF: the caller falls back to OpenSlide
        return None
    try:
        for page in tiff_pages(tif):
            if (int(page.imagewidth), int(page.imagelength)) != tuple(size) or not page.is_tiled:
                continue
            if (page.photometric not in _DECODABLE_PHOTOMETRIC or page.planarconfig != 1 or page.bitspersample != 8
                    or page.samplesperpixel != 3 or page.imagedepth != 1):
                break
            tw, th = int(page.tilewidth), int(page.tilelength)
            across = math.ceil(page.imagewidth / tw)
            band = (math.ceil(read_w / th) + 2) * across + 8  # a row band of stored tiles, plus the next
            cap = min(band, MAX_CACHE_BYTES // (tw * th * 3))
            return TiffLevel(tif, page, cap)
    except Exception:  # noqa: BLE001
        pass
    tif.close()
    return None


def jpeg_decode_scaled(stream: bytes, k: int, shape: tuple[int, int]) -> np.ndarray:
    """A self-contained JPEG decoded at 1/``k`` (2, 4 or 8) by libjpeg-turbo's scaled inverse DCT (through PIL's
    ``draft``): each 8x8 block's coefficients give 8/k x 8/k pixels, so the 1/k image costs little more than
    the entropy decoding. A low-pass of the block's own frequencies, not a box average of the pixels: it differs
    from decode + box average by a few grey levels, most at sharp edges (``benchmarks/results/downsample.md``)."""
    from PIL import Image

    with Image.open(io.BytesIO(stream)) as im:
        im.draft("RGB", (shape[1], shape[0]))
        px = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    if px.shape[:2] != tuple(shape):
        raise ValueError(f"scaled JPEG decode gave {px.shape[:2]}, not {tuple(shape)}")
    return px


def _has_adobe(stream: bytes) -> bool:
    """Whether a JPEG stream has an APP14 "Adobe" segment before its first scan."""
    i = 2
    while i + 4 <= len(stream) and stream[i] == 0xFF:
        marker = stream[i + 1]
        if marker == 0xDA:  # start of scan: no more header segments
            return False
        size = int.from_bytes(stream[i + 2:i + 4], "big")
        if marker == 0xEE and stream[i + 4:i + 9] == b"Adobe":
            return True
        i += 2 + size
    return False


def shift_bilinear(src: np.ndarray, wx: int, wy: int, w: int, h: int) -> np.ndarray:
    """``[h+1, w+1, 3]`` level pixels -> ``[h, w, 3]`` sampled at a sub-pixel offset of (wx, wy) / 256.

    Integer arithmetic as in pixman's bilinear filter (which OpenSlide's cairo painting uses), with
    rounding; it factorises exactly into a horizontal then a vertical pass.
    """
    s = src.astype(np.uint32)
    row = s[:, :w] * (256 - wx) + s[:, 1:w + 1] * wx  # <= 65280
    out = row[:h] * (256 - wy) + row[1:h + 1] * wy
    return ((out + 32768) >> 16).astype(np.uint8)


def split_offset(v: float) -> tuple[int, int]:
    """A level coordinate -> (integer pixel, 8-bit fraction); a fraction that rounds to 256 moves one pixel on."""
    i = math.floor(v)
    f = round((v - i) * 256)
    if f == 256:
        return i + 1, 0
    return i, f
