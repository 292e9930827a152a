"""Round 8: tissue detection thresholds, checked against an independent Otsu (scikit-image) and hand numbers."""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.filters import threshold_otsu

from gigaslide.slides import open_slide
from gigaslide.testing import make_slide
from gigaslide.tiling import segment_array
from gigaslide.tiling.tissue import DEFAULT_MIN_AREA_UM2, MIN_SATURATION, min_area_px

GLASS, TISSUE = (245, 245, 245), (150, 60, 140)  # saturation 0 and 153
PALE_30, PALE_44 = (200, 176, 190), (200, 165, 190)  # saturation 30 and 44: above the floor of 20


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1]


def test_pale_stain_below_otsu_is_not_tissue_when_otsu_splits_glass_from_tissue():
    """Bands of glass (1200 px), pale stain of saturation 30 (1200 px) and 44 (600 px), tissue (1800 px). Otsu
    (scikit-image) puts 0, 30 and 44 in its lower class; below its threshold exactly half the pixels are glass
    (under the floor), so Otsu is trusted (at least OTSU_MIN_BACKGROUND = 0.5) and the saturation-30 band, above
    the floor but below Otsu, is background. (A minimum of the two thresholds, or a strict "more than half", would
    fall back to the floor and call it tissue.)"""
    rgb = np.zeros((80, 60, 3), np.uint8)
    rgb[:20], rgb[20:40], rgb[40:50], rgb[50:] = GLASS, PALE_30, PALE_44, TISSUE
    sat = _saturation(rgb)
    otsu = threshold_otsu(sat)
    assert sorted(np.unique(sat).tolist()) == [0, 30, 44, 153] and 30 < otsu < 153  # the premise
    below = sat[sat < otsu]
    assert (below < MIN_SATURATION).mean() == 0.5
    m = segment_array(rgb, min_area_px=4)
    assert not m[:40].any()  # glass and the pale band under Otsu's threshold
    assert m[50:].all()  # tissue, to the image's edge


def test_bright_tinted_glass_is_glass_even_when_saturated_as_the_floor():
    """Glass tinted pink by the scanner's white balance (255, 235, 245): saturation 20, the floor, but every channel
    at least 235 (BACKGROUND_BRIGHTNESS). Half the image is tissue; Otsu's lower class is that glass, all at the
    floor, so the floor decides and only the brightness rule keeps the glass out."""
    rgb = np.zeros((60, 60, 3), np.uint8)
    rgb[:30], rgb[30:] = (255, 235, 245), TISSUE
    assert _saturation(rgb)[0, 0] == MIN_SATURATION  # the premise
    m = segment_array(rgb, min_area_px=4)
    assert not m[:30].any() and m[30:].all()


def test_minimum_area_is_an_area_in_square_microns(tmp_path):
    """At 0.5 µm/px and 32 level-0 px per thumbnail px a thumbnail px is 16 x 16 = 256 µm², so 20,000 µm² is
    78.125 -> 78 thumbnail px (not 20,000 / 16)."""
    with open_slide(make_slide(tmp_path / "s.tiff", (512, 384), mpp=0.5)) as s:
        assert DEFAULT_MIN_AREA_UM2 == 20_000
        assert min_area_px(s, 32.0) == 78
        assert min_area_px(s, 8.0, 1000.0) == 62  # 1000 / (8 * 0.5)² = 62.5


def test_a_thin_band_of_tissue_along_the_image_edge_is_not_eroded():
    """Tissue cut by the image's edge, 2 thumbnail px wide (64 level-0 px at the default 32 px per thumbnail px): the
    morphology continues the edge pixels beyond the border, so the band is kept whole (with the outside taken as
    glass, the 3 x 3 opening removed it: any piece under 3 px wide goes)."""
    rgb = np.full((40, 50, 3), GLASS, np.uint8)
    rgb[:2, 10:40] = TISSUE  # along the top edge
    rgb[10:30, -2:] = TISSUE  # along the right edge
    m = segment_array(rgb, min_area_px=4)
    truth = np.zeros((40, 50), bool)
    truth[:2, 10:40] = truth[10:30, -2:] = True
    np.testing.assert_array_equal(m, truth)
