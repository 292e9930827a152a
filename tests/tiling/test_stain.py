"""Background (bright-field / fluorescence) and stain (H&E / not) from the thumbnail; --background dark."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gigaslide.cli.main import main
from gigaslide.slides import open_slide
from gigaslide.slides.writer import write_pyramidal_tiff
from gigaslide.tiling import (StainWarning, TilingParams, detect_background, detect_stain, load_grid, segment_array,
                              segment_tissue, tile_slide)
from gigaslide.tiling.stain import FLUORESCENCE, H_AND_E, NON_HE

W, H = 1024, 768
BLOBS = ((300, 300, 180, 140), (720, 460, 200, 170))  # cx, cy, rx, ry (level-0 px)


def _blob_slide(path, fg, bg):  # noqa: ANN001, ANN202
    """Two elliptical tissue pieces coloured by ``fg(X, Y)`` on a uniform ``bg`` background."""

    def fn(x0, y0, w, h, ds):  # noqa: ANN001, ANN202
        X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
        inside = np.zeros((h, w), bool)
        for cx, cy, rx, ry in BLOBS:
            inside |= ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1
        out = np.where(inside[..., None], fg(X, Y), np.asarray(bg, np.float32))
        return out.clip(0, 255).astype(np.uint8)

    return write_pyramidal_tiff(path, W, H, fn, mpp=1.0, tile=256)  # 1 µm² px: each piece is far above the min area


def _spots(X, Y, a, b, cell=20.0):  # noqa: ANN001, ANN202
    n = ((X // cell).astype(np.int64) * 31 + (Y // cell).astype(np.int64) * 17) % 5 == 0
    return np.where(n[..., None], np.asarray(b, np.float32), np.asarray(a, np.float32))


def he(X, Y):  # noqa: ANN001, ANN201
    return _spots(X, Y, (200, 120, 170), (120, 60, 150))  # eosin stroma, hematoxylin nuclei


def ihc(X, Y):  # noqa: ANN001, ANN201
    return _spots(X, Y, (150, 160, 210), (160, 110, 60), cell=16)  # blue counterstain, brown DAB cells


def fluo(X, Y):  # noqa: ANN001, ANN201
    return _spots(X, Y, (30, 150, 60), (40, 60, 230))  # green autofluorescence, DAPI nuclei


def _expected_mask(shape, ds):  # noqa: ANN001, ANN202
    Y, X = (np.mgrid[: shape[0], : shape[1]] + 0.5) * ds
    m = np.zeros(shape, bool)
    for cx, cy, rx, ry in BLOBS:
        m |= ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1
    return m


def _iou(a, b):  # noqa: ANN001, ANN202
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("stains")
    return {"he": _blob_slide(d / "he.tiff", he, (245, 245, 245)), "ihc": _blob_slide(d / "ihc.tiff", ihc, (246, 246, 244)),
            "fluo": _blob_slide(d / "fluo.tiff", fluo, (6, 8, 10))}


def test_stain_and_background_detected(slides):
    got = {}
    for k, p in slides.items():
        with open_slide(p) as s:
            tm, thumb = segment_tissue(s)
        got[k] = tm.info
        assert _iou(tm.mask, _expected_mask(tm.mask.shape, tm.downsample)) > 0.9, k  # the tissue is found on each
    assert got["he"]["stain"] == H_AND_E and "stain_warning" not in got["he"] and got["he"]["background"] == "bright"
    assert got["ihc"]["stain"] == NON_HE and "IHC" in got["ihc"]["stain_warning"] and "brown DAB" in got["ihc"]["stain_warning"]
    assert got["fluo"]["stain"] == FLUORESCENCE and got["fluo"]["background"] == "dark"
    assert "fluorescence" in got["fluo"]["stain_warning"]


def test_dark_background_needs_the_dark_detector():
    """On a fluorescence image the bright-field rule (saturation + glass) is not what finds tissue; the dark rule is."""
    rgb = np.full((120, 160, 3), 8, np.uint8)
    rgb[30:90, 40:120] = (90, 90, 95)  # grey autofluorescent tissue: bright but unsaturated
    bright = segment_array(rgb, min_area_px=4, background="bright")
    dark = segment_array(rgb, min_area_px=4, background="dark")
    truth = np.zeros(rgb.shape[:2], bool)
    truth[30:90, 40:120] = True
    assert _iou(dark, truth) > 0.95 and _iou(bright, truth) < 0.5
    assert detect_background(rgb) == "dark" and detect_background(255 - rgb) == "bright"


def test_a_fluorescence_slide_mostly_covered_by_tissue_is_dark(tmp_path):
    """Tissue over ~70 % of a fluorescence scan makes the median pixel tissue, not background: it was taken for
    bright-field, and the saturation rule then called the whole slide tissue (the black background's noise is
    saturated in HSV), so every background tile was kept. Its black background still tells."""

    def fn(x0, y0, w, h, ds):  # noqa: ANN001, ANN202
        X, Y = np.meshgrid(x0 + (np.arange(w) + 0.5) * ds, y0 + (np.arange(h) + 0.5) * ds)
        inside = ((X - W / 2) / (0.52 * W)) ** 2 + ((Y - H / 2) / (0.52 * H)) ** 2 <= 1
        noise = ((X.astype(np.int64) * 7 + Y.astype(np.int64) * 13) % 11)[..., None].astype(np.float32)
        return np.where(inside[..., None], fluo(X, Y), noise).clip(0, 255).astype(np.uint8)

    p = write_pyramidal_tiff(tmp_path / "big_fluo.tiff", W, H, fn, mpp=1.0, tile=256)
    with open_slide(p) as s:
        tm, thumb = segment_tissue(s)
    Y, X = (np.mgrid[: tm.mask.shape[0], : tm.mask.shape[1]] + 0.5) * tm.downsample
    truth = ((X - W / 2) / (0.52 * W)) ** 2 + ((Y - H / 2) / (0.52 * H)) ** 2 <= 1
    assert 0.6 < truth.mean() < 0.85 and detect_background(thumb) == "dark" and tm.info["background"] == "dark"
    assert _iou(tm.mask, truth) > 0.95 and tm.fraction < 0.85
    rng = np.random.default_rng(0)  # bright-field tissue to every edge (no glass, nothing black) stays bright-field
    assert detect_background((he(*np.meshgrid(np.arange(200.0), np.arange(150.0))) + rng.normal(0, 20, (150, 200, 3)))
                             .clip(0, 255).astype(np.uint8)) == "bright"


def test_min_tissue_on_dark_background(slides, tmp_path):
    """--background dark: tiles only on the tissue pieces, with tissue fractions of the dark-rule mask."""
    with pytest.warns(StainWarning, match="fluorescence"):
        g = tile_slide(slides["fluo"], tmp_path, TilingParams(mpp=1.0, tile_size=64, min_tissue=0.9, background="dark"))
        g0 = tile_slide(slides["fluo"], tmp_path / "all", TilingParams(mpp=1.0, tile_size=64, min_tissue=0.0, background="dark"))
    assert 0 < len(g) < len(g0) / 2 and (g.tissue >= 0.9).all()
    with open_slide(slides["fluo"]) as s:
        means = [s.read_region(tuple(c), (64, 64), 1.0).max(axis=-1).mean() for c in g.coords]
    assert min(means) > 100  # every kept tile is bright signal, none is the black background
    assert g.extra["background"] == "dark" and g.extra["background_option"] == "dark"


def test_warned_once_per_slide_and_recorded(slides, tmp_path):
    with pytest.warns(StainWarning) as rec:
        g = tile_slide(slides["ihc"], tmp_path, TilingParams(mpp=1.0, tile_size=64))
    assert len([w for w in rec if issubclass(w.category, StainWarning)]) == 1 and "ihc:" in str(rec[0].message)
    back = load_grid(tmp_path / "patches" / "ihc.h5")  # recorded in the patches h5 attrs, and so in TileGrid.extra
    assert back.extra["stain"] == NON_HE == g.extra["stain"] and back.extra["stain_warning"] == g.extra["stain_warning"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", StainWarning)
        tile_slide(slides["he"], tmp_path, TilingParams(mpp=1.0, tile_size=64))  # H&E: no warning


def test_cli_warns_one_line_and_takes_background(slides, tmp_path, capsys):
    assert main(["tile", str(slides["ihc"]), str(slides["he"]), "--out", str(tmp_path / "o"), "--mpp", "1.0",
                 "--tile-size", "64"]) == 0
    err = capsys.readouterr().err
    warn = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "ihc:" in warn[0] and "not H&E" in warn[0]
    assert main(["tile", str(slides["fluo"]), "--out", str(tmp_path / "f"), "--mpp", "1.0", "--tile-size", "64",
                 "--background", "dark", "--min-tissue", "0.9"]) == 0
    assert load_grid(tmp_path / "f" / "patches" / "fluo.h5").extra["background"] == "dark"
    assert main(["encode", str(slides["fluo"]), "--out", str(tmp_path / "e"), "--encoder", "test_resnet", "--weights",
                 "random", "--mpp", "2.0", "--tile-size", "32", "--workers", "0", "--background", "dark"]) == 0
    g = load_grid(tmp_path / "e" / "patches" / "fluo.h5")  # encode passes --background down to the tiling
    assert g.extra["background_option"] == "dark" and g.extra["stain"] == FLUORESCENCE
    assert "fluorescence" in capsys.readouterr().err


def test_detect_stain_needs_enough_stained_pixels():
    rgb = np.full((50, 50, 3), 245, np.uint8)
    rgb[:5, :5] = (150, 160, 210)
    assert detect_stain(rgb).stain == "unknown" and detect_stain(rgb).warning is None


@pytest.mark.realdata
def test_real_slides_stain(real_slides):
    want = {"cmu-1-small-region.svs": H_AND_E, "tcga-cr-7395-01a-01-ts1.svs": H_AND_E, "kidney-48-5.tif": NON_HE}
    for name, stain in want.items():
        with open_slide(real_slides / name, mpp=0.5) as s:
            info = detect_stain(s.thumbnail(1024)[0])
        assert info.background == "bright" and info.stain == stain, (name, info)


def test_a_slide_tiled_in_a_worker_process_is_warned_about_once_here(slides, tmp_path):
    from gigaslide.tiling.parallel import tile_many

    with pytest.warns(StainWarning) as rec:
        got = {p.stem: (g, err) for p, g, err in tile_many([slides["ihc"], slides["he"]], str, tmp_path,
                                                           TilingParams(mpp=1.0, tile_size=64), workers=2)}
    stain = [str(w.message) for w in rec if issubclass(w.category, StainWarning)]
    assert len(stain) == 1 and "ihc:" in stain[0]
    assert got["ihc"][0].extra["stain"] == NON_HE and got["he"][0].extra["stain"] == H_AND_E


def test_the_fluorescence_warning_names_the_option_that_forces_a_mis_detected_slide() -> None:
    """The warning said "(--background dark)" -- what detection had already chosen -- instead of how to force a
    bright-field slide taken for fluorescence; every command that prints it takes --background (tests/cli)."""
    from gigaslide.tiling.stain import FLUORESCENCE, StainInfo

    msg = StainInfo("dark", FLUORESCENCE).warning or ""
    assert "pass --background bright" in msg and "--background dark" not in msg


def test_a_slide_forced_bright_is_not_called_fluorescence(slides, tmp_path):
    """A dark slide forced ``--background bright`` (a bright-field slide mis-detected as fluorescence, as the
    warning suggests) was still recorded as fluorescence and warned about: the stain guess ignored the option."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        g = tile_slide(slides["fluo"], tmp_path, TilingParams(mpp=1.0, tile_size=64, min_tissue=0.0,
                                                              background="bright"))
    assert g.extra["background"] == "bright" and g.extra["stain"] != FLUORESCENCE
    assert not any("fluorescence" in str(w.message) for w in seen)
