"""Where a slide's physical resolution (µm per level-0 pixel) comes from.

Order: an explicit override (``--slide-mpp`` or a CSV column), the vendor/OpenSlide properties,
then TIFF resolution tags when they are plausible for a microscope (0.05–20 µm/px; the 72-dpi
default of ordinary TIFF writers is ignored).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gigaslide.errors import GigaslideError
from gigaslide.slides.ids import slide_id_from_path

PLAUSIBLE_MPP = (0.05, 20.0)


@dataclass(frozen=True)
class Mpp:
    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2


def _f(v: object) -> float | None:
    try:
        f = float(str(v))
    except (TypeError, ValueError):
        return None
    return f if f > 0 else None


def _plausible(v: float | None) -> bool:
    return v is not None and PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1]


def mpp_from_properties(props: Mapping[str, str]) -> Mpp | None:
    for kx, ky, src in (
        ("openslide.mpp-x", "openslide.mpp-y", "openslide.mpp"),
        ("tiffslide.mpp-x", "tiffslide.mpp-y", "tiffslide.mpp"),
        ("aperio.MPP", "aperio.MPP", "aperio.MPP"),
    ):
        x, y = _f(props.get(kx)), _f(props.get(ky))
        if _plausible(x):
            return Mpp(x, y if _plausible(y) else x, src)  # type: ignore[arg-type]
    # TIFF resolution tags: pixels per unit
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_um = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(unit)
    rx, ry = _f(props.get("tiff.XResolution")), _f(props.get("tiff.YResolution"))
    if per_um and rx:
        x = per_um / rx
        y = per_um / ry if ry else x
        if _plausible(x) and _plausible(y):
            return Mpp(x, y, "tiff.Resolution")
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
        v = _f(r["mpp"])
        if v is None:
            raise GigaslideError(f"mpp '{r['mpp']}' for {r[key]} is not a positive number", path=p,
                                 fix="write the scan resolution in µm per pixel, e.g. 0.25")
        table[slide_id_from_path(Path(r[key])) if key in ("path", "filename") else r[key]] = v
    return table


def resolve_override(slide_mpp: float | str | None, slide_id: str) -> float | None:
    """``--slide-mpp`` may be a number (all slides) or a CSV path (per slide)."""
    if slide_mpp is None or slide_mpp == "":
        return None
    v = _f(slide_mpp)
    if v is not None:
        return v
    table = load_mpp_table(str(slide_mpp))
    return table.get(slide_id)
