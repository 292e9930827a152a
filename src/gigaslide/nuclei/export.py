"""Writing nuclei: polygons from instance maps, QuPath GeoJSON detections, a CSV table, per-tile counts (HDF5).

Coordinates are level-0 px with QuPath's convention (pixel ``i`` spans ``[i, i+1)``, so a pixel centre is
at ``i + 0.5``). GeoJSON and the table are streamed to temporary files and renamed when the slide is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

#: QuPath classification colours ([r, g, b]) of nucleus types 1, 2, ... (HoVer-Net's PanNuke order: neoplastic red,
#: inflammatory green, connective blue, dead yellow, epithelial orange; then more), repeating past the last.
TYPE_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 165, 0), (255, 0, 255), (0, 255, 255),
               (128, 64, 0), (128, 0, 128), (0, 128, 128))
TABLE_COLUMNS = ("id", "centroid_x", "centroid_y", "area_um2", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "type",
                 "probability")


@dataclass
class Nucleus:
    id: int
    polygon: np.ndarray  # [K, 2] level-0 (x, y), closed (first == last)
    centroid: tuple[float, float]  # level-0 (x, y)
    area_um2: float
    bbox: tuple[float, float, float, float]  # level-0 x0, y0, x1, y1
    type: int | None = None
    type_name: str | None = None
    probability: float | None = None


def polygon_of(mask: np.ndarray) -> np.ndarray:
    """Outline [K, 2] (x, y) in pixel-index coordinates of a boolean mask's largest component, closed."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask, 1)
    contours = find_contours(padded.astype(np.float32), 0.5)
    if not contours:
        ys, xs = np.nonzero(mask)
        c = np.array([[xs.min() - 0.5, ys.min() - 0.5], [xs.max() + 0.5, ys.min() - 0.5],
                      [xs.max() + 0.5, ys.max() + 0.5], [xs.min() - 0.5, ys.max() + 0.5]], np.float64)
        return np.vstack([c, c[:1]])
    c = max(contours, key=len)
    c = approximate_polygon(c, tolerance=0.5)[:, ::-1] - 1.0  # (row, col) -> (x, y), undo the pad
    if len(c) < 4:
        c = max(contours, key=len)[:, ::-1] - 1.0
    if not np.array_equal(c[0], c[-1]):
        c = np.vstack([c, c[:1]])
    return c


def type_color(t: int | None) -> list[int]:
    """The [r, g, b] of nucleus type ``t`` (1, 2, ...) in QuPath; grey for a nucleus without a type number."""
    return list(TYPE_COLORS[(int(t) - 1) % len(TYPE_COLORS)]) if t is not None and int(t) > 0 else [128, 128, 128]


def feature(n: Nucleus, slide_id: str) -> dict[str, Any]:
    meas: dict[str, float] = {"area_um2": round(n.area_um2, 3), "centroid_x": round(n.centroid[0], 2),
                              "centroid_y": round(n.centroid[1], 2)}
    if n.probability is not None:
        meas["probability"] = round(n.probability, 4)
    props: dict[str, Any] = {"objectType": "detection", "name": f"nucleus {n.id}", "measurements": meas}
    if n.type_name is not None:  # QuPath's classification: its name and colour ([r, g, b]), one colour per type
        props["classification"] = {"name": n.type_name, "color": type_color(n.type)}
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in n.polygon]
    return {"type": "Feature", "id": f"{slide_id}-{n.id}", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": props}


class GeoJSONWriter:
    """Streams a FeatureCollection (one feature per line) into an open text file."""

    def __init__(self, f: IO[str], slide_id: str):
        self.f, self.slide_id, self.n = f, slide_id, 0
        f.write('{"type": "FeatureCollection", "features": [\n')

    def add(self, n: Nucleus) -> None:
        self.f.write((",\n" if self.n else "") + json.dumps(feature(n, self.slide_id), separators=(",", ":")))
        self.n += 1

    def close(self) -> None:
        self.f.write("\n]}\n")


def table_row(n: Nucleus) -> str:
    vals = [n.id, f"{n.centroid[0]:.2f}", f"{n.centroid[1]:.2f}", f"{n.area_um2:.3f}", *(f"{v:.2f}" for v in n.bbox),
            "" if n.type_name is None else n.type_name, "" if n.probability is None else f"{n.probability:.4f}"]
    return ",".join(str(v) for v in vals) + "\n"


def tile_counts(coords: np.ndarray, tile0: float, centroids: np.ndarray, areas: np.ndarray, types: np.ndarray | None,
                n_types: int) -> dict[str, np.ndarray]:
    """Per tile (top-left ``coords`` [N, 2], side ``tile0`` level-0 px): nucleus count, mean area, per-type counts."""
    n = len(coords)
    count = np.zeros(n, np.int32)
    area_sum = np.zeros(n, np.float64)
    per_type = np.zeros((n, max(n_types, 0)), np.int32)
    if len(centroids) and n:
        order = np.argsort(centroids[:, 0], kind="stable")
        cx, cy = centroids[order, 0], centroids[order, 1]
        ar = areas[order]
        ty = types[order] if types is not None else None
        lo = np.searchsorted(cx, coords[:, 0], "left")
        hi = np.searchsorted(cx, coords[:, 0] + tile0, "left")
        for i in range(n):
            if hi[i] > lo[i]:
                sel = slice(lo[i], hi[i])
                m = (cy[sel] >= coords[i, 1]) & (cy[sel] < coords[i, 1] + tile0)
                count[i] = int(m.sum())
                area_sum[i] = float(ar[sel][m].sum())
                if ty is not None and n_types:
                    per_type[i] = np.bincount(ty[sel][m], minlength=n_types + 1)[1:n_types + 1]
    mean_area = np.where(count > 0, area_sum / np.maximum(count, 1), 0.0).astype(np.float32)
    out = {"count": count, "mean_area_um2": mean_area}
    if n_types:
        out["type_count"] = per_type
    return out


def area_in_slide_fraction(coords: np.ndarray, tile0: float, dimensions: tuple[int, int] | None) -> np.ndarray:
    """Fraction of each tile (top-left ``coords``, side ``tile0`` level-0 px) on the slide of ``dimensions`` (w, h)
    level-0 px: 1 inside, less for a tile reaching past the slide's right or bottom edge; all 1 without dimensions."""
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    if dimensions is None or tile0 <= 0:
        return np.ones(len(c), np.float64)
    iw = np.clip(float(dimensions[0]) - c[:, 0], 0, tile0) - np.clip(-c[:, 0], 0, tile0)
    ih = np.clip(float(dimensions[1]) - c[:, 1], 0, tile0) - np.clip(-c[:, 1], 0, tile0)
    return (np.clip(iw, 0, None) * np.clip(ih, 0, None) / (tile0 * tile0)).clip(0, 1)


def write_tiles_h5(path: Path, coords: np.ndarray, tile0: float, slide_mpp: float, stats: dict[str, np.ndarray],
                   attrs: dict[str, Any], dimensions: tuple[int, int] | None = None) -> None:
    """Per-tile ``stats`` on ``coords`` plus ``density_per_mm2``: nuclei per mm² of the tile's area *on the slide*
    (``dimensions``: the slide's (w, h) level-0 px; a tile reaching past its edge -- the grid's last row and column
    -- has only its part on the slide, ``area_mm2``, to hold nuclei: dividing by the whole tile would make every
    edge tile look sparse). Without ``dimensions`` the whole tile's area is used. 0 for a tile wholly off the slide."""
    import h5py

    from gigaslide import atomic

    area_mm2 = (tile0 * slide_mpp / 1000.0) ** 2
    on_slide = area_mm2 * area_in_slide_fraction(coords, tile0, dimensions)
    density = np.where(on_slide > 0, stats["count"] / np.where(on_slide > 0, on_slide, 1.0), 0.0)
    with atomic.atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=np.asarray(coords, np.int64))
            for k, v in stats.items():
                f.create_dataset(k, data=v)
            f.create_dataset("density_per_mm2", data=density.astype(np.float32))
            f.create_dataset("area_mm2", data=on_slide.astype(np.float32))
            for k, v in attrs.items():
                if v is not None:
                    f.attrs[k] = v if not isinstance(v, (dict, list)) else json.dumps(v)
            f.attrs["tile_size_level0"] = float(tile0)
            f.attrs["tile_area_mm2"] = float(area_mm2)
            if dimensions is not None:
                f.attrs["slide_dimensions"] = [int(dimensions[0]), int(dimensions[1])]


__all__ = ["TABLE_COLUMNS", "TYPE_COLORS", "GeoJSONWriter", "Nucleus", "area_in_slide_fraction", "feature",
           "polygon_of", "table_row", "tile_counts", "type_color", "write_tiles_h5"]
