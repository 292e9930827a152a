"""Reading nuclei annotations (nuclei/annotations.py): QuPath GeoJSON nuclei in pieces and with holes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gigaslide.nuclei.annotations import read_geojson


def _square(x: float, y: float, s: float) -> list[list[float]]:
    return [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]


def _write(path: Path, geoms: list[dict]) -> Path:
    feats = [{"type": "Feature", "geometry": g, "properties": {"objectType": "detection"}} for g in geoms]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_a_multipolygon_is_one_nucleus_and_holes_are_left_out(tmp_path: Path) -> None:
    """QuPath's MultiPolygon is one object: one nucleus of all its pieces (each piece was a nucleus of its own); an
    inner ring is a hole (was filled)."""
    p = _write(tmp_path / "a.geojson", [
        {"type": "MultiPolygon", "coordinates": [[_square(2, 2, 6)], [_square(12, 2, 4)]]},
        {"type": "Polygon", "coordinates": [_square(2, 12, 8), _square(4, 14, 4)]},
        {"type": "Polygon", "coordinates": [_square(14, 14, 3)]}])
    ann = read_geojson(p, (24, 24))
    assert ann.count == 3
    assert np.bincount(ann.inst.ravel())[1:].tolist() == [36 + 16, 64 - 16, 9]
    assert ann.inst[15, 5] == 0 and ann.inst[13, 3] == ann.inst[3, 3] + 1  # the hole, corner coordinates
    assert ann.inst[3, 13] == ann.inst[3, 3]  # both pieces


def test_slide_nuclei_exported_for_qupath_read_back_as_the_same_instances(tmp_path: Path) -> None:
    """gigaslide nuclei's GeoJSON (a nucleus in pieces with a hole) read back as annotations (e.g. after correcting
    it in QuPath): one instance with its pixels, the hole empty."""
    from gigaslide.nuclei.export import GeoJSONWriter, Nucleus, polygons_of

    m = np.zeros((30, 40), bool)
    m[3:20, 3:20] = True
    m[9:13, 9:13] = False
    m[5:12, 26:34] = True
    polys = [[r + 0.5 for r in rings] for rings in polygons_of(m)]  # pixel centres at i + 0.5, as the slide export
    with open(tmp_path / "n.geojson", "w") as f:
        w = GeoJSONWriter(f, "s")
        w.add(Nucleus(1, polys, (10.0, 10.0), 1.0, (3.0, 3.0, 34.0, 20.0)))
        w.close()
    ann = read_geojson(tmp_path / "n.geojson", m.shape)
    assert ann.count == 1
    back = ann.inst == 1
    assert (back & m).sum() / (back | m).sum() > 0.9 and not back[10:12, 10:12].any() and back[8, 30]
