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


#: One polygon: its exterior ring then its holes, each ``[K, 2]`` (x, y) and closed (first == last).
Rings = list[np.ndarray]


@dataclass
class Nucleus:
    id: int
    polygon: np.ndarray | list[Rings]  # level-0 (x, y): one ring [K, 2], or polygons (pieces) of rings, all closed
    centroid: tuple[float, float]  # level-0 (x, y) of the nucleus's pixels (every piece)
    area_um2: float  # its pixels' area (every piece): a little over its outline's, traced between pixel centres
    bbox: tuple[float, float, float, float]  # level-0 x0, y0, x1, y1
    type: int | None = None
    type_name: str | None = None
    probability: float | None = None


def _approximate_polygon(coords: np.ndarray, tolerance: float) -> np.ndarray:
    """:func:`skimage.measure.approximate_polygon` (Douglas-Peucker): the same points, chosen by the same arithmetic,
    with the segments of one depth of the recursion handled together. skimage takes one segment per loop pass (a
    dozen NumPy calls per kept point), which was two thirds of the time of exporting a slide's nuclei."""
    coords = np.asarray(coords)
    if tolerance <= 0:
        return coords
    n = coords.shape[0]
    chain = np.zeros(n, bool)
    chain[0] = chain[-1] = True
    starts, ends = np.array([0]), np.array([n - 1])
    while len(starts):
        r0, c0 = coords[starts, 0], coords[starts, 1]
        r1, c1 = coords[ends, 0], coords[ends, 1]
        dr, dc = r1 - r0, c1 - c0
        angle = -np.arctan2(dr, dc)
        sin, cos = np.sin(angle), np.cos(angle)
        seg_dist = c0 * sin + r0 * cos
        counts = np.maximum(ends - starts - 1, 0)
        keep = counts > 0
        if not keep.any():
            break
        starts, ends, counts = starts[keep], ends[keep], counts[keep]
        r0, c0, r1, c1, dr, dc = r0[keep], c0[keep], r1[keep], c1[keep], dr[keep], dc[keep]
        sin, cos, seg_dist = sin[keep], cos[keep], seg_dist[keep]
        seg = np.repeat(np.arange(len(starts)), counts)
        offsets = np.cumsum(counts) - counts
        idx = starts[seg] + 1 + (np.arange(len(seg)) - offsets[seg])
        pr, pc = coords[idx, 0], coords[idx, 1]
        dr0, dc0 = pr - r0[seg], pc - c0[seg]
        dr1, dc1 = pr - r1[seg], pc - c1[seg]
        proj0 = dr0 * dr[seg] + dc0 * dc[seg]
        proj1 = -dr1 * dr[seg] - dc1 * dc[seg]
        perp = (proj0 > 0) & (proj1 > 0)
        d = np.where(perp, np.abs(pr * cos[seg] + pc * sin[seg] - seg_dist[seg]),
                     np.minimum(np.sqrt(dc0 ** 2 + dr0 ** 2), np.sqrt(dc1 ** 2 + dr1 ** 2)))
        dmax = np.maximum.reduceat(d, offsets)
        split = dmax > tolerance
        at_max = np.where(d == dmax[seg], np.arange(len(d)), len(d))
        first = np.minimum.reduceat(at_max, offsets)  # the first point of largest distance, as argmax
        new = idx[first[split]]
        chain[new] = True
        starts = np.concatenate([starts[split], new])
        ends = np.concatenate([new, ends[split]])
    return coords[chain, :]


def _ring(contour: np.ndarray) -> np.ndarray:
    """A marching-squares contour (row, col) of a once-padded mask as a closed ring (x, y) in the mask's pixel-index
    coordinates, simplified within 0.5 px (kept whole where that leaves under 4 points)."""
    c = _approximate_polygon(contour, tolerance=0.5)
    if len(c) < 4:
        c = contour
    c = c[:, ::-1] - 1.0  # (row, col) -> (x, y), undo the pad
    return c if np.array_equal(c[0], c[-1]) else np.vstack([c, c[:1]])


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def polygons_of(mask: np.ndarray) -> list[Rings]:
    """Every piece of a boolean mask as a polygon ``[exterior, *holes]`` (rings (x, y) in pixel-index coordinates,
    closed, holes wound against the exterior), largest piece first: a nucleus cut in pieces (a watershed, or
    overlapping annotations) is all of its pixels, as its area and centroid are. Pieces are 4-connected, as marching
    squares separates them; each is traced half-way between pixel centres (corners cut, so a ring's area is a little
    under the pixel count: about 0.5 px per corner)."""
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    lab, n = ndi.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(lab.ravel())[1:]
    out: list[Rings] = []
    for k in np.argsort(-sizes, kind="stable") + 1:
        piece = lab == k
        contours = [c for c in find_contours(np.pad(piece, 1).astype(np.float32), 0.5) if len(c) >= 4]
        if not contours:  # not reached for a non-empty piece; its bounding box rather than nothing
            ys, xs = np.nonzero(piece)
            c = np.array([[xs.min() - 0.5, ys.min() - 0.5], [xs.max() + 0.5, ys.min() - 0.5],
                          [xs.max() + 0.5, ys.max() + 0.5], [xs.min() - 0.5, ys.max() + 0.5]], np.float64)
            out.append([np.vstack([c, c[:1]])])
            continue
        rings = [_ring(c) for c in contours]
        areas = [_signed_area(r) for r in rings]
        i = int(np.argmax(np.abs(areas)))  # a 4-connected piece has one outer boundary, the largest; others are holes
        holes = [r if np.sign(a) != np.sign(areas[i]) else r[::-1] for j, (r, a) in enumerate(zip(rings, areas))
                 if j != i and a != 0]
        out.append([rings[i], *holes])
    return out


def polygon_of(mask: np.ndarray) -> np.ndarray:
    """Exterior ring [K, 2] (x, y) in pixel-index coordinates of a boolean mask's largest piece, closed (the slide
    export writes every piece and hole: :func:`polygons_of`)."""
    return polygons_of(mask)[0][0]


def _clip_ring(ring: np.ndarray, w: float, h: float) -> np.ndarray | None:
    """``ring`` cut to the rectangle [0, w] x [0, h] (Sutherland-Hodgman), closed; None where nothing is left."""
    pts = np.asarray(ring, np.float64)
    if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    if pts.min() >= 0 and pts[:, 0].max() <= w and pts[:, 1].max() <= h:
        return np.vstack([pts, pts[:1]]) if len(pts) >= 3 else None
    for axis, lim, keep_below in ((0, 0.0, False), (0, float(w), True), (1, 0.0, False), (1, float(h), True)):
        if len(pts) == 0:
            return None
        inside = pts[:, axis] <= lim if keep_below else pts[:, axis] >= lim
        new = []
        for j in range(len(pts)):
            a, b, ina, inb = pts[j - 1], pts[j], inside[j - 1], inside[j]
            if ina != inb:  # the edge a-b crosses the line: its crossing point
                t = (lim - a[axis]) / (b[axis] - a[axis])
                q = a + t * (b - a)
                q[axis] = lim
                new.append(q)
            if inb:
                new.append(b)
        pts = np.array(new, np.float64).reshape(-1, 2)
    if len(pts):
        pts = pts[np.any(pts != np.roll(pts, 1, axis=0), axis=1)]  # no repeated vertex
    if len(pts) < 3 or _signed_area(pts) == 0:
        return None
    return np.vstack([pts, pts[:1]])


def clip_polygons(polys: list[Rings], w: float, h: float) -> list[Rings]:
    """Polygons cut to the slide, [0, w] x [0, h] (level-0 px): a nucleus on the slide's edge, read with context
    past it and resampled, is traced up to a pixel past the edge. A polygon whose exterior is wholly off it is
    dropped, as is a hole."""
    out: list[Rings] = []
    for rings in polys:
        ext = _clip_ring(rings[0], w, h)
        if ext is None:
            continue
        holes = [c for c in (_clip_ring(r, w, h) for r in rings[1:]) if c is not None]
        out.append([ext, *holes])
    return out


def type_color(t: int | None) -> list[int]:
    """The [r, g, b] of nucleus type ``t`` (1, 2, ...) in QuPath; grey for a nucleus without a type number."""
    return list(TYPE_COLORS[(int(t) - 1) % len(TYPE_COLORS)]) if t is not None and int(t) > 0 else [128, 128, 128]


def feature(n: Nucleus, slide_id: str) -> dict[str, Any]:
    """A QuPath detection: the outline (a Polygon, or a MultiPolygon for a nucleus in pieces) and measurements named
    with their units (QuPath lists a name as it is, next to its own centroids in µm): ``centroid_x_px`` is level-0
    px."""
    meas: dict[str, float] = {"area_um2": round(n.area_um2, 3), "centroid_x_px": round(n.centroid[0], 2),
                              "centroid_y_px": round(n.centroid[1], 2)}
    if n.probability is not None:
        meas["probability"] = round(n.probability, 4)
    props: dict[str, Any] = {"objectType": "detection", "name": f"nucleus {n.id}", "measurements": meas}
    if n.type_name is not None:  # QuPath's classification: its name and colour ([r, g, b]), one colour per type
        props["classification"] = {"name": n.type_name, "color": type_color(n.type)}
    polys = [[n.polygon]] if isinstance(n.polygon, np.ndarray) else n.polygon
    coords = [[[[round(float(x), 2), round(float(y), 2)] for x, y in r] for r in rings] for rings in polys]
    geom = {"type": "Polygon", "coordinates": coords[0]} if len(coords) == 1 else \
        {"type": "MultiPolygon", "coordinates": coords}  # a nucleus in pieces: every piece, as QuPath reads it
    return {"type": "Feature", "id": f"{slide_id}-{n.id}", "geometry": geom, "properties": props}


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


__all__ = ["TABLE_COLUMNS", "TYPE_COLORS", "GeoJSONWriter", "Nucleus", "area_in_slide_fraction", "clip_polygons",
           "feature", "polygon_of", "polygons_of", "table_row", "tile_counts", "type_color", "write_tiles_h5"]
