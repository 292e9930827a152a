"""Per-slide QuPath GeoJSON: one square Polygon per tile (level-0 px) with its scores as measurements.

Each file is a ``FeatureCollection``; each tile a ``Feature`` with ``properties.objectType = "tile"``
(QuPath imports it as a tile object; drag the file onto the slide, or *File > Import objects*),
``properties.measurements`` = ``{name: number}`` (so *Measure > Show measurement maps* colours by
it) and ``properties.name`` = ``"tile <row>"``. Non-finite values are left out (JSON has no NaN).
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide import atomic
from gigaslide.errors import GigaslideError
from gigaslide.export.catalog import list_slides
from gigaslide.export.guard import clean_stale_tmp, exclusive, stops_on_signals
from gigaslide.export.runs import TileScorer, load_runs
from gigaslide.export.tables import encoded_slides, nothing_to_export, run_columns, tissue_fraction
from gigaslide.mil.heatmap import tile_size_of
from gigaslide.provenance import provenance


def tile_size_level0(ff: Any) -> float:
    return float(tile_size_of(ff))


def _tile_features(coords: np.ndarray, size0: float, measurements: dict[str, np.ndarray],
                   object_type: str) -> Iterator[dict[str, Any]]:
    """The ``Feature`` of each tile, one at a time (the columns read into Python floats once, not per value)."""
    names = list(measurements)
    cols = [np.asarray(measurements[k], np.float64).tolist() for k in names]
    for i, (x, y) in enumerate(np.asarray(coords, np.float64).reshape(-1, 2).tolist()):
        x1, y1 = x + size0, y + size0
        yield {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": {"objectType": object_type, "name": f"tile {i}",
                           "measurements": {k: c[i] for k, c in zip(names, cols) if math.isfinite(c[i])}},
        }


def tiles_geojson(coords: np.ndarray, size0: float, measurements: dict[str, np.ndarray],
                  object_type: str = "tile") -> dict[str, Any]:
    """FeatureCollection of the tiles ``coords`` (top-left, level-0 px) of side ``size0`` level-0 px."""
    return {"type": "FeatureCollection", "features": list(_tile_features(coords, float(size0), measurements,
                                                                         object_type))}


def write_tiles_geojson(path: str | os.PathLike, coords: np.ndarray, size0: float,
                        measurements: dict[str, np.ndarray], object_type: str = "tile") -> None:
    """``json.dumps(tiles_geojson(...))`` written to ``path`` tile by tile, the same bytes (a test checks it): the whole
    collection held as Python objects and then as one string cost about 2 kB a tile (a slide of 10^6 tiles: GBs)."""
    with open(path, "w", encoding="ascii") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        part: list[str] = []
        for i, feature in enumerate(_tile_features(coords, float(size0), measurements, object_type)):
            part.append((", " if i else "") + json.dumps(feature))
            if len(part) == 4096:
                fh.write("".join(part))
                part.clear()
        fh.write("".join(part) + "]}")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the file system cannot hold (too long: ``is_file`` raises then)."""
    try:
        return path.is_file()
    except OSError:
        return False


#: the export's record beside the GeoJSON files
PROVENANCE = "provenance.json"


def export_qupath(out_dirs: list[str | os.PathLike], out: str | os.PathLike, runs: list[str | os.PathLike] = (),
                  object_type: str = "tile", tile_probability: bool = True) -> tuple[list[Path], list[str]]:
    """Write ``out/<slide>.geojson`` for every encoded slide, and ``out/provenance.json`` (the features' encoder,
    weights, mpp and tile size, the runs whose columns it holds, each slide's source files: GeoJSON has no place for
    it that QuPath keeps); returns (files, problems)."""
    if object_type not in ("tile", "detection", "annotation"):
        raise GigaslideError(f"object type '{object_type}' is not one QuPath imports here",
                             fix="use --object-type tile (or detection)")
    entries, problems = list_slides(list(out_dirs))  # each entry is completed when its slide is exported
    run_list = load_runs(list(runs))
    scorer = TileScorer()
    out_d = atomic.ensure_writable_dir(out)
    written, made, slides_rec = [], None, {}
    with stops_on_signals() as stop, exclusive(out_d / ".qupath-export.lock", out_d) as held:
        if held:  # what a killed export left: temporary files as large as the slide's GeoJSON
            clean_stale_tmp(out_d, [f"{k}.geojson" for k in entries])
        for e, ff in encoded_slides(entries.values(), problems):
            cols, probs = run_columns(e, ff, run_list, scorer, tile_probability)
            problems += probs
            meas = {"tissue fraction": tissue_fraction(e, ff.coords), **cols}
            try:
                with atomic.atomic_path(out_d / f"{e.key}.geojson") as tmp:
                    write_tiles_geojson(tmp, ff.coords, tile_size_level0(ff), meas, object_type)
                    stop.check()  # a Ctrl-C swallowed inside a library's callback: this slide's file is not written
            except OSError as err:  # an id of ~240+ bytes (a peer's file name): the other slides are written
                if err.errno != errno.ENAMETOOLONG:
                    raise
                problems.append(f"{e.slide_id}: the name {e.key}.geojson (with its temporary file's prefix) is longer "
                                f"than {out_d} allows (255 bytes on most file systems) -- left out")
                continue
            written.append(out_d / f"{e.key}.geojson")
            made = ff if made is None else made
            slides_rec[e.key] = {"slide_path": e.slide_path, "features": e.features, "slide_mpp": e.slide_mpp,
                                 "n_tiles": len(ff)}
        if made is not None:
            atomic.write_json(out_d / PROVENANCE, provenance(
                "qupath_export", encoder=made.encoder, encoder_weights_sha256=made.attrs.get("encoder_weights_sha256"),
                mpp=made.mpp, tile_size=made.attrs.get("tile_size"), sources=[str(d) for d in out_dirs],
                runs={r.name: {"path": str(r.path), "kind": r.kind, "model": r.model} for r in run_list},
                object_type=object_type, coordinates="polygon vertices in level-0 px", slides=slides_rec,
                problems=problems))
    done = {p.name for p in written}
    for key in entries:  # left out now, its file from an earlier export would pass for this one's
        stale = out_d / f"{key}.geojson"
        if stale.name not in done and _is_file(stale):
            problems.append(f"{stale}: from an earlier export, not rewritten ({key} was left out now) -- delete it, "
                            "or re-run once the slide is fixed")
    if not written:
        raise nothing_to_export(out_dirs, len(entries), problems)
    return written, problems
