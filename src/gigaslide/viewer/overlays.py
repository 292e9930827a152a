"""Overlay layers rendered server side as RGBA PNG tiles of the deep-zoom pyramid (level-0 coordinates).

Per-tile values live on the tile lattice (one cell per tile, see :class:`TileLattice`); an overlay
tile samples that lattice at its output pixels (nearest cell), so a layer costs the same whatever
the number of tiles, and the browser draws one image per screen tile instead of a DOM element per
tile. The tissue mask is rasterised once from ``tissue/<id>.geojson``; nuclei outlines are drawn
from ``nuclei/<id>.geojson`` per screen tile (only the polygons whose box meets it).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gigaslide.errors import GigaslideError

#: Colour maps offered in the viewer (matplotlib names).
COLORMAPS = ("jet", "viridis", "magma", "inferno", "plasma", "turbo", "coolwarm", "RdYlBu_r", "Reds", "Greens")


#: Categorical palettes (matplotlib's tab10 / tab20, written out so a cluster layer needs no matplotlib).
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
         "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")


def palette(k: int) -> list[str]:
    """``k`` category colours (hex): tab10 up to 10, tab20 up to 20, then tab20 again."""
    table = TAB10 if k <= 10 else TAB20
    return [table[i % len(table)] for i in range(k)]


def lut(name: str) -> np.ndarray:
    """uint8 [256, 3] RGB table of a colour map."""
    import matplotlib  # heavy: only when a score layer is first drawn

    if name not in COLORMAPS:
        raise KeyError(name)
    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


class TileLattice:
    """Where each tile of a slide lies: ``coords`` (top-left, level-0 px) of squares of side ``size0`` on a
    lattice of step ``step0`` (``size0`` unless tiles overlap)."""

    def __init__(self, coords: np.ndarray, size0: float, step0: float | None = None):
        self.coords = np.asarray(coords, np.float64).reshape(-1, 2)
        self.size0 = float(size0)
        self.step0 = float(step0 or size0)
        self.origin = self.coords.min(0) if len(self.coords) else np.zeros(2)
        ij = np.rint((self.coords - self.origin) / self.step0).astype(np.int64)
        nx, ny = (ij.max(0) + 1) if len(ij) else (0, 0)
        self.cells = np.full((int(ny) + 1, int(nx) + 1), -1, np.int64)  # one spare row / column for clipping
        self.cells[ij[:, 1], ij[:, 0]] = np.arange(len(ij))

    def sample(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Tile index under each (x, y) of a grid of level-0 positions ``xs`` [w] x ``ys`` [h] (-1: no tile)."""
        ix = np.floor((xs - self.origin[0]) / self.step0).astype(np.int64)
        iy = np.floor((ys - self.origin[1]) / self.step0).astype(np.int64)
        ny, nx = self.cells.shape
        okx, oky = (ix >= 0) & (ix < nx), (iy >= 0) & (iy < ny)
        idx = self.cells[np.clip(iy, 0, ny - 1)[:, None], np.clip(ix, 0, nx - 1)[None, :]]
        idx = np.where(oky[:, None] & okx[None, :], idx, -1)
        if len(self.coords):  # a lattice cell is wider than its tile when tiles are spaced apart
            safe = np.maximum(idx, 0)
            dx, dy = xs[None, :] - self.coords[safe, 0], ys[:, None] - self.coords[safe, 1]
            tol = 1.0  # level-0 px: tile starts are floored onto the lattice
            inside = (dx < self.size0 + tol) & (dy < self.size0 + tol) & (dx >= -tol) & (dy >= -tol)
            idx = np.where(inside, idx, -1)
        return idx

    def at(self, x: float, y: float) -> int:
        """Index of the tile containing level-0 point (x, y), -1 when none does."""
        return int(self.sample(np.array([float(x)]), np.array([float(y)]))[0, 0])


def pixel_centres(box: tuple[int, int, int, int], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 centres of the pixels of a box given in px of a level ``scale`` times smaller."""
    x0, y0, x1, y1 = box
    return (np.arange(x0, x1) + 0.5) * scale, (np.arange(y0, y1) + 0.5) * scale


def render_scores(lattice: TileLattice, values: np.ndarray, box: tuple[int, int, int, int], scale: float,
                  cmap: str, threshold: float) -> np.ndarray:
    """RGBA of per-tile ``values`` in [0, 1]; tiles below ``threshold`` (or NaN) stay transparent."""
    xs, ys = pixel_centres(box, scale)
    idx = lattice.sample(xs, ys)
    v = np.asarray(values, np.float64)
    val = np.where(idx >= 0, v[np.maximum(idx, 0)], np.nan)
    show = np.isfinite(val) & (val >= threshold)
    rgba = np.zeros((*idx.shape, 4), np.uint8)
    table = lut(cmap)
    rgba[..., :3] = table[np.clip(np.nan_to_num(val, nan=0.0) * 255, 0, 255).astype(np.int64)]
    rgba[..., 3] = np.where(show, 255, 0)
    return rgba


def render_categories(lattice: TileLattice, ids: np.ndarray, box: tuple[int, int, int, int], scale: float,
                      k: int) -> np.ndarray:
    """RGBA of per-tile category ids in [0, k) in :func:`palette` colours; -1 (no id) stays transparent."""
    xs, ys = pixel_centres(box, scale)
    idx = lattice.sample(xs, ys)
    v = np.asarray(ids, np.int64)
    cat = np.where(idx >= 0, v[np.maximum(idx, 0)] if len(v) else -1, -1)
    table = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in palette(max(1, k))], np.uint8)
    rgba = np.zeros((*idx.shape, 4), np.uint8)
    show = cat >= 0
    rgba[show, :3] = table[cat[show] % len(table)]
    rgba[show, 3] = 255
    return rgba


def render_grid(lattice: TileLattice, box: tuple[int, int, int, int], scale: float,
                colour: tuple[int, int, int] = (20, 60, 220)) -> np.ndarray:
    """RGBA outlines of every tile (about one screen pixel wide at any zoom)."""
    xs, ys = pixel_centres(box, scale)
    idx = lattice.sample(xs, ys)
    rgba = np.zeros((*idx.shape, 4), np.uint8)
    if not len(lattice.coords):
        return rgba
    safe = np.maximum(idx, 0)
    lx = xs[None, :] - lattice.coords[safe, 0]
    ly = ys[:, None] - lattice.coords[safe, 1]
    w = max(scale, lattice.size0 / 64)  # line width in level-0 px: >= 1 screen px
    edge = (idx >= 0) & ((lx < w) | (ly < w) | (lattice.size0 - lx <= w) | (lattice.size0 - ly <= w))
    rgba[edge] = (*colour, 255)
    return rgba


def _edges(rings: list[np.ndarray]) -> np.ndarray:
    """[m, 4] (x0, y0, x1, y1): the non-horizontal edges of closed ``rings`` (the last vertex joins the first)."""
    if not rings:
        return np.zeros((0, 4))
    e = np.concatenate([np.concatenate([r, np.roll(r, -1, 0)], 1) for r in rings])
    return e[e[:, 1] != e[:, 3]]


def inside(edges: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """[len(ys), len(xs)]: which points (xs[j], ys[i]; both ascending) lie inside the rings of ``edges``, even-odd
    (holes are rings too): a point is inside when a ray to its left crosses an odd number of edges, an edge counting
    for the ``y`` in [its lower end, its upper end) -- exactly the pixels whose centres the outline encloses."""
    out = np.zeros((len(ys), len(xs)), bool)
    if not len(edges) or not len(ys):
        return out
    lo, hi = np.minimum(edges[:, 1], edges[:, 3]), np.maximum(edges[:, 1], edges[:, 3])
    near = (hi > ys.min()) & (lo <= ys.max())
    e, lo, hi = edges[near], lo[near], hi[near]
    n = len(xs)
    step = max(1, min(4_000_000 // max(1, len(e)), 2_000_000 // max(1, n)))  # rows at a time: bounded tables
    for a in range(0, len(ys), step):
        y = ys[a:a + step]
        r, k = np.nonzero((lo[None, :] <= y[:, None]) & (y[:, None] < hi[None, :]))  # row r meets edge k
        if not len(r):
            continue
        x0, y0, x1, y1 = e[k].T
        cross = x0 + (y[r] - y0) * (x1 - x0) / (y1 - y0)
        # each crossing flips inside / outside from the first point at or right of it on: a running count per row
        flips = np.bincount(r * (n + 1) + np.searchsorted(xs, cross, side="left"), minlength=len(y) * (n + 1))
        out[a:a + step] = np.cumsum(flips.reshape(len(y), n + 1)[:, :n], axis=1) % 2 == 1
    return out


class TissueRaster:
    """The tissue of ``tissue/<id>.geojson`` (its pieces and their holes): rasterised once (about 2048 px on the longer
    side) for zoomed-out views, drawn from the outline itself when zoomed in further than that raster: either way a
    pixel is tissue when its centre lies inside the outline (the area the tiles' tissue fractions were computed on)."""

    def __init__(self, geojson: Path, dimensions: tuple[int, int], max_px: int = 2048):
        w, h = dimensions
        self.ds = max(1.0, max(w, h) / max_px)  # (no finer than level 0: the deepest level of the pyramid)
        self.edges = _edges(_read_rings(geojson, holes=True))
        cols, rows = max(1, int(np.ceil(w / self.ds))), max(1, int(np.ceil(h / self.ds)))
        self.mask = inside(self.edges, (np.arange(cols) + 0.5) * self.ds, (np.arange(rows) + 0.5) * self.ds)

    def render(self, box: tuple[int, int, int, int], scale: float, colour=(0, 170, 0)) -> np.ndarray:
        xs, ys = pixel_centres(box, scale)
        if scale < self.ds:  # finer than the raster: its cells would move the outline by up to half a cell
            m = inside(self.edges, xs, ys)
        else:
            h, w = self.mask.shape
            ix = np.clip((xs / self.ds).astype(np.int64), 0, w - 1)
            iy = np.clip((ys / self.ds).astype(np.int64), 0, h - 1)
            m = self.mask[iy[:, None], ix[None, :]]
        rgba = np.zeros((*m.shape, 4), np.uint8)
        rgba[m] = (*colour, 255)
        return rgba


class NucleiOutlines:
    """Nuclei polygons (QuPath GeoJSON detections): their outer rings in one flat vertex array (``vertices`` [V, 2],
    ring ``i`` = ``vertices[starts[i]:starts[i + 1]]``), with bounding boxes and centres, bucketed by centre
    (:attr:`BUCKET` level-0 px) so that a screen tile looks only at the nuclei near it. A slide holds 10^5-10^6 nuclei:
    a NumPy array per ring, and the whole file parsed as one JSON tree, cost about 4 GB and minutes for 10^6 before
    the first tile was drawn (:func:`_nuclei_rings` reads the nuclei stage's one-feature-per-line files line by
    line)."""

    BUCKET = 512.0

    def __init__(self, geojson: Path):
        self.vertices, self.starts = _nuclei_rings(geojson)
        n = np.diff(self.starts)
        self.boxes, self.centres = np.zeros((0, 4)), np.zeros((0, 2))
        self._keys, self._order, self._rows = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(n):  # in one pass over all vertices
            v, start, end = self.vertices, self.starts[:-1], self.starts[1:] - 1
            self.boxes = np.stack([np.minimum.reduceat(v[:, 0], start), np.minimum.reduceat(v[:, 1], start),
                                   np.maximum.reduceat(v[:, 0], start), np.maximum.reduceat(v[:, 1], start)], 1)
            # vertex means (a closed ring's repeated first vertex counted once): the dots of the zoomed-out views
            closed = (n > 3) & (v[start] == v[end]).all(1)
            self.centres = (np.add.reduceat(v, start) - v[end] * closed[:, None]) / (n - closed)[:, None]
            # how far a nucleus reaches from its centre's bucket: the buckets a tile looks at are widened by it
            self._reach = float(np.max(np.abs(self.boxes - np.tile(self.centres, 2)))) if len(n) else 0.0
            cell = self._cell(self.centres)
            self._c0, self._r0 = cell.min(0)
            self._span = int(cell[:, 0].max() - self._c0 + 1)
            keys = (cell[:, 1] - self._r0) * self._span + (cell[:, 0] - self._c0)
            self._order = np.argsort(keys, kind="stable")
            self._keys = keys[self._order]
            self._rows = np.unique(cell[:, 1])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def ring(self, i: int) -> np.ndarray:
        """The outer ring [k, 2] (level-0 x, y) of nucleus ``i`` (file order)."""
        return self.vertices[self.starts[i]:self.starts[i + 1]]

    def _cell(self, xy: np.ndarray) -> np.ndarray:
        """Bucket (column, row) of level-0 points (far-off ones clipped: an absurd coordinate is one bucket too)."""
        return np.floor(np.clip(np.asarray(xy, np.float64), -2.0 ** 31, 2.0 ** 31) / self.BUCKET).astype(np.int64)

    def near(self, x0: float, y0: float, x1: float, y1: float, pad: float = 0.0, ordered: bool = True) -> np.ndarray:
        """Indices (``ordered``: ascending, file order) of every nucleus whose centre lies in [x0 - pad, x1 + pad] x
        [y0 - pad, y1 + pad] (level-0 px), and of some nuclei near it: the caller tests each exactly."""
        if not len(self):
            return np.zeros(0, np.int64)
        (c0, r0), (c1, r1) = self._cell([[x0 - pad, y0 - pad], [x1 + pad, y1 + pad]])
        c0, c1 = max(c0, self._c0), min(c1, self._c0 + self._span - 1)
        rows = self._rows[(self._rows >= r0) & (self._rows <= r1)]
        if c0 > c1 or not len(rows):
            return np.zeros(0, np.int64)
        if len(rows) == len(self._rows) and c0 == self._c0 and c1 == self._c0 + self._span - 1:
            return np.arange(len(self))  # the tile holds every bucket (zoomed out on the whole slide)
        base = (rows - self._r0) * self._span
        lo = np.searchsorted(self._keys, base + (c0 - self._c0), "left")
        hi = np.searchsorted(self._keys, base + (c1 - self._c0), "right")
        count = hi - lo
        total = int(count.sum())
        # positions lo[k] .. hi[k] - 1 of every row k, in one array
        pos = np.arange(total) + np.repeat(lo - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
        return np.sort(self._order[pos]) if ordered else self._order[pos]

    def render(self, box: tuple[int, int, int, int], scale: float, colour=(255, 255, 0), limit: int = 20000) -> np.ndarray:
        """Outlines (at most ``limit`` per tile: a tile at these zooms covers at most 1024 level-0 px a side), or
        zoomed out (``scale`` > 4, a nucleus a few px) one dot per nucleus at the px holding its centre -- every
        nucleus of the tile: capping them left all but a strip of a zoomed-out tile of a dense slide empty."""
        x0, y0, x1, y1 = box
        bx0, by0, bx1, by1 = x0 * scale, y0 * scale, x1 * scale, y1 * scale
        if scale > 4:
            rgba = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
            c = self.centres[self.near(bx0, by0, bx1, by1, ordered=False)]
            px = np.floor((c - (bx0, by0)) / scale).astype(np.int64)
            ok = (px[:, 0] >= 0) & (px[:, 0] < x1 - x0) & (px[:, 1] >= 0) & (px[:, 1] < y1 - y0)
            rgba[px[ok, 1], px[ok, 0]] = (*colour, 255)
            return rgba
        img = Image.new("RGBA", (x1 - x0, y1 - y0), (0, 0, 0, 0))
        if len(self):
            cand = self.near(bx0, by0, bx1, by1, pad=self._reach)
            b = self.boxes[cand]
            hit = cand[(b[:, 2] >= bx0) & (b[:, 0] <= bx1) & (b[:, 3] >= by0) & (b[:, 1] <= by1)]
            draw = ImageDraw.Draw(img)
            for i in hit[:limit]:
                # the px holding each vertex (floored here: PIL truncates towards 0, which drew a vertex up to 1 px left
                # of / above the tile in its first column / row as well: a nucleus on a tile edge drawn twice)
                pts = np.floor((self.ring(i) - (bx0, by0)) / scale)
                draw.line([tuple(p) for p in pts] + [tuple(pts[0])], fill=(*colour, 255), width=1)
        return np.asarray(img)


def _flat_rings(rings: list, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [V, 2] float64, starts [n + 1]) of GeoJSON rings (lists of [x, y] or [x, y, z]) with >= 3 vertices
    each; any other shape is one line naming ``path``."""
    rings = [r for r in rings if len(r) >= 3]
    if not rings:
        return np.zeros((0, 2)), np.zeros(1, np.int64)
    try:  # every vertex [x, y] (or every one [x, y, z]): one conversion for all rings
        v = (np.concatenate(rings) if all(isinstance(r, np.ndarray) for r in rings)
             else np.array([p for r in rings for p in r], np.float64))
        ok = v.ndim == 2 and v.shape[1] >= 2
    except (TypeError, ValueError):
        ok = False
    if not ok:
        def xy(ring) -> np.ndarray:  # noqa: ANN001
            a = np.asarray(ring, np.float64)
            if a.ndim != 2 or a.shape[1] < 2:
                raise ValueError(f"a ring of shape {a.shape}, not [n, 2]")
            return a[:, :2]

        try:
            v = np.concatenate([xy(r) for r in rings])
        except (TypeError, ValueError) as e:
            raise GigaslideError(f"not GeoJSON polygons ({type(e).__name__}: {str(e)[:120]})", path=path,
                                 fix="re-run the job that wrote it (a FeatureCollection of Polygon features)") from None
    return np.ascontiguousarray(v[:, :2]), np.concatenate([[0], np.cumsum([len(r) for r in rings])]).astype(np.int64)


#: A nucleus as the nuclei stage writes it (:func:`gigaslide.nuclei.export.feature`, compact separators): one ring
_POLYGON = b'"geometry":{"type":"Polygon","coordinates":[[['


def _chunk_rings(entries: list, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, starts) of ``entries`` in order: each the text ``x,y],[x,y],...,[x,y`` of a one-ring Polygon (read
    here as numbers, not as a JSON tree: 5 times faster) or a list of rings JSON gave (any other geometry)."""
    texts = [e for e in entries if isinstance(e, bytes)]
    if not texts:
        return _flat_rings([r for e in entries for r in e], path)
    counts = np.array([t.count(b"],[") + 1 for t in texts], np.int64)
    nums = np.fromstring(b",".join(texts).replace(b"],[", b","), sep=",")  # noqa: NPY201 - text mode, not deprecated
    if nums.size != 2 * counts.sum():  # stopped at something not a number (an altitude, a damaged line)
        raise ValueError("not [x, y] numbers")
    v = nums.reshape(-1, 2)
    if len(texts) == len(entries) and (counts >= 3).all():
        return v, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    parts = iter(np.split(v, np.cumsum(counts)[:-1]))
    return _flat_rings([r for e in entries for r in ([next(parts)] if isinstance(e, bytes) else e)], path)


def _feature_lines(path: Path, chunk: int = 4096):  # noqa: ANN202
    """(vertices, starts) of the outer rings of a FeatureCollection written one feature per line (the nuclei stage's
    :class:`~gigaslide.nuclei.export.GeoJSONWriter`), read line by line, about ``chunk`` features at a time; raises
    ``ValueError`` for a file of any other layout (or damaged): then it is read whole (:func:`_read_geojson`)."""
    with open(path, "rb") as fh:
        head = fh.readline().strip()
        if not (head.startswith(b"{") and head.endswith(b"[") and b'"features"' in head):
            raise ValueError("not one feature per line")
        entries: list = []
        closed = False
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if closed or line in (b"]}", b"] }"):
                if closed or not line.startswith(b"]"):  # anything after the collection's end
                    raise ValueError("text after the collection")
                closed = True
                continue
            i = line.find(_POLYGON)
            j = line.find(b"]]", i) if i >= 0 else -1
            if j > 0 and line[j:j + 3] == b"]]]" and line.count(b'"geometry"') == 1:  # one feature of one ring
                entries.append(line[i + len(_POLYGON):j])
            else:
                f = json.loads(line[:-1] if line.endswith(b",") else line)
                if not (isinstance(f, dict) and f.get("type") == "Feature"):
                    raise ValueError("not a feature")
                entries.append(list(_rings(f)))
            if len(entries) >= chunk:
                yield _chunk_rings(entries, path)
                entries = []
        if not closed:
            raise ValueError("no end of the collection")
        yield _chunk_rings(entries, path)


def _nuclei_rings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, starts) of the outer rings (>= 3 vertices, every coordinate finite) of a GeoJSON file: a file of one
    feature per line is read line by line, any other as a whole (:func:`_read_rings`)."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    try:
        parts = list(_feature_lines(Path(path)))
    except (ValueError, AttributeError, TypeError, UnicodeDecodeError):  # another layout: read whole
        parts = [_flat_rings(_read_rings(path), path)]
    except OSError as e:
        raise GigaslideError(f"unreadable GeoJSON ({e})", path=path, fix="re-run the job that wrote it") from None
    v = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 2))
    n = np.concatenate([np.diff(p[1]) for p in parts]) if parts else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    finite = np.isfinite(v).all(1)
    if not finite.all():  # a ring with a NaN / inf vertex was never drawn (its box and centre NaN): left out
        good = np.logical_and.reduceat(finite, starts[:-1]) if len(n) else np.zeros(0, bool)
        keep = np.repeat(good, n)
        v, n = v[keep], n[good]
        starts = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    return v, starts


def _read_geojson(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GigaslideError(f"unreadable GeoJSON ({e})", path=path, fix="re-run the job that wrote it") from None


def _read_rings(path: Path, holes: bool = False) -> list[np.ndarray]:
    """Outer rings [n, 2] (level-0 x, y) of the polygons of a GeoJSON file (``holes``: their holes' rings too); a third
    coordinate (GeoJSON allows an altitude) is dropped; a file of another shape is one line naming it."""
    def xy(ring) -> np.ndarray:  # noqa: ANN001
        a = np.asarray(ring, np.float64)
        if a.ndim != 2 or a.shape[1] < 2:
            raise ValueError(f"a ring of shape {a.shape}, not [n, 2]")
        return a[:, :2]

    gj = _read_geojson(path)
    try:
        return [xy(ring) for ring in _rings(gj, holes) if len(ring)]
    except (AttributeError, TypeError, ValueError, IndexError) as e:
        raise GigaslideError(f"not GeoJSON polygons ({type(e).__name__}: {str(e)[:120]})", path=path,
                             fix="re-run the job that wrote it (a FeatureCollection of Polygon features)") from None


def _rings(gj: dict, holes: bool = False):  # noqa: ANN202
    """Outer rings (``holes``: and holes) of every Polygon / MultiPolygon of a Feature, FeatureCollection or list."""
    feats = gj.get("features", []) if isinstance(gj, dict) else gj
    if isinstance(gj, dict) and gj.get("type") == "Feature":
        feats = [gj]
    for f in feats or []:
        g = (f or {}).get("geometry") or {}
        polys = [g.get("coordinates")] if g.get("type") == "Polygon" else (
            g.get("coordinates") or [] if g.get("type") == "MultiPolygon" else [])
        for poly in polys:
            if poly:
                yield from (poly if holes else poly[:1])


def to_png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
