"""Tissue from annotations (``gigaslide tile --tissue-from``): GeoJSON forms, holes, classes, exact tiles, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.testing import make_slide
from gigaslide.tiling import TilingParams, load_grid, read_polygons, tile_slide
from gigaslide.tiling.annotations import rasterize


def square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry: dict, cls: str | None = None) -> dict:
    props = {} if cls is None else {"classification": {"name": cls}}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def write(path, doc) -> str:  # noqa: ANN001
    path.write_text(json.dumps(doc))
    return str(path)


def test_rasterize_marks_exactly_the_pixels_whose_centres_are_inside():
    # level-0 square [16, 48) x [8, 40) at 8 level-0 px per mask px: mask columns 2..5, rows 1..4
    m = rasterize([[np.array(square(16, 8, 48, 40), float)]], (8, 8), 8.0)
    want = np.zeros((8, 8), bool)
    want[1:5, 2:6] = True
    np.testing.assert_array_equal(m, want)


def test_a_hole_is_cut_out_and_overlapping_polygons_merge():
    outer = np.array(square(0, 0, 80, 80), float)
    hole = np.array(square(20, 20, 60, 60), float)
    other = np.array(square(40, 40, 100, 100), float)  # overlaps the hole: its part of the hole is tissue again
    m = rasterize([[outer, hole], [other]], (10, 10), 10.0)
    assert not m[3, 3] and not m[2, 2]  # inside the hole only
    assert m[0, 0] and m[7, 7] and m[5, 5] and m[9, 9]  # outline, overlap, second polygon
    assert m.sum() == (64 - 16) + 36 - 12  # outer minus hole, plus the second square, less what both cover


def test_every_geojson_form_qupath_writes_is_read(tmp_path):
    poly = {"type": "Polygon", "coordinates": [square(0, 0, 10, 10)]}
    multi = {"type": "MultiPolygon", "coordinates": [[square(0, 0, 10, 10)], [square(20, 0, 30, 10)]]}
    forms = {
        "collection": {"type": "FeatureCollection", "features": [feature(poly), feature(multi)]},
        "feature": feature(poly),
        "geometry": poly,
        "list": [feature(poly), feature({"type": "Point", "coordinates": [5, 5]})],  # QuPath < 0.3; points ignored
        "geometry_collection": feature({"type": "GeometryCollection", "geometries": [poly, multi]}),
    }
    counts = {k: len(read_polygons(write(tmp_path / f"{k}.geojson", d))) for k, d in forms.items()}
    assert counts == {"collection": 3, "feature": 1, "geometry": 1, "list": 1, "geometry_collection": 3}


def test_classes_keep_only_their_polygons_and_name_what_was_found(tmp_path):
    doc = {"type": "FeatureCollection", "features": [
        feature({"type": "Polygon", "coordinates": [square(0, 0, 10, 10)]}, "Tumor"),
        feature({"type": "Polygon", "coordinates": [square(50, 50, 60, 60)]}, "Stroma"),
        feature({"type": "Polygon", "coordinates": [square(80, 80, 90, 90)]})]}
    p = write(tmp_path / "a.geojson", doc)
    (tumour,) = read_polygons(p, ["Tumor"])
    assert tumour[0][0].tolist() == [0.0, 0.0]
    assert len(read_polygons(p)) == 3
    with pytest.raises(GigaslideError) as e:
        read_polygons(p, ["Necrosis"])
    assert "'Stroma'" in e.value.what and "'Tumor'" in e.value.what and "(none)" in e.value.what


@pytest.mark.parametrize("text, words", [("{not json", "not a readable GeoJSON"),
                                         (json.dumps({"type": "FeatureCollection", "features": []}), "no polygon"),
                                         (json.dumps(feature({"type": "Polygon", "coordinates": [[1, 2, 3]]})),
                                          "not [x, y] pairs")])
def test_bad_annotation_files_get_one_line_errors_naming_the_file(tmp_path, text, words):
    p = tmp_path / "bad.geojson"
    p.write_text(text)
    with pytest.raises(GigaslideError) as e:
        read_polygons(p)
    assert words in e.value.what and str(p) in str(e.value) and e.value.fix


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    """A glass-only slide (tissue detection finds nothing), 1024 x 768 px at 0.5 um/px."""
    d = tmp_path_factory.mktemp("annot")
    return make_slide(d / "glass.tiff", (1024, 768), mpp=0.5, blank=True)


def test_tiles_come_from_the_annotation_where_detection_finds_nothing(blank, tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    # two tiles' worth of 128-px tiles at 0.5 um/px = 128 level-0 px: [128, 384) x [256, 384) and a half-covered tile
    write(ann / "glass.geojson", feature({"type": "MultiPolygon", "coordinates": [
        [square(128, 256, 384, 384)], [square(640, 0, 704, 128)]]}))
    params = TilingParams(0.5, 128, 0, 0.4, tissue_from=str(ann))
    grid = tile_slide(blank, tmp_path / "out", params, overlays=True)
    assert sorted(map(tuple, grid.coords.tolist())) == [(128, 256), (256, 256), (640, 0)]
    np.testing.assert_allclose(np.sort(grid.tissue), [0.5, 1.0, 1.0], atol=0.02)
    assert grid.extra["tissue_source"] == "annotations"
    with pytest.raises(GigaslideError, match="no tissue tiles"):  # detection on the same glass slide
        tile_slide(blank, tmp_path / "detected", TilingParams(0.5, 128, 0, 0.5))
    stored = load_grid(tmp_path / "out" / "patches" / "glass.h5")
    assert stored.extra["tissue_annotations_sha256"] == grid.extra["tissue_annotations_sha256"]
    assert (tmp_path / "out" / "tissue" / "glass.geojson").is_file()


def test_an_edited_annotation_retiles_and_an_unchanged_one_is_reused(blank, tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    f = ann / "glass.geojson"
    write(f, feature({"type": "Polygon", "coordinates": [square(0, 0, 256, 128)]}))
    params = TilingParams(0.5, 128, 0, 0.5, tissue_from=str(ann))
    assert len(tile_slide(blank, tmp_path / "o", params)) == 2
    coords = tmp_path / "o" / "patches" / "glass.h5"
    before = coords.stat().st_mtime_ns
    assert len(tile_slide(blank, tmp_path / "o", params)) == 2 and coords.stat().st_mtime_ns == before  # reused
    write(f, feature({"type": "Polygon", "coordinates": [square(0, 0, 384, 128)]}))
    assert len(tile_slide(blank, tmp_path / "o", params)) == 3  # edited: tiled again
    # the grid made from annotations is not taken for a detected one, nor the other way round
    assert not TilingParams(0.5, 128, 0, 0.5).matches(load_grid(coords))
    assert not TilingParams(0.5, 128, 0, 0.5, tissue_from=str(ann), tissue_classes=("Tumor",)).matches(load_grid(coords))


def test_an_annotation_named_after_the_slide_file_is_found_and_the_slide_id_wins(blank, tmp_path):
    write(tmp_path / "glass.tiff.geojson", feature({"type": "Polygon", "coordinates": [square(0, 0, 128, 128)]}))
    params = TilingParams(0.5, 128, 0, 0.5, tissue_from=str(tmp_path))
    assert tile_slide(blank, tmp_path / "o", params).coords.tolist() == [[0, 0]]
    assert params.matches(load_grid(tmp_path / "o" / "patches" / "glass.h5"))
    write(tmp_path / "glass.geojson", feature({"type": "Polygon", "coordinates": [square(128, 0, 256, 128)]}))
    assert tile_slide(blank, tmp_path / "o", params).coords.tolist() == [[128, 0]]


def test_a_slide_without_its_annotation_file_is_named_with_the_fix(blank, tmp_path):
    with pytest.raises(GigaslideError) as e:
        tile_slide(blank, tmp_path / "o", TilingParams(0.5, 128, 0, 0.5, tissue_from=str(tmp_path)))
    assert "no tissue annotation for slide glass" in e.value.what and "glass.geojson" in e.value.fix


def test_annotations_outside_the_slide_say_so(blank, tmp_path):
    write(tmp_path / "glass.geojson", feature({"type": "Polygon", "coordinates": [square(5000, 5000, 6000, 6000)]}))
    with pytest.raises(GigaslideError, match="inside the tissue annotations"):
        tile_slide(blank, tmp_path / "o", TilingParams(0.5, 128, 0, 0.5, tissue_from=str(tmp_path)))


def test_detected_grids_from_before_the_option_still_match(tmp_path, synthetic_slide):
    grid = tile_slide(synthetic_slide, tmp_path / "d", TilingParams(0.5, 224, 0, 0.25))
    assert "tissue_source" not in grid.extra  # detected grids carry no tissue_source, as those written before it
    stored = load_grid(tmp_path / "d" / "patches" / f"{grid.slide_id}.h5")
    assert TilingParams(0.5, 224, 0, 0.25).matches(stored)
    assert not TilingParams(0.5, 224, 0, 0.25, tissue_from=str(tmp_path)).matches(stored)


def test_tissue_detect_keeps_only_the_detected_tissue_inside_the_annotations(tmp_path, synthetic_slide):
    detected = tile_slide(synthetic_slide, tmp_path / "det", TilingParams(0.5, 128, 0, 0.5))
    det = set(map(tuple, detected.coords.tolist()))
    ann = tmp_path / "ann"
    ann.mkdir()
    sid = detected.slide_id
    write(ann / f"{sid}.geojson", feature({"type": "Polygon", "coordinates": [square(0, 0, 1024, 1536)]}))  # left half
    outline = tile_slide(synthetic_slide, tmp_path / "ann_only", TilingParams(0.5, 128, 0, 0.5, tissue_from=str(ann)))
    inside = tile_slide(synthetic_slide, tmp_path / "ann_det",
                        TilingParams(0.5, 128, 0, 0.5, tissue_from=str(ann), tissue_detect=True))
    got = set(map(tuple, inside.coords.tolist()))
    # exactly the detected tiles of the left half: the outline's glass is dropped, nothing outside it is added
    assert got == {c for c in det if c[0] + 128 <= 1024} and got
    assert len(outline) == 8 * 12 > len(got)  # the outline alone: every tile of the half, glass included
    assert inside.extra["tissue_source"] == "annotations+detected"
    stored = load_grid(tmp_path / "ann_det" / "patches" / f"{sid}.h5")
    assert TilingParams(0.5, 128, 0, 0.5, tissue_from=str(ann), tissue_detect=True).matches(stored)
    assert not TilingParams(0.5, 128, 0, 0.5, tissue_from=str(ann)).matches(stored)  # switching it re-tiles
    assert not TilingParams(0.5, 128, 0, 0.5, tissue_from=str(ann), tissue_detect=True).matches(
        load_grid(tmp_path / "ann_only" / "patches" / f"{sid}.h5"))


def test_tissue_detect_on_glass_says_what_was_empty(blank, tmp_path):
    write(tmp_path / "glass.geojson", feature({"type": "Polygon", "coordinates": [square(0, 0, 512, 512)]}))
    with pytest.raises(GigaslideError, match="inside the detected tissue within the tissue annotations") as e:
        tile_slide(blank, tmp_path / "o", TilingParams(0.5, 128, 0, 0.5, tissue_from=str(tmp_path), tissue_detect=True))
    assert "--tissue-detect" in e.value.fix
