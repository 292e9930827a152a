"""Round 7: two builds of one mosaic folder (at once, or one killed and resumed with other settings)."""

import csv
import threading
import time

import pytest

from gigaslide.errors import GigaslideError
from gigaslide.locks import exclusive_file
from gigaslide.mil import mosaic
from gigaslide.mil.mosaic import MosaicConfig, build_mosaic, read_ground_truth
from gigaslide.testing import make_tile_folder


def _tiles(tmp_path):
    return make_tile_folder(tmp_path / "tiles", 3, size=16, classes=("0", "1"), noise=0)


def test_a_second_build_waits_for_the_first_and_leaves_its_files_alone(tmp_path):
    """A second build started while another wrote the folder removed that build's slide being written (its rename
    then failed with a bare FileNotFoundError) and wrote beside it: it now waits for the lock the first holds."""
    tiles, out = _tiles(tmp_path), tmp_path / "m"
    (out / "slides").mkdir(parents=True)
    writing = out / "slides" / ".tmp-mosaic_0000.tiff.live1.tiff"  # the first build's slide, being written
    writing.write_bytes(b"II*\0")
    done = threading.Event()
    errors = []

    def second():
        try:
            build_mosaic(tiles, out, MosaicConfig(slides=4, grid=6), verbose=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
        done.set()

    with exclusive_file(out / mosaic.LOCK):  # the first build holds the folder
        th = threading.Thread(target=second)
        th.start()
        time.sleep(1.0)
        assert writing.exists() and not done.is_set()
        assert not (out / "labels.csv").exists()
        writing.unlink()  # the first build's rename
    th.join(60)
    assert done.is_set() and not errors
    assert len(list((out / "slides").glob("*.tiff"))) == 4 and (out / "mosaic.json").is_file()
    assert not (out / mosaic.LOCK).exists() and not (out / mosaic.BUILDING).exists()


def test_a_build_killed_half_way_resumes_only_with_its_own_settings(tmp_path, monkeypatch):
    """mosaic.json (the settings a re-run is checked against) is written last: a build killed half-way and re-run
    with another seed kept the dead build's slides under the new build's labels (a slide labelled 0 holding tumour)."""
    from gigaslide.slides import writer

    tiles, out = _tiles(tmp_path), tmp_path / "m"
    real, calls = writer.write_array_as_slide, []

    def dies_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(writer, "write_array_as_slide", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_mosaic(tiles, out, MosaicConfig(slides=6, grid=6, seed=0), verbose=False)
    monkeypatch.setattr(writer, "write_array_as_slide", real)
    assert len(list((out / "slides").glob("*.tiff"))) == 2
    with pytest.raises(GigaslideError, match=r"partly built with other settings \(seed 0 -> 1\)"):
        build_mosaic(tiles, out, MosaicConfig(slides=6, grid=6, seed=1), verbose=False)
    assert mosaic.settings_diff(out / "mosaic.json", MosaicConfig(slides=6, grid=6, seed=1)) == {"seed": (0, 1)}
    build_mosaic(tiles, out, MosaicConfig(slides=6, grid=6, seed=0), verbose=False)  # the same settings resume
    assert not (out / mosaic.BUILDING).exists()
    build_mosaic(tiles, tmp_path / "fresh", MosaicConfig(slides=6, grid=6, seed=0), verbose=False)
    assert (out / "labels.csv").read_text() == (tmp_path / "fresh" / "labels.csv").read_text()
    with open(out / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            gt = read_ground_truth(out / "ground_truth" / f"{row['slide_id']}.csv")
            assert int(gt[:, 3].sum() > 0) == int(row["label"])
