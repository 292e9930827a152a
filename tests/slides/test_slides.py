from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.slides import find_slides, load_mpp_table, mpp_from_properties, open_slide, slide_id_from_path
from gigaslide.testing import make_slide


def test_synthetic_slide_geometry_and_mpp(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        assert s.dimensions == (2048, 1536)
        assert s.level_count >= 2
        assert s.level_downsamples[1] == pytest.approx(2.0)
        assert s.mpp == pytest.approx(0.5, rel=1e-3)
        assert s.backend == "openslide"


def test_read_region_at_coarser_mpp_picks_level_and_resizes(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        ch = s.choose_level(1.0)
        assert ch.level == 1 and ch.scale == pytest.approx(1.0)
        ch = s.choose_level(1.5)
        assert ch.level == 1 and ch.scale == pytest.approx(1.5)
        tile = s.read_region((0, 0), (64, 48), 1.5)
        assert tile.shape == (48, 64, 3) and tile.dtype == np.uint8
        # the same area read at level 0 then downsampled agrees with the pyramid read
        full = s.read_region((800, 600), (100, 100), 0.5).astype(float)
        half = s.read_region((800, 600), (50, 50), 1.0).astype(float)
        pooled = full.reshape(50, 2, 50, 2, 3).mean(axis=(1, 3))
        assert np.abs(pooled - half).mean() < 12


def test_mpp_finer_than_scan_is_refused(synthetic_slide):
    with open_slide(synthetic_slide) as s:
        with pytest.raises(GigaslideError, match="finer than the scan"):
            s.check_target_mpp(0.25)
        s.check_target_mpp(0.47)  # within rounding tolerance


def test_a_target_finer_than_the_scan_names_the_scans_mpp_and_the_finest_that_works(synthetic_slide):
    """The fix names the scan's own mpp and the finest --mpp accepted (which itself passes; a hair finer fails); when
    the resolution came from --slide-mpp, the fix is correcting --slide-mpp, not the file's metadata."""
    with open_slide(synthetic_slide) as s:
        with pytest.raises(GigaslideError) as e:
            s.check_target_mpp(0.25)
        assert "from tiff.Resolution" in e.value.what or "from openslide.mpp" in e.value.what
        assert "use --mpp 0.5 (the scan's own resolution) or coarser" in e.value.fix
        assert "the finest accepted is --mpp 0.45;" in e.value.fix
        assert "give the true one with --slide-mpp" in e.value.fix and "correct --slide-mpp" not in e.value.fix
        s.check_target_mpp(0.45)
        with pytest.raises(GigaslideError):
            s.check_target_mpp(0.4499)
    with open_slide(synthetic_slide, mpp=0.2527) as s:
        with pytest.raises(GigaslideError) as e:
            s.check_target_mpp(0.2)
        assert "(0.2527 µm/px, from --slide-mpp;" in e.value.what
        fix = e.value.fix
        assert "use --mpp 0.253 (the scan's own resolution)" in fix and "finest accepted is --mpp 0.228" in fix
        assert "0.2527 µm/px (given with --slide-mpp) is not this slide's scan resolution, correct --slide-mpp" in fix
        s.check_target_mpp(0.228)


def test_a_target_on_a_slide_without_mpp_says_to_give_slide_mpp(tmp_path, monkeypatch):
    """No resolution in the file: the error names the target it was needed for and the fix is --slide-mpp (from the
    objective power when the metadata has one), not a coarser --mpp."""
    from gigaslide.slides.slide import Slide

    path = make_slide(tmp_path / "nompp.tiff", (512, 512), mpp=None, seed=0)
    with open_slide(path) as s:
        assert not s.has_mpp
        with pytest.raises(GigaslideError) as e:
            s.check_target_mpp(0.5)
        assert "no resolution (mpp)" in e.value.what and "needed to read it at 0.5 µm/px" in e.value.what
        assert "--slide-mpp" in e.value.fix and "--mpp 0" not in e.value.fix
        props = {**s.properties, "openslide.objective-power": "40"}
        monkeypatch.setattr(Slide, "properties", property(lambda self: props))
        with pytest.raises(GigaslideError) as e:
            s.check_target_mpp(0.5)
        assert "its metadata says 40x, usually ~0.25 µm/px" in e.value.fix and "--slide-mpp 0.25" in e.value.fix


@pytest.mark.realdata
def test_real_slides_target_mpp_errors_name_their_fix(real_slides):
    """cmu-1 (0.499 µm/px in the file) at --mpp 0.25: its own mpp and the finest accepted; tcga-cr-7395 (no mpp):
    --slide-mpp."""
    with open_slide(real_slides / "cmu-1-small-region.svs") as s:
        with pytest.raises(GigaslideError) as e:
            s.check_target_mpp(0.25)
        assert "use --mpp 0.499 (the scan's own resolution) or coarser; the finest accepted is --mpp 0.45" in \
            e.value.fix
        s.check_target_mpp(0.45)
    with open_slide(real_slides / "tcga-cr-7395-01a-01-ts1.svs") as s:
        with pytest.raises(GigaslideError) as e:
            s.check_target_mpp(0.5)
        assert "needed to read it at 0.5 µm/px" in e.value.what and "--slide-mpp" in e.value.fix


def test_a_scan_with_pixels_that_are_not_square_is_refused(tmp_path):
    """0.25 µm/px across, 0.5 down: a square box of level-0 px is a 1:2 rectangle of tissue, so a tile read at 2 µm/px
    showed a round 400 µm disc 212 px wide and 150 px high (not 200 x 200). Refused, naming both resolutions."""
    import tifffile

    from gigaslide.tiling import make_grid

    img = np.full((512, 1024, 3), 240, np.uint8)
    for name, (mx, my) in {"aniso": (0.25, 0.5), "near": (0.25, 0.2512)}.items():
        tifffile.imwrite(tmp_path / f"{name}.tiff", img, tile=(256, 256), photometric="rgb",
                         resolution=(1e4 / mx, 1e4 / my), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "aniso.tiff") as s:
        assert (s.mpp_info.x, s.mpp_info.y) == pytest.approx((0.25, 0.5))
        with pytest.raises(GigaslideError, match=r"not square \(0.25 x 0.5 µm/px"):
            s.check_target_mpp(1.0)
        with pytest.raises(GigaslideError, match="not square"):
            make_grid(s, None, target_mpp=1.0, tile_size=64)
    with open_slide(tmp_path / "near.tiff") as s:  # within 1 %: rounding in the metadata, tiled as before
        assert len(make_grid(s, None, target_mpp=1.0, tile_size=64)) > 0
    with open_slide(tmp_path / "aniso.tiff", mpp=0.25) as s:  # a resolution given by hand is square
        s.check_target_mpp(1.0)
    # a grid made before (here: recorded at the mean, 0.375 µm/px, as it was then) is not reused but refused
    from gigaslide.tiling import TilingParams, tile_slide

    params = TilingParams(mpp=1.0, tile_size=64, min_tissue=0.0)
    with open_slide(tmp_path / "aniso.tiff", mpp=0.375) as s:
        tile_slide(s, tmp_path / "out", params, overlays=False)
    with pytest.raises(GigaslideError, match="not square"):
        tile_slide(tmp_path / "aniso.tiff", tmp_path / "out", params, overlays=False)


def test_mpp_override_number_and_csv(tmp_path, synthetic_slide):
    with open_slide(synthetic_slide, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_info.source == "override"
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nsynth,0.3\n")
    with open_slide(synthetic_slide, mpp=str(csv)) as s:
        assert s.mpp == pytest.approx(0.3)
    assert load_mpp_table(csv) == {"synth": 0.3}
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,mpp\nx,abc\n")
    with pytest.raises(GigaslideError, match="not a positive finite number"):
        load_mpp_table(bad)


def test_mpp_table_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path, synthetic_slide):
    csv = tmp_path / "mpp.csv"
    csv.write_bytes("slide_id,mpp\r\nsynth,0.25\r\n".encode("utf-8-sig"))  # Excel's "CSV UTF-8"
    assert load_mpp_table(csv) == {"synth": 0.25}
    with open_slide(synthetic_slide, mpp=str(csv)) as s:
        assert s.mpp == 0.25 and s.mpp_info.source == "override"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("slide_id,mpp\nl\xe9sion,0.25\n".encode("latin-1"))
    with pytest.raises(GigaslideError, match="not UTF-8") as e:
        load_mpp_table(latin)
    assert "latin.csv" in str(e.value) and "\n" not in e.value.one_line()


@pytest.mark.parametrize("column", ["path", "filename"])
def test_mpp_table_file_names_give_the_slide_ids_slides_get(tmp_path, column):
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"{column},mpp\n/data/x.ome.tif,0.25\ny.ome.tiff,0.5\nz.svs,0.3\nw.tiff,0.4\n")
    assert load_mpp_table(csv) == {"x": 0.25, "y": 0.5, "z": 0.3, "w": 0.4}
    assert slide_id_from_path(Path("/data/x.ome.tif")) == "x"


def test_metadata_a_reader_has_no_value_for_is_left_out(synthetic_slide, monkeypatch):
    import tiffslide

    import gigaslide.slides.slide as slide_mod

    monkeypatch.setattr(slide_mod, "open_backend", lambda p: (tiffslide.TiffSlide(str(p)), "tiffslide"))
    with open_slide(synthetic_slide) as s:
        assert s.backend == "tiffslide" and s._handle.properties["tiffslide.vendor"] is None
        assert "None" not in s.properties.values() and "tiffslide.vendor" not in s.properties
        assert s.vendor == "tiffslide" and s.info()["vendor"] == "tiffslide"


def test_mpp_from_tiff_tags_ignores_72_dpi():
    assert mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}) is None
    m = mpp_from_properties({"tiff.XResolution": "40000", "tiff.YResolution": "40000", "tiff.ResolutionUnit": "centimeter"})
    assert m is not None and m.x == pytest.approx(0.25) and m.source == "tiff.Resolution"
    assert mpp_from_properties({"aperio.MPP": "0.2527"}).x == pytest.approx(0.2527)


def test_no_mpp_slide_refused_with_fix(tmp_path):
    p = make_slide(tmp_path / "nompp.tiff", (600, 600), mpp=None)
    with open_slide(p) as s:
        assert not s.has_mpp
        with pytest.raises(GigaslideError) as e:
            _ = s.mpp
    assert "--slide-mpp" in str(e.value) and "nompp.tiff" in str(e.value)


def test_find_slides(tmp_path, synthetic_slide):
    (tmp_path / "a").mkdir()
    make_slide(tmp_path / "a" / "x.tiff", (300, 300))
    (tmp_path / "a" / "notes.txt").write_text("x")
    assert [p.name for p in find_slides([tmp_path / "a"])] == ["x.tiff"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(GigaslideError, match="no slide files"):
        find_slides([tmp_path / "empty"])
    with pytest.raises(GigaslideError, match="not found"):
        find_slides([tmp_path / "missing.svs"])


# --- real formats from ../shared/data/slides -------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("name,dims,mpp", [
    ("cmu-1-small-region.svs", (2220, 2967), 0.499),
    ("tcga-cr-7395-01a-01-ts1.svs", (4443, 3567), None),
    ("kidney-48-5.tif", (1493, 901), None),
    ("formats/boxes.tiff", (300, 250), None),  # 72-dpi style tags (352 µm/px) are ignored
    ("formats/boxes_0.dcm", (16, 16), 0.499),
    ("formats/small.svs", None, 0.499),
])
def test_real_formats_open(real_slides, name, dims, mpp):
    with open_slide(real_slides / name) as s:
        if dims:
            assert s.dimensions == dims
        assert s.has_mpp == (mpp is not None)
        if mpp:
            assert s.mpp == pytest.approx(mpp, rel=1e-3)
    # every format reads pixels at a physical resolution (an mpp override where the file has none)
    with open_slide(real_slides / name, mpp=None if mpp else 0.5) as s:
        w, h = s.dimensions
        region = s.read_region((max(0, w // 2 - 8), max(0, h // 2 - 8)), (16, 16), s.mpp)
        assert region.shape == (16, 16, 3) and region.dtype == np.uint8 and region.max() > 0  # real pixels, not zeros


@pytest.mark.realdata
def test_dicom_folder_is_one_slide(real_slides):
    found = find_slides([real_slides / "formats"])
    assert sum(p.suffix == ".dcm" for p in found) == 1


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["corrupt/unopenable.tiff"])
def test_unopenable_gives_one_line(real_slides, name):
    with pytest.raises(GigaslideError) as e:
        open_slide(real_slides / name)
    msg = str(e.value)
    assert "unopenable.tiff" in msg and "fix:" in msg and "\n" not in msg
