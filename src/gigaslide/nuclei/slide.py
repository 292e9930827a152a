"""``gigaslide nuclei``: whole-slide nuclei segmentation, tissue-only, tile by tile, resumable.

The slide is cut into *regions* of ``region`` px at the model's mpp (a tile grid anchored at (0, 0),
kept where there is tissue); each is read with ``margin`` px of context on every side, segmented, and
keeps exactly the nuclei whose centroid falls in its own grid cell — so a nucleus crossing a region
border is kept once, by the region owning its centroid, and is complete (the margin is wider than a
nucleus; a margin under :data:`MIN_MARGIN` px or a region under 1 px is refused). Where the slide is not at the
model's mpp, two regions resample a nucleus on their border with other pixel phases and place its centroid up to
a pixel apart, on either side of the border; a nucleus within :data:`BORDER_PX` of a border is therefore kept by the
first region that finds it there and skipped by a later one that finds it again (:class:`_Owner`). Memory is one
region at a time whatever the slide's size. The post-processing looks :data:`~gigaslide.nuclei.postprocess.CONTEXT_PX`
px past a nucleus, so with a margin that wide plus a nucleus (the default 64 px) the nuclei of a region are the whole
slide's, apart from the network's own context at its window borders (a 1000 px MoNuSeg image in 256 px regions or as one
region: 737 of 740 nuclei the same, SQ 0.99; 27 + 34 differed while the post-processing scaled over each region).
Processes started on one ``OUT`` share its slides (a lock per slide, :data:`LOCKS_DIR`). On a dark-background
(fluorescence) slide the context outside the slide is read black, as ``encode`` reads it (white glass on bright-field
slides); the record says which (``edge_fill``), and a dark slide segmented before (no record of it) is segmented
again. ``background`` (``--background``) forces the background instead of detecting it (``auto``), as
``tile --background`` does; a slide segmented with another value (the record's ``background_option``; none: ``auto``)
is segmented again. Outputs per slide, under ``OUT/nuclei/`` (each
written to a temporary file and renamed; ``<slide>.json`` last, marking the slide done):

* ``<slide>.geojson`` — QuPath detections (a nucleus in pieces is a MultiPolygon, holes are inner rings, cut to the
  slide; measurements: ``area_um2`` and ``centroid_x_px``/``centroid_y_px`` of its pixels, probability; type as
  classification), level-0 px;
* ``<slide>.csv`` — one row per nucleus: id, centroid x/y (level-0 px), area µm², bbox, type, probability;
* ``<slide>_tiles.h5`` — per-tile nucleus count, density (per mm²), mean area (and per-type counts) on the
  coordinates of ``OUT/features/<slide>.h5`` when it exists (the same order, so MIL can join them), otherwise
  on a grid of ``tile_size`` px at ``tile_mpp``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import atomic, runs
from gigaslide.devices import PrecisionChoice, choose_precision, pick_device
from gigaslide.errors import GigaslideError
from gigaslide.features.manifest import Manifest
from gigaslide.files import shown_name
from gigaslide.locks import ItemLock
from gigaslide.nuclei.export import (TABLE_COLUMNS, GeoJSONWriter, Nucleus, clip_polygons, polygons_of, table_row,
                                     tile_counts, write_tiles_h5)
from gigaslide.nuclei.infer import MODEL_WEIGHTS, fixed_window, load_model, model_dir, segment
from gigaslide.nuclei.postprocess import PostParams
from gigaslide.provenance import provenance
from gigaslide.slides import open_slide, slide_id_from_path
from gigaslide.slides.ids import not_text_path_error
from gigaslide.slides.slide import fill_value
from gigaslide.tiling import IDENTITY_KEY, Scan, StainWarning, grid_positions, make_grid, segment_tissue
from gigaslide.tiling.tissue import check_background, slide_background, thumbnail_info

#: The outputs' format: a record of another one is segmented again. 2: a nucleus in pieces is every piece (a
#: MultiPolygon; was its largest) with its holes, outlines are cut to the slide (were up to a pixel past its edge on a
#: resampled slide); /1 records also include ones made before border nuclei were kept once and before windows past a
#: region's edge were padded with the slide's fill, which the record's key does not tell apart.
SLIDE_FORMAT = "gigaslide.nuclei-slide/2"
#: Least context (px at the model's mpp) read around a region: a nucleus reaching further than the margin past its
#: region's border is cut at the edge of what was read (and its cut-off part, whose centroid lies in the neighbouring
#: region, can be kept there a second time). 16 px is 4 µm at 0.25 µm/px; the default 64 px fits nuclei up to about
#: 30 µm across at 0.25 µm/px.
MIN_MARGIN = 16
#: Model px around a region border within which two regions' centroids of one nucleus are taken as the same nucleus
#: (resampling phases and window contexts move a centroid by about a pixel; distinct nuclei lie further apart).
BORDER_PX = 3.0
#: Per-slide locks (``OUT/nuclei/locks/<slide>.lock``): two processes on one ``--out`` share its slides, each
#: segmenting the ones it locks; a slide another live process holds is waited for (its lock polled every
#: :data:`LOCK_POLL_S` s) and then skipped as done, or taken over when that process died.
LOCKS_DIR = "locks"
LOCK_POLL_S = 2.0


class _Owner:
    """Which region keeps a nucleus: the one whose grid cell holds its centroid, except near a border. A centroid
    within ``tol`` (level-0 px) of its cell's border, or outside the cell by at most ``tol``, is kept by the first
    region to see it unless a nucleus already kept there lies within ``tol`` of it; kept ones within ``2 tol`` of a
    border are remembered (so a region that saw the nucleus deeper inside still blocks the neighbour's copy)."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, tol: float):
        self.xs, self.ys, self.tol = np.asarray(xs, np.float64), np.asarray(ys, np.float64), float(tol)
        self.kept: dict[tuple[int, int], list[tuple[float, float]]] = {}

    def _cell(self, c: np.ndarray) -> tuple[int, int]:
        return int(np.floor(c[0] / self.tol)), int(np.floor(c[1] / self.tol))

    def _seen(self, c: np.ndarray) -> bool:
        kx, ky = self._cell(c)
        return any(np.hypot(c[0] - x, c[1] - y) <= self.tol for i in (-1, 0, 1) for j in (-1, 0, 1)
                   for x, y in self.kept.get((kx + i, ky + j), ()))

    def keeps(self, c: np.ndarray, kx: int, ky: int) -> bool:
        """Whether the region in grid cell (``kx``, ``ky``) keeps the nucleus of level-0 centroid ``c``."""
        out, edge = 0.0, np.inf  # how far outside the cell; distance to its nearest inner border
        for v, pos, k in ((c[0], self.xs, kx), (c[1], self.ys, ky)):
            lo = pos[k] if k > 0 else -np.inf  # the slide's own edges are no border between regions
            hi = pos[k + 1] if k + 1 < len(pos) else np.inf
            out = max(out, lo - v, v - hi)
            edge = min(edge, abs(v - lo), abs(hi - v))
        if out > self.tol:
            return False
        if out <= 0 and edge > 2 * self.tol:
            return True
        if self._seen(c):
            return False
        self.kept.setdefault(self._cell(c), []).append((float(c[0]), float(c[1])))
        return True


@dataclass
class SlideParams:
    region: int = 1024
    margin: int = 64
    tissue_only: bool = True
    min_tissue: float = 0.01
    tile_mpp: float = 0.5
    tile_size: int = 224
    window: int = 512  # network input (px at the model mpp) inside a region
    precision: str = "auto"  # auto: bf16 on CPU where it agrees with fp32 on the slide's first region (devices policy)
    background: str = "auto"  # auto (detected), bright (glass) or dark (fluorescence): tissue and outside the slide

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def check(self) -> None:
        """Refuse a region under 1 px, a margin under :data:`MIN_MARGIN` px or an unknown background, naming the
        option."""
        check_background(self.background)
        if self.region < 1:
            raise GigaslideError(f"--region {self.region} must be at least 1 px",
                                 fix="use e.g. --region 1024 (px at the model's mpp; memory is one region at a time)")
        if self.margin < MIN_MARGIN:
            raise GigaslideError(f"--margin {self.margin} is under {MIN_MARGIN} px: nuclei crossing a region border "
                                 "would be cut (and kept twice)",
                                 fix=f"use --margin {MIN_MARGIN} or more, wider than a nucleus (the default is 64)")


@dataclass
class NucleiResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    nuclei: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0


def outputs(out: str | os.PathLike, sid: str) -> dict[str, Path]:
    d = Path(out) / "nuclei"
    return {"geojson": d / f"{sid}.geojson", "table": d / f"{sid}.csv", "tiles": d / f"{sid}_tiles.h5",
            "record": d / f"{sid}.json"}


def _is_done(rec_path: Path, key: dict[str, Any], scan: Scan | None, slide: str | os.PathLike | None = None,
             slide_mpp: float | str | None = None, background: str = "auto") -> bool:
    """The slide's outputs are there, made with these settings from this scan (``scan``: the slide as it opens now;
    a corrected ``--slide-mpp`` or another file under the same name changes every level-0 coordinate and area), with
    the context outside the slide read as now: a record without ``edge_fill`` (made when it was read white glass on
    every slide) is done only where ``slide``'s background is not dark; one made at another ``background`` option
    (``background_option``; a record without it was made at ``auto``) is not done."""
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError):
        return False
    if scan is None or not scan.made(rec.get("slide_mpp"), rec.get("slide_dimensions"), rec.get(IDENTITY_KEY),
                                     written=rec_path.stat().st_mtime):  # (another file of the same size too)
        return False
    done = (rec.get("format") == SLIDE_FORMAT and rec.get("key") == key
            and rec.get("background_option", "auto") == background) and all(
        (rec_path.parent / f).is_file() for f in rec.get("files", []))
    if done and "edge_fill" not in rec and slide is not None:  # a slide that cannot be opened is segmented again
        return slide_background(slide, slide_mpp, background) == "bright"  # (which reports what is wrong with it)
    return done


def _look(slide, tissue, background: str = "auto") -> dict[str, Any]:  # noqa: ANN001
    """The slide's ``background`` (``bright`` or ``dark``: ``background`` when it is not ``auto``) and ``stain`` guess
    (with ``stain_warning`` when it is not H&E): tissue detection's, or found on a thumbnail without it."""
    return tissue.info if tissue is not None else thumbnail_info(slide, None, background)[2]


def _count_coords(out: Path, sid: str, slide, tissue, p: SlideParams) -> tuple[np.ndarray, float, str]:  # noqa: ANN001
    """Tile coordinates and side (level-0 px) for the per-tile counts: the feature store's (gigaslide's, CLAM's or
    TRIDENT's layout: a CLAM file has neither ``patch_size_level0`` nor ``tile_size`` and failed the whole run with a
    KeyError), else an own grid. A feature file made from another scan of the slide (its recorded level-0 mpp, size or
    file identity differ) is refused: its tiles are not this scan's."""
    f = out / "features" / f"{sid}.h5"
    if f.is_file():
        from gigaslide.features import store
        from gigaslide.tiling.store import level0_dimensions

        ff = store.load(f, arrays=False)
        a, ca = ff.attrs, ff.coords_attrs
        made_from = (a.get("slide_mpp", ca.get("level0_mpp")), level0_dimensions(ca), a.get(IDENTITY_KEY))
        if not Scan.of(slide).made(*made_from):
            raise GigaslideError(f"the feature file was made from another scan of {sid} (its level-0 mpp, size or "
                                 "file differ from this slide's): its tiles are not this slide's", path=f,
                                 fix="encode this slide again (gigaslide encode, same --out), or segment into an --out "
                                     "without its features")
        return np.asarray(ff.coords, np.int64).reshape(-1, 2), ff.require_tile_size_level0(), str(f)
    g = make_grid(slide, tissue, target_mpp=p.tile_mpp, tile_size=p.tile_size, min_tissue=0.0 if not p.tissue_only else 0.25)
    return g.coords, g.tile_size_level0, f"grid {p.tile_size} px at {p.tile_mpp} µm/px"


def _nuclei_of_region(inst: np.ndarray, types: dict[int, tuple[int, float]], npp: np.ndarray, loc: tuple[int, int],
                      f: float, mpp: float, owner: Callable[[np.ndarray], np.ndarray], type_names: dict[str, str],
                      dimensions: tuple[float, float] = (np.inf, np.inf)):  # noqa: ANN202
    """The nuclei of a region's instance map that ``owner`` keeps: outline (every piece and hole, level-0 px, cut to
    the slide of ``dimensions`` (w, h)), centroid and area of its pixels, bbox (on the slide), type, probability. A
    nucleus with nothing on the slide (found in the context read past its edge) is left out."""
    from scipy import ndimage as ndi

    objs = ndi.find_objects(inst)
    for k, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        m = inst[sl] == k
        ys, xs = np.nonzero(m)
        cx = loc[0] + (xs.mean() + sl[1].start + 0.5) * f
        cy = loc[1] + (ys.mean() + sl[0].start + 0.5) * f
        if not owner(np.array([cx, cy])):
            continue
        polys = clip_polygons([[np.stack([loc[0] + (r[:, 0] + sl[1].start + 0.5) * f,
                                          loc[1] + (r[:, 1] + sl[0].start + 0.5) * f], 1) for r in rings]
                                for rings in polygons_of(m)], *dimensions)
        if not polys:
            continue
        t, prob = types.get(k, (None, float(npp[sl][m].mean())))
        t = t or None  # type 0: the NC branch calls the whole nucleus background -- a nucleus without a class
        w, h = dimensions
        bbox = (max(loc[0] + sl[1].start * f, 0.0), max(loc[1] + sl[0].start * f, 0.0), min(loc[0] + sl[1].stop * f, w),
                min(loc[1] + sl[0].stop * f, h))
        yield (polys, (float(cx), float(cy)), float(m.sum()) * mpp * mpp, bbox, t,
               None if t is None else type_names.get(str(t), f"type{t}"), prob)


def probe_window(img: np.ndarray, window: int, background: str = "bright") -> np.ndarray:
    """The window of ``img`` (a corner, an edge's middle or the centre) with the most tissue: the darkest on a bright
    (glass) background, the brightest on a ``dark`` (fluorescence) one, where black is background."""
    w = max(32, min(window, img.shape[0], img.shape[1]) // 32 * 32)

    def starts(n: int) -> list[int]:
        return sorted({0, max(0, (n - w) // 2), max(0, n - w)})

    sign = -1.0 if background == "dark" else 1.0
    return min((img[y:y + w, x:x + w] for y in starts(img.shape[0]) for x in starts(img.shape[1])),
               key=lambda c: sign * float(c.mean()))


def choose_region_precision(model, img: np.ndarray, p: SlideParams,  # noqa: ANN001
                            background: str = "bright") -> PrecisionChoice:
    """``p.precision`` resolved on one region: under ``auto`` the NP and HV logits of the region's most stained window
    (:func:`probe_window`) in bf16 are compared with fp32 (:func:`gigaslide.devices.choose_precision`); background
    (glass, or black on a ``dark`` slide) says nothing about precision."""
    crop = probe_window(img, fixed_window(model) or p.window, background)
    dev = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(crop)).to(dev).permute(2, 0, 1)[None].float().div_(255.0)

    def probe() -> torch.Tensor:
        out = model(x)
        return torch.cat([out["np"].float().flatten(1), out["hv"].float().flatten(1)], 1)

    return choose_precision(dev, p.precision, probe=probe)


def segment_slide(path: str | os.PathLike, out: str | os.PathLike, model, p: SlideParams, *,  # noqa: ANN001, C901
                  slide_mpp=None,  # noqa: ANN001
                  progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    p.check()
    out = Path(out)
    spec = model.spec
    mpp = float(spec.mpp)
    with open_slide(path, mpp=slide_mpp) as s:
        try:
            s.check_target_mpp(mpp)  # a slide coarser than the model's mpp is refused, naming both
        except GigaslideError as e:  # the slide layer's fix (a coarser --mpp) is no option here: the model's mpp is
            fine = "finer than the scan" in e.what
            raise GigaslideError(e.what, path=e.path, fix=(
                f"this model segments at {mpp:g} µm/px: give slides scanned that fine, or train a nuclei model at "
                f"the scan's resolution (gigaslide nuclei-train --mpp {s.mpp:.2g}); correct a wrong scan resolution "
                "with --slide-mpp") if fine else e.fix) from None
        sid = s.id
        f = mpp / s.mpp  # level-0 px per model px
        W, H = s.dimensions
        tissue = segment_tissue(s, background=p.background)[0] if p.tissue_only else None
        look = _look(s, tissue, p.background)
        background = look["background"]  # dark: the context outside the slide is read black, as encode reads it
        if look.get("stain_warning"):  # as tile / encode warn: a model trained on H&E may not transfer
            warnings.warn(f"{sid}: {look['stain_warning']}", StainWarning, stacklevel=2)
        region = int(min(p.region, int(min(W, H) / f)))
        grid = make_grid(s, tissue, target_mpp=mpp, tile_size=region, min_tissue=p.min_tissue if p.tissue_only else 0.0)
        tile0 = grid.tile_size_level0
        xs_all, ys_all = grid_positions(W, tile0, tile0), grid_positions(H, tile0, tile0)
        owners = _Owner(xs_all, ys_all, BORDER_PX * f)
        # the count grid before any region is segmented: a --tile-size the slide cannot hold fails now, not at the end
        coords, ctile0, source = _count_coords(out, sid, s, tissue, p)
        files = outputs(out, sid)
        atomic.ensure_writable_dir(files["geojson"].parent)
        cents, areas, tys = [], [], []
        n_id = 0
        choice: PrecisionChoice | None = None
        t0 = time.perf_counter()
        with atomic.atomic_path(files["geojson"], suffix=".geojson") as gtmp, \
                atomic.atomic_path(files["table"], suffix=".csv") as ttmp:
            with open(gtmp, "w") as gf, open(ttmp, "w") as tf:
                gw = GeoJSONWriter(gf, sid)
                tf.write(",".join(TABLE_COLUMNS) + "\n")
                for r, (x0, y0) in enumerate(grid.coords):
                    kx, ky = int(np.searchsorted(xs_all, x0, "right") - 1), int(np.searchsorted(ys_all, y0, "right") - 1)

                    def owner(c: np.ndarray, kx: int = kx, ky: int = ky) -> bool:
                        return owners.keeps(c, kx, ky)

                    loc = (int(np.floor(x0 - p.margin * f)), int(np.floor(y0 - p.margin * f)))
                    size = region + 2 * p.margin
                    img = s.read_region(loc, (size, size), mpp, background=background)
                    if choice is None:
                        choice = choose_region_precision(model, img, p, background)
                    inst, types, npp = segment(model, img, precision=choice.resolved, pad_mode="constant", tile=p.window,
                                                 margin=32, fill=fill_value(background))
                    for poly, c, a, bbox, t, tname, prob in _nuclei_of_region(inst, types, npp, loc, f, mpp, owner,
                                                                              spec.type_names, (W, H)):
                        n_id += 1
                        nuc = Nucleus(n_id, poly, c, a, bbox, t, tname, prob)
                        gw.add(nuc)
                        tf.write(table_row(nuc))
                        cents.append(c)
                        areas.append(a)
                        tys.append(t or 0)
                    if progress:
                        progress(sid, r + 1, len(grid.coords))
                gw.close()
            c_arr = np.asarray(cents, np.float64).reshape(-1, 2)
            stats = tile_counts(coords, ctile0, c_arr, np.asarray(areas, np.float64), np.asarray(tys, np.int64),
                                spec.n_types)
            write_tiles_h5(files["tiles"], coords, ctile0, s.mpp, stats, provenance(
                "nuclei-tiles", slide_id=sid, coords_source=source, nuclei_mpp=mpp, encoder=spec.encoder_spec.name,
                nuclei_model=str(model_dir_of(model)), type_names=spec.type_names or None, background=background,
                edge_fill=background, nuclei_model_sha256=getattr(model, "weights_sha256", None) or None,
                postprocess=PostParams.from_dict(spec.postprocess).to_dict(),  # the counts' model and settings, so
                window=fixed_window(model) or p.window,  # a table of counts names what made it
                precision=choice.resolved if choice is not None else None), dimensions=(int(W), int(H)))
        megapixels = len(grid.coords) * region * region / 1e6
        rec = {"format": SLIDE_FORMAT, "key": _key(model, p), "slide": str(path), "slide_id": sid, "nuclei": n_id,
               "regions": len(grid.coords), "megapixels": megapixels, "seconds": round(time.perf_counter() - t0, 3),
               "mpp": mpp, "slide_mpp": float(s.mpp), "slide_dimensions": [int(W), int(H)],
               IDENTITY_KEY: Scan.of(s).identity,
               "background": background, "edge_fill": background, "background_option": p.background,
               "stain": look.get("stain"),
               "files": [files[k].name for k in ("geojson", "table", "tiles")],
               "coords_source": source, "precision": (choice or PrecisionChoice(p.precision, "fp32" if p.precision == "auto" else p.precision)).record()}
        atomic.write_json(files["record"], rec)
    return rec


def model_dir_of(model) -> str:  # noqa: ANN001
    return getattr(model, "source", "")


def _key(model, p: SlideParams) -> dict[str, Any]:  # noqa: ANN001
    """The settings a record must match (the background option is compared on its own, see :func:`_is_done`: records
    made before it existed were made at ``auto``), with the post-processing's parameters as this version applies
    them: a record without them was made when the HV derivatives were scaled over each whole region (the nuclei
    depended on ``--region``), and is made again."""
    return {"model_sha256": getattr(model, "weights_sha256", ""),
            **{k: v for k, v in p.as_dict().items() if k != "background"},
            "postprocess": PostParams.from_dict(model.spec.postprocess).to_dict()}


def _distinct_ids(slides: Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """``slides`` with a file given twice (by another relative, absolute or symlinked path) kept once; two files of
    one slide id (``a/x.svs``, ``b/x.svs``) are refused, naming both: their outputs share ``OUT/nuclei/<id>.*`` (the
    second was skipped as done when it had the first's size, or overwrote the first's results)."""
    seen: dict[str, Path] = {}
    kept = []
    for pth in slides:
        sid, real = slide_id_from_path(Path(pth)), Path(pth).resolve()
        if sid in seen:
            if seen[sid] == real:
                continue
            raise GigaslideError(f"two slides have the id '{sid}': {seen[sid]} and {real}", path=pth,
                                 fix="rename one of them, or segment them into different --out folders")
        seen[sid] = real
        kept.append(pth)
    return kept


def segment_slides(slides: Sequence[str | os.PathLike], model_path: str | os.PathLike, out: str | os.PathLike,
                   params: SlideParams = SlideParams(), *, slide_mpp: float | str | None = None, device: str = "auto",
                   progress: Callable[[str, int, int], None] | None = None) -> NucleiResult:
    """Segment every slide into ``out/nuclei/``; finished slides are skipped, a broken one is reported. Bad
    ``params`` (:meth:`SlideParams.check`) are refused before anything is read or written. Each slide is segmented
    under its lock (:data:`LOCKS_DIR`), so processes started on one ``out`` share the slides; only a slide's own
    temporary files are cleared (once its lock is held: another process's may be in use)."""
    params.check()
    slides = _distinct_ids(slides)
    out = atomic.ensure_writable_dir(out)
    dev = pick_device(device)
    model = load_model(model_path, dev)
    model.source = str(model_dir(model_path))
    model.weights_sha256 = runs.file_sha256(model_dir(model_path) / MODEL_WEIGHTS)
    if fixed_window(model) and fixed_window(model) != params.window:  # a ViT runs on its training crop: the records
        params = replace(params, window=fixed_window(model))  # name the window used, not the one asked for
    manifest = Manifest(out / "nuclei" / "manifest.json", {"command": "nuclei", "model": model.source,
                                                           "model_sha256": model.weights_sha256, **params.as_dict()})
    res = NucleiResult()
    t = time.perf_counter()

    def done(pth: str | os.PathLike, sid: str) -> bool:
        return _is_done(outputs(out, sid)["record"], _key(model, params), Scan.read(pth, slide_mpp), pth, slide_mpp,
                        params.background)

    pending = list(slides)
    try:
        while pending:
            held = []  # slides another live process is segmenting: looked at again once this one's are done
            for pth in pending:
                sid = slide_id_from_path(Path(pth))
                bad = not_text_path_error(os.path.abspath(pth))
                if bad:  # its id and path cannot be written to the GeoJSON / table / record: fails alone, at once
                    sid = shown_name(sid)
                    res.failed[sid] = bad
                    manifest.set(sid, "failed", path=str(pth), error=bad)
                    continue
                if done(pth, sid):
                    res.skipped.append(sid)
                    continue
                lock = ItemLock(out / "nuclei" / LOCKS_DIR, sid)
                if not lock.acquire():
                    held.append(pth)
                    continue
                try:
                    if done(pth, sid):  # finished by another process between the look and the lock
                        res.skipped.append(sid)
                        continue
                    for f in outputs(out, sid).values():  # this slide's temporaries: a killed run's (the lock is
                        atomic.clean_stale_tmp_for(f)  # ours; other slides' may be another live process's)
                    try:
                        with torch.inference_mode():
                            rec = segment_slide(pth, out, model, params, slide_mpp=slide_mpp, progress=progress)
                    except GigaslideError as e:
                        res.failed[sid] = e.one_line()
                        manifest.set(sid, "failed", path=str(pth), error=e.one_line())
                        continue
                finally:
                    lock.release()
                manifest.set(sid, "done", path=str(pth), nuclei=rec["nuclei"], seconds=rec["seconds"])
                res.done.append(sid)
                res.nuclei += rec["nuclei"]
                res.megapixels += rec["megapixels"]
            if held:
                time.sleep(LOCK_POLL_S)
            pending = held
    finally:
        manifest.flush()
    res.seconds = time.perf_counter() - t
    return res


__all__ = ["MIN_MARGIN", "NucleiResult", "SlideParams", "outputs", "segment_slide", "segment_slides"]
