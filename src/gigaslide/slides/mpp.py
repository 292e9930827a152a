"""Where a slide's physical resolution (µm per level-0 pixel) comes from.

Order: an explicit override (``--slide-mpp`` or a CSV column), the vendor/OpenSlide properties,
then TIFF resolution tags when they are plausible for a microscope (0.05–20 µm/px; the 72-dpi
default of ordinary TIFF writers is ignored).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gigaslide.errors import GigaslideError
from gigaslide.safe_parse import is_number, positive_number
from gigaslide.slides.ids import slide_id_from_path

PLAUSIBLE_MPP = (0.05, 20.0)
#: A resolution given by hand (``--slide-mpp``, a CSV row) outside this range is refused: it is a unit mistake (a value
#: in mm or m, 0.00025 or 2.5e-7 for 0.25 µm/px; in nm, 250), which read tiles of absurd sizes or failed deep inside
#: tiling ("use --tile-size at most 0").
OVERRIDE_MPP = (0.01, 100.0)
_UNITS_FIX = "give the scan resolution in µm per pixel at level 0, e.g. 0.25 (40x) or 0.5 (20x), not in mm or nm"


@dataclass(frozen=True)
class Mpp:
    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2


def check_override(v: float, what: str, path: str | os.PathLike | None = None) -> float:
    """``v`` when it is a plausible hand-given resolution (:data:`OVERRIDE_MPP`), else a one-line error naming
    ``what`` (``--slide-mpp``, or the CSV row's slide)."""
    lo, hi = OVERRIDE_MPP
    if not lo <= v <= hi:
        raise GigaslideError(f"{what}: {v:g} µm/px is outside the resolutions slides are scanned at ({lo:g}-{hi:g}"
                             " µm/px): a value in another unit?", path=path, fix=_UNITS_FIX)
    return v


def _plausible(v: float | None) -> bool:
    return v is not None and PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1]


def mpp_from_properties(props: Mapping[str, str]) -> Mpp | None:
    for kx, ky, src in (
        ("openslide.mpp-x", "openslide.mpp-y", "openslide.mpp"),
        ("tiffslide.mpp-x", "tiffslide.mpp-y", "tiffslide.mpp"),
        ("aperio.MPP", "aperio.MPP", "aperio.MPP"),
    ):
        x, y = positive_number(props.get(kx)), positive_number(props.get(ky))
        if _plausible(x):
            return Mpp(x, y if _plausible(y) else x, src)  # type: ignore[arg-type]
    # TIFF resolution tags: pixels per unit
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_um = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(unit)
    rx, ry = positive_number(props.get("tiff.XResolution")), positive_number(props.get("tiff.YResolution"))
    if per_um and rx:
        x = per_um / rx
        y = per_um / ry if ry else x
        if _plausible(x) and _plausible(y):
            return Mpp(x, y, "tiff.Resolution")
    return None


def ignored_mpp(props: Mapping[str, str]) -> str | None:
    """The resolution the metadata states but :func:`mpp_from_properties` does not use (outside
    :data:`PLAUSIBLE_MPP`, not finite, or 0), as ``openslide.mpp-x 1e+07 µm/px``; None when it states none."""
    for k in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"):
        v = props.get(k)
        if v not in (None, ""):
            try:
                return f"{k} {float(v):.4g} µm/px"
            except ValueError:
                return f"{k} '{str(v)[:20]}'"
    unit, rx = str(props.get("tiff.ResolutionUnit", "")).lower(), props.get("tiff.XResolution")
    if rx not in (None, "") and unit not in ("", "none", "1"):
        return f"tiff.XResolution {str(rx)[:20]} px per {unit}"
    return None


def load_mpp_table(path: str | os.PathLike) -> dict[str, float]:
    """Read ``slide_id,mpp`` (or ``slide,mpp`` / ``path,mpp`` / ``filename,mpp``) rows into ``{slide_id: mpp}``.

    UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8"); a ``path`` / ``filename`` gives the slide id its
    file would get (``x.ome.tif`` -> ``x``, as :func:`~gigaslide.slides.ids.slide_id_from_path`)."""
    p = Path(path)
    if not p.is_file():
        raise GigaslideError("mpp table not found", path=p, fix="give a CSV with columns slide_id,mpp")
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError:
        raise GigaslideError("mpp table is not UTF-8 text", path=p,
                             fix="save it as CSV UTF-8 with columns slide_id,mpp") from None
    if not rows or "mpp" not in rows[0]:
        raise GigaslideError("mpp table has no 'mpp' column", path=p, fix="give a CSV with columns slide_id,mpp")
    key = next((k for k in ("slide_id", "slide", "path", "filename") if k in rows[0]), None)
    if key is None:
        raise GigaslideError("mpp table has no 'slide_id' column", path=p, fix="give a CSV with columns slide_id,mpp")
    table: dict[str, float] = {}
    for r in rows:
        v = positive_number(r["mpp"])
        if v is None:
            raise GigaslideError(f"mpp '{r['mpp']}' for {r[key]} is not a positive finite number", path=p,
                                 fix="write the scan resolution in µm per pixel, e.g. 0.25")
        check_override(v, f"mpp of {r[key]}", path=p)
        sid = slide_id_from_path(Path(r[key])) if key in ("path", "filename") else r[key]
        if table.get(sid, v) != v:  # the last row won without a word: half a cohort's tiles at the wrong scale
            raise GigaslideError(f"mpp table gives slide {sid} two resolutions, {table[sid]:g} and {v:g} µm/px", path=p,
                                 fix="keep one row per slide with its scan resolution")
        table[sid] = v
    return table


def resolve_override(slide_mpp: float | str | None, slide_id: str) -> float | None:
    """``--slide-mpp`` may be a number (all slides) or a CSV path (per slide)."""
    if slide_mpp is None or slide_mpp == "":
        return None
    if is_number(slide_mpp):  # "nan" or "inf" is no CSV path: it was read as one ("mpp table not found: nan")
        v = positive_number(slide_mpp)
        if v is None:
            raise GigaslideError(f"--slide-mpp {slide_mpp} is not a positive finite number", fix=f"{_UNITS_FIX}, "
                                 "or a CSV with columns slide_id,mpp")
        return check_override(v, "--slide-mpp")
    return _table(str(slide_mpp)).get(slide_id)


#: Tables read by :func:`_table`, by the CSV's path and stat (an edited file is read again); the last few only.
_TABLES: dict[tuple, dict[str, float]] = {}


def _table(path: str) -> dict[str, float]:
    """:func:`load_mpp_table` of ``path``, read once per version of the file: every slide opened (in tiling, in
    reader processes, once per check) read and parsed the whole CSV again -- with one row per slide 67 ms a slide
    at 10,000 rows, 11 minutes for the batch, growing with the square of the slides."""
    try:
        st = os.stat(path)
    except OSError:
        return load_mpp_table(path)  # says that it is not there
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    table = _TABLES.get(key)
    if table is None:
        table = load_mpp_table(path)
        while len(_TABLES) >= 4:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = table
    return table
