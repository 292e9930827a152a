"""Review round 5: two ``nuclei`` processes on one --out share its slides and never delete each other's files."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gigaslide.locks import ItemLock
from gigaslide.nuclei import slide as nslide

from .test_slide import _disc_slide, _oracle

P = nslide.SlideParams(region=128, margin=24, tissue_only=False, window=128, tile_size=64)


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nslide, "segment", _oracle)


def test_a_run_leaves_the_temporaries_of_another_live_run_alone(tiny_run: Path, tmp_path: Path, oracle: None) -> None:
    """Every temporary file in OUT/nuclei was deleted when a run started: a second process started on the same --out
    removed the first one's half-written outputs, and the first then failed ("a file disappeared ... restore it")."""
    _disc_slide(tmp_path / "s.tiff", size=300)
    d = tmp_path / "out" / "nuclei"
    d.mkdir(parents=True)
    theirs = d / ".tmp-other.geojson.abc123.geojson"  # another process's slide, being written
    theirs.write_text("{")
    killed = [d / ".tmp-s.geojson.k1.geojson", d / ".tmp-s.csv.k2.csv", d / ".tmp-manifest.json.k3"]
    for f in killed:  # a killed run's: this slide's and the manifest's
        f.write_text("x")
    assert nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", P).done == ["s"]
    assert theirs.read_text() == "{"
    assert not any(f.exists() for f in killed)


def test_a_slide_another_process_is_segmenting_is_waited_for_and_not_done_twice(
        tiny_run: Path, tmp_path: Path, oracle: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without per-slide locks both processes segmented every slide (twice the work, and the writes raced)."""
    monkeypatch.setattr(nslide, "LOCK_POLL_S", 0.05)
    _disc_slide(tmp_path / "a.tiff", size=300)
    shutil.copy(tmp_path / "a.tiff", tmp_path / "b.tiff")
    out = tmp_path / "out"
    ref = nslide.segment_slides([tmp_path / "a.tiff"], tiny_run / "run", tmp_path / "ref", P)
    other = ItemLock(out / "nuclei" / nslide.LOCKS_DIR, "a")  # a live process holds slide a
    assert other.acquire()
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(res=nslide.segment_slides(
        [tmp_path / "a.tiff", tmp_path / "b.tiff"], tiny_run / "run", out, P)))
    th.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "nuclei" / "b.json").is_file():
        time.sleep(0.05)
    assert th.is_alive() and not (out / "nuclei" / "a.json").exists()  # b done, a still held by the other process
    for f in ("a.geojson", "a.csv", "a_tiles.h5", "a.json"):  # the other process finishes a
        shutil.copy(tmp_path / "ref" / "nuclei" / f, out / "nuclei" / f)
    other.release()
    th.join(120)
    res = box["res"]
    assert res.done == ["b"] and res.skipped == ["a"] and not res.failed
    assert res.nuclei == ref.nuclei
    assert not list((out / "nuclei" / nslide.LOCKS_DIR).glob("*.lock"))


def test_a_lock_left_by_a_killed_process_is_taken_over(tiny_run: Path, tmp_path: Path, oracle: None) -> None:
    _disc_slide(tmp_path / "s.tiff", size=300)
    locks = tmp_path / "out" / "nuclei" / nslide.LOCKS_DIR
    locks.mkdir(parents=True)
    (locks / "s.lock").write_text('{"pid": 999999999, "host": "%s", "start": "0", "time": 0}'
                                  % __import__("socket").gethostname())
    res = nslide.segment_slides([tmp_path / "s.tiff"], tiny_run / "run", tmp_path / "out", P)
    assert res.done == ["s"] and np.isfinite(res.seconds)


def test_two_slides_of_one_id_are_refused_and_one_given_twice_is_segmented_once(tiny_run: Path, tmp_path: Path,
                                                                               oracle: None) -> None:
    """a/x.tiff and b/x.tiff (two files, the same size) both write OUT/nuclei/x.*: the second was skipped as done,
    its nuclei never found, and the run said "1 done, 1 skipped"; the same file by two paths is one slide."""
    from gigaslide.errors import GigaslideError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _disc_slide(tmp_path / "a" / "x.tiff", size=300)
    _disc_slide(tmp_path / "b" / "x.tiff", size=300)
    with pytest.raises(GigaslideError) as e:
        nslide.segment_slides([tmp_path / "a" / "x.tiff", tmp_path / "b" / "x.tiff"], tiny_run / "run",
                              tmp_path / "out", P)
    assert "two slides have the id 'x'" in e.value.one_line() and not (tmp_path / "out").exists()
    res = nslide.segment_slides([tmp_path / "a" / "x.tiff", tmp_path / "a" / ".." / "a" / "x.tiff"], tiny_run / "run",
                                tmp_path / "out", P)
    assert res.done == ["x"] and not res.skipped
