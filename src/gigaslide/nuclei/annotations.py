"""Reading nuclei annotations into instance maps: Aperio / MoNuSeg XML polygons, QuPath GeoJSON,
label images (PNG / TIFF), HoVer-Net ``.npy`` and CoNSeP ``.mat``.

Every reader returns an :class:`Annotation`: an instance label map (int32, 0 = background) of the
image's size, an optional type per instance, and notes about what was repaired (polygons clipped at
the image border, dropped because degenerate or entirely outside, self-intersecting ones rasterised
with the even-odd rule). XML is parsed without external entities or entity expansion (defusedxml).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gigaslide.errors import GigaslideError
from gigaslide.safe_parse import parse_xml, positive_number

ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json", ".png", ".tif", ".tiff", ".npy", ".mat")
#: Most vertices a polygon ring may have: a nucleus outline has tens to hundreds (MoNuSeg: 277 at most). Rasterising
#: and checking a ring costs its box's pixels times its vertices (a ring of 100 000 vertices took 30 s, one of millions
#: hours), so a file with a longer ring is refused, naming it.
MAX_RING_VERTICES = 10_000
#: Largest coordinate (px) read as a position: past it (1e308 ...) arithmetic on the ring overflows.
MAX_COORDINATE = 1e9


@dataclass
class Annotation:
    inst: np.ndarray  # int32 [H, W]
    types: dict[int, int] | None = None  # instance id -> type (1..T)
    type_names: dict[int, str] | None = None
    mpp: float | None = None  # µm/px when the file says so (MoNuSeg XML: MicronsPerPixel)
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(len(np.unique(self.inst)) - (1 if (self.inst == 0).any() else 0))


def _parse_xml(path: Path):  # noqa: ANN202
    return parse_xml(path)  # the project's safe parser (defusedxml: no entities, no external references)


def _self_intersects(xy: np.ndarray) -> bool:
    """True when two non-adjacent edges of the closed polygon cross. Only edges whose x-ranges overlap are compared,
    a block of edges at a time: a ring of thousands of vertices (a detailed hand-drawn outline) took minutes and GB
    as an all-pairs table."""
    p = np.asarray(xy, np.float64)
    n = len(p)
    if n < 4:
        return False
    a, b = p, np.roll(p, -1, axis=0)
    lo_x, hi_x = np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 0], b[:, 0])
    lo_y, hi_y = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    order = np.argsort(lo_x, kind="stable")
    sorted_lo = lo_x[order]
    last = np.searchsorted(sorted_lo, hi_x[order], "right")  # edges order[s+1:last[s]] start within edge s's x-range

    def orient(p1, p2, p3):  # noqa: ANN001, ANN202
        return np.sign((p2[:, 0] - p1[:, 0]) * (p3[:, 1] - p1[:, 1]) - (p2[:, 1] - p1[:, 1]) * (p3[:, 0] - p1[:, 0]))

    block = max(1, (1 << 20) // n)
    for s0 in range(0, n, block):
        pos = np.arange(s0, min(n, s0 + block))
        counts = np.maximum(last[pos] - pos - 1, 0)
        if not counts.sum():
            continue
        si = np.repeat(pos, counts)
        sj = si + 1 + (np.arange(len(si)) - np.repeat(np.cumsum(counts) - counts, counts))
        i, j = order[si], order[sj]
        gap = np.abs(i - j)
        keep = (gap > 1) & (gap < n - 1) & (lo_y[i] <= hi_y[j]) & (lo_y[j] <= hi_y[i])
        i, j = i[keep], j[keep]
        if not len(i):
            continue
        A, B, C, D = a[i], b[i], a[j], b[j]
        if ((orient(A, B, C) * orient(A, B, D) < 0) & (orient(C, D, A) * orient(C, D, B) < 0)).any():
            return True
    return False


def _ring_pixels(xy: object, shape: tuple[int, int], notes: dict[str, int]) -> tuple[np.ndarray, np.ndarray] | str:
    """The pixels (rows, cols) inside one ring [K, 2] (x, y; even-odd rule), noting a clipped or self-intersecting
    ring; ``"dropped_degenerate"`` or ``"dropped_outside"`` instead where it covers no pixel."""
    from skimage.draw import polygon as draw_polygon

    h, w = shape
    xy = np.asarray(xy, np.float64)
    if xy.ndim != 2 or len(xy) < 3 or not np.isfinite(xy).all() or np.abs(xy).max() > MAX_COORDINATE:
        return "dropped_degenerate"
    if (xy[:, 0].max() < -0.5 or xy[:, 1].max() < -0.5 or xy[:, 0].min() > w - 0.5 or xy[:, 1].min() > h - 0.5):
        return "dropped_outside"
    if xy[:, 0].min() < 0 or xy[:, 1].min() < 0 or xy[:, 0].max() > w - 1 or xy[:, 1].max() > h - 1:
        notes["clipped"] += 1
    if _self_intersects(xy):
        notes["self_intersecting"] += 1  # rasterised with the even-odd rule
    rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=(h, w))
    return (rr, cc) if len(rr) else "dropped_degenerate"


def rasterise(polygons: list, shape: tuple[int, int], types: list[int] | None = None,
              path: str | os.PathLike | None = None) -> Annotation:
    """Instance map of ``polygons``, one nucleus each: a ring [K, 2] (x, y in px; pixel centres at integer
    coordinates), or a nucleus in pieces with holes, ``[[exterior, *holes], ...]`` (a QuPath MultiPolygon: one
    nucleus, its holes left out). Later nuclei overwrite earlier ones where they overlap; a nucleus left with no
    pixel is dropped."""
    h, w = shape
    _check_ring_sizes(polygons, path)
    inst = np.zeros((h, w), np.int32)
    notes = {"polygons": len(polygons), "dropped_degenerate": 0, "dropped_outside": 0, "clipped": 0,
             "self_intersecting": 0}
    kept_types: dict[int, int] = {}
    nid = 0
    for k, item in enumerate(polygons):
        pieces = item if isinstance(item, (list, tuple)) and len(item) and isinstance(item[0], (list, tuple)) \
            else [[item]]
        rows, cols = [], []  # the nucleus's pixels, piece by piece (work within a piece's box, not the whole image:
        reason = "dropped_degenerate"  # a mask of the image per polygon made 10 000 nuclei take minutes)
        for rings in pieces:
            px = _ring_pixels(rings[0], shape, notes) if len(rings) else "dropped_degenerate"
            if isinstance(px, str):
                reason = px
                continue
            rr, cc = px
            if len(rings) > 1:
                r0, c0 = int(rr.min()), int(cc.min())
                piece = np.zeros((int(rr.max()) - r0 + 1, int(cc.max()) - c0 + 1), bool)
                piece[rr - r0, cc - c0] = True
                for hole in rings[1:]:
                    hp = _ring_pixels(hole, shape, {"clipped": 0, "self_intersecting": 0})
                    if not isinstance(hp, str):
                        hr, hc = hp[0] - r0, hp[1] - c0
                        inside = (hr >= 0) & (hc >= 0) & (hr < piece.shape[0]) & (hc < piece.shape[1])
                        piece[hr[inside], hc[inside]] = False
                rr, cc = np.nonzero(piece)
                rr, cc = rr + r0, cc + c0
            rows.append(rr)
            cols.append(cc)
        if not sum(len(r) for r in rows):
            notes[reason] += 1
            continue
        nid += 1
        inst[np.concatenate(rows), np.concatenate(cols)] = nid
        if types is not None:
            kept_types[nid] = int(types[k])
    inst, remap = _compact(inst)
    t = {remap[k]: v for k, v in kept_types.items() if k in remap} if types is not None else None
    lost = nid - len(remap)
    if lost:
        notes["dropped_overlapped"] = lost
    return Annotation(inst, t, notes=notes)


def _ring_lengths(item: object) -> list[int]:
    """Vertex counts of the rings of one :func:`rasterise` item (a ring, or pieces of rings)."""
    if isinstance(item, np.ndarray) or not (isinstance(item, (list, tuple)) and len(item)
                                            and isinstance(item[0], (list, tuple))):
        return [len(item) if hasattr(item, "__len__") else 0]
    return [len(r) if hasattr(r, "__len__") else 0 for rings in item for r in rings]


def _check_ring_sizes(polygons: list, path: str | os.PathLike | None) -> None:
    """Refuse a polygon ring of more than :data:`MAX_RING_VERTICES` vertices, naming the file and the polygon."""
    for k, item in enumerate(polygons):
        n = max(_ring_lengths(item), default=0)
        if n > MAX_RING_VERTICES:
            raise GigaslideError(f"polygon {k + 1} has {n} vertices (more than {MAX_RING_VERTICES}: no nucleus outline "
                                 "has that many)", path=path,
                                 fix="simplify the outline, or leave region annotations out of the nuclei file")


def _compact(inst: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    ids = np.unique(inst)
    ids = ids[ids > 0]
    lut = np.zeros(int(inst.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[inst], {int(o): int(n) for o, n in zip(ids, lut[ids])}


def read_aperio_xml(path: str | os.PathLike, shape: tuple[int, int]) -> Annotation:
    path = Path(path)
    try:
        tree = _parse_xml(path)
        root = tree.getroot() if hasattr(tree, "getroot") else tree
    except GigaslideError as e:
        raise GigaslideError(f"cannot read annotation XML ({e.what})", path=path,
                             fix=e.fix or "give an Aperio / MoNuSeg XML file without DTD entities") from None
    except Exception as e:  # noqa: BLE001 - malformed or unsafe XML (entities) is a bad file for the user
        raise GigaslideError(f"cannot read annotation XML ({type(e).__name__}: {str(e)[:120]})", path=path,
                             fix="give an Aperio / MoNuSeg XML file without DTD entities") from None
    polys = []
    for region in root.iter("Region"):
        try:
            xy = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        except (TypeError, ValueError):
            xy = []
        # Aperio (ImageScope) vertices are corner coordinates, pixel i spanning [i, i+1) as in QuPath: on the MoNuSeg
        # images the nuclei' stain sits 0.5 px up-left of polygons read as pixel centres; rasterise takes centres
        polys.append(np.array(xy, np.float64).reshape(-1, 2) - 0.5)
    ann = rasterise(polys, shape, path=path)
    ann.mpp = positive_number(root.get("MicronsPerPixel"))  # nan, -0.25, 1e999: not stated
    return ann


def _malformed(path: Path, what: str) -> GigaslideError:
    return GigaslideError(f"not QuPath GeoJSON: {what}", path=path, fix="export the annotations from QuPath as GeoJSON")


def _geojson_features(obj: object, path: Path) -> list[dict]:
    """The Features of a GeoJSON object (a FeatureCollection, a Feature, or a list of them, as QuPath writes); a
    feature that is not an object, or whose ``geometry`` / ``properties`` is neither an object nor null, is refused
    naming the file (it was an AttributeError)."""
    feats: list = []
    todo = [obj]
    while todo:
        o = todo.pop()
        if isinstance(o, list):
            todo.extend(reversed(o))
        elif isinstance(o, dict) and o.get("type") == "FeatureCollection":
            fs = o.get("features", [])
            if not isinstance(fs, list):
                raise _malformed(path, f"'features' is a {type(fs).__name__}, not a list")
            feats.extend(fs)
        elif isinstance(o, dict) and o.get("type") == "Feature":
            feats.append(o)
    for k, f in enumerate(feats):
        if not isinstance(f, dict):
            raise _malformed(path, f"feature {k + 1} is a {type(f).__name__}, not an object")
        for key in ("geometry", "properties"):
            if not isinstance(f.get(key) or {}, dict):
                raise _malformed(path, f"feature {k + 1}'s {key} is a {type(f[key]).__name__}, not an object")
    return feats


#: QuPath object types that are nuclei when a file also has annotations: a file with any of them is an export of
#: detected (or hand-made) detections, and its ``annotation`` objects are the regions they were detected in.
DETECTION_TYPES = ("detection", "cell")


def _object_type(f: dict) -> str:
    return str((f.get("properties") or {}).get("objectType", "")).lower()


def _nuclei_features(feats: list[dict]) -> tuple[list[dict], int]:
    """(the features that are nuclei, how many region annotations were left out): in a QuPath export with detections
    or cells, its ``annotation`` objects are the regions they were found in (one was rasterised as a nucleus the size
    of the region, under the others); a file of annotations only (nuclei drawn by hand) is all nuclei."""
    if not any(_object_type(f) in DETECTION_TYPES for f in feats):
        return feats, 0
    kept = [f for f in feats if _object_type(f) != "annotation"]
    return kept, len(feats) - len(kept)


def _nucleus_geometry(f: dict) -> dict:
    """A feature's nucleus outline: a QuPath cell's ``nucleusGeometry`` (its ``geometry`` is the whole cell, the
    nucleus grown by a few µm), else its ``geometry``."""
    g = f.get("nucleusGeometry") if _object_type(f) == "cell" else None
    return g if isinstance(g, dict) else (f.get("geometry") or {})


def _geojson_obj(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than Python's stack
        raise GigaslideError(f"cannot read GeoJSON ({str(e)[:120]})", path=path,
                             fix="export the annotations from QuPath as GeoJSON") from None


def _class_name(f: dict) -> str | None:
    cls = (f.get("properties") or {}).get("classification") or {}
    name = cls.get("name") if isinstance(cls, dict) else None
    return None if name is None else str(name)


def class_names(paths: Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Nucleus class names (QuPath ``classification.name``) in the GeoJSON files among ``paths`` (other formats
    and unreadable files are skipped: reading them reports them), each with the first file that has it, sorted
    by name."""
    found: dict[str, Path] = {}
    for p in map(Path, paths):
        if p.suffix.lower() in (".geojson", ".json"):
            try:
                obj = _geojson_obj(p)
            except GigaslideError:
                continue
            try:
                feats = _nuclei_features(_geojson_features(obj, p))[0]
            except GigaslideError:
                continue
            for f in feats:
                name = _class_name(f)
                if name is not None:
                    found.setdefault(name, p)
    return dict(sorted(found.items()))


def type_codes(names: Iterable[str]) -> dict[str, int]:
    """``name -> type`` (1..T, names sorted): one map for every file of a data set, so a class has one code."""
    return {n: i + 1 for i, n in enumerate(sorted(set(names)))}


def unknown_class(name: str, path: str | os.PathLike, codes: dict[str, int]) -> GigaslideError:
    """The error for a GeoJSON class ``name`` in ``path`` that ``codes`` (class name -> type) does not know."""
    known = ", ".join(sorted(codes, key=codes.__getitem__)) or "none"
    return GigaslideError(f"unknown nucleus class '{name}' (known classes: {known})", path=path,
                          fix="name the nuclei with the known classes (a model scores only the classes it was "
                              "trained on), or train a model on annotations with this class")


def _position_array(ring: object) -> np.ndarray:
    """A GeoJSON ring as [K, 2] (x, y): a position's altitude (GeoJSON allows [x, y, z]) is left out; a ring that is
    not a list of positions (a flat list of numbers, ragged, text) is [0, 2], dropped as degenerate. Reshaping every
    ring to pairs read [x, y, z] positions as the wrong points."""
    try:
        a = np.asarray(ring, np.float64)
    except (TypeError, ValueError):
        return np.zeros((0, 2))
    return a[:, :2] if a.ndim == 2 and a.shape[1] >= 2 else np.zeros((0, 2))


def annotation_note(ann: Annotation) -> str | None:
    """What reading an annotation left out, for the user (None when nothing): polygons dropped as degenerate (under 3
    points or no area), outside the image, or covered by later ones. Repairs are usual and not mentioned (they stay in
    ``notes``): polygons clipped at the image border, self-intersecting ones filled by the even-odd rule (every
    MoNuSeg file has a few). A QuPath export's region annotations left out beside its detections are named too."""
    n = ann.notes
    said = [f"{n[k]} {what}" for k, what in (
        ("dropped_degenerate", "dropped as degenerate (under 3 points, no area or unreadable coordinates)"),
        ("dropped_outside", "dropped as outside the image"),
        ("dropped_overlapped", "dropped as covered by later polygons")) if n.get(k)]
    out = f"{', '.join(said)} of {n['polygons']} polygons" if said and "polygons" in n else None
    if n.get("regions_left_out"):  # a QuPath export's region annotations next to its detections / cells
        left = (f"{n['regions_left_out']} QuPath region annotation(s) left out (the file's detections / cells are "
                "its nuclei)")
        out = f"{out}; {left}" if out else left
    return out


def read_geojson(path: str | os.PathLike, shape: tuple[int, int], codes: dict[str, int] | None = None) -> Annotation:
    """QuPath GeoJSON polygons; a feature's ``classification.name`` becomes its type through ``codes`` (the data
    set's map, :func:`type_codes` of :func:`class_names` over all its files, or a model's stored names). A class
    missing from ``codes`` is refused naming the file and the class. Without ``codes`` (None or empty) the file's
    own names are numbered 1..T in sorted order (for one file on its own: another file may number a class
    differently).
    Features without a class are nuclei without a type."""
    path = Path(path)
    polys, names = [], []
    feats, regions = _nuclei_features(_geojson_features(_geojson_obj(path), path))
    for k, f in enumerate(feats):
        geom = _nucleus_geometry(f)
        name = _class_name(f)
        pieces = []  # one nucleus per feature: every piece of a MultiPolygon, holes (inner rings) left out
        coords = geom.get("coordinates")
        if geom.get("type") in ("Polygon", "MultiPolygon") and coords and not isinstance(coords, list):
            raise _malformed(path, f"feature {k + 1}'s coordinates are a {type(coords).__name__}, not a list")
        if geom.get("type") == "Polygon":
            pieces = [coords] if coords else []
        elif geom.get("type") == "MultiPolygon":
            pieces = [p for p in coords or [] if p]
        if not pieces:
            continue
        # pixel centres at integer coordinates; QuPath uses corner coordinates
        rings = [[_position_array(r) - 0.5 for r in (p if isinstance(p, list) else [p])] for p in pieces]
        polys.append(rings[0][0] if len(rings) == 1 and len(rings[0]) == 1 else rings)
        names.append(name)
    if any(n is not None for n in names):
        code = codes or type_codes(n for n in names if n is not None)
        unknown = sorted({n for n in names if n is not None and n not in code})
        if unknown:
            raise unknown_class(unknown[0], path, code)
        ann = rasterise(polys, shape, [code.get(n, 0) for n in names], path=path)
        ann.type_names = {v: k for k, v in code.items()}
        ann.types = {k: v for k, v in (ann.types or {}).items() if v > 0}
    else:
        ann = rasterise(polys, shape, path=path)
    if regions:
        ann.notes["regions_left_out"] = regions
    return ann


def _claimed_shape(path: Path, suffix: str) -> tuple[int, ...]:
    """The array shape a label file's header claims, read without decoding the pixels."""
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(str(path)) as t:
            return tuple(int(n) for n in t.series[0].shape)
    if suffix == ".npy":
        fmt = np.lib.format
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            return tuple(int(n) for n in header(f)[0])
    from PIL import Image

    with Image.open(path) as im:
        return int(im.size[1]), int(im.size[0])


def read_label_image(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> Annotation:
    """An instance label image (PNG / TIFF, or HoVer-Net's ``.npy``); with ``shape`` (its image's h, w) a file whose
    header claims another size is refused before its pixels are decoded (a TIFF header claiming 60 000 x 60 000 px
    allocated gigabytes for a file of a few hundred bytes)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        claimed = _claimed_shape(path, suffix) if shape is not None else None
    except Exception as e:  # noqa: BLE001 - an unreadable header is a bad file for the user
        raise GigaslideError(f"cannot read label image ({type(e).__name__}: {str(e)[:120]})", path=path,
                             fix="give an instance label image (one integer id per nucleus, 0 = background)") from None
    if claimed is not None and tuple(shape) not in (claimed[:2], claimed[-2:]):
        raise GigaslideError(f"annotation is {'x'.join(map(str, claimed[::-1]))} px but its image is "
                             f"{shape[1]}x{shape[0]} px", path=path, fix="pair each image with its own annotation file")
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(str(path))
        elif suffix == ".npy":
            arr = np.load(str(path), allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        raise GigaslideError(f"cannot read label image ({type(e).__name__}: {str(e)[:120]})", path=path,
                             fix="give an instance label image (one integer id per nucleus, 0 = background)") from None
    types = None
    if arr.ndim == 3 and arr.shape[-1] >= 2 and suffix == ".npy":  # HoVer-Net layout: [..., inst, type] after RGB
        inst_c, type_c = (3, 4) if arr.shape[-1] >= 5 else (0, 1)
        tmap = arr[..., type_c].astype(np.int64)
        arr = arr[..., inst_c]
        types = _types_from_map(arr.astype(np.int64), tmap)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise GigaslideError(f"label image must be a 2-D integer array (got {arr.dtype} {arr.shape})", path=path,
                             fix="save instance ids (not an RGB overlay) as 16- or 32-bit PNG / TIFF")
    inst, remap = _compact(arr.astype(np.int64))
    t = {remap[k]: v for k, v in types.items() if k in remap and v > 0} if types else None
    return Annotation(inst.astype(np.int32), t, notes={"instances": len(remap)})


def _types_from_map(inst: np.ndarray, tmap: np.ndarray) -> dict[int, int]:
    """``id -> type``: the most common type (the lowest on ties; 0 where none is >= 0) of each instance's pixels,
    looked at within its bounding box (a pass over the whole image per instance took a minute for 10 000 nuclei)."""
    from scipy import ndimage as ndi

    out = {}
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if not len(ids):
        return out
    lab = np.searchsorted(ids, inst) + 1  # ids made consecutive (1..n) for find_objects; background -> 0
    lab[inst <= 0] = 0
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        vals = tmap[sl][lab[sl] == k]
        vals = vals[vals >= 0]
        out[int(ids[k - 1])] = int(np.bincount(vals).argmax()) if vals.size else 0
    return out


def read_mat(path: str | os.PathLike) -> Annotation:
    from scipy.io import loadmat

    try:
        d = loadmat(str(path))
    except Exception as e:  # noqa: BLE001
        raise GigaslideError(f"cannot read .mat ({str(e)[:120]})", path=path, fix="give a CoNSeP-style .mat with inst_map") from None
    if "inst_map" not in d:
        raise GigaslideError("no inst_map in .mat", path=path, fix="give a CoNSeP-style .mat (inst_map, optional type_map)")
    inst = d["inst_map"].astype(np.int64)
    types = _types_from_map(inst, d["type_map"].astype(np.int64)) if "type_map" in d else None
    inst2, remap = _compact(inst)
    t = {remap[k]: v for k, v in types.items() if k in remap and v > 0} if types else None
    return Annotation(inst2.astype(np.int32), t)


def read_annotation(path: str | os.PathLike, shape: tuple[int, int], codes: dict[str, int] | None = None) -> Annotation:
    """Read any supported annotation file for an image of ``shape`` (h, w); ``codes`` (class name -> type) numbers
    GeoJSON classes (:func:`read_geojson`); the other formats carry numeric types already."""
    p = Path(path)
    s = p.suffix.lower()
    if s == ".xml":
        ann = read_aperio_xml(p, shape)
    elif s in (".geojson", ".json"):
        ann = read_geojson(p, shape, codes)
    elif s == ".mat":
        ann = read_mat(p)
    elif s in (".png", ".tif", ".tiff", ".npy"):
        ann = read_label_image(p, shape)
    else:
        raise GigaslideError(f"unknown annotation format '{s}'", path=p, fix=f"use one of {', '.join(ANNOTATION_SUFFIXES)}")
    if ann.inst.shape != tuple(shape):
        raise GigaslideError(f"annotation is {ann.inst.shape[1]}x{ann.inst.shape[0]} px but its image is "
                             f"{shape[1]}x{shape[0]} px", path=p, fix="pair each image with its own annotation file")
    return ann


__all__ = ["ANNOTATION_SUFFIXES", "Annotation", "annotation_note", "class_names", "rasterise", "read_annotation",
           "read_aperio_xml", "read_geojson", "read_label_image", "read_mat", "type_codes",
           "unknown_class"]
