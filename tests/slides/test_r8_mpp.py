"""Review round 8 (mutation testing): where a slide's resolution comes from, with values worked out by hand from the
TIFF tags' units (pixels per centimetre or per inch), and the limits that refuse a target or a scan."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from gigaslide.errors import GigaslideError
from gigaslide.slides import mpp_from_properties, open_slide


@pytest.mark.parametrize("unit,res,want", [
    ("centimeter", ("40000", "20000"), (0.25, 0.5)),  # 1e4 µm per cm / px per cm; y from its own tag
    ("3", ("40000", "40000"), (0.25, 0.25)),  # the TIFF code for centimetre, as some readers report it
    ("inch", ("101600", "50800"), (0.25, 0.5)),  # 25,400 µm per inch / px per inch
    ("2", ("50800", "50800"), (0.5, 0.5)),  # the TIFF code for inch
    ("centimeter", ("40000", None), (0.25, 0.25)),  # no y tag: square
])
def test_tiff_resolution_tags_in_their_units(unit, res, want):
    props = {"tiff.ResolutionUnit": unit, "tiff.XResolution": res[0]}
    if res[1]:
        props["tiff.YResolution"] = res[1]
    m = mpp_from_properties(props)
    assert m is not None and m.source == "tiff.Resolution"
    assert (m.x, m.y) == pytest.approx(want, rel=1e-12)


def test_the_plausible_range_is_0_05_to_20_um_per_px():
    """Outside 0.05-20 µm/px the metadata's value is set aside (no microscope scans there); the ends are kept."""
    for v, ok in [("0.049", False), ("0.05", True), ("20", True), ("20.5", False)]:
        m = mpp_from_properties({"openslide.mpp-x": v, "openslide.mpp-y": v})
        assert (m is not None) == ok, v
        if ok:
            assert m.x == float(v)
    m = mpp_from_properties({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "250000"})  # 0.04 µm/px
    assert m is None


def test_openslides_resolution_comes_first_and_its_y_is_its_own():
    m = mpp_from_properties({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2531", "aperio.MPP": "0.5",
                             "tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "10000"})
    assert (m.x, m.y, m.source) == (0.2527, 0.2531, "openslide.mpp")
    assert m.mean == pytest.approx(0.2529, rel=1e-12)  # the slide's mpp: the mean of across and down
    m = mpp_from_properties({"openslide.mpp-x": "0.25", "openslide.mpp-y": "nan"})
    assert (m.x, m.y) == (0.25, 0.25)  # an unusable y: square
    m = mpp_from_properties({"aperio.MPP": "0.4990", "tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "10000"})
    assert (m.x, m.y, m.source) == (0.499, 0.499, "aperio.MPP")


def _tiff(path, mx: float, my: float):  # noqa: ANN001, ANN202
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / mx, 1e4 / my), resolutionunit="CENTIMETER")
    return path


def test_pixels_up_to_1_percent_from_square_are_read_further_are_refused(tmp_path):
    """|x - y| over the mean: 0.25 x 0.2524 is 0.96 % (rounding in the metadata: read, at the mean 0.2512 µm/px);
    0.25 x 0.2527 is 1.07 % (refused, naming both)."""
    with open_slide(_tiff(tmp_path / "a.tiff", 0.25, 0.2524)) as s:
        s.check_target_mpp(0.5)
        assert s.mpp == pytest.approx(0.2512, rel=1e-6)
    with open_slide(_tiff(tmp_path / "b.tiff", 0.25, 0.2527)) as s:
        with pytest.raises(GigaslideError, match=r"not square \(0.25 x 0.2527 µm/px"):
            s.check_target_mpp(0.5)
