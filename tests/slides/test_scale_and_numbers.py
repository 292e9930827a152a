"""Counts at scale (discovery of many slides, an mpp CSV with a row per slide, slides that fail to open) and degenerate
numbers (non-finite and absurd resolutions)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.slides import Slide, find_slides, load_mpp_table, mpp_from_properties, open_slide
from gigaslide.slides import mpp as mpp_mod
from gigaslide.testing import make_slide


def test_find_slides_resolves_each_folder_once_not_each_file(tmp_path, monkeypatch):
    """Deduplicating by resolved path lstat-ed every part of every file's path (7 calls a file here; 73,000 for
    10,000 slides, 1.5 s locally, minutes on a network file system); each folder is resolved once now, and a
    symlinked file or folder still counts once."""
    root = tmp_path / "cohort"
    for i in range(120):
        d = root / f"site{i % 3}" / f"case{i % 12:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"s{i:03d}.svs").touch()
    os.symlink(root / "site0" / "case00" / "s000.svs", root / "site0" / "case00" / "z_link.svs")  # the same file
    os.symlink(root / "site1", root / "z_site1_again")  # the same folder
    calls = []
    real = Path.resolve
    monkeypatch.setattr(Path, "resolve", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    found = find_slides([root])
    monkeypatch.undo()
    assert len(found) == 120 and found == sorted(found)
    assert root / "site0" / "case00" / "z_link.svs" not in found
    assert not [p for p in found if "z_site1_again" in p.parts]
    assert len(calls) <= 16 + 1, f"{len(calls)} paths resolved for 120 slides in 16 folders, one a link"


def test_an_mpp_csv_is_read_once_for_all_slides_and_again_when_edited(tmp_path, monkeypatch):
    """Every slide opened re-read the whole CSV (one row per slide: 67 ms a slide at 10,000 rows, quadratic)."""
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\n" + "".join(f"s{i},0.25\n" for i in range(50)))
    reads = []
    real = mpp_mod.load_mpp_table
    monkeypatch.setattr(mpp_mod, "load_mpp_table", lambda p: reads.append(p) or real(p))
    assert [mpp_mod.resolve_override(str(csv), f"s{i}") for i in range(50)] == [0.25] * 50
    assert len(reads) == 1
    csv.write_text("slide_id,mpp\ns0,0.5\n")  # a corrected table is read again (its size and times changed)
    os.utime(csv, ns=(1, 1))  # even one whose mtime was set back (cp -p of an older copy)
    assert mpp_mod.resolve_override(str(csv), "s0") == 0.5
    assert mpp_mod.resolve_override(str(csv), "s1") is None
    assert len(reads) == 2


@pytest.mark.parametrize(("row", "message"), [
    ("inf", "not a positive finite number"),  # was taken: tiling failed with OverflowError, info printed "inf x inf"
    ("1e400", "not a positive finite number"),
    ("nan", "not a positive finite number"),
    ("0.00025", "0.00025 µm/px is outside"),  # in mm
])
def test_a_csv_resolution_that_is_no_scan_resolution_names_the_row(tmp_path, row, message):
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"slide_id,mpp\ngood,0.25\nsynth,{row}\n")
    with pytest.raises(GigaslideError) as e:
        load_mpp_table(csv)
    assert message in e.value.one_line() and "synth" in e.value.one_line() and "mpp.csv" in e.value.one_line()


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e-7", "5000"])
def test_slide_given_a_resolution_that_is_no_scan_resolution_refuses_it(synthetic_slide, value):
    with pytest.raises(GigaslideError, match="--slide-mpp"):
        Slide(synthetic_slide, mpp=value)


@pytest.mark.parametrize("props", [
    {"openslide.mpp-x": "inf", "openslide.mpp-y": "inf"},
    {"openslide.mpp-x": "nan", "openslide.mpp-y": "nan", "aperio.MPP": "NaN"},
    {"openslide.mpp-x": "0", "openslide.mpp-y": "0"},
    {"tiff.XResolution": "inf", "tiff.YResolution": "inf", "tiff.ResolutionUnit": "centimeter"},
    {"tiff.XResolution": "0", "tiff.YResolution": "0", "tiff.ResolutionUnit": "centimeter"},
    {"openslide.mpp-x": "10000000", "openslide.mpp-y": "10000000"},
])
def test_metadata_without_a_usable_resolution_gives_none(props):
    assert mpp_from_properties(props) is None


def _stripped_tiff_no_reader_decodes(path: Path) -> Path:
    """A stripped (not tiled) JPEG TIFF whose strip is zeroed: OpenSlide refuses it, tiffslide and the plain-image
    reader open it and fail on its pixels."""
    import tifffile

    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (64, 64, 3), np.uint8), photometric="rgb", compression="jpeg",
                     rowsperstrip=64)
    with tifffile.TiffFile(path) as t:
        off, n = int(t.pages[0].dataoffsets[0]), int(t.pages[0].databytecounts[0])
    b = bytearray(path.read_bytes())
    b[off + 2: off + n] = bytes(n - 2)
    path.write_bytes(bytes(b))
    return path


def _open_fds_of(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve())
        except OSError:
            pass
    return n


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_slide_no_reader_opens_leaves_no_file_open(tmp_path):
    """A fallback reader that opened the file and failed on its pixels kept it open until a garbage collection:
    one descriptor per damaged slide of a batch (ulimit -n 1024)."""
    bad = _stripped_tiff_no_reader_decodes(tmp_path / "bad.tif")
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            with pytest.raises(GigaslideError, match="no reader could open"):
                open_slide(bad)
        assert _open_fds_of(bad) == 0
    finally:
        gc.enable()


def test_a_constant_black_slide_reads_as_itself(tmp_path):
    """A pure black (or white) slide: the reader gives its own pixels, neither background nor NaN (uint8 always)."""
    from gigaslide.slides import iter_tiles
    from gigaslide.slides.writer import write_array_as_slide

    p = write_array_as_slide(tmp_path / "black.tiff", np.zeros((600, 700, 3), np.uint8), mpp=0.5, compression="none")
    tiles = list(iter_tiles(p, [(0, 0), (256, 256), (640, 0)], 128, 0.5))
    assert tiles[0].max() == 0 and tiles[1].max() == 0
    assert (tiles[2][:, :60] == 0).all() and (tiles[2][:, 60:] == 255).all()  # past the slide's edge: glass
    dark = list(iter_tiles(p, [(640, 0)], 128, 0.5, background="dark"))[0]
    assert dark.max() == 0
    with open_slide(make_slide(tmp_path / "white.tiff", (600, 500), blank=True)) as s:
        thumb, _ = s.thumbnail(64)
        assert thumb.dtype == np.uint8 and thumb.min() > 200


@pytest.mark.parametrize(("resolution", "unit", "said"), [
    (((1, 1000), (1, 1000)), "CENTIMETER", "openslide.mpp-x 1e+07 µm/px"),  # absurd: 1 px per 10 m
    ((72, 72), "INCH", "openslide.mpp-x 352.8 µm/px"),  # an image writer's 72-dpi default
    (((0, 1), (0, 1)), "CENTIMETER", "tiff.XResolution 0 px per centimeter"),
])
def test_a_resolution_the_metadata_states_but_is_not_used_is_named(tmp_path, resolution, unit, said):
    """The file states a resolution no microscope scans at: the error said only 'no resolution in its metadata', and
    `gigaslide info` 'unknown', while the file has one; both now name the value that was set aside."""
    import tifffile

    p = tmp_path / "odd.tiff"
    tifffile.imwrite(p, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     compression="jpeg", resolution=resolution, resolutionunit=unit)
    with open_slide(p) as s:
        assert not s.has_mpp and s.info()["mpp_ignored"] == said
        with pytest.raises(GigaslideError) as e:
            s.check_target_mpp(0.5)
    assert f"its {said} is not a microscope's (0.05-20 µm/px)" in e.value.one_line()
    assert "--slide-mpp" in e.value.one_line()
