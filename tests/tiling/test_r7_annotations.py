"""Review round 7: hostile annotation files are refused in one line instead of a traceback or an empty tissue."""

from __future__ import annotations

import json
import re

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.tiling.annotations import read_polygons


def _polygon(ring: list) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}


@pytest.mark.parametrize("bad, shown", [(float("nan"), "nan"), (1e308, "1e+308"), (-1e20, "-1e+20")])
def test_coordinates_that_are_not_pixel_positions_are_refused(tmp_path, bad, shown):
    """NaN (Python's JSON reader takes it) and 1e20 rasterised to no tissue at all, with no word: the slide then had
    no tiles, or lost the polygon, for a reason nobody saw."""
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        _polygon([[0, 0], [100, 0], [100, 100]]), _polygon([[0, 0], [bad, 0], [100, 100]])]}))
    with pytest.raises(GigaslideError, match=re.escape(f"coordinate {shown}: not a level-0 pixel position")) as e:
        read_polygons(p)
    assert str(p) in str(e.value)


def test_a_document_nested_too_deeply_is_a_one_line_error(tmp_path):
    """A bare RecursionError traceback before."""
    p = tmp_path / "a.geojson"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(GigaslideError, match="not a readable GeoJSON file") as e:
        read_polygons(p)
    assert str(p) in str(e.value)


def test_large_but_finite_coordinates_and_a_third_value_still_read(tmp_path):
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps(_polygon([[0, 0, 7], [2e5, 0, 7], [2e5, 1e5, 7]])))
    (ring,), = read_polygons(p)
    assert ring.tolist() == [[0, 0], [2e5, 0], [2e5, 1e5]]
