"""Nuclei as QuPath reads them (nuclei/export.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gigaslide.nuclei.export import GeoJSONWriter, Nucleus, feature


def _nucleus(i: int, t: int | None, name: str | None) -> Nucleus:
    ring = np.array([[10.0, 10.0], [20.0, 10.0], [20.0, 20.0], [10.0, 20.0], [10.0, 10.0]]) + i
    return Nucleus(i, ring, (15.0 + i, 15.0 + i), 2.5, (10.0 + i, 10.0 + i, 20.0 + i, 20.0 + i), t, name, 0.9)


def test_classified_nuclei_carry_qupath_classification_name_and_rgb_color(tmp_path):
    """QuPath's GeoJSON: ``classification`` = {name, color [r, g, b]}; one colour per type, types told apart."""
    path = tmp_path / "n.geojson"
    with open(path, "w") as f:
        w = GeoJSONWriter(f, "s")
        for i, (t, name) in enumerate([(1, "tumor"), (2, "immune"), (1, "tumor"), (None, None)]):
            w.add(_nucleus(i, t, name))
        w.close()
    g = json.loads(path.read_text())
    assert g["type"] == "FeatureCollection" and len(g["features"]) == 4
    cls = [f["properties"].get("classification") for f in g["features"]]
    for c in cls[:3]:
        assert set(c) == {"name", "color"} and len(c["color"]) == 3
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])
    assert cls[0] == cls[2] and cls[0]["color"] != cls[1]["color"] and cls[3] is None
    f0 = g["features"][0]
    ring = f0["geometry"]["coordinates"][0]
    assert f0["properties"]["objectType"] == "detection" and ring[0] == ring[-1] and len(ring) >= 4
    assert f0["properties"]["measurements"] == {"area_um2": 2.5, "centroid_x_px": 15.0, "centroid_y_px": 15.0,
                                                "probability": 0.9}  # named with units: QuPath's own centroids are µm


def test_a_type_number_past_the_palette_still_gets_a_colour():
    c = feature(_nucleus(0, 23, "type23"), "s")["properties"]["classification"]
    assert c["name"] == "type23" and len(c["color"]) == 3


def test_tile_density_counts_only_the_tile_area_on_the_slide(tmp_path):
    """The grid's last row and column reach past the slide: nuclei per mm² of the part on the slide, not the whole
    tile (MoNuSeg 1000 px image, 443 px tiles: the corner tile is 7 % on the slide and read 14x too sparse)."""
    import h5py

    from gigaslide.nuclei.export import write_tiles_h5

    coords = np.array([[0, 0], [80, 0], [80, 80], [200, 200]], np.int64)
    tile0, mpp, dims = 100.0, 0.5, (150, 120)
    count = np.array([10, 7, 4, 0], np.int32)
    yy, xx = np.mgrid[0:400, 0:400]  # reference: level-0 pixels in the tile and on the slide, counted one by one
    px = np.array([((xx >= x) & (xx < x + tile0) & (yy >= y) & (yy < y + tile0) & (xx < dims[0]) & (yy < dims[1])).sum()
                   for x, y in coords])
    area = px * (mpp / 1000) ** 2
    want = np.where(px > 0, count / np.maximum(area, 1e-30), 0.0)
    write_tiles_h5(tmp_path / "t.h5", coords, tile0, mpp, {"count": count}, {"slide_id": "s"}, dimensions=dims)
    with h5py.File(tmp_path / "t.h5") as f:
        np.testing.assert_allclose(f["density_per_mm2"][:], want, rtol=1e-6)
        np.testing.assert_allclose(f["area_mm2"][:], area, rtol=1e-6)
        assert list(f.attrs["slide_dimensions"]) == [150, 120]
    write_tiles_h5(tmp_path / "u.h5", coords, tile0, mpp, {"count": count}, {})  # no dimensions: the whole tile
    with h5py.File(tmp_path / "u.h5") as f:
        np.testing.assert_allclose(f["density_per_mm2"][:], count / (tile0 * mpp / 1000) ** 2, rtol=1e-6)


@pytest.mark.realdata
def test_monuseg_outlines_exported_as_polygons_cover_their_nuclei(shared_data):
    """Every annotated nucleus of a real MoNuSeg image, outlined as the slide export outlines predictions (pixel
    centres at i + 0.5, QuPath's convention) and filled again, covers its own pixels: no shift, no lost nucleus."""
    from pathlib import Path

    from scipy import ndimage as ndi
    from skimage.draw import polygon as fill

    from gigaslide.nuclei.annotations import read_aperio_xml
    from gigaslide.nuclei.export import polygon_of

    root = Path(shared_data) / "nuclei" / "monuseg2018-test" / "annotations"
    inst = read_aperio_xml(root / "TCGA-2Z-A9J9-01A-01-TS1.xml", (1000, 1000)).inst
    ious = []
    for k, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is None:
            continue
        m = inst[sl] == k
        if ndi.label(m)[1] > 1:  # one outline per nucleus: pieces cut off by overlapping annotations left aside
            continue
        ring = polygon_of(m) + 0.5  # level-0 corner coordinates of the crop
        assert np.array_equal(ring[0], ring[-1]) and len(ring) >= 4
        back = np.zeros(m.shape, bool)
        rr, cc = fill(ring[:, 1] - 0.5, ring[:, 0] - 0.5, m.shape)
        back[rr, cc] = True
        ious.append((back & m).sum() / (back | m).sum())
    assert len(ious) > 400 and min(ious) > 0.9 and np.mean(ious) > 0.98


def _area(rings: list[np.ndarray]) -> float:
    """A polygon's area: its exterior's less its holes'."""
    from gigaslide.tiling.polygon import ring_area

    return abs(ring_area(rings[0])) - sum(abs(ring_area(r)) for r in rings[1:])


def test_every_piece_of_a_nucleus_and_its_holes_are_exported_as_qupath_reads_them():
    """A nucleus in two pieces, the larger with a hole: both pieces (a MultiPolygon, largest first) and the hole (an
    inner ring wound against the exterior); the old outline was the larger piece's exterior alone."""
    from gigaslide.nuclei.export import polygons_of
    from gigaslide.tiling.polygon import ring_area

    m = np.zeros((14, 24), bool)
    m[1:11, 1:11] = True  # 100 px, with a 2x2 hole: 96
    m[5:7, 5:7] = False
    m[3:7, 15:19] = True  # 16 px, apart
    polys = polygons_of(m)
    assert [len(p) for p in polys] == [2, 1]
    ext, hole = polys[0]
    assert np.sign(ring_area(ext)) != np.sign(ring_area(hole))
    assert np.all((hole >= 4) & (hole <= 7)) and np.all(polys[1][0][:, 0] >= 14)
    assert _area(polys[0]) == 88.0 and _area(polys[1]) == 12.5  # 96 and 16 px, traced between centres, simplified
    g = feature(Nucleus(1, polys, (6.0, 6.0), 7.0, (1.0, 1.0, 19.0, 11.0)), "s")["geometry"]
    assert g["type"] == "MultiPolygon" and [len(p) for p in g["coordinates"]] == [2, 1]
    assert all(r[0] == r[-1] for p in g["coordinates"] for r in p)
    one = feature(Nucleus(2, polygons_of(m[:, :12]), (6.0, 6.0), 6.0, (1.0, 1.0, 11.0, 11.0)), "s")["geometry"]
    assert one["type"] == "Polygon" and len(one["coordinates"]) == 2


def test_outlines_are_cut_to_the_slide():
    """A ring reaching past the slide's corner is cut to [0, w] x [0, h] (its part on the slide, exact); a ring wholly
    off the slide is dropped, a hole cut like its exterior."""
    from gigaslide.nuclei.export import clip_polygons

    sq = np.array([[-1.0, -1.0], [3.0, -1.0], [3.0, 3.0], [-1.0, 3.0], [-1.0, -1.0]])
    off = sq + [20.0, 0.0]
    hole = np.array([[-0.5, 1.0], [-0.5, 2.0], [1.0, 2.0], [1.0, 1.0], [-0.5, 1.0]])
    out = clip_polygons([[sq, hole], [off]], 10, 10)
    assert len(out) == 1 and len(out[0]) == 2
    ext, h = out[0]
    assert ext.min() == 0 and ext.max() == 3 and ext[0].tolist() == ext[-1].tolist()
    assert h.min() == 0 and abs(_area(out[0]) - 8.0) < 1e-9  # 3 x 3 less the hole's 1 x 1 on the slide
    assert clip_polygons([[sq + 2.0]], 10, 10)[0][0].tolist() == (sq + 2.0).tolist()  # inside: unchanged
