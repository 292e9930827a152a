"""Tissue from annotations: a GeoJSON of polygons (QuPath, a pathologist, another tool) instead of detection.

``gigaslide tile --tissue-from DIR`` reads ``DIR/<slide_id>.geojson`` (or ``.json``, or ``<slide file
name>.geojson``) per slide: a
FeatureCollection, a single Feature or geometry, or QuPath's older plain list of features. Polygons and
MultiPolygons count (holes cut out, overlapping polygons merged); points and lines are ignored.
``classes`` keeps only features whose ``properties.classification.name`` (QuPath) or ``properties.name``
is one of them. Coordinates are level-0 pixels, as QuPath exports them.

The polygons are rasterised on the slide's thumbnail grid (the mask segmentation would give), and each
tile's tissue fraction is the covered share of its box as for detected tissue, so ``--min-tissue`` means the
same. With ``--tissue-detect`` only the detected tissue inside the polygons counts (the same detection as
without annotations, on the same thumbnail): a coarse outline's glass, fat and pale areas drop out. The grid
records where its tissue came from (``tissue_source``: ``annotations`` or ``annotations+detected``), the
annotation file and its SHA-256: an edited annotation re-tiles the slide, an unchanged one is reused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.provenance import file_sha256
from gigaslide.slides.slide import Slide
from gigaslide.tiling.tissue import TissueMask, check_background, detect_on_thumbnail, thumbnail_info

#: provenance keys of a grid (and its feature files) whose tissue came from annotations
TISSUE_KEYS = ("tissue_source", "tissue_annotations", "tissue_annotations_sha256", "tissue_classes")


def tissue_attrs(extra: dict) -> dict:
    """The :data:`TISSUE_KEYS` a grid's ``extra`` holds (none for detected tissue): what a grid passes on to the files
    made from it, so they can be checked against the tiling settings (``TilingParams.tissue_matches``)."""
    return {k: extra[k] for k in TISSUE_KEYS if extra.get(k) is not None}


def classes_attr(classes: Sequence[str] | None) -> str:
    """How the annotation classes are recorded: comma-joined, "" for every class."""
    return ",".join(classes or ())


#: file names tried for a slide's annotations, in this order
SUFFIXES = (".geojson", ".json")


def annotation_path(folder: str | os.PathLike, slide_id: str, slide_path: str | os.PathLike | None = None) -> Path | None:
    """``folder/<slide_id>.geojson`` (or ``.json``), else ``folder/<slide file name>.geojson`` (``a.svs.geojson``, as
    some exports name it) where it exists, else None."""
    names = [slide_id] + ([Path(slide_path).name] if slide_path else [])
    for name in names:
        for sfx in SUFFIXES:
            p = Path(folder) / f"{name}{sfx}"
            if p.is_file():
                return p
    return None


def _features(doc: object) -> Iterator[dict]:
    """Every Feature-like dict of a GeoJSON document (a bare geometry counts as a feature without properties)."""
    if isinstance(doc, list):  # QuPath < 0.3 exported a plain list of features
        for d in doc:
            yield from _features(d)
    elif isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection":
            yield from _features(doc.get("features") or [])
        elif kind == "Feature":
            yield doc
        elif kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            yield {"type": "Feature", "geometry": doc, "properties": {}}


def _class_name(feature: dict) -> str | None:
    props = feature.get("properties") or {}
    c = props.get("classification")
    if isinstance(c, dict) and c.get("name") is not None:
        return str(c["name"])
    if isinstance(c, str):
        return c
    return None if props.get("name") is None else str(props["name"])


def _polygons(geometry: dict | None) -> Iterator[list]:
    """Each polygon (a list of rings, the first the outline, the rest holes) of a geometry."""
    if not isinstance(geometry, dict):
        return
    kind = geometry.get("type")
    if kind == "Polygon":
        yield geometry.get("coordinates") or []
    elif kind == "MultiPolygon":
        yield from (geometry.get("coordinates") or [])
    elif kind == "GeometryCollection":
        for g in geometry.get("geometries") or []:
            yield from _polygons(g)


#: largest |coordinate| accepted (level-0 px): far beyond any slide, and where rasterising stops being exact
MAX_COORD = 1e12


def read_polygons(path: str | os.PathLike, classes: Sequence[str] | None = None) -> list[list[np.ndarray]]:
    """The polygons of a GeoJSON file as lists of rings (``[n, 2]`` float level-0 x, y), filtered by ``classes``.
    Coordinates that are not finite (``NaN``, which Python's JSON reader accepts) or beyond :data:`MAX_COORD`, and
    documents nested too deeply to read, are refused in one line (they rasterised to no tissue without a word)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise GigaslideError(f"not a readable GeoJSON file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})",
                             path=p, fix="export the annotations as GeoJSON (QuPath: File > Export objects as GeoJSON)") from None
    try:
        return _read_polygons(doc, p, classes)
    except RecursionError:
        raise GigaslideError("GeoJSON nested too deeply to read", path=p,
                             fix="export the annotations as GeoJSON (QuPath: File > Export objects as GeoJSON)"
                             ) from None


def _read_polygons(doc: object, p: Path, classes: Sequence[str] | None) -> list[list[np.ndarray]]:
    keep = None if classes is None else {str(c) for c in classes}
    out, seen = [], set()
    for feat in _features(doc):
        name = _class_name(feat)
        seen.add(name)
        if keep is not None and name not in keep:
            continue
        for poly in _polygons(feat.get("geometry")):
            try:
                rings = [np.asarray(r, np.float64)[:, :2] for r in poly]
            except (TypeError, ValueError, IndexError):
                raise GigaslideError("a polygon's coordinates are not [x, y] pairs", path=p,
                                     fix="write each ring as a list of [x, y] level-0 pixel pairs") from None
            bad = next((r for r in rings if not (np.abs(r) <= MAX_COORD).all()), None)  # NaN fails the test too
            if bad is not None:
                v = bad[~(np.abs(bad) <= MAX_COORD)][0]
                raise GigaslideError(f"a polygon has the coordinate {float(v)!r}: not a level-0 pixel position", path=p,
                                     fix="write finite level-0 pixel coordinates (as QuPath exports them)")
            if rings and len(rings[0]) >= 3:
                out.append([r for r in rings if len(r) >= 3])
    if not out:
        found = ", ".join(sorted("(none)" if s is None else repr(s) for s in seen)) or "no features"
        what = f"no polygon of class {', '.join(sorted(keep))}" if keep is not None else "no polygon"
        raise GigaslideError(f"{what} in the annotations (classes found: {found})", path=p,
                             fix="draw the tissue as polygons, or pass --tissue-classes with the classes to keep")
    return out


def rasterize(polygons: list[list[np.ndarray]], shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Boolean mask ``shape`` (rows, cols) whose pixel ``(i, j)`` covers level-0 ``[j d, (j+1) d) x [i d, (i+1) d)``:
    set where the pixel's centre lies inside a polygon (holes excluded), merged over polygons."""
    from skimage.draw import polygon as fill

    mask = np.zeros(shape, bool)
    for rings in polygons:
        px = [fill(r[:, 1] / downsample - 0.5, r[:, 0] / downsample - 0.5, shape=shape) for r in rings]
        if len(px) == 1:  # no hole: its pixels are set directly
            mask[px[0]] = True
            continue
        rows = np.concatenate([rr for rr, _ in px])
        cols = np.concatenate([cc for _, cc in px])
        if not len(rows):
            continue
        r0, c0 = rows.min(), cols.min()  # even-odd over the polygon's bounding box only, not the whole mask
        piece = np.zeros((rows.max() - r0 + 1, cols.max() - c0 + 1), bool)
        for rr, cc in px:  # the outline, then each hole toggles its inside off (each pixel listed once per ring)
            piece[rr - r0, cc - c0] ^= True
        mask[r0:r0 + piece.shape[0], c0:c0 + piece.shape[1]] |= piece
    return mask


#: ``tissue_source`` of each way to get the tissue: detected, the annotations' polygons, or detected inside them
SOURCES = {(False, False): "detected", (True, False): "annotations", (True, True): "annotations+detected"}


def annotation_tissue(slide: Slide, path: str | os.PathLike, classes: Sequence[str] | None = None, *,
                      background: str = "auto", thumb_size: int | None = None,
                      detect: bool = False) -> tuple[TissueMask, np.ndarray]:
    """Tissue mask of ``slide`` from the annotation file ``path`` on the thumbnail grid; returns (mask, thumbnail RGB).
    ``detect``: only the detected tissue inside the polygons (drops the glass, fat and pale areas a coarse outline
    encloses); ``background`` is then the one detection uses, else it is only recorded (``auto``: detected from the
    thumbnail), as with detected tissue."""
    check_background(background)  # (before the file is read: the cheaper error first)
    polygons = read_polygons(path, classes)
    thumb, ds, info = thumbnail_info(slide, thumb_size, background)
    mask = rasterize(polygons, thumb.shape[:2], ds)
    if detect:
        mask &= detect_on_thumbnail(slide, thumb, ds, info["background"])
    info.update(tissue_source=SOURCES[True, detect], tissue_annotations=str(path),
                tissue_annotations_sha256=file_sha256(path), tissue_classes=classes_attr(classes))
    return TissueMask(mask, ds, slide.dimensions, info), thumb
