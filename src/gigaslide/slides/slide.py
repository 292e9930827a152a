"""A thin slide handle: geometry, resolution, and region reads at a physical resolution.

Tissue detection, tiling and encoding live in their own stages and take a :class:`Slide`; this
class only knows how to read pixels. Coordinates are always level-0 pixels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gigaslide.errors import GigaslideError
from gigaslide.safe_parse import check_slide_id
from gigaslide.slides.backend import open_backend
from gigaslide.slides.ids import slide_id_from_path
from gigaslide.slides.mpp import PLAUSIBLE_MPP, Mpp, ignored_mpp, mpp_from_properties, resolve_override

#: A target resolution may be this much finer than the scan before it is refused (rounding in metadata).
MPP_TOLERANCE = 0.1


#: A thumbnail's source level of at most this many px is read in one piece; a larger one (a non-pyramidal slide)
#: band by band, :data:`THUMB_BAND_PX` px at a time (see :meth:`Slide.thumbnail`).
THUMB_READ_PX = 64e6
THUMB_BAND_PX = 16e6
#: Largest level a thumbnail is read from (3.4e10 px, e.g. 185,000 px square; in bands, ~2,000 reads of ~0.5 s): beyond,
#: no level is small enough and the header is damaged or hostile -- a 500 KB TIFF claiming one sparse 10^6 x 10^6 px
#: level read 62,500 blocks at ~0.5 s each (about 9 hours, estimated from the first 29) before tissue detection.
THUMB_MAX_SOURCE_PX = 2**35


#: Most level px one :meth:`Slide.read_region` reads (4 bytes each in OpenSlide's buffer: 16 GiB; a streaming canvas
#: of 16384 px read at /4 of a level is this much): a target mpp far coarser than the slide's coarsest level read
#: ``(size x scale)^2`` px -- 224 px at 500 µm/px on a 0.5 µm/px slide of two levels, 50 GB -- and failed with a
#: MemoryError said to be a damaged file, or an OverflowError at 1e308.
MAX_READ_PX = 2**32


#: A read is not resampled when its scale is this close (relative) to 1, 2, 4 or 8 (see :meth:`LevelChoice.factor`).
SCALE_TOLERANCE = 0.01
#: Integer shrink factors applied by exact box averaging instead of a resize.
BOX_FACTORS = (1, 2, 4, 8)
#: The value pixels outside the slide (and sparse, never-scanned tiles) are read as, per background: white glass for
#: bright-field, black for fluorescence (a white band on a dark image is an edge the tissue does not have).
FILL = {"bright": 255, "dark": 0}


def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when it has none (``MemoryError()``)."""
    lines = str(e).splitlines()
    return lines[0] if lines and lines[0].strip() else type(e).__name__


def check_mpp_value(target_mpp: float) -> float:
    """``target_mpp`` as a float when it is a positive finite resolution, else a one-line error (0, negative, NaN and
    inf read 1 px tiles upsampled without a word, or failed deep inside PIL with a ValueError or OverflowError)."""
    try:
        v = float(target_mpp)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise GigaslideError(f"target mpp {target_mpp!r} is not a positive finite resolution",
                             fix="give it in µm per pixel, e.g. 0.5 (20x) or 0.25 (40x)")
    return v


def check_size(size: tuple[int, int], what: str = "region size") -> tuple[int, int]:
    """``size`` (w, h) as ints when both are at least 1 px, else a one-line error (0 failed inside PIL)."""
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError):
        w = h = 0
    if w < 1 or h < 1:
        raise GigaslideError(f"{what} {size!r} must be at least 1 x 1 px", fix="give a positive width and height")
    return w, h


def fill_value(background: str | None) -> int:
    """255 for a ``bright`` background (or None: bright-field, the default), 0 for ``dark`` (fluorescence)."""
    if background is None:
        return FILL["bright"]
    if background not in FILL:
        raise GigaslideError(f"unknown background '{background}' to read tiles on",
                             fix="use bright (bright-field glass, white) or dark (fluorescence, black)")
    return FILL[background]


@dataclass(frozen=True)
class LevelChoice:
    level: int
    level_downsample: float  # level-0 px per level px
    scale: float  # level px per target px (>= 1 means we shrink after reading)

    def factor(self, tolerance: float = SCALE_TOLERANCE) -> int:
        """1, 2, 4 or 8 when ``scale`` is that within ``tolerance`` (read k*size px, box-average by k); else 0."""
        for k in BOX_FACTORS:
            if abs(self.scale - k) <= tolerance * k:
                return k
        return 0


def _round_up(x: float, digits: int = 3) -> float:
    """``x`` (> 0) rounded up to ``digits`` significant digits."""
    q = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / q - 1e-9) * q


def _objective_power(props: dict[str, str]) -> float | None:
    """The scan's objective power from the metadata (OpenSlide's, else Aperio's AppMag); None without a usable one."""
    for key in ("openslide.objective-power", "aperio.AppMag"):
        try:
            v = float(props.get(key, ""))
        except ValueError:
            continue
        if math.isfinite(v) and 1 <= v <= 200:
            return v
    return None


class _Closed:
    """Stands in for a closed slide's reader: any use is one GigaslideError line (OpenSlide raised a ctypes
    ``ArgumentError: Passing closed slide object``, even from ``repr``)."""

    def __init__(self, path: Path):
        self._path = path

    def __getattr__(self, name: str):  # noqa: ANN204
        raise GigaslideError("the slide was closed", path=self._path,
                             fix="read it inside its `with open_slide(...)` block, or open it again")

    def close(self) -> None:
        pass


class Slide:
    """An open slide. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike, *, mpp: float | str | None = None, slide_id: str | None = None):
        self.path = Path(path)
        self.id = check_slide_id(slide_id, path=self.path) if slide_id else slide_id_from_path(self.path)
        override = resolve_override(mpp, self.id)  # first: refused after opening, the reader's file stayed open
        self._handle, self.backend = open_backend(self.path)
        if override is not None:
            self._mpp: Mpp | None = Mpp(override, override, "override")
        else:
            self._mpp = mpp_from_properties(self.properties)

    # -- geometry -----------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        w, h = self._handle.dimensions
        return int(w), int(h)

    @property
    def level_count(self) -> int:
        return int(self._handle.level_count)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(int(w), int(h)) for w, h in self._handle.level_dimensions]

    @property
    def level_downsamples(self) -> list[float]:
        return [float(d) for d in self._handle.level_downsamples]

    @property
    def properties(self) -> dict[str, str]:
        """The reader's metadata as strings; keys it has no value for (tiffslide's ``None``) are left out."""
        return {str(k): str(v) for k, v in dict(self._handle.properties).items() if v is not None}

    @property
    def associated_images(self) -> list[str]:
        try:
            return sorted(self._handle.associated_images.keys())
        except Exception:  # noqa: BLE001
            return []

    @property
    def vendor(self) -> str:
        """The format's vendor as the reader names it (``aperio``, ``generic-tiff``, ...); else the reader's name."""
        p = self.properties
        return p.get("openslide.vendor") or p.get("tiffslide.vendor") or self.backend

    # -- resolution ---------------------------------------------------------------------------
    @property
    def has_mpp(self) -> bool:
        return self._mpp is not None

    @property
    def mpp_info(self) -> Mpp:
        if self._mpp is None:
            raise self._no_mpp_error()
        return self._mpp

    def _no_mpp_error(self, target_mpp: float | None = None) -> GigaslideError:
        """The file has no resolution: the fix is ``--slide-mpp`` with this slide's scan resolution (suggested from
        its objective power when the metadata has one, else the usual values per objective)."""
        need = f", needed to read it at {target_mpp:g} µm/px" if target_mpp is not None else ""
        power = _objective_power(self.properties)
        if power:
            guess = 10.0 / power  # ~0.25 µm/px at 40x, ~0.5 at 20x
            hint = (f"its metadata says {power:g}x, usually ~{guess:.2g} µm/px: check the scanner's report and give "
                    f"e.g. --slide-mpp {guess:.2g}")
        else:
            hint = ("give --slide-mpp with its scan resolution from the scanner's report (µm/px at level 0: ~0.25 for "
                    "a 40x scan, ~0.5 for 20x; e.g. --slide-mpp 0.25)")
        ignored = ignored_mpp(self.properties)
        why = (f"; its {ignored} is not a microscope's ({PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} µm/px), so it is "
               "not used" if ignored else "")
        return GigaslideError(f"slide has no resolution (mpp) in its metadata{need}{why}", path=self.path,
                              fix=f"{hint}, or a CSV with columns slide_id,mpp for many slides")

    @property
    def mpp(self) -> float:
        return self.mpp_info.mean

    def check_target_mpp(self, target_mpp: float) -> None:
        """Refuse a target resolution this slide cannot give: no scan resolution (the fix: ``--slide-mpp``), or finer
        than the scan by more than :data:`MPP_TOLERANCE` (the fix names the scan's own mpp and the finest one that
        works, or the ``--slide-mpp`` value to correct when the resolution came from it)."""
        if not (math.isfinite(target_mpp) and target_mpp > 0):  # NaN passed both checks below
            raise GigaslideError(f"target mpp {target_mpp} must be positive and finite", fix="use e.g. --mpp 0.5")
        if self._mpp is None:
            raise self._no_mpp_error(target_mpp)
        self.check_square()
        finest = self.mpp * (1 - MPP_TOLERANCE)
        if target_mpp < finest:
            own, src = self.mpp, self._mpp.source
            # the finest --mpp accepted, rounded up to 3 significant digits (so that it passes itself)
            ok = _round_up(finest)
            use = f"use --mpp {own:.3g} (the scan's own resolution) or coarser; the finest accepted is --mpp {ok:.3g}"
            fix = (f"{use}; or, if {own:.4g} µm/px (given with --slide-mpp) is not this slide's scan resolution, "
                   "correct --slide-mpp (or its row in the CSV)" if src == "override" else
                   f"{use}; or, if the file's resolution ({src}) is wrong, give the true one with --slide-mpp")
            given = "--slide-mpp" if src == "override" else src
            raise GigaslideError(
                f"target resolution {target_mpp:g} µm/px is finer than the scan ({own:.4g} µm/px, from {given}; "
                f"at most {MPP_TOLERANCE:.0%} finer is read)", path=self.path, fix=fix)

    def check_square(self) -> None:
        """Refuse a scan whose pixels are not square (µm/px across and down differ by more than SCALE_TOLERANCE):
        tiles are square in level-0 px, so they would cover another length across than down. Without a resolution
        there is nothing to check."""
        m = self._mpp
        if m is not None and abs(m.x - m.y) > SCALE_TOLERANCE * m.mean:
            raise GigaslideError(
                f"the scan's pixels are not square ({m.x:.4g} x {m.y:.4g} µm/px, from {m.source}): tiles would cover "
                "another length across than down", path=self.path,
                fix="resample the slide to square pixels first, or give its true resolution with --slide-mpp if the "
                    "metadata is wrong")

    def choose_level(self, target_mpp: float, tolerance: float = SCALE_TOLERANCE) -> LevelChoice:
        """Coarsest level that is still at least as fine as ``target_mpp`` (or coarser by at most ``tolerance``)."""
        want = check_mpp_value(target_mpp) / self.mpp  # level-0 px per target px
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= want * (1 + max(tolerance, 1e-3)):
                best = i
        d = self.level_downsamples[best]
        return LevelChoice(best, d, want / d)

    # -- pixels ---------------------------------------------------------------------------------
    def read_mpp(self, target_mpp: float, tolerance: float = SCALE_TOLERANCE, level: LevelChoice | None = None) -> float:
        """The resolution of the pixels :meth:`read_region` returns for ``target_mpp`` (differs within ``tolerance``)."""
        ch = level or self.choose_level(target_mpp, tolerance)
        k = ch.factor(tolerance)
        return self.mpp * ch.level_downsample * k if k else float(target_mpp)

    def read_region(self, location: tuple[int, int], size: tuple[int, int], target_mpp: float,
                    level: LevelChoice | None = None, tolerance: float = SCALE_TOLERANCE,
                    background: str | None = "bright") -> np.ndarray:
        """RGB uint8 array of ``size`` (w, h) target px whose top-left is ``location`` in level-0 px.

        When the level's scale is within ``tolerance`` of 1, 2, 4 or 8 the level is read at that
        multiple and box-averaged (no resampling, see :meth:`read_mpp`); otherwise it is resized.
        Pixels outside the slide are the ``background``'s: white glass (``bright``, the default) or
        black (``dark``: a fluorescence slide's tiles at its edges are padded black, see :data:`FILL`).
        """
        fill = fill_value(background)
        w, h = check_size(size)
        ch = level or self.choose_level(target_mpp, tolerance)
        k = ch.factor(tolerance)
        fw, fh = (w * k, h * k) if k else (w * ch.scale, h * ch.scale)
        if not fw * fh <= MAX_READ_PX:  # inf too
            raise GigaslideError(
                f"reading {w} x {h} px at {target_mpp:g} µm/px needs {fw:.4g} x {fh:.4g} px of level {ch.level} "
                f"(downsample {ch.level_downsample:g}), more than the {MAX_READ_PX:,} px read at once", path=self.path,
                fix="read smaller regions or at a finer mpp (the slide has no level near this one); for an overview "
                    "use Slide.thumbnail")
        lw, lh = (w * k, h * k) if k else (max(1, math.ceil(fw - 1e-6)), max(1, math.ceil(fh - 1e-6)))
        try:
            img = self._handle.read_region((int(location[0]), int(location[1])), ch.level, (lw, lh))
        except Exception as e:  # noqa: BLE001
            raise GigaslideError(
                f"cannot read pixels at {tuple(location)} level {ch.level} ({_first_line(e)})",
                path=self.path,
                fix="the file is damaged or incomplete; re-copy or re-scan it, or exclude it from the batch",
            ) from None
        img = self._fill_outside(img, location, ch, fill)
        if k:
            return box_reduce(to_rgb(img, fill), k)
        # the tile spans exactly w x scale level px: the read is rounded up to whole px, the resize samples the box only
        img = img.resize((w, h), Image.Resampling.BILINEAR, box=(0, 0, w * ch.scale, h * ch.scale),
                         reducing_gap=None if ch.scale < 2 else 2.0)
        return to_rgb(img, fill)

    def _fill_outside(self, img: Image.Image, location: tuple[int, int], ch: LevelChoice,
                      fill: int = 255) -> Image.Image:
        """Pixels outside the slide as ``fill`` (255: white glass). OpenSlide returns them transparent (``to_rgb``
        puts them on ``fill``); tiffslide returns them black, so they are painted here."""
        if img.mode == "RGBA":
            return img
        lw_all, lh_all = self.level_dimensions[ch.level]
        x = int(location[0]) / ch.level_downsample
        y = int(location[1]) / ch.level_downsample
        x0, y0 = max(0, math.ceil(-x - 1e-6)), max(0, math.ceil(-y - 1e-6))  # first inside column / row
        x1, y1 = max(0, math.ceil(lw_all - x - 1e-6)), max(0, math.ceil(lh_all - y - 1e-6))  # first outside
        if x0 == 0 and y0 == 0 and x1 >= img.size[0] and y1 >= img.size[1]:
            return img
        arr = np.array(img.convert("RGB"))
        arr[:, :x0] = fill
        arr[:y0] = fill
        arr[:, x1:] = fill
        arr[y1:] = fill
        return Image.fromarray(arr)

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose longer side is at most ``max_size``; returns (array, level-0 px per thumb px).

        The sizes are rounded per axis, so each axis has its own exact scale, ``W / width`` and ``H / height`` (up to
        half a thumbnail px apart over the image from the one returned): painting on it, use both, as heatmaps do."""
        W, H = self.dimensions
        if not isinstance(max_size, (int, np.integer)) or max_size < 1:
            raise GigaslideError(f"thumbnail size {max_size!r} must be a whole number of px, at least 1",
                                 path=self.path, fix="give e.g. max_size=1024")
        ds = max(W, H) / max_size
        ds = max(ds, 1.0)
        tw, th = max(1, round(W / ds)), max(1, round(H / ds))
        level = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= ds * (1 + 1e-3):
                level = i
        lw, lh = self.level_dimensions[level]
        if lw * lh > THUMB_MAX_SOURCE_PX:
            raise GigaslideError(
                f"no level of the slide is small enough for a {max_size} px thumbnail: the smallest it can be made "
                f"from is level {level}, {lw:,} x {lh:,} px ({lw * lh:.3g} px, more than the "
                f"{THUMB_MAX_SOURCE_PX:.3g} read for one; reading it would take hours)", path=self.path,
                fix="convert it to a pyramidal TIFF (`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`); "
                    "if no scan is that large, its header is damaged: re-copy or re-export it")
        try:
            if lw * lh <= THUMB_READ_PX:
                img = self._handle.read_region((0, 0), level, (lw, lh))
            else:  # a non-pyramidal (or sparse-pyramid) slide: its level is read band by band, never whole
                img = self._banded_reduce(level, max(1, int(min(lw / tw, lh / th))))
        except Exception as e:  # noqa: BLE001
            raise GigaslideError(f"cannot read the slide's pixels ({_first_line(e)})", path=self.path,
                                 fix="the file is damaged or incomplete; re-copy or re-scan it") from None
        if img.size != (tw, th):
            img = _opaque_to_rgb(img)  # PIL reduces and resizes RGBA through premultiplied alpha: ~20 % of the time
            factor = int(min(img.size[0] / tw, img.size[1] / th))
            if factor >= 2:  # integer box reduction first: much faster than one large resize
                img = img.reduce(factor)
            img = img.resize((tw, th), Image.Resampling.BILINEAR)
        return to_rgb(img), W / tw

    def _banded_reduce(self, level: int, f: int) -> Image.Image:
        """Level ``level`` box-averaged by ``f`` (RGB, on white where transparent), read in bands of about
        :data:`THUMB_BAND_PX` px (a multiple of ``f`` rows each): memory stays at one band, where reading the level
        whole (OpenSlide's ``get_thumbnail`` does) took 1.7 GB for a 1024 px thumbnail of a non-pyramidal
        16384 x 12288 TIFF (0.2 GB in bands). A band of ``f`` rows wider than that is read in blocks of a multiple
        of ``f`` columns: a header claiming a 10^6 px wide level made every band 3.9 GB (``f`` = 977 rows)."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        rows = max(f, int(THUMB_BAND_PX // lw) // f * f)
        cols = lw if rows * lw <= THUMB_BAND_PX else max(f, int(THUMB_BAND_PX // rows) // f * f)
        parts = []
        for y in range(0, lh, rows):
            h = min(rows, lh - y)
            blocks = []
            for x in range(0, lw, cols):
                band = self._handle.read_region((int(round(x * ds)), int(round(y * ds))), level, (min(cols, lw - x), h))
                blocks.append(to_rgb(band.reduce(f) if f > 1 else band))  # RGBA reduced first, as a level read whole
            parts.append(blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1))
        return Image.fromarray(np.concatenate(parts, axis=0))

    def info(self) -> dict[str, Any]:
        mpp = self._mpp
        return {
            "path": str(self.path),
            "slide_id": self.id,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": self.level_downsamples,
            "mpp": None if mpp is None else [mpp.x, mpp.y],
            "mpp_source": None if mpp is None else mpp.source,
            "mpp_ignored": None if mpp is not None else ignored_mpp(self.properties),  # stated, not plausible
            "objective_power": self.properties.get("openslide.objective-power"),
            "associated_images": self.associated_images,
        }

    def close(self) -> None:
        try:
            self._handle.close()
        except Exception:  # noqa: BLE001
            pass
        self._handle = _Closed(self.path)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if isinstance(self._handle, _Closed):
            return f"Slide({str(self.path)!r}, closed)"
        return f"Slide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={self._mpp and round(self._mpp.mean, 4)})"


def box_reduce(rgb: np.ndarray, k: int) -> np.ndarray:
    """Average ``k`` x ``k`` blocks of an RGB uint8 array (exact, rounded; PIL's reduce)."""
    if k == 1:
        return rgb
    return np.asarray(Image.fromarray(rgb).reduce(k))


def _opaque_to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB when it is RGBA and fully opaque (OpenSlide's reads of the scanned area), else itself: the same
    pixels after a reduce or resize, without PIL's two whole-image conversions to and from premultiplied alpha and
    a fourth channel to average."""
    if img.mode == "RGBA" and img.getchannel("A").getextrema()[0] == 255:
        return img.convert("RGB")
    return img


def to_rgb(img: Image.Image, fill: int = 255) -> np.ndarray:
    """RGBA (transparent outside the scanned area) -> RGB on ``fill`` (255: white; 0: black, fluorescence)."""
    if img.mode == "RGBA":
        if img.getchannel("A").getextrema()[0] == 255:  # fully opaque (the usual case): drop alpha in C
            return np.asarray(img.convert("RGB"))
        arr = np.asarray(img)
        rgb = arr[..., :3]
        a = arr[..., 3:4].astype(np.uint16)
        return ((rgb.astype(np.uint16) * a + int(fill) * (255 - a)) // 255).astype(np.uint8)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
